"""`rnndeploy export` through click's CliRunner: success, verification failure, user errors."""

from __future__ import annotations

import onnx
import pytest
from click.testing import CliRunner

from rnndeploy import ModelConfig, SequenceModel, save_checkpoint
from rnndeploy.cli import main
from rnndeploy.export import export_checkpoint, verification


@pytest.fixture
def checkpoint(tmp_path):
    model = SequenceModel(ModelConfig(task="lm", cell="lstm", vocab_size=6, embed_dim=4, hidden_size=5))
    return save_checkpoint(tmp_path / "lm.pt", model, vocab=list("abcdef"))


def test_export_verify_writes_all_artifacts(checkpoint, tmp_path):
    out = tmp_path / "out" / "lm.onnx"
    result = CliRunner().invoke(
        main,
        [
            "export",
            str(checkpoint),
            "-o",
            str(out),
            "--verify",
            "--fp16",
            "--int8",
            "--triton-repo",
            str(tmp_path / "repo"),
        ],
    )
    assert result.exit_code == 0, result.output
    for path in (
        out,
        out.with_name("lm.fp16.onnx"),
        out.with_name("lm.int8.onnx"),
        tmp_path / "repo/lm/1/model.onnx",
    ):
        onnx.checker.check_model(onnx.load(path))
    assert result.output.count("PASSED") == 3
    assert "max abs" in result.output and "top-1 agreement" in result.output and "int8" in result.output


def test_default_output_is_next_to_the_checkpoint(checkpoint):
    result = CliRunner().invoke(main, ["export", str(checkpoint)])
    assert result.exit_code == 0, result.output
    assert checkpoint.with_suffix(".onnx").is_file()


def test_failed_verification_exits_nonzero(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(verification.TOLERANCES, "fp32", (-1.0, 0.0))  # nothing can pass
    result = CliRunner().invoke(main, ["export", str(checkpoint), "-o", str(tmp_path / "m.onnx"), "--verify"])
    assert result.exit_code == 1
    assert "FAILED" in result.output and "verification failed" in result.output


def test_missing_checkpoint(tmp_path):
    result = CliRunner().invoke(main, ["export", str(tmp_path / "nope.pt")])
    assert result.exit_code == 1
    assert "nope.pt does not exist" in result.output


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00not a checkpoint at all")
    result = CliRunner().invoke(main, ["export", str(bad)])
    assert result.exit_code == 1
    assert "bad.pt is not a checkpoint: expected the .pt file (a zip archive)" in " ".join(
        result.output.split()
    )
    assert "Traceback" not in result.output


def test_unsupported_opset(checkpoint):
    result = CliRunner().invoke(main, ["export", str(checkpoint), "--opset", "11"])
    assert result.exit_code == 1
    assert "opset must be in [14, 20], got 11" in result.output


def test_export_checkpoint_report_for_the_demo(checkpoint, tmp_path):
    report = export_checkpoint(checkpoint, tmp_path / "demo.onnx", verify=True)
    assert report.ok
    text = str(report)
    assert text.startswith(f"wrote fp32: {tmp_path / 'demo.onnx'}")
    assert "onnxruntime stepwise" in text and "onnx.reference" in text and text.rstrip().endswith("PASSED")
