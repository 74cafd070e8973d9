"""Hostile ``rnndeploy.*`` metadata: a clear ModelError at load (Python, info, run, generate, serve), with a
bounded message, and never a silently missing vocabulary or normalization."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from rnndeploy.cli import main
from rnndeploy.runtime import ModelError, StreamingSession, testing
from rnndeploy.runtime.metadata import QUOTE_CHARS

MAX_MESSAGE = 600  # a message quotes at most QUOTE_CHARS of a bad value, plus its own words
STATE = {"input": "h0", "output": "hn", "shape": [2, "batch", 7], "batch_axis": 1, "dtype": "float32"}
C_STATE = {**STATE, "input": "c0", "output": "cn"}
MILLION = json.dumps([chr(0x100 + k) for k in range(1_000_000)])


def with_metadata(model: onnx.ModelProto, **props: str) -> bytes:
    """``model`` with metadata props replaced (``rnndeploy_x`` -> ``rnndeploy.x``)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    meta = {p.key: p.value for p in copy.metadata_props}
    meta.update({k.replace("_", ".", 1): v for k, v in props.items()})
    onnx.helper.set_model_props(copy, meta)
    return copy.SerializeToString()


@pytest.fixture(scope="module")
def lm():
    return testing.lstm_lm(hidden_size=7, num_layers=2)


BAD_LM = {
    "shape-int": (
        {"rnndeploy_states": json.dumps([{**STATE, "shape": 5}, C_STATE])},
        "rnndeploy.states entry 0",
    ),
    "shape-str": ({"rnndeploy_states": json.dumps([{**STATE, "shape": "abc"}, C_STATE])}, "shape must be"),
    "axis-str": (
        {"rnndeploy_states": json.dumps([{**STATE, "batch_axis": "1"}, C_STATE])},
        "batch_axis must",
    ),
    "entry-int": ({"rnndeploy_states": json.dumps([3, C_STATE])}, "rnndeploy.states entry 0"),
    "name-int": ({"rnndeploy_states": json.dumps([{**STATE, "input": 1}, C_STATE])}, "input must be"),
    "states-dict": ({"rnndeploy_states": json.dumps({"h0": "hn"})}, "rnndeploy.states must be"),
    "states-deep": ({"rnndeploy_states": "[" * 100_000 + "]" * 100_000}, "nests too deep"),
    "config-list": ({"rnndeploy_config": "[1, 2]"}, "rnndeploy.config must be a JSON object"),
    "config-str": ({"rnndeploy_config": '"lm"'}, "rnndeploy.config must be a JSON object"),
    "config-not-json": ({"rnndeploy_config": "{oops"}, "rnndeploy.config is not JSON"),
    "head": ({"rnndeploy_config": json.dumps({"head": 3})}, "head must be one of"),
    "vocab-size-str": ({"rnndeploy_config": json.dumps({"vocab_size": "9"})}, "vocab_size must be"),
    "vocab-dict": ({"rnndeploy_vocab": json.dumps({"a": 0})}, "rnndeploy.vocab must be"),
    "vocab-ints": ({"rnndeploy_vocab": json.dumps(list(range(9)))}, "rnndeploy.vocab must be"),
    "vocab-str": ({"rnndeploy_vocab": '"abcdefgh "'}, "rnndeploy.vocab must be"),
    "vocab-twice": ({"rnndeploy_vocab": json.dumps(list("abcdefgha"))}, "more than once"),
    "vocab-million": ({"rnndeploy_vocab": MILLION}, "1000000 token ids but the language model's output"),
    "vocab-short": (
        {"rnndeploy_vocab": json.dumps(list("abc"))},
        "3 token ids but the language model's output",
    ),
    "vocab-vs-config": (
        {"rnndeploy_config": json.dumps({"vocab_size": 9}), "rnndeploy_vocab": json.dumps(list("abc"))},
        "rnndeploy.vocab has 3 entries but the model's vocab_size is 9",
    ),
    "task-vs-config": ({"rnndeploy_config": json.dumps({"task": "regression"})}, "rnndeploy.task is 'lm'"),
    "stats-list": ({"rnndeploy_data_stats": "[1]"}, "rnndeploy.data_stats must be a JSON object"),
}


@pytest.mark.parametrize("props, message", BAD_LM.values(), ids=BAD_LM.keys())
def test_bad_metadata_is_a_model_error_with_a_bounded_message(lm, props, message):
    with pytest.raises(ModelError) as error:
        StreamingSession(with_metadata(lm, **props), providers="cpu")
    assert message in str(error.value)
    assert len(str(error.value)) < MAX_MESSAGE, str(error.value)[:2000]


