"""`rnndeploy run / generate / info` through click's CliRunner, against whole-sequence reference runs."""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx.reference import ReferenceEvaluator

from rnndeploy.cli import main
from rnndeploy.runtime import available_providers, testing

TOL = {"rtol": 1e-5, "atol": 1e-6}
VOCAB = list("abcdefgh ")


@pytest.fixture(scope="module")
def lm_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "lm.onnx"
    onnx.save(testing.lstm_lm(vocab=VOCAB, hidden_size=7), path)
    return path


@pytest.fixture(scope="module")
def odd_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "odd.onnx"
    onnx.save(testing.scaled_rnn(memory=("mem", "mem_updated"), total=("acc", "acc_new"), const="gain"), path)
    return path


def lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines()]


def reference_lm(path, tokens: np.ndarray) -> np.ndarray:
    zeros = np.zeros((2, 1, 7), np.float32)
    return ReferenceEvaluator(str(path)).run(["output"], {"input": tokens[None], "h0": zeros, "c0": zeros})[
        0
    ][0]


def test_run_npy(lm_path, tmp_path):
    tokens = np.random.default_rng(0).integers(0, len(VOCAB), 12)
    np.save(tmp_path / "tokens.npy", tokens)
    result = CliRunner().invoke(main, ["run", str(lm_path), "--input", str(tmp_path / "tokens.npy")])
    assert result.exit_code == 0, result.output
    rows = lines(result.output)
    assert [r["step"] for r in rows] == list(range(12))
    np.testing.assert_allclose(np.array([r["output"] for r in rows]), reference_lm(lm_path, tokens), **TOL)


def test_run_stdin_with_state_mapping_and_constant(odd_path):
    x = np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32)
    stdin = "\n".join(json.dumps(row.tolist()) for row in x) + "\n"
    args = [
        "run",
        str(odd_path),
        "--state",
        "mem=mem_updated",
        "--state",
        "acc=acc_new",
        "--const",
        "gain=0.5",
    ]
    result = CliRunner().invoke(main, args, input=stdin)
    assert result.exit_code == 0, result.output
    zeros = np.zeros((1, 5), np.float32)
    want = ReferenceEvaluator(str(odd_path)).run(
        ["y"], {"x": x[None], "mem": zeros, "acc": zeros, "gain": np.array([0.5], np.float32)}
    )[0][0]
    np.testing.assert_allclose(np.array([r["y"] for r in lines(result.output)]), want, **TOL)


@pytest.mark.parametrize(
    "args, stdin, message",
    [
        ([], "[0.1, 0.2, 0.3]\n", "no state pairs found"),
        (
            ["--state", "mem=mem_updated", "--state", "acc=acc_new"],
            "[1, 2, 3]\n",
            "give each line as a JSON object",
        ),
        (["--state", "mem"], "", "expected NAME=VALUE"),
        (
            ["--state", "mem=mem_updated", "--state", "acc=acc_new", "--const", "gain=x"],
            "",
            "VALUE must be JSON",
        ),
        (["--provider", "nosuch"], "", "'nosuch' (nosuch) is not available"),
    ],
    ids=["no-states", "const-missing", "bad-state", "bad-const", "bad-provider"],
)
def test_run_errors(odd_path, args, stdin, message):
    result = CliRunner().invoke(main, ["run", str(odd_path), *args], input=stdin)
    assert result.exit_code != 0 and message in result.output, result.output


def test_run_bad_line_names_the_step(lm_path):
    result = CliRunner().invoke(main, ["run", str(lm_path)], input="1\n0.5\n")
    assert result.exit_code == 1
    assert json.loads(result.output.splitlines()[0])["step"] == 0
    assert "step 1: input must have dtype int64, got float64" in result.output


def test_generate_greedy_matches_whole_sequence_argmax(lm_path):
    """The prompt, then the continuation (only the continuation with --continuation-only)."""
    args = ["generate", str(lm_path), "--prompt", "abc", "--length", "8", "--temperature", "0"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(lm_path), providers=["CPUExecutionProvider"])
    text = "abc"
    for _ in range(8):
        ids = np.array([[VOCAB.index(c) for c in text]])
        zeros = np.zeros((2, 1, 7), np.float32)
        scores = session.run(["output"], {"input": ids, "h0": zeros, "c0": zeros})[0][0, -1]
        text += VOCAB[int(np.argmax(scores))]
    assert result.output == text + "\n"
    result = CliRunner().invoke(main, [*args, "--continuation-only"])
    assert result.exit_code == 0 and result.output == text[3:] + "\n", result.output
    result = CliRunner().invoke(main, [*args[:-4], "--length", "0"])
    assert result.exit_code == 0 and result.output == "abc\n", result.output


def test_generate_sampling_is_seeded(lm_path):
    args = ["generate", str(lm_path), "--prompt", "ab", "--length", "40", "--top-k", "3"]
    first = CliRunner().invoke(main, [*args, "--seed", "1"]).output
    assert first == CliRunner().invoke(main, [*args, "--seed", "1"]).output
    assert len(first) == 43 and first.startswith("ab") and set(first[:-1]) <= set(VOCAB)
    assert first != CliRunner().invoke(main, [*args, "--seed", "2"]).output


