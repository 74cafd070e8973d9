"""`rnndeploy serve` in a subprocess for the tests that need the real command: free ports, readiness over HTTP
(and gRPC when asked), SIGTERM at the end; and one KServe v2 JSON request."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from rnndeploy.bench.serving import free_port


@dataclass(frozen=True)
class Serving:
    http_port: int
    grpc_port: int | None  # None: HTTP only

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def _ready(ports: Serving) -> bool:
    try:
        if httpx.get(f"{ports.url}/v2/health/ready").status_code != 200:
            return False
    except httpx.TransportError:
        return False
    if ports.grpc_port is None:
        return True
    import tritonclient.grpc as grpcclient

    try:
        return grpcclient.InferenceServerClient(f"127.0.0.1:{ports.grpc_port}").is_server_ready()
    except grpcclient.InferenceServerException:
        return False


@contextlib.contextmanager
def serving(model: Path, *options: str, name: str = "lm", grpc: bool = False) -> Iterator[Serving]:
    """``rnndeploy serve MODEL --name NAME OPTIONS`` on free ports until the block has run; then SIGTERM, and
    exit status 0 is asserted. Without ``grpc`` the gRPC port is off (its default, 8001, may be taken)."""
    ports = Serving(free_port(), free_port() if grpc else None)
    command = [sys.executable, "-m", "rnndeploy", "serve", str(model), "--name", name,
               "--port", str(ports.http_port), "--grpc-port", str(ports.grpc_port or 0), *options]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _ready(ports):
            assert server.poll() is None, f"serve exited {server.returncode}: {server.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "rnndeploy serve was not ready within 120 s"
            time.sleep(0.2)
        yield ports
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            raise
    assert server.returncode == 0, f"exit {server.returncode}; stderr: {server.stderr.read()[-2000:]}"


def infer(url: str, array: np.ndarray, datatype: str, sequence_id: int = 7, model: str = "lm") -> np.ndarray:
    """One KServe v2 JSON request starting and ending a sequence; returns ``output`` without the batch axis."""
    request = {
        "inputs": [
            {
                "name": "input",
                "shape": [1, *array.shape],
                "datatype": datatype,
                "data": array.ravel().tolist(),
            }
        ],
        "parameters": {"sequence_id": sequence_id, "sequence_start": True, "sequence_end": True},
    }
    reply = httpx.post(f"{url}/v2/models/{model}/infer", json=request, timeout=30)
    assert reply.status_code == 200, reply.text
    output = next(o for o in reply.json()["outputs"] if o["name"] == "output")
    return np.array(output["data"], np.float32).reshape(output["shape"])[0]
