"""export_onnx: standard RNN/LSTM/GRU nodes, the ONNX contract, parity with PyTorch through onnxruntime."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import rnndeploy
from rnndeploy import ModelConfig, SequenceModel
from rnndeploy.export import ExportError, OnnxRecurrent, export_onnx, verify
from rnndeploy.export import recurrent as recurrent_module
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


@pytest.mark.parametrize("opset", range(14, 21))
def test_opset_is_selectable(opset, tmp_path):
    # a bidirectional classifier: its head reshapes the state, which the exporter writes with Shape(start, end)
    model = make_model(task="classification", cell="gru", vocab_size=5, bidirectional=True, output_size=3)
    proto = export_onnx(model, tmp_path / "m.onnx", opset=opset)
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {opset}
    assert proto.ir_version == onnx.helper.find_min_ir_version_for(list(proto.opset_import))
    assert [n.op_type for n in proto.graph.node if n.op_type in ONNX_OP.values()] == ["GRU"]
    assert verify(model, tmp_path / "m.onnx", shapes=((2, 3), (1, 6)), reference_evaluator=False).ok


def test_an_opset_the_converter_cannot_reach_names_the_op_and_the_way_out():
    class Gated(nn.Module):  # chunk -> Split, which changed at opset 18
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(4, 6, batch_first=True)

        def forward(self, x):
            a, b = self.rnn(x)[0].chunk(2, dim=-1)
            return a * torch.sigmoid(b)

    with pytest.raises(
        ExportError, match=r"opset 17 \(it has no adapter for Split\); export at opset 18 or newer"
    ):
        export_onnx(Gated().eval(), None, (torch.randn(2, 5, 4),), opset=17)
    proto = export_onnx(Gated().eval(), None, (torch.randn(2, 5, 4),), opset=18)
    assert [n.op_type for n in proto.graph.node if n.op_type in ONNX_OP.values()] == ["GRU"]
    # without an opset asked for, the default gives way to 18 with a warning that says why
    with pytest.warns(
        UserWarning, match=r"no adapter for Split.*exported at opset 18 instead of the default 17"
    ):
        proto = export_onnx(Gated().eval(), None, (torch.randn(2, 5, 4),))
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {18}


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
    proto = export_onnx(model, None, (torch.randn(2, 3, 3), torch.randn(1, 2, 5)))
    assert [v.name for v in proto.graph.input] == ["input_0", "input_1"]
    assert [v.name for v in proto.graph.output] == ["output_0", "output_1"]
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


class Layer(nn.Module):
    """A bare torch.nn recurrent layer with flat state I/O: ``(x, h0[, c0]) -> (y, hn[, cn])``."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn
        self.lstm = isinstance(rnn, nn.LSTM)  # read once: export swaps self.rnn for its stand-in

    def forward(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y, new_state = self.rnn(x, state if self.lstm else state[0])
        return (y, *(new_state if self.lstm else (new_state,)))


LAYERS = {
    "rnn-tanh-L2-bi": lambda: nn.RNN(3, 4, num_layers=2, bidirectional=True),
    "rnn-relu-L1-batch_first": lambda: nn.RNN(3, 4, nonlinearity="relu", batch_first=True),
    "lstm-L2-bi": lambda: nn.LSTM(3, 4, num_layers=2, bidirectional=True),
    "lstm-L1-bi-batch_first": lambda: nn.LSTM(3, 4, bidirectional=True, batch_first=True),
    "gru-L2-bi-batch_first": lambda: nn.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=True),
    "gru-L1-uni": lambda: nn.GRU(3, 4),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_every_torch_nn_layer_exports_one_node_per_layer_with_batch_and_time_dynamic(name, tmp_path):
    rnn = LAYERS[name]().eval()
    model = Layer(rnn).eval()
    cell = recurrent_module.cell_of(rnn)
    D, L = 2 if rnn.bidirectional else 1, rnn.num_layers
    states = ["h0", "c0"] if cell == "lstm" else ["h0"]
    outputs = ["y"] + [f"{s[0]}n" for s in states]
    seq = {0: "batch", 1: "time"} if rnn.batch_first else {0: "time", 1: "batch"}
    axes = {"x": seq, "y": seq, **{n: {1: "batch"} for n in states + outputs[1:]}}

    def inputs(T: int, B: int) -> list[torch.Tensor]:
        x = torch.randn(B, T, 3) if rnn.batch_first else torch.randn(T, B, 3)
        return [x] + [torch.randn(L * D, B, 4) for _ in states]

    proto = export_onnx(
        model,
        tmp_path / "layer.onnx",
        inputs(EXAMPLE_TIME, EXAMPLE_BATCH),
        input_names=["x", *states],
        output_names=outputs,
        dynamic_axes=axes,
    )
    recurrent = [n for n in proto.graph.node if n.op_type in ONNX_OP.values()]
    assert [n.op_type for n in recurrent] == [ONNX_OP[cell]] * L  # one node per layer, never unrolled
    assert {attrs(n)["direction"] for n in recurrent} == {b"bidirectional" if D == 2 else b"forward"}
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*proto.graph.input, *proto.graph.output]
    }
    for value, value_axes in axes.items():
        assert all(dims[value][axis] == label for axis, label in value_axes.items()), (value, dims[value])
    for T, B in ((1, 1), (9, 4), (2, 7)):  # none the traced (time 5, batch 3)
        feeds = dict(zip(["x", *states], inputs(T, B), strict=True))
        got = run_onnx(tmp_path / "layer.onnx", feeds)
        with torch.no_grad():
            expected = model(*feeds.values())
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, e.numpy(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(LAYERS))
def test_the_stand_in_computes_what_the_layer_computes(name):
    rnn = LAYERS[name]().eval()
    x = torch.randn(2, 6, 3) if rnn.batch_first else torch.randn(6, 2, 3)
    with torch.no_grad():
        for hx in (None, torch.randn(rnn.num_layers * (2 if rnn.bidirectional else 1), 2, 4)):
            state = (hx, torch.randn_like(hx)) if hx is not None and isinstance(rnn, nn.LSTM) else hx
            y, s = OnnxRecurrent(rnn)(x, state)
            y_ref, s_ref = rnn(x, state)
            torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-4)


