"""Runtime and server benchmarks: per-step latency, batched stream throughput, server throughput and latency.

Model: a character LSTM LM, 2 layers x 256 hidden, embedding 64, vocabulary 64 (built with onnx.helper as
the exporter writes it) and its int8 variant (``rnndeploy.export.quantize_int8``: DynamicQuantizeLSTM);
torch eager runs the same shape as a ``rnndeploy.SequenceModel``. Per-step latency is measured with 1 and 2
intra-op threads (the same count for onnxruntime and torch); stream and server benchmarks use 1 thread.
The server is driven by two clients: tritonclient.http threads and benchmarks/kserve_load.py (asyncio).
Prints tables and writes runtime.json, runtime.csv and runtime.png under benchmarks/results/ (or ``out``).

    python benchmarks/bench_runtime.py [--quick]     or     rnndeploy bench runtime [--quick]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from rnndeploy.export import quantize_int8
from rnndeploy.provenance import git_commit
from rnndeploy.runtime import StreamingSession, default_session_options, testing

VOCAB = [chr(ord("!") + i) for i in range(64)]
EMBED, HIDDEN, LAYERS = 64, 256, 2
RESULTS = Path(__file__).resolve().parent / "results"


def quantiles(samples_s: list[float]) -> dict[str, float]:
    """Median and 0.2 / 0.8 / 0.99 quantiles in microseconds."""
    q = np.quantile(np.asarray(samples_s) * 1e6, [0.5, 0.2, 0.8, 0.99])
    return {"p50_us": q[0], "p20_us": q[1], "p80_us": q[2], "p99_us": q[3]}


def time_steps(step, steps: int, warmup: int = 50) -> dict[str, float]:
    for _ in range(warmup):
        step()
    samples = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        samples.append(time.perf_counter() - start)
    return quantiles(samples)


def bench_latency(model_bytes: bytes, int8_bytes: bytes, steps: int) -> list[dict]:
    """Per-step latency at batch 1, fp32 and int8, 1 and 2 intra-op threads on both onnxruntime and torch.

    Cases: a bare InferenceSession.run loop, StreamingSession (fp32, fp32 with io_binding, int8
    DynamicQuantizeLSTM), torch eager on the same shape. torch's own dynamic int8 is not measured: its
    quantize_dynamic leaves rnndeploy's LSTM subclass in fp32 (and torch.ao.quantization is deprecated).
    """
    import torch

    from rnndeploy.models import ModelConfig, SequenceModel

    tokens = np.array([[5]], np.int64)
    config = ModelConfig(
        task="lm", cell="lstm", vocab_size=len(VOCAB), embed_dim=EMBED, hidden_size=HIDDEN, num_layers=LAYERS
    )
    model = SequenceModel(config).eval()
    x = torch.tensor([[5]])
    rows = []
    for threads in (1, 2):
        bare = ort.InferenceSession(
            model_bytes, default_session_options(threads), providers=["CPUExecutionProvider"]
        )
        state = {
            "h0": np.zeros((LAYERS, 1, HIDDEN), np.float32),
            "c0": np.zeros((LAYERS, 1, HIDDEN), np.float32),
        }

        def bare_step(bare=bare, state=state):
            _, state["h0"], state["c0"] = bare.run(None, {"input": tokens, **state})

        cases = [("onnxruntime run loop (bare)", "fp32", bare_step)]
        for name, precision, source, binding in (
            ("StreamingSession.step", "fp32", model_bytes, False),
            ("StreamingSession.step io_binding", "fp32", model_bytes, True),
            ("StreamingSession.step", "int8", int8_bytes, False),
        ):
            session = StreamingSession(source, providers="cpu", threads=threads, io_binding=binding)
            cases.append((name, precision, partial(session.step, tokens)))
        for name, precision, step in cases:
            rows.append(_latency_row(name, "onnxruntime", precision, threads, time_steps(step, steps)))

        torch.set_num_threads(threads)
        torch_state = {"s": model.init_state(1)}

        def torch_step(torch_state=torch_state):
            with torch.inference_mode():
                _, torch_state["s"] = model(x, torch_state["s"])

        stats = time_steps(torch_step, max(steps // 4, 100))
        rows.append(_latency_row("torch eager SequenceModel", "torch", "fp32", threads, stats))
    return rows


def _latency_row(name: str, engine: str, precision: str, threads: int, stats: dict) -> dict:
    label = f"{name} {precision} {threads} thread{'s' if threads > 1 else ''}"
    return {
        "case": label,
        "name": name,
        "engine": engine,
        "precision": precision,
        "threads": threads,
        **stats,
    }


def bench_streams(model_bytes: bytes, counts: list[int], rounds: int) -> list[dict]:
    """Steps per second for N streams: one batched step_many call vs one step call per stream."""
    rows = []
    rng = np.random.default_rng(0)
    for n in counts:
        xs = {s: rng.integers(0, len(VOCAB), (1, 1)) for s in range(n)}
        batched = StreamingSession(model_bytes, providers="cpu")
        separate = StreamingSession(model_bytes, providers="cpu")

        reps = max(rounds // n, 5)
        for name, fn in (
            ("batched step_many", partial(batched.step_many, xs)),
            ("one step per stream", partial(_one_by_one, separate, xs)),
        ):
            stats = time_steps(fn, reps, warmup=3)
            rows.append({"streams": n, "mode": name, "steps_per_s": n / (stats["p50_us"] * 1e-6), **stats})
    return rows


def _one_by_one(session: StreamingSession, xs: dict) -> None:
    for stream, x in xs.items():
        session.step(x, stream=stream)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


CLIENTS = {
    "tritonclient": "benchmarks/kserve_load.py --client tritonclient: tritonclient.http, a thread per sequence",
    "aiohttp": "benchmarks/kserve_load.py --client aiohttp: asyncio + aiohttp, all sequences on one loop",
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
            ports[mode] = _free_port()
            command = [sys.executable, "-m", "rnndeploy", "serve", str(model_path), "--name", "lm"]
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


def _client_load(client: str, port: int, sequences: int, steps: int) -> tuple[float, list[float]]:
    """Steps per second and step latencies (s) measured by benchmarks/kserve_load.py in a fresh process."""
    script = Path(__file__).resolve().parent / "kserve_load.py"
    command = [sys.executable, str(script), "--client", client, "--port", str(port)]
    command += ["--sequences", str(sequences), "--steps", str(steps), "--vocab", str(len(VOCAB))]
    result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
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
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "torch": torch.__version__,
        "commit": git_commit(Path(__file__).resolve().parent),
        "model": f"char LSTM LM {LAYERS}x{HIDDEN}, embed {EMBED}, vocab {len(VOCAB)}",
    }


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n{title}")
    widths = [max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(_fmt(row[c]).ljust(w) for c, w in zip(columns, widths, strict=True)))


def _fmt(value) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def summarize(latency: list[dict], streams: list[dict], server: list[dict]) -> dict:
    """Ratios of the tables. Every speedup over torch eager compares the same thread count on both sides;
    ``int8`` keys compare onnxruntime's int8 model with torch eager fp32 (torch int8 is not measured)."""
    p50 = {(r["name"], r["precision"], r["threads"]): r["p50_us"] for r in latency}
    summary = {}
    for threads in (1, 2):
        suffix = f"{threads}thread" + ("s" if threads > 1 else "")
        ours = p50[("StreamingSession.step", "fp32", threads)]
        torch_eager = p50[("torch eager SequenceModel", "fp32", threads)]
        summary[f"overhead_vs_bare_run_pct_{suffix}"] = 100 * (
            ours / p50[("onnxruntime run loop (bare)", "fp32", threads)] - 1
        )
        summary[f"io_binding_vs_run_{suffix}"] = (
            p50[("StreamingSession.step io_binding", "fp32", threads)] / ours
        )
        summary[f"speedup_vs_torch_eager_fp32_{suffix}"] = torch_eager / ours
        summary[f"speedup_int8_vs_torch_eager_fp32_{suffix}"] = (
            torch_eager / p50[("StreamingSession.step", "int8", threads)]
        )
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
    return summary


