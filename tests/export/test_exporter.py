"""export_onnx: standard RNN/LSTM/GRU nodes, the ONNX contract, parity with PyTorch through onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import rnndeploy
from rnndeploy import ModelConfig, SequenceModel
from rnndeploy.export import ExportError, export_onnx, verify
from rnndeploy.export.exporter import EXAMPLE_BATCH, EXAMPLE_TIME

# A covering subset of cell x layers x bidirectional x encoder x head (SequenceModel is batch-first; the
# time-major torch.nn layers are covered by the plain-module tests below).
CASES = {
    "lstm-L2-uni-embed-logsoftmax": dict(task="lm", cell="lstm", vocab_size=11, num_layers=2),
    "gru-L1-uni-linear-identity": dict(task="regression", cell="gru", input_size=4, output_size=2),
    "rnn_relu-L2-uni-linear-identity": dict(
        task="regression", cell="rnn", nonlinearity="relu", input_size=3, num_layers=2, output_size=1
    ),
    "rnn_tanh-L1-uni-embed-softmax": dict(task="lm", cell="rnn", vocab_size=9, head="softmax"),
    "lstm-L2-bi-linear-logsoftmax": dict(
        task="classification", cell="lstm", input_size=4, num_layers=2, bidirectional=True, output_size=3
    ),
    "gru-L3-bi-embed-softmax": dict(
        task="classification",
        cell="gru",
        vocab_size=7,
        num_layers=3,
        bidirectional=True,
        output_size=4,
        head="softmax",
    ),
    "lstm-L1-uni-linear-identity": dict(
        task="classification", cell="lstm", input_size=2, output_size=3, head="identity"
    ),
}
ONNX_OP = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}


def make_model(**kwargs) -> SequenceModel:
    return SequenceModel(ModelConfig(embed_dim=6, hidden_size=5, **kwargs)).eval()


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def exported(request, tmp_path):
    model = make_model(**CASES[request.param])
    path = tmp_path / "model.onnx"
    vocab = [chr(97 + i) for i in range(model.config.vocab_size)] if model.config.task == "lm" else None
    proto = export_onnx(model, path, vocab=vocab, data_stats={"mean": 0.5})
    return model, path, proto, vocab


def test_recurrent_layers_are_standard_onnx_nodes(exported):
    model, _, proto, _ = exported
    c = model.config
    ops = [n.op_type for n in proto.graph.node]
    assert not {"Loop", "Scan", "If"} & set(ops)
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    recurrent = [n for n in proto.graph.node if n.op_type in ONNX_OP.values()]
    assert [n.op_type for n in recurrent] == [ONNX_OP[c.cell]] * c.num_layers
    initializers = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    g = {"rnn": 1, "lstm": 4, "gru": 3}[c.cell]
    for layer, node in enumerate(recurrent):
        a = attrs(node)
        assert a.get("layout", 0) == 0
        assert a["hidden_size"] == c.hidden_size
        assert a["direction"] == (b"bidirectional" if c.bidirectional else b"forward")
        if c.cell == "gru":
            assert a["linear_before_reset"] == 1
        if c.cell == "rnn":
            assert a["activations"] == [c.nonlinearity.capitalize().encode()] * c.num_directions
        w, r, b = (initializers[name] for name in node.input[1:4])  # weights are initializers, not computed
        in_size = c.embed_dim if layer == 0 else c.hidden_size * c.num_directions
        assert w.shape == (c.num_directions, g * c.hidden_size, in_size)
        assert r.shape == (c.num_directions, g * c.hidden_size, c.hidden_size)
        assert b.shape == (c.num_directions, 2 * g * c.hidden_size)
        assert node.input[4] == ""  # no sequence_lens: every step of every row is a step


def test_weights_are_reordered_to_onnx_gate_order(exported):
    model, _, proto, _ = exported
    c = model.config
    initializers = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    nodes = [n for n in proto.graph.node if n.op_type == ONNX_OP[c.cell]]
    gates = {"rnn": 1, "lstm": 4, "gru": 3}[c.cell]
    order = {"rnn": [0], "lstm": [0, 3, 1, 2], "gru": [1, 0, 2]}[c.cell]  # i,f,g,o -> i,o,f,c; r,z,n -> z,r,h

    def onnx_order(torch_tensor) -> np.ndarray:
        blocks = np.split(torch_tensor.detach().numpy(), gates)
        return np.concatenate([blocks[k] for k in order])

    for layer, node in enumerate(nodes):
        w, r, b = (initializers[name] for name in node.input[1:4])
        for d in range(c.num_directions):
            sfx = f"l{layer}" + ("_reverse" if d else "")
            np.testing.assert_array_equal(w[d], onnx_order(getattr(model.rnn, f"weight_ih_{sfx}")))
            np.testing.assert_array_equal(r[d], onnx_order(getattr(model.rnn, f"weight_hh_{sfx}")))
            np.testing.assert_array_equal(
                b[d],
                np.concatenate(
                    [
                        onnx_order(getattr(model.rnn, f"bias_ih_{sfx}")),
                        onnx_order(getattr(model.rnn, f"bias_hh_{sfx}")),
                    ]
                ),
            )


def test_graph_io_and_metadata_follow_the_contract(exported):
    model, _, proto, vocab = exported
    c = model.config
    states = list(c.state_names)
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.input
    }
    dims.update(
        {
            v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in proto.graph.output
        }
    )
    assert [v.name for v in proto.graph.input] == ["input"] + [f"{s}0" for s in states]
    assert [v.name for v in proto.graph.output] == ["output"] + [f"{s}n" for s in states]
    assert dims["input"][:2] == ["batch", "time"]
    rows = c.num_layers * c.num_directions
    for s in states:
        assert dims[f"{s}0"] == [rows, "batch", c.hidden_size] == dims[f"{s}n"]
    assert dims["output"] == (
        ["batch", c.output_size] if c.task == "classification" else ["batch", "time", c.output_size]
    )
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["rnndeploy.version"] == rnndeploy.__version__
    assert meta["rnndeploy.task"] == c.task
    assert ModelConfig.from_json(meta["rnndeploy.config"]) == c
    assert json.loads(meta["rnndeploy.states"]) == [
        {
            "input": f"{s}0",
            "output": f"{s}n",
            "shape": [rows, "batch", c.hidden_size],
            "batch_axis": 1,
            "dtype": "float32",
        }
        for s in states
    ]
    assert json.loads(meta["rnndeploy.data_stats"]) == {"mean": 0.5}
    assert meta["rnndeploy.cell"] == c.cell
    assert json.loads(meta["rnndeploy.sizes"])["hidden_size"] == c.hidden_size
    if c.task == "lm":
        assert json.loads(meta["rnndeploy.vocab"]) == vocab
    else:
        assert "rnndeploy.vocab" not in meta


def test_onnxruntime_matches_pytorch_full_and_stepwise(exported):
    model, path, _, _ = exported
    shapes = ((1, 1), (2, 7), (6, 4))
    assert (EXAMPLE_BATCH, EXAMPLE_TIME) not in shapes
    report = verify(model, path, shapes=shapes)
    assert report.ok, str(report)
    names = {c.name.split()[1] for c in report.checks}
    assert "full" in names and ("stepwise" in names) == (not model.config.bidirectional)
    assert any(c.name.startswith("onnx.reference") for c in report.checks) == (
        model.config.nonlinearity != "relu"
    )


def test_verify_catches_a_gru_exported_with_linear_before_reset_0(tmp_path):
    model = make_model(task="regression", cell="gru", input_size=3, output_size=2)
    proto = export_onnx(model)
    node = next(n for n in proto.graph.node if n.op_type == "GRU")
    next(a for a in node.attribute if a.name == "linear_before_reset").i = 0
    onnx.save(proto, tmp_path / "wrong.onnx")
    report = verify(model, tmp_path / "wrong.onnx", reference_evaluator=False)
    assert not report.ok
    assert "FAILED" in str(report)


@pytest.mark.parametrize("opset", [14, 17, 20])
def test_opset_is_selectable(opset, tmp_path):
    model = make_model(task="lm", cell="gru", vocab_size=5)
    proto = export_onnx(model, tmp_path / "m.onnx", opset=opset)
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {opset}
    assert verify(model, tmp_path / "m.onnx", shapes=((2, 3),), reference_evaluator=False).ok


def test_unsupported_opset_names_the_range():
    with pytest.raises(ExportError, match=r"opset must be in \[14, 20\], got 9"):
        export_onnx(make_model(task="lm", cell="lstm", vocab_size=5), opset=9)


class TimeMajorTagger(nn.Module):
    """Embedding -> time-major bidirectional torch.nn.LSTM without an initial state -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(13, 6)
        self.lstm = nn.LSTM(6, 5, num_layers=2, bidirectional=True)
        self.out = nn.Linear(10, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [T, B] -> [T, B, 4]
        y, _ = self.lstm(self.embed(tokens))
        return torch.tanh(self.out(y))


class BatchFirstStack(nn.Module):
    """Linear -> batch-first torch.nn.GRU -> torch.nn.RNN (relu) -> Linear, state in and out."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 6)
        self.gru = nn.GRU(6, 5, batch_first=True)
        self.rnn = nn.RNN(5, 4, nonlinearity="relu", batch_first=True, bias=False)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, hn = self.gru(torch.relu(self.proj(x)), h)
        y, _ = self.rnn(y)
        return self.head(y), hn


def run_onnx(path, feeds: dict[str, torch.Tensor]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})


def test_plain_torch_module_with_time_major_bidirectional_lstm(tmp_path):
    model = TimeMajorTagger().eval()
    proto = export_onnx(
        model,
        tmp_path / "tagger.onnx",
        (torch.randint(0, 13, (5, 3)),),
        input_names=["tokens"],
        output_names=["tags"],
        dynamic_axes={"tokens": {0: "time", 1: "batch"}, "tags": {0: "time", 1: "batch"}},
    )
    assert [n.op_type for n in proto.graph.node if n.op_type in ONNX_OP.values()] == ["LSTM", "LSTM"]
    for T, B in ((1, 1), (9, 4)):
        tokens = torch.randint(0, 13, (T, B))
        (got,) = run_onnx(tmp_path / "tagger.onnx", {"tokens": tokens})
        with torch.no_grad():
            np.testing.assert_allclose(got, model(tokens).numpy(), atol=1e-5, rtol=1e-4)


def test_plain_torch_module_with_batch_first_gru_and_relu_rnn(tmp_path):
    model = BatchFirstStack().eval()
    export_onnx(
        model,
        tmp_path / "stack.onnx",
        (torch.randn(3, 5, 3), torch.randn(1, 3, 5)),
        input_names=["x", "h"],
        output_names=["y", "hn"],
        dynamic_axes={"x": {0: "b", 1: "t"}, "h": {1: "b"}, "y": {0: "b", 1: "t"}, "hn": {1: "b"}},
    )
    ops = [n.op_type for n in onnx.load(tmp_path / "stack.onnx").graph.node]
    assert ops.count("GRU") == 1 and ops.count("RNN") == 1
    for B, T in ((1, 2), (4, 8)):
        x, h = torch.randn(B, T, 3), torch.randn(1, B, 5)
        got = run_onnx(tmp_path / "stack.onnx", {"x": x, "h": h})
        with torch.no_grad():
            expected = model(x, h)
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, e.numpy(), atol=1e-5, rtol=1e-4)


def test_bare_rnndeploy_layer_exports(tmp_path):
    layer = rnndeploy.GRU(4, 5, num_layers=2, bidirectional=True, batch_first=True).eval()
    export_onnx(
        layer, tmp_path / "gru.onnx", (torch.randn(3, 5, 4),), input_names=["x"], output_names=["y", "hn"]
    )
    x = torch.randn(2, 9, 4)
    got = run_onnx(tmp_path / "gru.onnx", {"x": x})
    with torch.no_grad():
        expected = layer(x)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e.numpy(), atol=1e-5, rtol=1e-4)


def test_export_leaves_the_model_untouched():
    model = BatchFirstStack()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, None, (torch.randn(2, 3, 3), torch.randn(1, 2, 5)))
    assert type(model.gru) is nn.GRU and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_projection_lstm_is_refused_by_name_and_the_old_file_survives(tmp_path):
    class Projected(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.LSTM(3, 6, proj_size=2, batch_first=True)

        def forward(self, x):
            return self.encoder(x)[0]

    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous export")
    with pytest.raises(ExportError, match=r"'encoder'.*proj_size=2"):
        export_onnx(Projected(), path, (torch.randn(2, 4, 3),))
    assert path.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_packed_sequences_are_refused_clearly():
    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.RNN(3, 4)

        def forward(self, x):
            packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([x.shape[0]] * x.shape[1]))
            return self.rnn(packed)[1]

    with pytest.raises(ExportError, match="PackedSequence"):
        export_onnx(Packed(), None, (torch.randn(4, 2, 3),))


def test_generic_module_needs_example_inputs():
    with pytest.raises(ExportError, match="example_inputs is required"):
        export_onnx(TimeMajorTagger())
