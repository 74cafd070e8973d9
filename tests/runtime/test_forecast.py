"""A forecaster answers in the units of its training series: the runtime applies ``rnndeploy.data_stats``.

The reference is the checkpoint's model in PyTorch, fed ``(x - mean) / std`` and mapped back with
``y * std + mean`` by hand, as examples/forecast_co2.py does.
"""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rnndeploy.checkpoint import load_checkpoint
from rnndeploy.cli import main
from rnndeploy.export import export_checkpoint, export_onnx
from rnndeploy.models import ModelConfig, SequenceModel
from rnndeploy.runtime import ModelError, StreamingSession
from rnndeploy.train import TrainOptions, train

from ..serve_subprocess import infer, serving

TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(scope="module")
def forecaster(tmp_path_factory):
    """A GRU trained for a few steps on a two-column CSV far from zero mean / unit scale, exported."""
    folder = tmp_path_factory.mktemp("forecast")
    t = np.arange(400)
    series = np.stack([400 + 10 * np.sin(t / 7), -3 + 0.5 * np.cos(t / 5)], axis=1)
    csv = folder / "series.csv"
    csv.write_text("level,change\n" + "".join(f"{a:.4f},{b:.4f}\n" for a, b in series))
    options = TrainOptions(
        data=str(csv),
        cell="gru",
        hidden=8,
        embed=4,
        seq_len=16,
        batch=2,
        steps=4,
        eval_every=4,
        device="cpu",
        out=folder / "model.pt",
        progress=False,
    )
    result = train(options)
    onnx_path = folder / "model.onnx"
    export_checkpoint(result.checkpoint, onnx_path, verify=False)
    rows = np.loadtxt(csv, delimiter=",", skiprows=1, dtype=np.float32)[:6]
    return load_checkpoint(result.checkpoint), onnx_path, rows


def torch_forecast(ckpt, rows: np.ndarray) -> np.ndarray:
    mean = np.asarray(ckpt.data_stats["mean"], np.float32)
    std = np.asarray(ckpt.data_stats["std"], np.float32)
    with torch.no_grad():
        y, _ = ckpt.model(torch.from_numpy((rows - mean) / std)[None])
    return y[0].numpy() * std + mean


def test_run_forecasts_in_the_units_of_the_training_csv(forecaster):
    ckpt, path, rows = forecaster
    stdin = "".join(json.dumps(row.tolist()) + "\n" for row in rows)
    result = CliRunner().invoke(main, ["run", str(path)], input=stdin)
    assert result.exit_code == 0, result.output
    got = np.array([json.loads(line)["output"] for line in result.output.splitlines()])
    want = torch_forecast(ckpt, rows)
    assert abs(want[:, 0].mean() - 400) < 30, "the reference forecast should be in ppm-like units"
    np.testing.assert_allclose(got, want, **TOL)


def test_serve_forecasts_in_the_units_of_the_training_csv(forecaster):
    ckpt, path, rows = forecaster
    with serving(path) as served:
        got = infer(served.url, rows, "FP32")
    np.testing.assert_allclose(got, torch_forecast(ckpt, rows), **TOL)


def test_run_raw_feeds_the_graph_as_it_is(forecaster):
    ckpt, path, rows = forecaster
    stdin = "".join(json.dumps(row.tolist()) + "\n" for row in rows)
    result = CliRunner().invoke(main, ["run", str(path), "--raw"], input=stdin)
    assert result.exit_code == 0, result.output
    got = np.array([json.loads(line)["output"] for line in result.output.splitlines()])
    with torch.no_grad():
        want, _ = ckpt.model(torch.from_numpy(rows)[None])
    np.testing.assert_allclose(got, want[0].numpy(), **TOL)


@pytest.mark.parametrize("io_binding", [False, True], ids=["run", "iobinding"])
def test_session_normalizes_step_and_step_many(forecaster, io_binding):
    ckpt, path, rows = forecaster
    session = StreamingSession(path, providers="cpu", io_binding=io_binding)
    assert session.normalization is not None
    assert session.normalization.inputs == ("input",) and session.normalization.outputs == ("output",)
    assert session.describe()["normalization"]["mean"] == pytest.approx(ckpt.data_stats["mean"])
    want = torch_forecast(ckpt, rows)
    got = [session.step(rows[t : t + 1], stream="a")["output"] for t in range(3)]  # [1, F] steps
    got.append(session.step(rows[3:], stream="a")["output"])  # a chunk of 3
    np.testing.assert_allclose(np.concatenate(got), want, **TOL)
    many = [session.step_many({"b": rows[t : t + 1], "c": rows[t : t + 1]}) for t in range(6)]
    for stream in ("b", "c"):
        np.testing.assert_allclose(np.concatenate([m[stream]["output"] for m in many]), want, **TOL)
    assert StreamingSession(path, normalize=False).normalization is None