def plot(path: Path, latency: list[dict], streams: list[dict], server: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(16, 10))
    axes = axes.ravel()
    names = [r["case"] for r in latency]
    axes[0].barh(
        names,
        [r["p50_us"] for r in latency],
        xerr=[[r["p50_us"] - r["p20_us"] for r in latency], [r["p80_us"] - r["p50_us"] for r in latency]],
    )
    axes[0].set_xscale("log")
    axes[0].set_xlabel("us per step (median, 0.2-0.8), batch 1")
    axes[0].set_title("Per-step latency")
    for mode in ("batched step_many", "one step per stream"):
        rows = [r for r in streams if r["mode"] == mode]
        axes[1].plot([r["streams"] for r in rows], [r["steps_per_s"] for r in rows], "o-", label=mode)
    axes[1].set(
        xscale="log", yscale="log", xlabel="streams", ylabel="steps / s", title="Streams in one session"
    )
    axes[1].legend()
    for ax, client in zip(axes[2:], CLIENTS, strict=True):
        for mode in dict.fromkeys(r["mode"] for r in server):
            rows = [r for r in server if r["mode"] == mode and r["client"] == client]
            x, y = [r["sequences"] for r in rows], [r["steps_per_s"] for r in rows]
            ax.plot(x, y, "o--" if "no_worker_thread" in mode else "o-", label=mode)
        ax.set(
            xscale="log", xlabel="concurrent sequences", ylabel="steps / s", title=f"Server, {client} client"
        )
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def main(quick: bool = False, out: Path | None = None) -> dict:
    """Run all benchmarks, print tables, write runtime.json / .csv / .png; return the results."""
    from rnndeploy.checkpoint import atomic_write

    out = Path(out) if out is not None else RESULTS
    info = machine()
    model = testing.lstm_lm(vocab=VOCAB, embed_dim=EMBED, hidden_size=HIDDEN, num_layers=LAYERS)
    model_bytes = model.SerializeToString()
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(model, Path(tmp) / "lm.onnx")
        int8_bytes = quantize_int8(Path(tmp) / "lm.onnx", Path(tmp) / "lm.int8.onnx").SerializeToString()
    latency = bench_latency(model_bytes, int8_bytes, 300 if quick else 3000)
    print_table("Per-step latency, batch 1 (us)", latency, ["case", "p50_us", "p20_us", "p80_us", "p99_us"])
    streams = bench_streams(model_bytes, [1, 8, 64] if quick else [1, 8, 64, 256], 256 if quick else 2048)
    print_table(
        "Streams: batched vs one call per stream", streams, ["streams", "mode", "steps_per_s", "p50_us"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lm.onnx"
        onnx.save(model, path)
        server = bench_server(path, [1, 16] if quick else [1, 16, 64], 20 if quick else 50, 1 if quick else 5)
    print_table(
        "Server: steps/s and step latency",
        server,
        ["client", "mode", "sequences", "steps_per_s", "p50_us", "p99_us"],
    )
    summary = summarize(latency, streams, server)
    print("\nSummary: " + json.dumps({k: round(v, 2) for k, v in summary.items()}, indent=1))
    results = {
        "machine": info,
        "quick": quick,
        "latency": latency,
        "streams": streams,
        "server": server,
        "server_clients": CLIENTS,
        "summary": summary,
    }
    results = json.loads(json.dumps(results, default=float))

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(
                [
                    "section",
                    "case",
                    "streams_or_sequences",
                    "steps_per_s",
                    "p50_us",
                    "p20_us",
                    "p80_us",
                    "p99_us",
                    "commit",
                    "date",
                ]
            )
            for r in results["latency"]:
                writer.writerow(
                    [
                        "latency",
                        r["case"],
                        1,
                        1e6 / r["p50_us"],
                        r["p50_us"],
                        r["p20_us"],
                        r["p80_us"],
                        r["p99_us"],
                        info["commit"],
                        info["date"],
                    ]
                )
            for r in results["streams"]:
                writer.writerow(
                    [
                        "streams",
                        r["mode"],
                        r["streams"],
                        r["steps_per_s"],
                        r["p50_us"],
                        r["p20_us"],
                        r["p80_us"],
                        r["p99_us"],
                        info["commit"],
                        info["date"],
                    ]
                )
            for r in results["server"]:
                writer.writerow(
                    [
                        "server",
                        f"{r['mode']} ({r['client']})",
                        r["sequences"],
                        r["steps_per_s"],
                        r["p50_us"],
                        r["p20_us"],
                        r["p80_us"],
                        r["p99_us"],
                        info["commit"],
                        info["date"],
                    ]
                )

    atomic_write(out / "runtime.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    atomic_write(out / "runtime.csv", write_csv)
    atomic_write(out / "runtime.png", lambda tmp: plot(Path(tmp), latency, streams, server))
    print(f"\nwrote {out / 'runtime.json'}, runtime.csv, runtime.png")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes (a smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    main(quick=args.quick, out=args.out)
