"""Where the CPU goes at 64 concurrent sequences: client process vs server process, per protocol and client.

`rnndeploy serve` (HTTP and gRPC on, one intra-op thread) runs the demo-size LM (a char LSTM 2x256, vocabulary
103, exported from ``SequenceModel``); rnndeploy.bench.load drives it with each client in turn, in a
process of its own: ``tritonclient`` (tritonclient.http, a thread per sequence), ``grpc-stream``
(tritonclient.grpc, a thread and a stream per sequence), ``aiohttp`` and ``grpc-aio-stream`` (all sequences on
one event loop). For each: steps per second, and the CPU seconds per step the client process and the server
process spent (getrusage of the finished client; /proc/<pid>/stat of the server). On a 2-core machine client
and server share the cores, so a client that spends more CPU per step leaves the server less.

Numbers only: prints a table and writes protocol-cpu.json (machine, versions, commit) into ``--out``.

    python benchmarks/bench_protocol_cpu.py [--sequences 64] [--steps 100] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime
from bench_protocol_floor import write_result  # this folder: python benchmarks/...

from rnndeploy.bench.runtime import VOCAB  # the runtime benchmark's demo-size LM
from rnndeploy.bench.serving import free_port, load_command

CLIENTS = ("tritonclient", "grpc-stream", "aiohttp", "grpc-aio-stream")


def export_lm(path: Path) -> None:
    import torch

    from rnndeploy.export import export_onnx
    from rnndeploy.models import ModelConfig, SequenceModel

    torch.manual_seed(0)
    config = ModelConfig(
        task="lm", cell="lstm", vocab_size=len(VOCAB), embed_dim=64, hidden_size=256, num_layers=2
    )
    export_onnx(SequenceModel(config).eval(), path, vocab=VOCAB)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "lm.onnx"
        export_lm(model)
        command = [sys.executable, "-m", "rnndeploy", "serve", str(model), "--port", "0"]
        command += ["--grpc-port", str(free_port())]  # 0 would turn gRPC off
        command += ["--name", "lm", "--threads", "1"]
        server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ports = {}
        try:
            for line in server.stdout:
                if "health:" in line:
                    ports["http"] = line.split("http://")[-1].split("/")[0].rsplit(":", 1)[1]
                if "gRPC" in line:
                    ports["grpc"] = line.strip().rsplit(":", 1)[1]
                if "Stop with" in line:
                    break
            if set(ports) != {"http", "grpc"}:
                raise RuntimeError(f"server did not print its ports (exit {server.poll()})")
            rows = []
            for client in CLIENTS:
                port = ports["grpc" if client.startswith("grpc") else "http"]
                load = load_command(client, port, args.sequences, args.steps, len(VOCAB))
                client0, server0, began = children_cpu_s(), cpu_s(server.pid), time.perf_counter()
                result = json.loads(subprocess.run(load, capture_output=True, text=True, check=True).stdout)
                wall = time.perf_counter() - began
                steps = args.sequences * args.steps
                rows.append(
                    {
                        "client": client,
                        "steps_per_s": result["steps_per_s"],
                        "client_cpu_us_per_step": (children_cpu_s() - client0) / steps * 1e6,
                        "server_cpu_us_per_step": (cpu_s(server.pid) - server0) / steps * 1e6,
                        "wall_s": wall,
                    }
                )
                print(f"  {client} done", file=sys.stderr, flush=True)
        finally:
            server.terminate()
            server.wait(30)
    print(
        f"\n{args.sequences} sequences x {args.steps} steps, CPU per step (client process, server process):"
    )
    print(f"{'client':18s} {'steps/s':>8s} {'client us':>10s} {'server us':>10s} {'both us':>8s}")
    for r in rows:
        both = r["client_cpu_us_per_step"] + r["server_cpu_us_per_step"]
        print(
            f"{r['client']:18s} {r['steps_per_s']:8.0f} {r['client_cpu_us_per_step']:10.0f} "
            f"{r['server_cpu_us_per_step']:10.0f} {both:8.0f}"
        )
    fields = {"rows": rows, "sequences": args.sequences, "steps": args.steps}
    packages = ("grpcio", "tritonclient", "uvicorn", "aiohttp")
    runtime = {"onnxruntime": onnxruntime.__version__}  # the package is onnxruntime or onnxruntime-gpu
    print(f"wrote {write_result(args.out / 'protocol-cpu.json', fields, packages, runtime)}")


if __name__ == "__main__":
    main()
