"""Runtime and server benchmarks: per-step latency against a bare onnxruntime loop, batched streams, the server.

Models, exported from ``rnndeploy.SequenceModel`` with random weights as ``rnndeploy export`` writes them, each
also as ``quantize_int8`` (DynamicQuantizeLSTM; a GRU keeps its fp32 recurrence, its head is quantized):

- ``lstm-2x256``: the demo's kind of model, a character LSTM LM, 2 x 256, embedding 64, vocabulary 103;
- ``gru-1x64``: a GRU forecaster, 1 x 64, one feature in and out (with ``rnndeploy.data_stats``);
- ``lstm-2x512``: a character LSTM LM, 2 x 512, embedding 64, vocabulary 103.

Per-step latency, batch 1, 1 and 2 intra-op threads, the same session options on every side: a bare
``InferenceSession.run`` loop that feeds the state back by hand, ``StreamingSession.step`` as it runs by
default (state in bound ping-pong buffers on the CPU), and ``StreamingSession.step`` with ``io_binding=False``
(one ``run()`` per step). The forecaster runs with ``normalize=False`` there (the bare loop does not
normalise either); one more row shows the cost of original units. The cases run in alternating blocks of
``steps`` steps; a case's figure is the median of its block medians, so load from other processes hits all
cases alike. torch eager runs the demo-size model. Streams: 64 streams in one ``step_many`` call (and one
``step_stacked`` call) against one
bare ``run()`` on the stacked batch, and batched against one ``step`` call per stream. The server (demo-size
model) is driven by two clients: tritonclient.http threads and rnndeploy.bench.load (asyncio); and one
server with its default batcher, HTTP and gRPC on, by the stock clients of each protocol (tritonclient.http,
tritonclient.grpc unary ``infer``, tritonclient.grpc a stream per sequence), through rnndeploy.bench.serving:
per-step latency at 1 sequence and steps per second at 16 and 64.
Then each model as a one-step graph (fp32, int8) against its sequence graph (`rnndeploy.bench.forms`).
Prints tables and writes runtime.json, runtime.csv and runtime.png (and step-graph.*) into ``out`` (default:
./bench-results).

    python benchmarks/bench_runtime.py [--quick] [--out DIR]     or     rnndeploy bench runtime [--quick]
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rnndeploy.bench.serving import Server, free_port, protocol_load, run_load
from rnndeploy.provenance import git_commit
from rnndeploy.runtime import StreamingSession, default_session_options

VOCAB = [chr(ord(" ") + i) for i in range(103)]
DEFAULT_OUT = Path("bench-results")
STREAMS = 64


def export_models(folder: Path) -> dict[str, dict[str, Path]]:
    """``{model name: {"fp32": path, "int8": path}}`` for the three benchmark models, exported into ``folder``."""
    import torch

    from rnndeploy.export import export_onnx, quantize_int8
    from rnndeploy.models import ModelConfig, SequenceModel

    configs = {
        "lstm-2x256": ModelConfig(
            task="lm", cell="lstm", vocab_size=len(VOCAB), embed_dim=64, hidden_size=256, num_layers=2
        ),
        "gru-1x64": ModelConfig(
            task="regression", cell="gru", input_size=1, output_size=1, embed_dim=16, hidden_size=64
        ),
        "lstm-2x512": ModelConfig(
            task="lm", cell="lstm", vocab_size=len(VOCAB), embed_dim=64, hidden_size=512, num_layers=2
        ),
    }
    torch.manual_seed(0)
    paths = {}
    for name, config in configs.items():
        fp32 = folder / f"{name}.onnx"
        lm = config.task == "lm"
        stats = None if lm else {"mean": [350.0], "std": [20.0]}
        export_onnx(SequenceModel(config).eval(), fp32, vocab=VOCAB if lm else None, data_stats=stats)
        int8 = folder / f"{name}.int8.onnx"
        quantize_int8(fp32, int8)
        paths[name] = {"fp32": fp32, "int8": int8}
    return paths


def step_input(session: ort.InferenceSession, batch: int = 1) -> np.ndarray:
    """One step's input with the batch axis: a token id ``[B, 1]`` or a feature ``[B, 1, 1]``."""
    first = session.get_inputs()[0]
    if first.type == "tensor(int64)":
        return np.full((batch, 1), 5, np.int64)
    return np.full((batch, 1, 1), 0.25, np.float32)


