"""Helpers for runtime tests that drive `rnndeploy serve` in a subprocess."""

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np


@contextmanager
def serving(path, *options: str) -> Iterator[str]:
    """``rnndeploy serve PATH --name lm`` on a free port; yields its base URL once ready, then stops it with
    SIGTERM and asserts exit status 0."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "rnndeploy",
        "serve",
        str(path),
        "--name",
        "lm",
        "--port",
        str(port),
        "--grpc-port",
        "0",  # HTTP only: the default gRPC port (8001) may be taken by another server on this machine
        *options,
    ]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, f"serve exited {server.returncode}: {server.stderr.read()[-2000:]}"
            try:
                if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve did not become ready in 60 s"
            time.sleep(0.2)
        yield url
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert server.returncode == 0, f"exit {server.returncode}; stderr: {server.stderr.read()[-2000:]}"


def infer(url: str, array: np.ndarray, datatype: str, sequence_id: int = 7) -> np.ndarray:
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
    reply = httpx.post(f"{url}/v2/models/lm/infer", json=request, timeout=30)
    assert reply.status_code == 200, reply.text
    output = next(o for o in reply.json()["outputs"] if o["name"] == "output")
    return np.array(output["data"], np.float32).reshape(output["shape"])[0]
