"""rnndeploy.RNNCell/LSTMCell/GRUCell: torch.nn's cells under rnndeploy's name, interchangeable with torch's, a
cell stepped by hand equal to rnndeploy's layer on every backend, and a model stepping one exportable."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import rnndeploy
from rnndeploy import kernels
from rnndeploy.export import export_onnx

from .tolerances import EXACT, ORT_TOL, TOL

TORCH = {"rnn": nn.RNNCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}
OURS = {"rnn": rnndeploy.RNNCell, "lstm": rnndeploy.LSTMCell, "gru": rnndeploy.GRUCell}
LAYERS = {"rnn": rnndeploy.RNN, "lstm": rnndeploy.LSTM, "gru": rnndeploy.GRU}
CELLS = [("rnn", "tanh"), ("rnn", "relu"), ("lstm", None), ("gru", None)]
CELL_IDS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]
IN, H = 3, 5
ATOL, RTOL = TOL[torch.float32]  # triton among the layer's backends

_no_triton = kernels.triton_unavailable_reason(torch.device("cpu"))
BACKENDS = [
    "torch",
    "reference",
    pytest.param("triton", marks=pytest.mark.skipif(_no_triton is not None, reason=str(_no_triton))),
]


def _kwargs(nl):
    return {"nonlinearity": nl} if nl else {}


def _state(cell, *shape):
    return tuple(torch.randn(shape) for _ in range(2 if cell == "lstm" else 1))


def _step(module, x, state):
    """One step; ``state`` and the result are tuples whatever the cell."""
    out = module(x, state if len(state) > 1 else state[0])
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("cell, nl", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cell_is_torchs_and_state_dicts_move_both_ways(cell, nl, bias):
    theirs = TORCH[cell](IN, H, bias=bias, **_kwargs(nl))
    ours = OURS[cell](IN, H, bias=bias, **_kwargs(nl))
    assert isinstance(ours, TORCH[cell])
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    ours.load_state_dict(theirs.state_dict(), strict=True)
    back = TORCH[cell](IN, H, bias=bias, **_kwargs(nl))
    back.load_state_dict(ours.state_dict(), strict=True)
    for B in (3, 0):  # batch 0 too, as torch.nn gives it
        x, state = torch.randn(B, IN), _state(cell, B, H)
        for module in (ours, back):
            for a, b in zip(_step(module, x, state), _step(theirs, x, state), strict=True):
                assert a.shape == (B, H)
                torch.testing.assert_close(a, b, atol=EXACT[0], rtol=EXACT[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell, nl", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("batched", [True, False], ids=["B3", "unbatched"])
def test_cell_stepped_by_hand_equals_the_layer(backend, cell, nl, batched):
    """A cell stepped over a sequence with the layer's weights gives the layer's outputs, final state and
    gradients, on every backend of the layer."""
    T = 7
    layer = LAYERS[cell](IN, H, backend=backend, **_kwargs(nl))
    step = OURS[cell](IN, H, **_kwargs(nl))
    step.load_state_dict({k.removesuffix("_l0"): v for k, v in layer.state_dict().items()})
    x = torch.randn((T, 3, IN) if batched else (T, IN))
    state = _state(cell, *((3, H) if batched else (H,)))

    def by_layer():
        xi, si = x.clone().requires_grad_(), tuple(s.clone().requires_grad_() for s in state)
        y, hidden = layer(xi, tuple(s.unsqueeze(0) for s in si) if cell == "lstm" else si[0].unsqueeze(0))
        final = tuple(h.squeeze(0) for h in (hidden if isinstance(hidden, tuple) else (hidden,)))
        return [y, *final], [xi, *si, *layer.parameters()]

    def by_hand():
        xi, si = x.clone().requires_grad_(), tuple(s.clone().requires_grad_() for s in state)
        s, ys = si, []
        for t in range(T):
            s = _step(step, xi[t], s)
            ys.append(s[0])
        return [torch.stack(ys), *s], [xi, *si, *step.parameters()]

    (outs, inputs), (outs_ref, inputs_ref) = by_layer(), by_hand()
    gen = torch.Generator().manual_seed(1)
    probes = [torch.randn(o.shape, generator=gen) for o in outs_ref]
    grads = torch.autograd.grad(sum((o * p).sum() for o, p in zip(outs, probes)), inputs)
    grads_ref = torch.autograd.grad(sum((o * p).sum() for o, p in zip(outs_ref, probes)), inputs_ref)
    for a, b in zip([*outs, *grads], [*outs_ref, *grads_ref], strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


class _Stepper(nn.Module):
    """A model that steps a cell by hand: one step per call, the state in and out, a head on h."""

    def __init__(self, cell: str, nl: str | None):
        super().__init__()
        self.cell = OURS[cell](IN, H, **_kwargs(nl))
        self.head = nn.Linear(H, 2)

    def forward(self, x, *state):
        state = _step(self.cell, x, state)
        return (self.head(state[0]), *state)


@pytest.mark.parametrize("cell, nl", CELLS, ids=CELL_IDS)
def test_model_stepping_a_cell_exports_and_runs_in_onnxruntime(cell, nl):
    """rnndeploy.export traces the step (the cell becomes Gemm and activations, no control flow) with a
    dynamic batch; onnxruntime gives torch's values at another batch size."""
    model = _Stepper(cell, nl).eval()
    n_state = 2 if cell == "lstm" else 1
    names = ["x", *("h", "c")[:n_state]]
    args = (torch.randn(3, IN), *_state(cell, 3, H))
    proto = export_onnx(
        model, example_inputs=args, input_names=names, dynamic_axes={n: {0: "batch"} for n in names}
    )
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    other = (torch.randn(5, IN), *_state(cell, 5, H))
    got = session.run(None, {n: a.numpy() for n, a in zip(names, other)})
    with torch.no_grad():
        expected = model(*other)
    assert len(got) == len(expected) == 1 + n_state
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b.numpy(), atol=ORT_TOL[0], rtol=ORT_TOL[1])