def bare_loop(path: Path, threads: int, batch: int = 1) -> Callable[[], object]:
    """A step of a hand-written ``InferenceSession.run`` loop: inputs and state in a dict, state fed back."""
    session = ort.InferenceSession(
        str(path), default_session_options(threads), providers=["CPUExecutionProvider"]
    )
    inputs = session.get_inputs()
    x = step_input(session, batch)
    feed = {inputs[0].name: x}
    for arg in inputs[1:]:
        feed[arg.name] = np.zeros([d if isinstance(d, int) else batch for d in arg.shape], np.float32)
    states = [arg.name for arg in inputs[1:]]

    def step() -> None:
        outs = session.run(None, feed)
        for name, value in zip(states, outs[1:], strict=True):
            feed[name] = value

    return step


def quantiles(samples_s: list[float]) -> dict[str, float]:
    """Median and 0.2 / 0.8 / 0.99 quantiles in microseconds."""
    q = np.quantile(np.asarray(samples_s) * 1e6, [0.5, 0.2, 0.8, 0.99])
    return {"p50_us": q[0], "p20_us": q[1], "p80_us": q[2], "p99_us": q[3]}


def alternate(cases: dict[str, Callable[[], object]], steps: int, blocks: int) -> dict[str, dict[str, float]]:
    """Times ``cases`` in alternating blocks of ``steps`` calls; per case: the median of the block medians
    (``us``) and the quantiles of all calls."""
    for step in cases.values():
        for _ in range(min(steps, 50)):
            step()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    medians: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(blocks):
        for name, step in cases.items():
            block = []
            for _ in range(steps):
                start = time.perf_counter()
                step()
                block.append(time.perf_counter() - start)
            samples[name] += block
            medians[name].append(float(np.median(block)) * 1e6)
    return {name: {"us": float(np.median(medians[name])), **quantiles(samples[name])} for name in cases}


