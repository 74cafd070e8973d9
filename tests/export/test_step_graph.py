"""The one-step graph: plain operators only, the sequence graph's contract, parity with PyTorch step by step and
with the sequence graph in onnxruntime, for every cell, layer count, task and precision."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from rnndeploy import ModelConfig, SequenceModel
from rnndeploy.export import ExportError, export_onnx
from rnndeploy.export.exporter import example_input
from rnndeploy.export.step_graph import (
    QUANTIZED_MATMULS,
    export_step_graph,
    quantize_step_graph,
    step_int8_accuracy,
    verify_step_graph,
)
from rnndeploy.export.verification import _run_stepwise, compare, session

CELLS = {
    "rnn-tanh": ("rnn", "tanh"),
    "rnn-relu": ("rnn", "relu"),
    "lstm": ("lstm", "tanh"),
    "gru": ("gru", "tanh"),
}
TASKS = {
    "lm": dict(task="lm", vocab_size=11),
    "regression": dict(task="regression", input_size=3, output_size=2),
}
FORBIDDEN = {"RNN", "LSTM", "GRU", "Loop", "Scan", "If", "DynamicQuantizeLSTM"}


def make_model(cell: str, layers: int, task: str, seed: int = 0) -> SequenceModel:
    torch.manual_seed(seed)
    kind, nonlinearity = CELLS[cell]
    config = ModelConfig(
        cell=kind, nonlinearity=nonlinearity, num_layers=layers, embed_dim=6, hidden_size=7, **TASKS[task]
    )
    return SequenceModel(config).eval()


def write(model: SequenceModel, precision: str, tmp_path) -> tuple:
    fp32 = export_step_graph(model, tmp_path / "step.onnx")
    if precision == "fp16":
        return export_step_graph(model, tmp_path / "step.fp16.onnx", fp16=True), fp32
    if precision == "int8":
        return quantize_step_graph(fp32, tmp_path / "step.int8.onnx"), fp32
    return fp32, fp32


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("layers", [1, 2], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("cell", list(CELLS))
def test_step_graph_matches_torch_and_the_sequence_graph(cell, layers, task, precision, tmp_path):
    model = make_model(cell, layers, task)
    path, fp32_path = write(model, precision, tmp_path)
    proto = onnx.load(str(path))
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & FORBIDDEN, ops
    if precision == "int8":  # every product of every cell is quantized
        assert ops & set(QUANTIZED_MATMULS) and "MatMul" not in ops and "Gemm" not in ops, ops
    else:
        assert "MatMul" in ops
    if precision == "fp16":
        assert {i.data_type for i in proto.graph.initializer if i.data_type in (1, 10)} == {
            TensorProto.FLOAT16
        }
    report = verify_step_graph(model, path, steps=5, batches=(1, 3))
    assert report.ok, str(report)
    assert len(report.checks) == 2 * len(model.config.state_names) + 2
    if precision == "int8":
        assert report.max_abs > 0  # quantization changed something, within the int8 tolerance

    # the fp32 sequence graph (RNN/LSTM/GRU nodes) run in onnxruntime over the whole sequence
    export_onnx(model, tmp_path / "seq.onnx")
    c = model.config
    names = ["output"] + [f"{s}n" for s in c.state_names]
    state_in = [f"{s}0" for s in c.state_names]
    generator = torch.Generator().manual_seed(3)
    x = example_input(model, 4, 9, generator).numpy()
    state = [torch.randn(s.shape, generator=generator).numpy() for s in model.init_state(4)]
    expected = session(tmp_path / "seq.onnx").run(
        names, {"input": x, **dict(zip(state_in, state, strict=True))}
    )
    got = _run_stepwise(session(path, precision=precision), names, state_in, x, state)
    for name, g, e in zip(names, got, expected, strict=True):
        check = compare("step vs sequence graph", name, g, e, precision)
        assert check.ok, (name, check.max_abs, check.scale)


@pytest.mark.parametrize("task", list(TASKS))
def test_step_graph_keeps_the_contract_of_the_sequence_graph(task, tmp_path):
    model = make_model("lstm", 2, task)
    vocab = [chr(97 + i) for i in range(11)] if task == "lm" else None
    stats = {"mean": [0.5, 1.0, 2.0], "std": [1.0, 2.0, 3.0]} if task == "regression" else None
    seq = export_onnx(model, tmp_path / "seq.onnx", vocab=vocab, data_stats=stats)
    step = onnx.load(str(export_step_graph(model, tmp_path / "step.onnx", vocab=vocab, data_stats=stats)))
    seq_meta = {p.key: p.value for p in seq.metadata_props}
    step_meta = {p.key: p.value for p in step.metadata_props}
    assert step_meta.pop("rnndeploy.form") == "step"
    assert step_meta == seq_meta
    assert json.loads(step_meta["rnndeploy.states"])[1]["input"] == "c0"

    def io(values):
        return [
            (
                v.name,
                v.type.tensor_type.elem_type,
                [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            )
            for v in values
        ]

    seq_io = {n: (t, dims) for n, t, dims in io(list(seq.graph.input) + list(seq.graph.output))}
    step_io = io(list(step.graph.input) + list(step.graph.output))
    assert [n for n, _, _ in step_io] == [v.name for v in list(seq.graph.input) + list(seq.graph.output)]
    for name, dtype, dims in step_io:
        seq_dtype, seq_dims = seq_io[name]
        assert dtype == seq_dtype, name
        # the same dynamic batch axis; the step graph's time axis is 1
        assert [1 if d == "time" else d for d in seq_dims] == dims, (name, seq_dims, dims)


def test_fp16_step_graph_computes_in_half_with_float_io(tmp_path):
    model = make_model("gru", 1, "regression")
    proto = onnx.load(str(export_step_graph(model, tmp_path / "half.onnx", fp16=True)))
    assert {v.type.tensor_type.elem_type for v in list(proto.graph.input)[1:]} == {TensorProto.FLOAT}
    assert {v.type.tensor_type.elem_type for v in proto.graph.output} == {TensorProto.FLOAT}
    types = {v.name: v.type.tensor_type.elem_type for v in proto.graph.value_info}
    tanh = next(n for n in proto.graph.node if n.op_type == "Tanh")
    assert types[tanh.output[0]] == TensorProto.FLOAT16
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["rnndeploy.precision"] == "fp16" and meta["rnndeploy.form"] == "step"


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "separate"])
@pytest.mark.parametrize("cell", ["rnn-tanh", "lstm", "gru"])
def test_both_product_layouts_match_torch(cell, fuse, tmp_path):
    for task in TASKS:
        model = make_model(cell, 2, task, seed=1)
        path = export_step_graph(model, tmp_path / f"{task}.onnx", fuse=fuse)
        concat = any(
            n.op_type == "Concat" and n.output[0] not in ("hn", "cn") for n in onnx.load(str(path)).graph.node
        )
        assert concat == fuse
        report = verify_step_graph(model, path)
        assert report.ok, str(report)


def test_encoder_wider_than_the_gates_is_not_folded(tmp_path):
    torch.manual_seed(0)
    model = SequenceModel(
        ModelConfig(task="regression", cell="rnn", input_size=40, output_size=1, embed_dim=2, hidden_size=3)
    ).eval()
    path = export_step_graph(model, tmp_path / "step.onnx")
    assert "encoder.weight_t" in {i.name for i in onnx.load(str(path)).graph.initializer}
    assert verify_step_graph(model, path).ok


def test_int8_accuracy_reports_scores_on_given_data(tmp_path):
    model = make_model("gru", 1, "lm")
    fp32 = export_step_graph(model, tmp_path / "step.onnx")
    int8 = quantize_step_graph(fp32, tmp_path / "step.int8.onnx")
    tokens = torch.randint(0, 11, (400,), generator=torch.Generator().manual_seed(0))
    lines = step_int8_accuracy(model, fp32, int8, (tokens, "random tokens"), batch=4)
    text = "\n".join(lines)
    assert "random tokens" in text and "bits/char" in text
    # fp32 bits/char equal what PyTorch scores on the same streams
    x = tokens[: 4 * 100].reshape(4, 100)
    with torch.no_grad():
        y, _ = model(x[:, :-1])
    bits = float(torch.nn.functional.nll_loss(y.reshape(-1, 11), x[:, 1:].reshape(-1)) / np.log(2))
    assert f"fp32 {bits:.4f}" in text


def test_bad_inputs_are_named(tmp_path):
    bi = SequenceModel(
        ModelConfig(task="classification", cell="gru", input_size=2, output_size=2, bidirectional=True)
    )
    with pytest.raises(ExportError, match="bidirectional"):
        export_step_graph(bi, tmp_path / "bi.onnx")
    model = make_model("lstm", 1, "lm")
    export_onnx(model, tmp_path / "seq.onnx")
    with pytest.raises(ExportError, match="not an fp32 step graph"):
        quantize_step_graph(tmp_path / "seq.onnx", tmp_path / "q.onnx")
    with pytest.raises(ExportError, match="not a step graph"):
        verify_step_graph(model, tmp_path / "seq.onnx")
    with pytest.raises(ExportError, match="opset"):
        export_step_graph(model, tmp_path / "x.onnx", opset=9)
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "q.onnx").exists()
