"""An ``--fp16`` export through every runtime command, each in its own process (onnxruntime 1.31's CPU provider
crashed such graphs with SIGSEGV at ORT_ENABLE_ALL): clean exits, outputs equal to the fp32 graph's within the
fp16 tolerance of export verification."""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from rnndeploy.export import export_onnx, to_fp16
from rnndeploy.export.verification import TOLERANCES
from rnndeploy.models import ModelConfig, SequenceModel
from rnndeploy.runtime.providers import uses_float16

from ..serve_subprocess import infer, serving

VOCAB = list("abcdefgh ")
ATOL, RTOL = TOLERANCES["fp16"]
TOKENS = [3, 1, 4, 1, 5, 8, 2, 6]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp16")
    config = ModelConfig(
        task="lm", cell="lstm", vocab_size=len(VOCAB), embed_dim=8, hidden_size=16, num_layers=2
    )
    fp32 = folder / "lm.onnx"
    export_onnx(SequenceModel(config).eval(), fp32, vocab=VOCAB)
    fp16 = folder / "lm.fp16.onnx"
    onnx.save(to_fp16(onnx.load(fp32)), fp16)
    return fp32, fp16


def fp32_outputs(path, tokens) -> np.ndarray:
    """Reference: the fp32 graph through a bare onnxruntime run, whole sequence, zero state: ``[T, V]``."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    zeros = np.zeros((2, 1, 16), np.float32)
    return session.run(["output"], {"input": np.array([tokens]), "h0": zeros, "c0": zeros})[0][0]


def rnndeploy(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "rnndeploy", *args]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=120)


def assert_clean(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}; stderr: {result.stderr[-2000:]}"


def test_the_export_is_a_float16_graph(models):
    fp32, fp16 = models
    assert uses_float16(str(fp16)) and not uses_float16(str(fp32))


def test_info(models):
    fp32, fp16 = models
    result = rnndeploy("info", str(fp16))
    assert_clean(result)
    got, want = json.loads(result.stdout), json.loads(rnndeploy("info", str(fp32)).stdout)
    for key in ("inputs", "outputs", "states"):
        assert got[key] == want[key], key
    assert got["metadata"]["rnndeploy.precision"] == "fp16"


def test_run(models, tmp_path):
    fp32, fp16 = models
    np.save(tmp_path / "tokens.npy", np.array(TOKENS))
    result = rnndeploy("run", str(fp16), "--input", str(tmp_path / "tokens.npy"))
    assert_clean(result)
    got = np.array([json.loads(line)["output"] for line in result.stdout.splitlines()])
    np.testing.assert_allclose(got, fp32_outputs(fp32, TOKENS), atol=ATOL, rtol=RTOL)


def test_generate_picks_what_the_fp32_graph_ranks_first(models):
    """Greedy generation: every character drawn has an fp32 log-probability within the fp16 tolerance of the
    fp32 graph's best one (fp16 rounding may only swap near-ties)."""
    fp32, fp16 = models
    result = rnndeploy("generate", str(fp16), "--prompt", "abc", "--length", "12", "--temperature", "0")
    assert_clean(result)
    text = result.stdout.rstrip("\n")  # the prompt, then the continuation
    assert len(text) == 15 and set(text) <= set(VOCAB), result.stdout
    scores = fp32_outputs(fp32, [VOCAB.index(c) for c in text])  # scores[t] predicts text[t + 1]
    for t in range(2, 14):
        chosen = scores[t, VOCAB.index(text[t + 1])]
        assert chosen >= scores[t].max() - 2 * (ATOL + RTOL * abs(scores[t].max())), (t, text)


def test_serve_answers_and_stops_on_sigterm(models):
    fp32, fp16 = models
    with serving(fp16) as served:
        got = infer(served.url, np.array(TOKENS), "INT64")
    np.testing.assert_allclose(got, fp32_outputs(fp32, TOKENS), atol=ATOL, rtol=RTOL)


def test_streaming_session(models):
    fp32, fp16 = models
    code = (
        "import json, sys, numpy as np\n"
        "from rnndeploy.runtime import StreamingSession\n"
        f"session = StreamingSession({str(fp16)!r}, providers='cpu')\n"
        f"tokens = {TOKENS!r}\n"
        "out = [session.step(np.array([t]))['output'][0].tolist() for t in tokens[:3]]\n"
        "out += session.step(np.array(tokens[3:]))['output'].tolist()\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert_clean(result)
    got = np.array(json.loads(result.stdout))
    np.testing.assert_allclose(got, fp32_outputs(fp32, TOKENS), atol=ATOL, rtol=RTOL)