def bench_latency(models: dict[str, dict[str, Path]], steps: int, blocks: int) -> list[dict]:
    """Per-step latency at batch 1 of every model, fp32 and int8, 1 and 2 threads (see the module docstring)."""
    rows = []
    for model, paths in models.items():
        for precision, path in paths.items():
            for threads in (1, 2):
                x = step_input(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
                bound = StreamingSession(path, providers="cpu", threads=threads, normalize=False)
                unbound = StreamingSession(
                    path, providers="cpu", threads=threads, normalize=False, io_binding=False
                )
                cases = {
                    "bare run() loop": bare_loop(path, threads),
                    "StreamingSession.step": partial(bound.step, x),
                    "StreamingSession.step io_binding=False": partial(unbound.step, x),
                }
                if bound.metadata.get("rnndeploy.data_stats", "{}") != "{}" and precision == "fp32":
                    units = StreamingSession(path, providers="cpu", threads=threads)
                    cases["StreamingSession.step original units"] = partial(units.step, x)
                for case, stats in alternate(cases, steps, blocks).items():
                    rows.append(
                        {"model": model, "precision": precision, "threads": threads, "case": case, **stats}
                    )
                print(f"  latency {model} {precision} {threads} thread(s) done", file=sys.stderr)
    return rows


def bench_torch(steps: int, blocks: int) -> list[dict]:
    """torch eager ``SequenceModel`` on the demo-size model, fp32, 1 and 2 threads."""
    import torch

    from rnndeploy.models import ModelConfig, SequenceModel

    config = ModelConfig(
        task="lm", cell="lstm", vocab_size=len(VOCAB), embed_dim=64, hidden_size=256, num_layers=2
    )
    model = SequenceModel(config).eval()
    x = torch.tensor([[5]])
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        state = {"s": model.init_state(1)}

        def step(state=state) -> None:
            with torch.inference_mode():
                _, state["s"] = model(x, state["s"])

        stats = alternate({"torch eager SequenceModel": step}, max(steps // 4, 50), blocks)
        for case, values in stats.items():
            rows.append(
                {"model": "lstm-2x256", "precision": "fp32", "threads": threads, "case": case, **values}
            )
    return rows


def bench_step_many(models: dict[str, dict[str, Path]], steps: int, blocks: int) -> list[dict]:
    """``STREAMS`` streams in one ``step_many`` call (one array per stream) and in one ``step_stacked`` call
    (their rows already stacked), the same streams every call as a busy server steps them, against one bare
    ``run()`` on the stacked batch; fp32, 1 thread. ``us`` is per call."""
    rows = []
    for model, paths in models.items():
        session = StreamingSession(paths["fp32"], providers="cpu", normalize=False)
        stacked = StreamingSession(paths["fp32"], providers="cpu", normalize=False)
        x = step_input(ort.InferenceSession(str(paths["fp32"]), providers=["CPUExecutionProvider"]))
        xs = {s: x.copy() for s in range(STREAMS)}
        cases = {
            f"bare run() on the stacked batch of {STREAMS}": bare_loop(paths["fp32"], 1, STREAMS),
            f"step_many, {STREAMS} streams": partial(session.step_many, xs),
            f"step_stacked, {STREAMS} streams": partial(
                stacked.step_stacked, list(xs), np.concatenate(list(xs.values()))
            ),
        }
        for case, stats in alternate(cases, max(steps // 10, 20), blocks).items():
            rows.append({"model": model, "streams": STREAMS, "case": case, **stats})
    return rows


def bench_streams(path: Path, counts: list[int], rounds: int) -> list[dict]:
    """Steps per second for N streams of the demo-size model: one batched step_many call vs one step call per
    stream."""
    rows = []
    rng = np.random.default_rng(0)
    for n in counts:
        xs = {s: rng.integers(0, len(VOCAB), (1, 1)) for s in range(n)}
        batched = StreamingSession(path, providers="cpu")
        separate = StreamingSession(path, providers="cpu")
        cases = {
            "batched step_many": partial(batched.step_many, xs),
            "one step per stream": partial(_one_by_one, separate, xs),
        }
        for mode, stats in alternate(cases, max(rounds // n, 5), 3).items():
            rows.append({"streams": n, "mode": mode, "steps_per_s": n / (stats["us"] * 1e-6), **stats})
    return rows


def _one_by_one(session: StreamingSession, xs: dict) -> None:
    for stream, x in xs.items():
        session.step(x, stream=stream)


CLIENTS = {
    "tritonclient": "rnndeploy.bench.load --client tritonclient: tritonclient.http, a thread per sequence",
    "aiohttp": "rnndeploy.bench.load --client aiohttp: asyncio + aiohttp, all sequences on one loop",
}


def bench_server(model_path: Path, concurrency: list[int], steps: int, repeats: int) -> list[dict]:
    """`rnndeploy serve` batched and unbatched side by side, driven by two clients (see ``CLIENTS``).

    Both clients send the same KServe v2 requests (binary tensor data); each mode is measured with the same
    client. Each mode runs with batches in the server's worker thread (the default) and on its event loop
    (``--no-worker-thread``). The servers are measured in turn, ``repeats`` times per client and
    concurrency, and the median throughput is kept, so load from other processes hits all modes alike.
    """
    batched = ["--max-batch-size", "64", "--max-queue-delay-us", "500"]
    unbatched = ["--max-batch-size", "1", "--max-queue-delay-us", "0"]
    modes = {
        "batched": batched,
        "unbatched": unbatched,
        "batched no_worker_thread": [*batched, "--no-worker-thread"],
        "unbatched no_worker_thread": [*unbatched, "--no-worker-thread"],
    }
    servers, ports = {}, {}
    try:
        for mode, flags in modes.items():
            ports[mode] = free_port()
            command = [
                sys.executable,
                "-m",
                "rnndeploy",
                "serve",
                str(model_path),
                "--name",
                "lm",
                "--grpc-port",
                "0",
            ]
            servers[mode] = subprocess.Popen(
                command + ["--port", str(ports[mode]), "--log-level", "warning", "--provider", "cpu", *flags],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        for mode, server in servers.items():
            _wait_ready(server, ports[mode])
            _client_load("aiohttp", ports[mode], 8, 20)  # warm-up: first runs, connection set-up
        rows = []
        for n in concurrency:
            for client in CLIENTS:
                rates: dict[str, list[float]] = {mode: [] for mode in modes}
                latencies: dict[str, list[float]] = {mode: [] for mode in modes}
                for _ in range(repeats):
                    for mode in modes:
                        rate, samples = _client_load(client, ports[mode], n, steps)
                        rates[mode].append(rate)
                        latencies[mode].extend(samples)
                for mode in modes:
                    rate = float(np.median(rates[mode]))
                    rows.append(
                        {
                            "client": client,
                            "mode": mode,
                            "sequences": n,
                            "steps_per_s": rate,
                            **quantiles(latencies[mode]),
                        }
                    )
    finally:
        for server in servers.values():
            server.terminate()
            server.wait(30)
    return rows


PROTOCOL_CLIENTS = {
    "tritonclient": "HTTP: tritonclient.http infer, a thread and a client per sequence",
    "grpc-unary": "gRPC: tritonclient.grpc infer (unary), a thread and a client per sequence",
    "grpc-stream": "gRPC: tritonclient.grpc start_stream / async_stream_infer, a stream per sequence",
}


def bench_protocols(model_path: Path, concurrency: list[int], steps: int, repeats: int) -> list[dict]:
    """One `rnndeploy serve` (default batcher, worker thread) on HTTP and gRPC, driven by ``PROTOCOL_CLIENTS``.

    Each load runs in a fresh client process (``rnndeploy.bench.serving.protocol_load``); the clients take
    turns, ``repeats`` times per concurrency, and the run with the median steps/s is kept.
    """
    server = Server(model_path, "--grpc-port", str(free_port()))
    rows = []
    try:
        for client in PROTOCOL_CLIENTS:  # warm-up: first runs, connection set-up
            protocol_load(server, client, 1, 20)
        for n in concurrency:
            runs: dict[str, list[dict]] = {client: [] for client in PROTOCOL_CLIENTS}
            for _ in range(repeats):
                for client in PROTOCOL_CLIENTS:
                    runs[client].append(protocol_load(server, client, n, steps))
            for measured in runs.values():
                ranked = sorted(measured, key=lambda row: row["steps_per_s"])
                rows.append({**ranked[len(ranked) // 2], "repeats": len(ranked)})
    finally:
        server.stop()
    return rows


def _client_load(client: str, port: int, sequences: int, steps: int) -> tuple[float, list[float]]:
    """Steps per second and step latencies (s) measured by rnndeploy.bench.load in a fresh process."""
    result = run_load(client, port, sequences, steps, len(VOCAB))
    return result["steps_per_s"], [x * 1e-6 for x in result["latencies_us"]]


def _wait_ready(server: subprocess.Popen, port: int) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            raise RuntimeError(f"the server on port {port} did not start")
        time.sleep(0.1)


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    import torch

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "torch": torch.__version__,
        "commit": git_commit(Path(__file__).resolve().parent),
        "models": "lstm-2x256 (LM, embed 64, vocab 103), gru-1x64 (forecaster, 1 feature), lstm-2x512 (LM)",
    }


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n{title}")
    widths = [max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(_fmt(row[c]).ljust(w) for c, w in zip(columns, widths, strict=True)))


def _fmt(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def add_ratios(latency: list[dict], step_many: list[dict]) -> None:
    """``vs_bare``: each row's time over the bare loop's with the same model, precision and threads."""
    bare = {
        (r["model"], r["precision"], r["threads"]): r["us"] for r in latency if r["case"] == "bare run() loop"
    }
    for r in latency:
        key = (r["model"], r["precision"], r["threads"])
        r["vs_bare"] = r["us"] / bare[key] if key in bare else float("nan")
    stacked = {r["model"]: r["us"] for r in step_many if r["case"].startswith("bare")}
    for r in step_many:
        r["per_stream_us"] = r["us"] / r["streams"]
        r["vs_bare"] = r["us"] / stacked[r["model"]]


def summarize(
    latency: list[dict], step_many: list[dict], streams: list[dict], server: list[dict], protocols: list[dict]
) -> dict:
    """The ratios the README quotes. ``step_vs_bare_*``: StreamingSession.step (default) over the bare
    loop; ``iobinding_vs_run_*``: the default (bound) step over the io_binding=False step;
    ``grpc_*_vs_http_*``: a gRPC client's p50 step latency (1 sequence) or steps/s over tritonclient.http's."""
    us = {(r["model"], r["precision"], r["threads"], r["case"]): r["us"] for r in latency}
    summary = {}
    for model, precision, threads, case in us:
        if case != "bare run() loop":
            continue
        tag = f"{model}_{precision}_{threads}thread{'s' if threads > 1 else ''}"
        step = us[(model, precision, threads, "StreamingSession.step")]
        summary[f"step_vs_bare_{tag}"] = step / us[(model, precision, threads, case)]
        summary[f"iobinding_vs_run_{tag}"] = (
            step / us[(model, precision, threads, "StreamingSession.step io_binding=False")]
        )
    for threads in (1, 2):
        torch_us = us.get(("lstm-2x256", "fp32", threads, "torch eager SequenceModel"))
        if torch_us:
            suffix = f"{threads}thread{'s' if threads > 1 else ''}"
            for precision in ("fp32", "int8"):
                step = us[("lstm-2x256", precision, threads, "StreamingSession.step")]
                summary[f"speedup_{precision}_vs_torch_eager_fp32_{suffix}"] = torch_us / step
    for r in step_many:
        if not r["case"].startswith("bare"):
            method = r["case"].split(",")[0]
            summary[f"{method}_{STREAMS}_vs_stacked_run_{r['model']}"] = r["vs_bare"]
    rate = {(r["streams"], r["mode"]): r["steps_per_s"] for r in streams}
    for n in sorted({r["streams"] for r in streams}):
        summary[f"batched_speedup_{n}_streams"] = (
            rate[(n, "batched step_many")] / rate[(n, "one step per stream")]
        )
    serve = {(r["client"], r["sequences"], r["mode"]): r["steps_per_s"] for r in server}
    for variant in ("", " no_worker_thread"):
        for client in CLIENTS:
            for n in sorted({r["sequences"] for r in server}):
                key = f"server_batched_speedup_{n}_sequences_{client}{variant.replace(' ', '_')}"
                summary[key] = (
                    serve[(client, n, "batched" + variant)] / serve[(client, n, "unbatched" + variant)]
                )
    by = {(r["client"], r["sequences"]): r for r in protocols}
    for client in ("grpc-unary", "grpc-stream"):
        for n in sorted({r["sequences"] for r in protocols}):
            grpc, http = by[(client, n)], by[("tritonclient", n)]
            tag = client.replace("-", "_")
            if n == 1:
                summary[f"{tag}_vs_http_p50_1_sequence"] = grpc["p50_us"] / http["p50_us"]
            else:
                summary[f"{tag}_vs_http_steps_per_s_{n}_sequences"] = (
                    grpc["steps_per_s"] / http["steps_per_s"]
                )
    return summary


def plot(
    path: Path,
    latency: list[dict],
    step_many: list[dict],
    streams: list[dict],
    server: list[dict],
    protocols: list[dict],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(22, 10))
    axes = axes.ravel()
    groups = list(dict.fromkeys((r["model"], r["precision"], r["threads"]) for r in latency))
    cases = [c for c in dict.fromkeys(r["case"] for r in latency) if c.startswith("StreamingSession")]
    ratio = {(r["model"], r["precision"], r["threads"], r["case"]): r["vs_bare"] for r in latency}
    width = 0.8 / len(cases)
    for k, case in enumerate(cases):
        values = [ratio.get((*g, case), np.nan) for g in groups]
        axes[0].bar(np.arange(len(groups)) + k * width, values, width, label=case)
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].axhline(1.05, color="red", lw=0.8, ls="--", label="1.05x target")
    axes[0].set_xticks(np.arange(len(groups)) + 0.4 - width / 2)
    axes[0].set_xticklabels([f"{m}\n{p} {t}t" for m, p, t in groups], fontsize=7)
    axes[0].set_ylabel("time per step / bare run() loop")
    axes[0].set_title("Per-step latency, batch 1, relative to a bare onnxruntime loop")
    axes[0].legend(fontsize=7)
    for mode in ("batched step_many", "one step per stream"):
        rows = [r for r in streams if r["mode"] == mode]
        axes[1].plot([r["streams"] for r in rows], [r["steps_per_s"] for r in rows], "o-", label=mode)
    axes[1].set(
        xscale="log", yscale="log", xlabel="streams", ylabel="steps / s", title="Streams in one session"
    )
    axes[1].legend()
    for ax, client in zip(axes[2:4], CLIENTS, strict=True):
        for mode in dict.fromkeys(r["mode"] for r in server):
            rows = [r for r in server if r["mode"] == mode and r["client"] == client]
            x, y = [r["sequences"] for r in rows], [r["steps_per_s"] for r in rows]
            ax.plot(x, y, "o--" if "no_worker_thread" in mode else "o-", label=mode)
        ax.set(
            xscale="log", xlabel="concurrent sequences", ylabel="steps / s", title=f"Server, {client} client"
        )
        if server:
            ax.legend()
    for client in PROTOCOL_CLIENTS:
        rows = [r for r in protocols if r["client"] == client]
        axes[4].plot([r["sequences"] for r in rows], [r["steps_per_s"] for r in rows], "o-", label=client)
    axes[4].set(xscale="log", xlabel="concurrent sequences", ylabel="steps / s", title="Server, HTTP vs gRPC")
    ones = [r for r in protocols if r["sequences"] == 1]
    x = np.arange(len(ones))
    axes[5].bar(x - 0.2, [r["p50_us"] for r in ones], 0.4, label="p50")
    axes[5].bar(x + 0.2, [r["p99_us"] for r in ones], 0.4, label="p99")
    axes[5].set_xticks(x, [r["client"] for r in ones])
    axes[5].set(yscale="log", ylabel="us per step", title="Server, 1 sequence, HTTP vs gRPC")
    if protocols:
        axes[4].legend()
        axes[5].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


CSV_COLUMNS = ["section", "model", "precision", "threads", "case", "streams_or_sequences", "us", "vs_bare",
               "steps_per_s", "p50_us", "p20_us", "p80_us", "p99_us", "commit", "date"]  # fmt: skip


def write_csv(path: str, results: dict) -> None:
    info = results["machine"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for section, key in (
            ("latency", "case"),
            ("step_many", "case"),
            ("streams", "mode"),
            ("server", "mode"),
            ("protocols", "client"),
        ):
            for r in results[section]:
                row = {
                    **r,
                    "section": section,
                    "case": r[key],
                    "commit": info["commit"],
                    "date": info["date"],
                }
                row["streams_or_sequences"] = r.get("streams", r.get("sequences", 1))
                if section == "server":
                    row["case"] = f"{r['mode']} ({r['client']})"
                writer.writerow(row)


def main(quick: bool = False, out: Path | None = None, server: bool = True, forms: bool = True) -> dict:
    """Run the benchmarks, print tables, write runtime.json / .csv / .png into ``out``; return the results.

    ``forms``: also the one-step graph against the sequence graph (`rnndeploy.bench.forms`, step-graph.*)."""
    from rnndeploy.checkpoint import atomic_write

    out = Path(out) if out is not None else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    steps, blocks = (100, 3) if quick else (300, 7)
    with tempfile.TemporaryDirectory() as tmp:
        models = export_models(Path(tmp))
        latency = bench_latency(models, steps, blocks) + bench_torch(steps, blocks)
        step_many = bench_step_many(models, steps, blocks)
        add_ratios(latency, step_many)
        print_table("Per-step latency, batch 1 (us: median of block medians)", latency,
                    ["model", "precision", "threads", "case", "us", "vs_bare", "p20_us", "p80_us", "p99_us"])  # fmt: skip
        print_table(f"{STREAMS} streams: step_many vs one bare run() on the stacked batch", step_many,
                    ["model", "case", "us", "per_stream_us", "vs_bare"])  # fmt: skip
        demo = models["lstm-2x256"]["fp32"]
        streams = bench_streams(demo, [1, 8, 64] if quick else [1, 8, 64, 256], 256 if quick else 2048)
        print_table(
            "Streams: batched vs one call per stream", streams, ["streams", "mode", "steps_per_s", "us"]
        )
        serving, protocols = [], []
        if server:
            concurrency = [1, 16] if quick else [1, 16, 64]
            serving = bench_server(demo, concurrency, 20 if quick else 50, 1 if quick else 5)
            print_table("Server: steps/s and step latency", serving,
                        ["client", "mode", "sequences", "steps_per_s", "p50_us", "p99_us"])  # fmt: skip
            protocols = bench_protocols(demo, concurrency, 20 if quick else 200, 1 if quick else 5)
            print_table("Server, HTTP vs gRPC (stock clients): steps/s and step latency", protocols,
                        ["client", "sequences", "steps_per_s", "p50_us", "p99_us"])  # fmt: skip
    info["load_average_at_end"] = os.getloadavg()
    summary = summarize(latency, step_many, streams, serving, protocols)
    print("\nSummary: " + json.dumps({k: round(v, 3) for k, v in summary.items()}, indent=1))
    results = {
        "machine": info,
        "quick": quick,
        "latency": latency,
        "step_many": step_many,
        "streams": streams,
        "server": serving,
        "server_clients": CLIENTS,
        "protocols": protocols,
        "protocol_clients": PROTOCOL_CLIENTS,
        "summary": summary,
    }
    results = json.loads(json.dumps(results, default=float))
    atomic_write(out / "runtime.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    atomic_write(out / "runtime.csv", lambda tmp: write_csv(tmp, results))
    atomic_write(
        out / "runtime.png", lambda tmp: plot(Path(tmp), latency, step_many, streams, serving, protocols)
    )
    print(f"\nwrote {out / 'runtime.json'}, runtime.csv, runtime.png")
    if forms:
        from rnndeploy.bench import forms as step_forms

        print("\nThe one-step graph against the sequence graph")
        step_forms.run(out, *((20, 2) if quick else (200, 15)))
    return results
