"""`rnndeploy serve` in a subprocess: 32 concurrent sequences x 200 steps via tritonclient, clean SIGTERM."""

import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

from rnndeploy.runtime import testing

V = 9


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "lm.onnx"
    onnx.save(testing.lstm_lm(hidden_size=7), path)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "rnndeploy",
        "serve",
        str(path),
        "--port",
        str(port),
        "--log-level",
        "info",
    ]
    process = subprocess.Popen(
        command + ["--max-queue-delay-us", "2000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, process.stderr.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.1)
    yield f"127.0.0.1:{port}", path, process
    if process.poll() is None:
        process.kill()


def test_32_sequences_200_steps_no_cross_talk(served):
    url, path, _ = served
    S, T = 32, 200
    tokens = np.random.default_rng(0).integers(0, V, (S, T))
    got = np.full((S, T, V), np.nan, np.float32)

    def sequence(s: int) -> None:
        # One client per thread, like separate callers; tritonclient's async_infer sleeps 10 ms per call.
        client = httpclient.InferenceServerClient(url)
        for t in range(T):
            tensor = httpclient.InferInput("input", [1, 1], "INT64")
            tensor.set_data_from_numpy(tokens[s : s + 1, t : t + 1], binary_data=(s + t) % 2 == 0)
            result = client.infer(
                "lm", [tensor], sequence_id=1000 + s, sequence_start=t == 0, sequence_end=t == T - 1
            )
            got[s, t] = result.as_numpy("output")[0, 0]

    with ThreadPoolExecutor(S) as pool:
        list(pool.map(sequence, range(S)))
    offline = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    zeros = np.zeros((2, S, 7), np.float32)
    want = offline.run(["output"], {"input": tokens, "h0": zeros, "c0": zeros})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    (stats,) = httpx.get(f"http://{url}/v2/models/lm/stats").json()["model_stats"]
    assert stats["inference_count"] == S * T and stats["live_sequences"] == 0
    assert stats["execution_count"] < 0.75 * S * T, f"concurrent steps were not batched: {stats}"


def test_sigterm_shuts_down_cleanly(served):
    _, _, process = served
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=20)
    stderr = process.stderr.read()
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells it was SIGTERM.
    assert code in (0, -signal.SIGTERM), stderr
    assert "Application shutdown complete" in stderr and "Traceback" not in stderr, stderr
