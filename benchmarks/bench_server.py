"""Server soak and limits: memory and errors under many sequences, short-step latency beside a maximal request.

`rnndeploy serve` runs in a subprocess (CPU, 1 thread) on a char LSTM LM (2x256, embed 64, vocab 64); the
clients run here on one asyncio loop (aiohttp), so on a 2-core machine client and server share the CPU.

- soak: N concurrent sequences (64, 256) step for ``--soak-s`` seconds each (a sequence ends and a new one
  starts every 100 steps); the server's RSS is sampled before, during (max) and after the idle timeout has
  evicted everything; errors are counted.
- maximal request: a client sends back-to-back stateless requests of the longest the default limits allow
  (1 row x 4096 time steps = max_steps, binary output) while another client measures one-step latency of a
  sequence (until ``--maximal-requests`` of them ran); the same latency alone is the baseline.
- protocols: per-step latency at 1 sequence and throughput at 16 and 64 sequences for HTTP
  (tritonclient.http), gRPC unary (tritonclient.grpc ``infer``) and gRPC streamed (a stream per sequence),
  one thread per sequence; and with the light asyncio clients, HTTP (aiohttp) and gRPC streamed (grpc.aio),
  all sequences on one loop. Each load runs in a fresh client process (rnndeploy.bench.load); the
  clients take turns, ``--repeats`` times, and the run with the median steps/s is kept.

Numbers only (no pass/fail): prints a table and writes JSON with machine, versions and commit.

    python benchmarks/bench_server.py [--soak-s 20] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import numpy as np
import onnx

from rnndeploy.bench.load import HEADER_LENGTH, request_body
from rnndeploy.bench.serving import Server, free_port, protocol_load, quantiles
from rnndeploy.provenance import git_commit
from rnndeploy.runtime import testing

VOCAB = [chr(ord("0") + i) for i in range(64)]
MAX_ROWS, MAX_STEPS = 1, 4096  # the longest request the default limits allow (max_steps = rows x steps)


def maximal_body() -> tuple[bytes, dict]:
    header = {
        "inputs": [
            {
                "name": "input",
                "shape": [MAX_ROWS, MAX_STEPS],
                "datatype": "INT64",
                "parameters": {"binary_data_size": MAX_ROWS * MAX_STEPS * 8},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
    text = json.dumps(header).encode()
    tokens = np.random.default_rng(0).integers(0, len(VOCAB), (MAX_ROWS, MAX_STEPS))
    return text + tokens.astype(np.int64).tobytes(), {HEADER_LENGTH: str(len(text))}


async def stepping(
    client, url: str, sequence_id: int, stop: asyncio.Event, latencies: list, errors: list
) -> None:
    t = 0
    while not stop.is_set():
        body, headers = request_body(sequence_id, (sequence_id + t) % len(VOCAB), t % 100 == 0, t % 100 == 99)
        began = time.perf_counter()
        async with client.post(url, data=body, headers=headers) as reply:
            await reply.read()
            if reply.status != 200:
                errors.append(reply.status)
        latencies.append(time.perf_counter() - began)
        t += 1
    if t % 100:  # end the open sequence
        body, headers = request_body(sequence_id, 0, False, True)
        async with client.post(url, data=body, headers=headers) as reply:
            await reply.read()


async def soak(server: Server, sequences: int, seconds: float) -> dict:
    url = f"{server.http}/v2/models/lm/infer"
    before = server.rss()
    peak, latencies, errors = before, [], []
    stop = asyncio.Event()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=sequences)) as client:
        tasks = [
            asyncio.create_task(stepping(client, url, 1 + s, stop, latencies, errors))
            for s in range(sequences)
        ]
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            await asyncio.sleep(0.5)
            peak = max(peak, server.rss())
        stop.set()
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - began
        async with client.get(f"{server.http}/v2/models/lm/stats") as reply:
            live_at_end = (await reply.json())["model_stats"][0]["live_sequences"]
    return {
        "sequences": sequences,
        "seconds": elapsed,
        "steps": len(latencies),
        "steps_per_s": len(latencies) / elapsed,
        "errors": len(errors),
        "rss_before_mb": before,
        "rss_peak_mb": peak,
        "rss_after_mb": server.rss(),
        "live_after": live_at_end,
        **quantiles(latencies),
    }


async def one_step_latency(server: Server, steps: int, beside_maximal: int) -> dict:
    """One-step latency of a sequence, alone (``steps`` steps) or until ``beside_maximal`` maximal requests ran."""
    url = f"{server.http}/v2/models/lm/infer"
    stop, big, latencies, errors = asyncio.Event(), [], [], []
    body, headers = maximal_body()
    peak = server.rss()

    async def maximal(client) -> None:
        while not stop.is_set():
            began = time.perf_counter()
            async with client.post(url, data=body, headers=headers) as reply:
                await reply.read()
                if reply.status != 200:
                    errors.append((reply.status, (await reply.read())[:200]))
            big.append(time.perf_counter() - began)

    async with aiohttp.ClientSession() as client:
        background = asyncio.create_task(maximal(client)) if beside_maximal else None
        if background is not None:
            while not big and not errors:  # the first maximal request has run: the server is warm
                await asyncio.sleep(0.1)
        t = 0
        while (len(big) < beside_maximal) if beside_maximal else (t < steps):
            step, step_headers = request_body(777, t % len(VOCAB), t == 0, False)
            began = time.perf_counter()
            async with client.post(url, data=step, headers=step_headers) as reply:
                await reply.read()
                if reply.status != 200:
                    errors.append((reply.status, None))
            latencies.append(time.perf_counter() - began)
            peak = max(peak, server.rss())
            t += 1
        stop.set()
        if background is not None:
            await background
    return {
        "beside_maximal_request": bool(beside_maximal),
        "errors": len(errors),
        "maximal_requests": len(big),
        "maximal_request_s_median": float(np.median(big)) if big else None,
        "rss_peak_mb": peak,
        **quantiles(latencies),
    }


def machine() -> dict:
    import onnxruntime

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "commit": git_commit(),
        "model": "char LSTM LM 2x256, embed 64, vocab 64; server: --provider cpu, 1 thread",
    }


def write_csv(results: dict, path: Path) -> None:
    """One row per measurement: kind, client, sequences, steps/s, p50/p99 us, RSS (soak), machine columns."""
    import csv

    meta = results["machine"]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(
            [
                "kind",
                "client",
                "sequences",
                "steps_per_s",
                "p50_us",
                "p99_us",
                "rss_peak_mb",
                "commit",
                "date",
            ]
        )
        for row in results["soak"]:
            writer.writerow(
                [
                    "soak",
                    "aiohttp",
                    row["sequences"],
                    row["steps_per_s"],
                    row["p50_us"],
                    row["p99_us"],
                    row["rss_peak_mb"],
                    meta["commit"],
                    meta["date"],
                ]
            )
        for row in results["latency"]:
            kind = "one_step_beside_maximal" if row["beside_maximal_request"] else "one_step_alone"
            writer.writerow(
                [
                    kind,
                    "aiohttp",
                    1,
                    "",
                    row["p50_us"],
                    row["p99_us"],
                    row["rss_peak_mb"],
                    meta["commit"],
                    meta["date"],
                ]
            )
        for row in results["protocols"]:
            writer.writerow(
                [
                    "protocol",
                    row["client"],
                    row["sequences"],
                    row["steps_per_s"],
                    row["p50_us"],
                    row["p99_us"],
                    "",
                    meta["commit"],
                    meta["date"],
                ]
            )


def plot(results: dict, path: Path) -> None:
    """Steps per second by client and sequences (left), p50/p99 latency at 1 sequence (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = list(dict.fromkeys(row["client"] for row in results["protocols"]))
    figure, (rate, latency) = plt.subplots(1, 2, figsize=(11, 4))
    for client in clients:
        rows = [r for r in results["protocols"] if r["client"] == client]
        rate.plot([r["sequences"] for r in rows], [r["steps_per_s"] for r in rows], marker="o", label=client)
    rate.set(xscale="log", xlabel="concurrent sequences", ylabel="steps / s", title="throughput")
    rate.legend(fontsize=8)
    ones = [r for r in results["protocols"] if r["sequences"] == 1]
    x = np.arange(len(ones))
    latency.bar(x - 0.2, [r["p50_us"] for r in ones], 0.4, label="p50")
    latency.bar(x + 0.2, [r["p99_us"] for r in ones], 0.4, label="p99")
    latency.set_xticks(x, [r["client"] for r in ones], rotation=20, fontsize=8)
    latency.set(yscale="log", ylabel="us per step", title="1 sequence")
    latency.legend(fontsize=8)
    meta = results["machine"]
    figure.suptitle(f"rnndeploy serve, {meta['model']}; commit {meta['commit']}, {meta['date']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--soak-s", type=float, default=20.0)
    parser.add_argument("--latency-steps", type=int, default=200)
    parser.add_argument("--maximal-requests", type=int, default=10)
    parser.add_argument("--protocol-steps", type=int, default=200, help="steps per sequence, protocol rows")
    parser.add_argument("--repeats", type=int, default=3, help="protocol rows: runs per cell (median kept)")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "lm.onnx"
        onnx.save(testing.lstm_lm(VOCAB, embed_dim=64, hidden_size=256, num_layers=2), model)
        results: dict = {"machine": machine(), "soak": [], "latency": []}
        server = Server(model, "--idle-timeout", "2", "--grpc-port", str(free_port()))
        try:
            results["rss_idle_mb"] = server.rss()
            for n in (64, 256):
                row = asyncio.run(soak(server, n, args.soak_s))
                time.sleep(4)  # the idle timeout (2 s) evicts whatever is left
                row["rss_after_eviction_mb"] = server.rss()
                results["soak"].append(row)
            for beside in (0, args.maximal_requests):
                results["latency"].append(asyncio.run(one_step_latency(server, args.latency_steps, beside)))
            time.sleep(4)
            results["rss_after_all_mb"] = server.rss()
            results["protocols"] = []
            clients = ("tritonclient", "grpc-unary", "grpc-stream", "aiohttp", "grpc-aio-stream")
            for sequences in (1, 16, 64):
                runs: dict[str, list[dict]] = {client: [] for client in clients}
                for _ in range(args.repeats):  # clients in turn, so load from other work hits all alike
                    for client in clients:
                        runs[client].append(protocol_load(server, client, sequences, args.protocol_steps))
                for client in clients:
                    ranked = sorted(runs[client], key=lambda row: row["steps_per_s"])
                    results["protocols"].append({**ranked[len(ranked) // 2], "repeats": len(ranked)})
        finally:
            results["exit_status"] = server.stop()
    print(
        f"{'sequences':>9} {'steps/s':>8} {'p50 us':>8} {'p99 us':>9} {'errors':>6} {'RSS MB before/peak/after':>26}"
    )
    for row in results["soak"]:
        rss = f"{row['rss_before_mb']:.0f}/{row['rss_peak_mb']:.0f}/{row['rss_after_eviction_mb']:.0f}"
        print(
            f"{row['sequences']:>9} {row['steps_per_s']:>8.0f} {row['p50_us']:>8.0f} {row['p99_us']:>9.0f} {row['errors']:>6} {rss:>26}"
        )
    for row in results["latency"]:
        what = "beside maximal request" if row["beside_maximal_request"] else "alone"
        extra = (
            f", maximal request {row['maximal_request_s_median']:.2f} s x{row['maximal_requests']}"
            if row["maximal_requests"]
            else ""
        )
        print(
            f"one step {what}: p50 {row['p50_us']:.0f} us, p99 {row['p99_us']:.0f} us, errors {row['errors']}{extra}"
        )
    print(f"RSS idle {results['rss_idle_mb']:.0f} MB, after everything {results['rss_after_all_mb']:.0f} MB")
    print(f"{'client':>13} {'sequences':>9} {'steps/s':>8} {'p50 us':>8} {'p99 us':>8}")
    for row in results["protocols"]:
        print(
            f"{row['client']:>13} {row['sequences']:>9} {row['steps_per_s']:>8.0f} {row['p50_us']:>8.0f} {row['p99_us']:>8.0f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "server_soak.json").write_text(json.dumps(results, indent=2) + "\n")
    write_csv(results, args.out / "server_soak.csv")
    plot(results, args.out / "server_soak.png")


if __name__ == "__main__":
    main()
