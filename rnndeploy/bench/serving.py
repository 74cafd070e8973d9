"""A `rnndeploy serve` process and load from `rnndeploy.bench.load` in fresh client processes.

Shared by the runtime benchmark (``rnndeploy bench runtime``) and benchmarks/bench_server.py.
"""

from __future__ import annotations

import json
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

#: Token ids the load cycles through (``--vocab`` of rnndeploy.bench.load).
LOAD_VOCAB = 64


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Server:
    """`rnndeploy serve` on a free port; ``urls`` are the ones it printed when ready."""

    def __init__(self, model: Path, *options: str) -> None:
        command = [sys.executable, "-m", "rnndeploy", "serve", str(model), "--name", "lm", "--port", "0"]
        command += ["--provider", "cpu", "--log-level", "warning", *options]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.process.stdout], daemon=True).start()
        self.urls: dict[str, str] = {}
        deadline = time.monotonic() + 120
        while True:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            match = re.search(r"(HTTP|gRPC)\b.*?((?:http://)?[\w.]+:\d+)", line)
            if match:
                self.urls.setdefault(match.group(1).lower(), match.group(2))
            if line.startswith("Stop with"):
                break
        self.http = self.urls["http"]

    def rss(self) -> float:
        return rss_mb(self.process.pid)

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(60)


def quantiles(samples: list[float]) -> dict:
    """p50 and p99 in microseconds of ``samples`` in seconds, and their count."""
    us = np.array(samples) * 1e6
    return {"p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99)), "n": len(samples)}


def load_command(
    client: str, port: int | str, sequences: int, steps: int, vocab: int = LOAD_VOCAB
) -> list[str]:
    """The command line of one rnndeploy.bench.load client process."""
    return [sys.executable, "-m", "rnndeploy.bench.load", "--client", client, "--port", str(port),
            "--sequences", str(sequences), "--steps", str(steps), "--vocab", str(vocab)]  # fmt: skip


def run_load(client: str, port: int | str, sequences: int, steps: int, vocab: int = LOAD_VOCAB) -> dict:
    """One load in a fresh process: its JSON (``steps_per_s``, ``latencies_us``)."""
    command = load_command(client, port, sequences, steps, vocab)
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def protocol_load(server: Server, client: str, sequences: int, steps: int) -> dict:
    """rnndeploy.bench.load in a fresh process against ``server``: steps/s and per-step latency quantiles."""
    address = server.urls["grpc"] if client.startswith("grpc") else server.http.removeprefix("http://")
    result = run_load(client, address.rsplit(":", 1)[1], sequences, steps)
    return {
        "client": client,
        "sequences": sequences,
        "steps_per_s": result["steps_per_s"],
        **quantiles([x * 1e-6 for x in result["latencies_us"]]),
    }
