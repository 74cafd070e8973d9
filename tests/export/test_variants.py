"""fp16 and int8 variants: graph types, kernels used, parity with PyTorch within the documented tolerances."""

from __future__ import annotations

import pytest
from onnx import TensorProto

from rnndeploy import ModelConfig, SequenceModel
from rnndeploy.export import TOLERANCES, export_onnx, quantize_int8, save_onnx, to_fp16, verify

CONFIGS = {
    "lstm-L2-embed": dict(task="lm", cell="lstm", vocab_size=11, num_layers=2),
    "gru-L1-linear": dict(task="regression", cell="gru", input_size=3, output_size=2),
    "rnn-L2-bi-linear": dict(
        task="classification", cell="rnn", input_size=3, num_layers=2, bidirectional=True, output_size=3
    ),
}


def make_model(**kwargs) -> SequenceModel:
    return SequenceModel(ModelConfig(embed_dim=6, hidden_size=8, **kwargs)).eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp16_graph_is_half_inside_with_float_io(name, tmp_path):
    model = make_model(**CONFIGS[name])
    half = to_fp16(export_onnx(model))
    save_onnx(half, tmp_path / "half.onnx")
    assert {i.data_type for i in half.graph.initializer if i.data_type in (1, 10)} == {TensorProto.FLOAT16}
    assert {v.type.tensor_type.elem_type for v in half.graph.output} == {TensorProto.FLOAT}
    recurrent = next(n for n in half.graph.node if n.op_type in ("RNN", "LSTM", "GRU"))
    types = {v.name: v.type.tensor_type.elem_type for v in half.graph.value_info}
    assert types[recurrent.output[1]] == TensorProto.FLOAT16  # the recurrence itself runs in half
    meta = {p.key: p.value for p in half.metadata_props}
    assert meta["rnndeploy.precision"] == "fp16"
    # onnxruntime CPU (casts to fp32) and onnx.reference (true fp16 numpy arithmetic) against PyTorch fp32
    report = verify(model, tmp_path / "half.onnx", precision="fp16", shapes=((1, 1), (3, 6)))
    assert report.ok, str(report)
    assert any(c.name.startswith("onnx.reference") for c in report.checks)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_int8_quantizes_lstm_only_and_stays_within_tolerance(name, tmp_path):
    model = make_model(**CONFIGS[name])
    export_onnx(model, tmp_path / "fp32.onnx")
    proto = quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx")
    ops = {n.op_type for n in proto.graph.node}
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["rnndeploy.precision"] == "int8" and meta["rnndeploy.config"] == model.config.to_json()
    cell = model.config.cell
    if cell == "lstm":
        assert "DynamicQuantizeLSTM" in ops and "LSTM" not in ops
    else:  # onnxruntime has no quantized GRU/RNN: they stay fp32
        assert {"rnn": "RNN", "gru": "GRU"}[cell] in ops
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops  # the head is quantized
    report = verify(model, tmp_path / "int8.onnx", precision="int8", shapes=((2, 5),))
    assert report.ok, str(report)
    assert 0 < report.max_abs <= TOLERANCES["int8"][0]  # quantization changed something, within tolerance


@pytest.mark.gpu
def test_fp16_runs_on_cuda_execution_provider(tmp_path):
    model = make_model(**CONFIGS["lstm-L2-embed"])
    save_onnx(to_fp16(export_onnx(model)), tmp_path / "half.onnx")
    report = verify(model, tmp_path / "half.onnx", precision="fp16", providers=["CUDAExecutionProvider"])
    assert report.providers[0] == "CUDAExecutionProvider"
    assert report.ok, str(report)