def test_statistics_that_do_not_fit_the_input_are_refused(tmp_path):
    config = ModelConfig(
        task="regression", cell="gru", input_size=3, output_size=3, embed_dim=4, hidden_size=5
    )
    path = tmp_path / "bad.onnx"
    export_onnx(SequenceModel(config).eval(), path, data_stats={"mean": [0.0, 1.0], "std": [1.0, 2.0]})
    with pytest.raises(ModelError, match=r"2 features but input input: float32\[batch, time, 3\] has 3"):
        StreamingSession(path)
    assert StreamingSession(path, normalize=False).normalization is None


def test_run_reads_a_csv_with_a_header_and_names_the_columns(forecaster, tmp_path):
    ckpt, path, rows = forecaster
    csv = tmp_path / "steps.csv"
    csv.write_text("level,change\n" + "".join(f"{a!r},{b!r}\n" for a, b in rows.tolist()))
    result = CliRunner().invoke(main, ["run", str(path), "--input", str(csv)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert [line["step"] for line in lines] == list(range(len(rows)))
    assert all(list(line["output"]) == ["level", "change"] for line in lines)
    got = np.array([[line["output"]["level"], line["output"]["change"]] for line in lines])
    np.testing.assert_allclose(got, torch_forecast(ckpt, rows), **TOL)


def test_run_reads_json_lines_of_named_fields(forecaster):
    """Fields by name, in any order per line: the first line's order is the column order."""
    ckpt, path, rows = forecaster
    stdin = json.dumps({"level": float(rows[0, 0]), "change": float(rows[0, 1])}) + "\n"
    stdin += "".join(json.dumps({"change": float(b), "level": float(a)}) + "\n" for a, b in rows[1:])
    result = CliRunner().invoke(main, ["run", str(path)], input=stdin)
    assert result.exit_code == 0, result.output
    outputs = [json.loads(line)["output"] for line in result.output.splitlines()]
    got = np.array([[out["level"], out["change"]] for out in outputs])
    np.testing.assert_allclose(got, torch_forecast(ckpt, rows), **TOL)
    stdin = json.dumps({"level": 1.0, "change": 2.0}) + "\n" + json.dumps({"level": 1.0, "other": 2.0}) + "\n"
    result = CliRunner().invoke(main, ["run", str(path)], input=stdin)
    assert result.exit_code == 1 and "every line needs the same fields" in result.output, result.output


@pytest.mark.parametrize(
    "text, message",
    [
        ("level,change\n1.0,x\n", "line 2: expected 2 numbers (columns ['level', 'change'])"),
        ("level,change\n1.0,2.0,3.0\n", "line 2: expected 2 numbers"),
        ("level,change\n", "has no data rows"),
        ("1.0,nan\n", "line 1: expected 2 numbers"),
    ],
    ids=["not-a-number", "too-wide", "header-only", "nan"],
)
def test_run_refuses_a_bad_csv_naming_the_line(forecaster, tmp_path, text, message):
    _, path, _ = forecaster
    csv = tmp_path / "bad.csv"
    csv.write_text(text)
    result = CliRunner().invoke(main, ["run", str(path), "--input", str(csv)])
    assert result.exit_code == 1 and message in result.output, result.output
    assert "allow_pickle" not in result.output


@pytest.mark.parametrize("command", ["run", "info", "generate", "serve"])
def test_a_training_checkpoint_is_named_as_one(forecaster, command):
    ckpt_path = forecaster[1].with_name("model.pt")
    extra = {"generate": ["--prompt", "a"], "serve": ["--port", "0", "--grpc-port", "0"]}.get(command, [])
    result = CliRunner().invoke(main, [command, str(ckpt_path), *extra], input="1\n")
    assert result.exit_code == 1, result.output
    assert "is a PyTorch training checkpoint, not an ONNX model" in result.output, result.output
    assert f"rnndeploy export {ckpt_path} -o model.onnx" in result.output
    with pytest.raises(ModelError, match="PyTorch training checkpoint"):
        StreamingSession(ckpt_path.read_bytes())