@pytest.mark.parametrize("command", ["info", "run", "generate", "serve"])
@pytest.mark.parametrize("case", ["shape-int", "vocab-dict", "vocab-million", "config-list"])
def test_every_command_refuses_bad_metadata_in_one_line(lm, tmp_path, command, case):
    props, message = BAD_LM[case]
    path = tmp_path / "bad.onnx"
    path.write_bytes(with_metadata(lm, **props))
    if command == "serve":  # a server that loads the model would not return: a subprocess with a timeout
        args = [sys.executable, "-m", "rnndeploy", "serve", str(path), "--port", "0", "--grpc-port", "0"]
        result = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1, result.stderr[:2000]
        assert "Traceback" not in result.stderr, result.stderr[-2000:]
        assert message in result.stderr and len(result.stderr) < MAX_MESSAGE, result.stderr[:2000]
        return
    extra = ["--prompt", "ab"] if command == "generate" else []
    result = CliRunner().invoke(main, [command, str(path), *extra], input="1\n")
    assert result.exit_code == 1, result.output[:2000]
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert message in result.output and len(result.output) < MAX_MESSAGE, result.output[:2000]


def test_a_checked_vocabulary_is_what_a_server_can_rely_on(lm):
    session = StreamingSession(lm.SerializeToString(), providers="cpu")
    assert session.vocab == list("abcdefgh ") and session.vocab_size == 9
    # Without a vocabulary the config's vocab_size still bounds the token ids.
    sized = with_metadata(lm, rnndeploy_config=json.dumps({"task": "lm", "vocab_size": 9}))
    stripped = onnx.ModelProto()
    stripped.ParseFromString(sized)
    kept = [p for p in stripped.metadata_props if p.key != "rnndeploy.vocab"]
    del stripped.metadata_props[:]
    stripped.metadata_props.extend(kept)
    session = StreamingSession(stripped.SerializeToString(), providers="cpu")
    assert session.vocab is None and session.vocab_size == 9


@pytest.fixture(scope="module")
def forecaster():
    model = testing.scaled_rnn(input_size=2)
    onnx.helper.set_model_props(model, {"rnndeploy.task": "regression"})
    return model


BAD_STATS = {
    "std-0": ({"mean": [0, 0], "std": [1, 0]}, "every std must be > 0"),
    "std-negative": ({"mean": [0, 0], "std": [1, -2]}, "every std must be > 0"),
    "std-underflows-in-float32": ({"mean": [0, 0], "std": [1, 1e-50]}, "does not fit the model's float32"),
    "mean-overflows-in-float32": ({"mean": [1e300, 0], "std": [1, 1]}, "does not fit the model's float32"),
    "std-nan": ('{"mean": [0, 0], "std": [1, NaN]}', "std must be a finite number"),
    "mean-inf": ('{"mean": [Infinity, 0], "std": [1, 1]}', "mean must be a finite number"),
    "std-missing": ({"mean": [0, 0]}, "hold both mean and std"),
    "std-str": ({"mean": [0, 0], "std": ["1", "1"]}, "std must be a finite number"),
    "nested": ({"mean": [[0, 0]], "std": [[1, 1]]}, "mean must be a finite number"),
    "lengths": ({"mean": [0, 0], "std": [1]}, "mean has 2 features, std 1"),
    "bool": ({"mean": [0, 0], "std": [True, True]}, "std must be a finite number"),
}


@pytest.mark.parametrize("stats, message", BAD_STATS.values(), ids=BAD_STATS.keys())
def test_bad_data_stats_are_refused_at_load(forecaster, stats, message):
    text = stats if isinstance(stats, str) else json.dumps(stats)
    with pytest.raises(ModelError) as error:
        StreamingSession(
            with_metadata(forecaster, rnndeploy_data_stats=text),
            constants={"sample_rate": 1.0},
            providers="cpu",
        )
    assert message in str(error.value) and "rnndeploy.data_stats" in str(error.value)
    assert len(str(error.value)) < MAX_MESSAGE


def test_good_data_stats_still_load(forecaster):
    """The checks refuse only bad statistics: tiny but representable ones normalise as before."""
    stats = {"mean": [1.0, -2.0], "std": [1e-30, 3.0]}
    session = StreamingSession(
        with_metadata(forecaster, rnndeploy_data_stats=json.dumps(stats)),
        constants={"sample_rate": 1.0},
        providers="cpu",
    )
    np.testing.assert_array_equal(session.normalization.std, [1e-30, 3.0])
    assert QUOTE_CHARS < MAX_MESSAGE
