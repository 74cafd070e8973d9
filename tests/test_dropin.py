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

from .tolerances import TOL

TORCH = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
OURS = {"rnn": rnndeploy.RNN, "lstm": rnndeploy.LSTM, "gru": rnndeploy.GRU}
CELLS = [("rnn", "tanh"), ("rnn", "relu"), ("lstm", None), ("gru", None)]
CELL_IDS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]
IN, H = 3, 5
ATOL, RTOL = TOL[torch.float32]  # triton among the backends

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


def _loss_and_grads(module, x, hx):
    """Outputs, final states and the gradients of a loss over all of them w.r.t. input, states and parameters."""
    x = x.clone().requires_grad_()
    hx = None if hx is None else tuple(h.clone().requires_grad_() for h in hx)
    y, hidden = module(x, hx if hx is None or len(hx) > 1 else hx[0])
    outs = [y, *_flat(hidden)]
    loss = sum(t.sum() for t in outs)
    inputs = [x, *(hx or ()), *module.parameters()]
    return outs, torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell, nl", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("batch_first", [False, True], ids=["time-major", "batch-first"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["zero-h0", "h0"])
def test_empty_batch_matches_torch(backend, cell, nl, batch_first, with_hx):
    """Batch size 0: torch.nn's output and state shapes, and its (empty or zero) gradients."""
    theirs, ours = _pair(cell, nl, backend, num_layers=2, bidirectional=True, batch_first=batch_first)
    x = torch.randn((0, 7, IN) if batch_first else (7, 0, IN))
    hx = tuple(torch.randn(4, 0, H) for _ in range(2 if cell == "lstm" else 1)) if with_hx else None
    outs_ref, grads_ref = _loss_and_grads(theirs, x, hx)
    outs, grads = _loss_and_grads(ours, x, hx)
    for a, b in zip([*outs, *grads], [*outs_ref, *grads_ref], strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell, nl", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize(
    "shape, batch_first",
    [((0, 2, IN), False), ((2, 0, IN), True), ((0, IN), False), ((0, 0, IN), False)],
    ids=["T0-B2", "T0-B2-batch-first", "T0-unbatched", "T0-B0"],
)
def test_empty_sequence_raises_torchs_error(backend, cell, nl, shape, batch_first):
    theirs, ours = _pair(cell, nl, backend, batch_first=batch_first)
    x = torch.randn(shape)
    gist = "Expected sequence length to be larger than 0"
    with pytest.raises(RuntimeError, match=gist):
        theirs(x)
    with pytest.raises(RuntimeError, match=gist):
        ours(x)


def _states(cell, *shape, dtype=torch.float32):
    states = tuple(torch.zeros(shape, dtype=dtype) for _ in range(2 if cell == "lstm" else 1))
    return states if cell == "lstm" else states[0]


# name -> (input and hx for a cell, the exception type torch.nn raises, a pattern torch's message and ours both
# match; a pair: torch's says nothing useful (None) and ours is held to the second)
BAD_INPUTS = {
    "features": (lambda c: (torch.randn(4, 2, 7), None), RuntimeError, r"input_size. Expected 3, got 7"),
    "rank-4": (
        lambda c: (torch.randn(4, 2, IN, 1), None),
        ValueError,
        r"(RNN|LSTM|GRU): Expected input to be 2D or 3D, got 4D",
    ),
    "input-dtype": (
        lambda c: (torch.randn(4, 2, IN, dtype=torch.float64), None),
        ValueError,
        r"input dtype \(torch.float64\) does not match weight dtype \(torch.float32\)",
    ),
    "hx-batch": (
        lambda c: (torch.randn(4, 2, IN), _states(c, 1, 3, H)),
        RuntimeError,
        r"Expected hidden(\[0\])? size \(1, 2, 5\), got \[1, 3, 5\]",
    ),
    "hx-size": (
        lambda c: (torch.randn(4, 2, IN), _states(c, 1, 2, H + 1)),
        RuntimeError,
        r"Expected hidden(\[0\])? size \(1, 2, 5\), got \[1, 2, 6\]",
    ),
    "hx-rank-batched": (
        lambda c: (torch.randn(4, 2, IN), _states(c, 2, H)),
        RuntimeError,
        r"For batched 3-D input, hx (and cx )?should also be 3-D but got \(?2-D",
    ),
    "hx-rank-unbatched": (
        lambda c: (torch.randn(4, IN), _states(c, 1, 1, H)),
        RuntimeError,
        r"For unbatched 2-D input, hx (and cx )?should also be 2-D but got \(?3-D",
    ),
    "hx-dtype": (
        lambda c: (torch.randn(4, 2, IN), _states(c, 1, 2, H, dtype=torch.float64)),
        RuntimeError,
        (None, r"h_0 is torch.float64 but the input is torch.float32"),
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell, nl", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_what_torch_raises(backend, cell, nl, case):
    """The exception type torch.nn raises for the same mistake, and a message with what was expected and what came."""
    make, error, gist = BAD_INPUTS[case]
    theirs_gist, ours_gist = gist if isinstance(gist, tuple) else (gist, gist)
    x, hx = make(cell)
    theirs, ours = _pair(cell, nl, backend)
    with pytest.raises(error, match=theirs_gist):
        theirs(x, hx)
    with pytest.raises(
        error, match=theirs_gist if backend == "torch" else ours_gist
    ):  # "torch": torch.nn's own
        ours(x, hx)


@pytest.mark.parametrize("backend", BACKENDS[1:])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_wrong_number_of_states_is_a_runtime_error(backend, cell):
    """torch.nn's LSTM/GRU (and so backend='torch') fail here with whatever indexing the tuple gives (IndexError,
    AttributeError); the others say what hx should be, in the RuntimeError torch.lstm raises for it."""
    ours = OURS[cell](IN, H, backend=backend)
    x = torch.randn(4, 2, IN)
    hx = torch.zeros(1, 2, H) if cell == "lstm" else (torch.zeros(1, 2, H),) * 2
    expected = (
        r"LSTM expects hx as a tuple \(h_0, c_0\), got 1 tensor"
        if cell == "lstm"
        else "one tensor h_0, got 2"
    )
    with pytest.raises(RuntimeError, match=expected):
        ours(x, hx)
