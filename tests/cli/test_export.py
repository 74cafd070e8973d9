"""`rnndeploy export` through click's CliRunner: success, verification failure, user errors."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from rnndeploy import ModelConfig, SequenceModel, save_checkpoint
from rnndeploy.cli import main
from rnndeploy.export import ExportError, export_checkpoint, pipeline, verification


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


def test_a_failed_verify_leaves_the_previous_file_and_keeps_the_rejected_one(
    checkpoint, tmp_path, monkeypatch
):
    out = tmp_path / "m.onnx"
    assert CliRunner().invoke(main, ["export", str(checkpoint), "-o", str(out), "--verify"]).exit_code == 0
    good = out.read_bytes()
    monkeypatch.setitem(verification.TOLERANCES, "fp32", (-1.0, 0.0))  # nothing can pass
    result = CliRunner().invoke(
        main, ["export", str(checkpoint), "-o", str(out), "--verify", "--overwrite", "--fp16", "--int8"]
    )
    assert result.exit_code == 1
    assert out.read_bytes() == good
    rejected = tmp_path / "m.rejected.onnx"
    message = " ".join(result.output.split())
    assert f"nothing was replaced (the rejected graph is kept at {rejected})" in message
    onnx.checker.check_model(onnx.load(rejected))
    # nothing built on the rejected graph, no temporary file left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm.pt", "m.onnx", "m.rejected.onnx"]


def test_a_passing_graph_is_fsynced_then_renamed_then_its_folder_fsynced(checkpoint, tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or fsync(fd)
    )
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or replace(a, b))
    out = tmp_path / "m.onnx"
    export_checkpoint(checkpoint, out, verify=True)
    final = [e for e in events if e[0] == "replace" and e[1] == str(out)]
    i = events.index(final[0])
    assert events[i - 1][0] == "fsync" and Path(events[i - 1][1]).parent == tmp_path  # the candidate
    assert events[i + 1] == ("fsync", str(tmp_path))  # the folder, so the rename survives a power loss


def test_export_refuses_to_replace_a_file_unless_told(checkpoint, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"someone else's model")
    result = CliRunner().invoke(main, ["export", str(checkpoint), "-o", str(out)])
    assert result.exit_code == 1
    assert f"{out} exists; pass --overwrite to replace it" in " ".join(result.output.split())
    assert out.read_bytes() == b"someone else's model"
    with pytest.raises(ExportError, match=r"exists; pass overwrite=True to replace it") as info:
        export_checkpoint(checkpoint, out, verify=False)
    assert "--overwrite" not in str(info.value)
    assert out.read_bytes() == b"someone else's model"
    # a variant that exists is refused before anything is written, the fp32 graph included
    (tmp_path / "n.int8.onnx").write_bytes(b"old int8")
    with pytest.raises(pipeline.OutputExistsError, match="n.int8.onnx exists"):
        export_checkpoint(checkpoint, tmp_path / "n.onnx", verify=False, int8=True)
    assert not (tmp_path / "n.onnx").exists()
    result = CliRunner().invoke(main, ["export", str(checkpoint), "-o", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(onnx.load(out))


def test_export_step_graph_writes_verified_step_graphs_for_every_precision(tmp_path):
    """`export --step-graph --fp16 --int8 --verify` writes the step graph and its variants, each checked step by
    step against PyTorch, next to the sequence graphs; a GRU gets an int8 step graph with int8 products."""
    model = SequenceModel(ModelConfig(task="lm", cell="gru", vocab_size=12, embed_dim=4, hidden_size=8))
    ckpt = save_checkpoint(tmp_path / "m.pt", model, vocab=[chr(97 + i) for i in range(12)])
    out = tmp_path / "m.onnx"
    args = ["export", str(ckpt), "-o", str(out), "--step-graph", "--fp16", "--int8", "--verify"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    for name in ("m.step.onnx", "m.step.fp16.onnx", "m.step.int8.onnx"):
        graph = onnx.load(str(tmp_path / name))
        ops = {node.op_type for node in graph.graph.node}
        assert not ops & {"GRU", "LSTM", "RNN", "Loop", "Scan"}, (name, ops)
        meta = {p.key: p.value for p in graph.metadata_props}
        assert meta["rnndeploy.form"] == "step", meta
    int8_ops = {node.op_type for node in onnx.load(str(tmp_path / "m.step.int8.onnx")).graph.node}
    assert int8_ops & {"MatMulInteger", "DynamicQuantizeMatMul"}, int8_ops
    assert result.output.count("step graph B1-T6") == 3 * 2, result.output  # fp32, fp16, int8: output, hn
    assert "int8 step-graph accuracy change" in result.output, result.output
    (tmp_path / "k.step.onnx").write_bytes(b"a step graph of another model")
    again = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(tmp_path / "k.onnx"), "--step-graph"])
    assert again.exit_code == 1 and "k.step.onnx exists; pass --overwrite" in again.output, again.output
    assert not (tmp_path / "k.onnx").exists(), "nothing is written when one target is refused"
