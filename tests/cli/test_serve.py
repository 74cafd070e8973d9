"""`rnndeploy serve` in a subprocess: its ready message, 32 concurrent sequences x 200 steps via tritonclient,
SIGTERM ending it with exit status 0."""

import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from rnndeploy.runtime import testing

from ..tritonserver_helpers import free_port

V = 9


def start_serve(path, *options: str) -> tuple[subprocess.Popen, dict[str, str], list[str]]:
    """``rnndeploy serve PATH --port 0 ...`` in a subprocess; returns it once it printed its URLs.

    Returns ``(process, {"http": base URL, ...}, lines printed)``; the URLs are the ones the server printed,
    so a test that uses them checks what a user is told.
    """
    command = [sys.executable, "-m", "rnndeploy", "serve", str(path), "--name", "lm", "--port", "0"]
    command += [] if "--grpc-port" in options else ["--grpc-port", str(free_port())]
    command += options
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    printed, urls = [], {}
    deadline = time.monotonic() + 60
    while "Stop with" not in "".join(printed):
        try:
            printed.append(lines.get(timeout=max(deadline - time.monotonic(), 0.01)))
        except queue.Empty:
            process.kill()
            raise AssertionError(
                f"no ready message; printed {printed}, stderr {process.stderr.read()}"
            ) from None
        match = re.search(r"(HTTP|gRPC|metrics)\b.*?((?:http://)?[\w.\[\]]+:\d+)", printed[-1])
        if match:
            urls.setdefault(match.group(1).lower(), match.group(2))
    return process, urls, printed


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "lm.onnx"
    onnx.save(testing.lstm_lm(hidden_size=7), path)
    metrics_port = free_port()
    process, urls, printed = start_serve(
        path, "--log-level", "info", "--max-queue-delay-us", "2000", "--metrics-port", str(metrics_port)
    )
    yield urls["http"].removeprefix("http://"), path, process, printed
    if process.poll() is None:
        process.kill()
        process.wait(10)


def test_ready_message_names_the_model_and_its_urls(served):
    url, path, _, printed = served
    text = "".join(printed)
    assert f"Serving model 'lm' (version 1) from {path}" in text, text
    assert f"http://{url}/v2/models/lm/infer" in text and f"http://{url}/v2/health/ready" in text, text
    assert httpx.get(f"http://{url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"http://{url}/v2/models/lm").json()["name"] == "lm"
    grpc_address = re.search(r"gRPC \(KServe v2, streaming\): (\S+)", text).group(1)
    assert tritonclient.grpc.InferenceServerClient(grpc_address).is_model_ready("lm")
    metrics_url = re.search(r"metrics \(Prometheus\): (\S+)", text).group(1)
    assert not metrics_url.startswith(f"http://{url}/"), "--metrics-port was given: its own port"
    page = httpx.get(metrics_url)
    assert page.status_code == 200 and "nv_inference_request_success{" in page.text, page.text[:300]
    assert "nv_inference_request_success{" in httpx.get(f"http://{url}/metrics").text


def test_32_sequences_200_steps_no_cross_talk(served):
    url, path, _, _ = served
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


def test_sigterm_shuts_down_cleanly_with_exit_status_0(served):
    _, _, process, _ = served
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=30)
    stderr = process.stderr.read()
    assert code == 0, stderr
    assert "Application shutdown complete" in stderr and "Traceback" not in stderr, stderr


def test_sigterm_exits_after_the_shutdown_deadline_while_a_body_is_still_being_read(tmp_path):
    path = tmp_path / "lm.onnx"
    onnx.save(testing.lstm_lm(hidden_size=7), path)
    process, urls, _ = start_serve(path, "--shutdown-timeout", "1", "--body-timeout", "600")
    try:
        host, port = urls["http"].removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port))) as stalled:
            stalled.sendall(b"POST /v2/models/lm/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
            # The request is being read once the server answers on another connection after it.
            assert httpx.get(f"{urls['http']}/v2/health/live").status_code == 200
            stream = tritonclient.grpc.InferenceServerClient(urls["grpc"])  # and a gRPC stream stays open
            replies: queue.Queue = queue.Queue()
            stream.start_stream(callback=lambda result, error: replies.put(error))
            tensor = tritonclient.grpc.InferInput("input", [1, 1], "INT64")
            tensor.set_data_from_numpy(np.array([[1]], np.int64))
            stream.async_stream_infer("lm", [tensor], sequence_id=3, sequence_start=True)
            assert replies.get(timeout=30) is None
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=60)  # a bound on the test: the deadline is 1 s
            stream.stop_stream(cancel_requests=True)
        stderr = process.stderr.read()
        assert code == 0, stderr
        assert "timeout graceful shutdown exceeded" in stderr, stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_a_port_in_use_is_a_clear_error(tmp_path):
    path = tmp_path / "lm.onnx"
    onnx.save(testing.lstm_lm(hidden_size=7), path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for flag in ("--port", "--grpc-port"):
            command = [sys.executable, "-m", "rnndeploy", "serve", str(path), flag, port]
            command += ["--port", "0"] if flag == "--grpc-port" else ["--grpc-port", str(free_port())]
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
            assert result.returncode == 1, result
            assert (
                "Traceback" not in result.stderr
                and port in result.stderr
                and "choose another" in result.stderr
            ), result.stderr


def test_sigterm_during_a_long_run_answers_503_and_unavailable_before_the_deadline(tmp_path):
    """Steps still in the model at the shutdown deadline are answered 503 (HTTP, JSON) and UNAVAILABLE (gRPC),
    not a plain-text 500 when the deadline cuts them off, and the log has no traceback."""
    path = tmp_path / "slow.onnx"
    # minutes per step on one thread: the process exits within the wait below only if the run is terminated
    onnx.save(testing.slow_rnn(60_000_000), path)
    process, urls, _ = start_serve(path, "--shutdown-timeout", "1")
    try:
        answers: queue.Queue = queue.Queue()
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1, 1], "data": [1.0]}]}

        def http_step() -> None:
            reply = httpx.post(f"{urls['http']}/v2/models/lm/infer", json=body, timeout=120)
            answers.put(("http", reply.status_code, reply.headers["content-type"], reply.text))

        def grpc_step() -> None:
            client = tritonclient.grpc.InferenceServerClient(urls["grpc"])
            tensor = tritonclient.grpc.InferInput("x", [1, 1, 1], "FP32")
            tensor.set_data_from_numpy(np.ones((1, 1, 1), np.float32))
            try:
                client.infer("lm", [tensor], client_timeout=120)
                answers.put(("grpc", "answered", None, None))
            except InferenceServerException as error:
                answers.put(("grpc", error.status(), None, error.message()))

        threads = [threading.Thread(target=f, daemon=True) for f in (http_step, grpc_step)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # both steps have arrived (one runs, one waits) unless the machine is very busy
        process.send_signal(signal.SIGTERM)
        got = sorted(answers.get(timeout=120) for _ in threads)
        code = process.wait(timeout=120)
        stderr = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert got[0][:3] == ("grpc", "StatusCode.UNAVAILABLE", None) and "shutting down" in got[0][3], got
    assert got[1][:3] == ("http", 503, "application/json") and "shutting down" in got[1][3], got
    assert code == 0, stderr
    assert "Traceback" not in stderr and "CancelledError" not in stderr, stderr