def test_a_traced_python_loop_is_refused(monkeypatch):
    # what any exporter that ignored the stand-in's ONNX node would do: trace the reference's loop over time
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: False)
    with pytest.raises(ExportError):
        export_onnx(make_model(task="lm", cell="lstm", vocab_size=5))
    with pytest.raises(ExportError, match=r"expected at least 1 ONNX GRU node.*has 0"):
        export_onnx(Layer(nn.GRU(3, 4)).eval(), None, (torch.randn(5, 3, 3), torch.randn(1, 3, 4)), opset=18)


def test_an_output_axis_asked_dynamic_that_comes_out_fixed_is_refused_by_name():
    class FirstThreeSteps(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(3, 4, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[0][:, -1:]  # the last step only: one step, whatever the length

    with pytest.raises(
        ExportError, match=r"axis 1 of 'y' should be dynamic \('time'\) but the exported graph has 1"
    ):
        export_onnx(
            FirstThreeSteps().eval(),
            None,
            (torch.randn(2, 5, 3),),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch", 1: "time"}, "y": {0: "batch", 1: "time"}},
        )


def test_export_emits_no_deprecation_or_future_warning(tmp_path):
    # A fresh interpreter with both categories as errors (import time included). Inside, every warning is also
    # recorded, since the exporter catches exceptions from one tracing strategy and tries the next.
    script = textwrap.dedent(
        """
        import sys
        import warnings
        import torch
        from torch import nn
        from rnndeploy import ModelConfig, SequenceModel
        from rnndeploy.export import export_onnx, to_fp16

        class Tagger(nn.Module):  # the README's case: a user module holding a plain torch.nn layer
            def __init__(self):
                super().__init__()
                self.embed, self.rnn, self.out = nn.Embedding(13, 6), nn.RNN(6, 5), nn.Linear(5, 4)

            def forward(self, tokens):
                return self.out(self.rnn(self.embed(tokens))[0])

        config = ModelConfig(task="classification", cell="lstm", vocab_size=7, embed_dim=4, hidden_size=5,
                             bidirectional=True, output_size=3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            to_fp16(export_onnx(SequenceModel(config).eval(), sys.argv[1] + "/seq.onnx", opset=14))
            export_onnx(Tagger().eval(), sys.argv[1] + "/tagger.onnx", (torch.randint(0, 13, (5, 3)),),
                        input_names=["tokens"], dynamic_axes={"tokens": {0: "time", 1: "batch"}})
        print([f"{w.category.__name__}: {w.message}" for w in caught
               if issubclass(w.category, (DeprecationWarning, FutureWarning))])
        """
    )
    result = subprocess.run(
        [
            sys.executable,
            "-W",
            "error::DeprecationWarning",
            "-W",
            "error::FutureWarning",
            "-c",
            script,
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout[-3000:]
    assert onnx.load(tmp_path / "tagger.onnx").graph.node
