"""Drop-in behaviour of rnndeploy.RNN/LSTM/GRU on every backend, against torch.nn itself: second derivatives,
empty batches and sequences, and the exceptions bad input raises.

``triton`` runs in Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rnndeploy
from rnndeploy import kernels

TORCH = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
OURS = {"rnn": rnndeploy.RNN, "lstm": rnndeploy.LSTM, "gru": rnndeploy.GRU}
CELLS = [("rnn", "tanh"), ("rnn", "relu"), ("lstm", None), ("gru", None)]
CELL_IDS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]
IN, H = 3, 5
ATOL, RTOL = 3e-5, 1e-4

_no_triton = kernels.triton_unavailable_reason(torch.device("cpu"))
BACKENDS = [
    "torch",
    "reference",
    pytest.param("triton", marks=pytest.mark.skipif(_no_triton is not None, reason=str(_no_triton))),
]


def _pair(cell, nl, backend, **kwargs):
    if nl:
        kwargs["nonlinearity"] = nl
    theirs = TORCH[cell](IN, H, **kwargs)
    ours = OURS[cell](IN, H, backend=backend, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _flat(hidden):
    return list(hidden) if isinstance(hidden, tuple) else [hidden]


def _gradient_penalty(module, x, probe: bool):
    """d/d(x, W_hh, W_ih) of ||d loss / d(x, W_hh)||^2, the second derivative a gradient penalty needs.

    ``probe``: the loss weighs the outputs by a fixed random tensor, so the gradient flowing into the layer
    does not itself require grad (loss = sum(y * p)); otherwise it does (loss = sum(y^2)).
    """
    x = x.clone().requires_grad_()
    y, hidden = module(x)
    if probe:
        gen = torch.Generator().manual_seed(3)
        loss = sum((t * torch.randn(t.shape, generator=gen)).sum() for t in [y, *_flat(hidden)])
    else:
        loss = sum(t.pow(2).sum() for t in [y, *_flat(hidden)])
    first = torch.autograd.grad(loss, [x, module.weight_hh_l0], create_graph=True)
    penalty = sum(g.pow(2).sum() for g in first)
    return first, torch.autograd.grad(penalty, [x, module.weight_hh_l0, module.weight_ih_l0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell, nl", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("probe", [False, True], ids=["loss-y2", "loss-probe"])
def test_double_backward_matches_torch_or_refuses(backend, cell, nl, probe):
    """Second derivatives equal torch.nn's where the backend has them; ``triton`` refuses loudly, as cuDNN does,
    instead of silently leaving out the kernels' share."""
    theirs, ours = _pair(cell, nl, backend, bidirectional=True)
    x = torch.randn(6, 2, IN)
    first_ref, second_ref = _gradient_penalty(theirs, x, probe)
    if backend == "triton":
        with pytest.raises(
            RuntimeError, match=r"double backward through backend='triton' \(\w+\) is not supported"
        ):
            _gradient_penalty(ours, x, probe)
        return
    first, second = _gradient_penalty(ours, x, probe)
    for name, a, b in zip(
        ["dx", "dW_hh", "d2x", "d2W_hh", "d2W_ih"], [*first, *second], [*first_ref, *second_ref]
    ):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell, nl", CELLS, ids=CELL_IDS)
def test_create_graph_keeps_first_order_gradients(backend, cell, nl):
    """create_graph=True alone (no second derivative taken) still gives torch.nn's first-order gradients."""
    theirs, ours = _pair(cell, nl, backend)
    x = torch.randn(5, 3, IN)

    def grads(module):
        xi = x.clone().requires_grad_()
        y, _ = module(xi)
        return torch.autograd.grad(y.pow(2).sum(), [xi, *module.parameters()], create_graph=True)

    for a, b in zip(grads(ours), grads(theirs), strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