def test_generate_errors(lm_path, odd_path, tmp_path):
    inferred = tmp_path / "inferred.onnx"
    onnx.save(testing.scaled_rnn(), inferred)
    result = CliRunner().invoke(main, ["generate", str(lm_path), "--prompt", "abz"])
    assert (
        result.exit_code == 1 and "prompt characters ['z'] are not in the model's vocabulary" in result.output
    )
    assert result.output.startswith("Error:"), "a refused prompt is not printed"
    args = ["generate", str(odd_path), "--prompt", "a"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "no state pairs found" in result.output
    result = CliRunner().invoke(main, ["generate", str(inferred), "--prompt", "a"])
    assert result.exit_code == 1 and "not a language model" in result.output


def test_info(lm_path):
    result = CliRunner().invoke(main, ["info", str(lm_path)])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert [(s["input"], s["output"], s["batch_axis"]) for s in info["states"]] == [
        ("h0", "hn", 1),
        ("c0", "cn", 1),
    ]
    assert info["inputs"] == ["input: int64[batch, time]"]
    assert info["metadata"]["rnndeploy.task"] == "lm"
    assert info["providers_available"] == starting_providers(lm_path)


def starting_providers(path) -> list[str]:
    """Reference: the providers of this onnxruntime build that a bare session on ``path`` really runs on."""
    ort.set_default_logger_severity(4)  # a provider that cannot load logs an error; it is what we test
    try:
        started = []
        for name in available_providers():
            session = ort.InferenceSession(str(path), providers=[name])
            if name in session.get_providers():
                started.append(name)
    finally:
        ort.set_default_logger_severity(2)
    return started


def rnndeploy(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "rnndeploy", *args]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=120)


def assert_no_onnxruntime_log(stderr: str) -> None:
    assert ":onnxruntime:" not in stderr and "\x1b[" not in stderr, f"onnxruntime logged: {stderr}"


def test_a_step_onnxruntime_rejects_prints_only_our_error(tmp_path):
    model = testing.lstm_lm(hidden_size=7, num_layers=2, metadata=False)  # no vocabulary: ids go unchecked
    path = tmp_path / "bare.onnx"
    onnx.save(model, path)
    result = rnndeploy("run", str(path), stdin="99\n")
    assert result.returncode == 1, result.stderr
    assert_no_onnxruntime_log(result.stderr)
    assert result.stderr.startswith("Error: step 0: the model cannot run this step"), result.stderr
    assert "input int64[1, 1] with values in [99, 99]" in result.stderr


def test_cuda_that_does_not_start_is_explained_in_cli_terms(lm_path):
    if "CUDAExecutionProvider" not in available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider")
    if "CUDAExecutionProvider" in starting_providers(lm_path):
        pytest.skip("CUDA starts on this machine")
    result = rnndeploy("run", str(lm_path), "--provider", "cuda")
    assert result.returncode == 1, result.stderr
    assert_no_onnxruntime_log(result.stderr)
    assert "--provider cuda: onnxruntime could not start CUDAExecutionProvider: " in result.stderr
    assert "Run with --provider cpu" in result.stderr and "providers=" not in result.stderr


def test_serve_refuses_a_model_without_states(odd_path):
    result = CliRunner().invoke(main, ["serve", str(odd_path), "--port", "1"])
    assert result.exit_code == 1 and "no state pairs found" in result.output, result.output


@pytest.mark.parametrize("token", [-1, len(VOCAB), 99])
def test_run_refuses_token_ids_outside_the_vocabulary(lm_path, token):
    result = CliRunner().invoke(main, ["run", str(lm_path)], input=f"1\n{token}\n")
    assert result.exit_code == 1
    assert (
        f"step 1: input input: token id {token} is outside the model's vocabulary [0, {len(VOCAB)})"
        in result.output
    )
    assert len(lines(result.output.split("Error")[0])) == 1, "step 0 ran, step 1 did not"


def test_run_text_prints_the_argmax_next_character(lm_path):
    text = "abba hg"
    result = CliRunner().invoke(main, ["run", str(lm_path), "--text", text])
    assert result.exit_code == 0, result.output
    got = lines(result.output)
    scores = reference_lm(lm_path, np.array([VOCAB.index(c) for c in text]))  # [T, V], the whole text at once
    assert [g["input"] for g in got] == list(text)
    assert [g["next"] for g in got] == [VOCAB[k] for k in scores.argmax(-1)]
    np.testing.assert_allclose([g["log_prob"] for g in got], scores.max(-1), rtol=1e-5, atol=1e-5)
    from_stdin = CliRunner().invoke(main, ["run", str(lm_path), "--text", "-"], input=text)
    assert from_stdin.output == result.output


def test_run_text_samples_reproducibly(lm_path):
    args = ["run", str(lm_path), "--text", "abcabc", "--temperature", "1.5"]
    first = CliRunner().invoke(main, [*args, "--seed", "3"])
    assert first.exit_code == 0, first.output
    assert first.output == CliRunner().invoke(main, [*args, "--seed", "3"]).output
    assert all(g["next"] in VOCAB for g in lines(first.output))


def test_run_text_refuses_characters_outside_the_vocabulary_and_other_models(lm_path, tmp_path):
    result = CliRunner().invoke(main, ["run", str(lm_path), "--text", "abz"])
    assert result.exit_code == 1
    assert "--text: text characters ['z'] are not in the model's vocabulary" in result.output
    inferred = tmp_path / "inferred.onnx"
    onnx.save(testing.scaled_rnn(), inferred)
    result = CliRunner().invoke(main, ["run", str(inferred), "--text", "a", "--const", "sample_rate=1"])
    assert result.exit_code == 1 and "not a language model" in result.output, result.output
