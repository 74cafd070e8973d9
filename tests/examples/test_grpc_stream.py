"""examples/grpc_stream.py against a running `rnndeploy serve`, the way a user runs it: its predictions match
a whole-sequence onnxruntime run, and a refused step ends in the server's message, not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from rnndeploy.bench.serving import Server, free_port
from rnndeploy.runtime import testing

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grpc_stream.py"
VOCAB = list("abcdefgh ")
TOKENS = [3, 1, 4, 1, 5]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("grpc") / "lm.onnx"
    onnx.save(testing.lstm_lm(vocab=VOCAB, hidden_size=7), path)
    served = Server(path, "--grpc-port", str(free_port()))
    yield path, served.urls["grpc"]
    assert served.stop() == 0


def _example(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=120)


def test_the_stream_predicts_what_a_whole_sequence_run_does(server):
    path, url = server
    run = _example("--url", url, "--model", "lm", *map(str, TOKENS))
    assert run.returncode == 0, run.stderr
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    zeros = np.zeros((2, 1, 7), np.float32)
    scores = session.run(["output"], {"input": np.array([TOKENS]), "h0": zeros, "c0": zeros})[0][0]
    expected = [f"{token} -> {int(np.argmax(s))}" for token, s in zip(TOKENS, scores, strict=True)]
    assert run.stdout.splitlines() == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "nope", "1", "2"], "unknown model 'nope'"),
        (["--model", "lm", "1", "99"], "token id 99"),
    ],
    ids=["wrong-model", "token-outside-vocabulary"],
)
def test_a_refused_step_ends_in_the_servers_message(server, args, message):
    run = _example("--url", server[1], *args)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr and "AttributeError" not in run.stderr, run.stderr
    assert run.stderr.startswith("error: the server refused a step:") and message in run.stderr, run.stderr
