"""The persistent Triton kernels against the plain-torch reference and torch.nn.

On CPU the kernels run in Triton's interpreter (tests/conftest.py); on a GPU machine the same cases run
compiled on the GPU. Every case checks outputs, final states and every gradient (input, weights, biases,
initial states). Fresh tensors are filled with NaN while a kernel runs, so an unwritten element fails.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnndeploy
from rnndeploy import kernels
from rnndeploy.kernels.plan import make_config

from ..tolerances import EXTREME_TOL, TOL

# every test here runs the kernels on CPU tensors; the interpreter needs triton >= 3.8
pytestmark = pytest.mark.interpreter

DTYPE_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
GATES = {"rnn": 1, "lstm": 4, "gru": 3}
IN = 4  # input features
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 on GPU: the kernels follow cudnn.allow_tf32 like cuDNN does; compare exact fp32 here."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def nan_outputs(monkeypatch):
    """Every float tensor allocated with empty/empty_like/new_empty starts as NaN."""

    def nan_fill(fn):
        def wrapped(*args, **kwargs):
            t = fn(*args, **kwargs)
            return t.fill_(math.nan) if t.is_floating_point() else t

        return wrapped

    monkeypatch.setattr(torch, "empty", nan_fill(torch.empty))
    monkeypatch.setattr(torch, "empty_like", nan_fill(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", nan_fill(torch.Tensor.new_empty))


def make_layer(cell, B, T, H, dtype=torch.float32, bias=True, lengths=False, scale=1.0, device=DEVICE):
    """Random inputs for one layer; weights uniform in +-1/sqrt(H) like torch's init."""
    G = GATES[cell]
    k = 1.0 / math.sqrt(H)

    def u(*shape):
        return ((torch.rand(*shape, device=device) * 2 - 1) * k).to(dtype).requires_grad_()

    x = (torch.randn(T, B, IN, device=device) * scale).to(dtype).requires_grad_()
    n_state = 2 if cell == "lstm" else 1
    state = tuple(torch.randn(B, H, device=device).to(dtype).requires_grad_() for _ in range(n_state))
    weights = (u(G * H, IN), u(G * H, H), u(G * H) if bias else None, u(G * H) if bias else None)
    lens = None
    if lengths:
        # one length per row for any B: full, half and single-step rows (B=1: all but the last two steps)
        pattern = (max(1, T // 2), T, 1) if B > 1 else (max(1, T - 2),)
        lens = torch.tensor([pattern[b % len(pattern)] for b in range(B)], device=device)
    return x, state, weights, lens


def run_with_grads(fn, cell, x, state, weights, lens, reverse, nonlinearity, probes=None):
    """Runs ``fn`` (a layer function) and returns outputs, final states and the gradients of a random loss."""
    y, final = fn(cell, x, state, weights, lengths=lens, reverse=reverse, nonlinearity=nonlinearity)
    outs = (y, *final)
    if probes is None:
        probes = [torch.randn(o.shape, device=o.device) for o in outs]
    loss = sum((o.float() * p).sum() for o, p in zip(outs, probes, strict=True))
    inputs = [t for t in (x, *state, *weights) if t is not None]
    grads = torch.autograd.grad(loss, inputs)
    return outs, grads, probes


def assert_near(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                tol: tuple[float, float] | None = None) -> None:  # fmt: skip
    """fp32: elementwise. bf16/fp16, or an explicit ``tol``: the largest error against the tensor's scale, since
    sums over many rounded terms (weight gradients) leave elements near zero with errors of the whole sum's
    order."""
    atol, rtol = tol or TOL[dtype]
    actual = actual.float()
    if dtype == torch.float32 and tol is None:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
        return
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert err <= atol + rtol * scale, f"{name}: max error {err:.3g} > {atol} + {rtol} * {scale:.3g}"


def assert_matches_reference(cell, nonlinearity, B, T, H, dtype, reverse, lengths, bias, strategy=None,
                             scale=1.0, device=DEVICE, tol=None):  # fmt: skip
    x, state, weights, lens = make_layer(cell, B, T, H, dtype, bias, lengths, scale, device)

    def ours(*args, **kwargs):
        return kernels.triton_layer(*args, **kwargs, strategy=strategy)

    outs, grads, probes = run_with_grads(ours, cell, x, state, weights, lens, reverse, nonlinearity)
    # the oracle runs in fp32 on the same (rounded) inputs
    f32 = [None if t is None else t.detach().float().requires_grad_() for t in (x, *state, *weights)]
    n_state = len(state)
    ref_outs, ref_grads, _ = run_with_grads(
        kernels.reference_layer, cell, f32[0], tuple(f32[1 : 1 + n_state]), tuple(f32[1 + n_state :]), lens,
        reverse, nonlinearity, probes,
    )  # fmt: skip
    names = ["y", "h_T", "c_T"][: len(outs)]
    for name, a, b in zip(names, outs, ref_outs, strict=True):
        assert a.dtype == dtype, name
        assert_near(name, a, b, dtype, tol)
    grad_names = [n for n, t in zip(["x", "h0", "c0"][: 1 + n_state] + ["w_ih", "w_hh", "b_ih", "b_hh"],
                                    (x, *state, *weights), strict=True) if t is not None]  # fmt: skip
    for name, a, b in zip(grad_names, grads, ref_grads, strict=True):
        assert_near(f"d{name}", a, b, dtype, tol)


CELLS = [("rnn", "tanh"), ("rnn", "relu"), ("lstm", "tanh"), ("gru", "tanh")]
# (B, T, H); H=20: a multiple of 4, not of 16 (the kernels get HDIV=4)
SHAPES = [(1, 1, 1), (3, 7, 5), (3, 20, 33), (1, 7, 33), (3, 1, 5), (3, 20, 1), (3, 7, 20)]
# (reverse, lengths, bias, strategy): every shape runs every variant (tiny shapes keep the interpreter quick)
VARIANTS = [
    (False, False, True, "resident"),
    (True, True, True, "resident-scratch"),
    (False, True, False, "stream"),
    (True, False, True, "resident"),
    (False, True, True, "resident"),
    (True, True, False, "stream"),
    (True, True, True, "resident-tagged"),
    (False, True, True, "resident-partial"),
    (True, True, True, "resident-partial-tagged"),
]


def _case_id(cell, nl, B, T, H, dtype, reverse, lengths, bias, strategy):
    name = cell if cell != "rnn" else f"rnn_{nl}"
    flags = "".join(["-rev" if reverse else "", "-len" if lengths else "", "" if bias else "-nobias"])
    return f"{name}-B{B}-T{T}-H{H}-{DTYPE_NAME[dtype]}{flags}-{strategy}"


def _layer_cases():
    cases = []
    for cell, nl in CELLS:
        for B, T, H in SHAPES:
            cases.extend((cell, nl, B, T, H, torch.float32, *variant) for variant in VARIANTS)
        for dtype in (torch.float16, torch.bfloat16):
            cases.append((cell, nl, 3, 7, 33, dtype, False, True, True, "resident"))
            cases.append((cell, nl, 3, 7, 33, dtype, True, True, True, "resident-tagged"))  # int32 words
            cases.append((cell, nl, 3, 7, 33, dtype, True, True, True, "resident-partial-tagged"))
    return [pytest.param(*case, id=_case_id(*case)) for case in cases]


@pytest.mark.parametrize("cell, nl, B, T, H, dtype, reverse, lengths, bias, strategy", _layer_cases())
def test_layer_matches_reference(nan_outputs, cell, nl, B, T, H, dtype, reverse, lengths, bias, strategy):
    assert_matches_reference(cell, nl, B, T, H, dtype, reverse, lengths, bias, strategy)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_extreme_inputs_stay_finite(cell):
    """|pre-activations| up to ~1e4 (saturating gates): no overflow, no NaN, same values and gradients."""
    assert_matches_reference(
        cell, "tanh", 3, 7, 5, torch.float32, False, True, True, scale=1e4, tol=EXTREME_TOL
    )


@pytest.mark.parametrize("where", ["largest", "smallest"])
def test_extreme_tolerance_catches_a_planted_error(where):
    """The scale-relative check of the extreme case still fails a gradient with one element off by 1% of scale."""
    x, state, weights, lens = make_layer("lstm", 3, 7, 5, lengths=True, scale=1e4)
    _, grads, _ = run_with_grads(kernels.reference_layer, "lstm", x, state, weights, lens, False, "tanh")
    expected = grads[-4]  # dw_ih, the tensor whose fp32 rounding the tolerance allows for
    planted = expected.clone().flatten()
    index = planted.abs().argmax() if where == "largest" else planted.abs().argmin()
    planted[index] += 0.01 * expected.abs().max()
    assert_near("dw_ih", expected, expected, torch.float32, EXTREME_TOL)
    with pytest.raises(AssertionError, match="dw_ih: max error"):
        assert_near("dw_ih", planted.view_as(expected), expected, torch.float32, EXTREME_TOL)


def test_inference_forward_skips_workspace_and_matches():
    x, state, weights, lens = make_layer("lstm", 3, 7, 5, lengths=True)
    with torch.no_grad():
        y, (h, c) = kernels.triton_layer("lstm", x, state, weights, lens)
        y_ref, (h_ref, c_ref) = kernels.reference_layer("lstm", x, state, weights, lens)
    atol, rtol = TOL[torch.float32]
    for a, b in ((y, y_ref), (h, h_ref), (c, c_ref)):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def test_autocast_runs_in_low_precision_and_trains_fp32_params():
    x, state, weights, _ = make_layer("gru", 3, 7, 33)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y, (h,) = kernels.triton_layer("gru", x, state, weights)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.bfloat16
    y.float().sum().backward()
    y_ref, _ = kernels.reference_layer("gru", x, state, weights)
    atol, rtol = TOL[torch.bfloat16]
    torch.testing.assert_close(y.float(), y_ref, atol=atol, rtol=rtol)
    assert all(w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all() for w in weights)


# (cell, nonlinearity, num_layers, bidirectional, batch_first, packed, hidden)
MODULE_CASES = [
    ("lstm", "tanh", 1, False, False, False, 5),
    ("lstm", "tanh", 2, True, True, True, 5),
    ("lstm", "tanh", 1, True, False, True, 33),
    ("gru", "tanh", 2, True, False, True, 5),
    ("gru", "tanh", 1, False, True, False, 33),
    ("rnn", "tanh", 2, False, True, True, 5),
    ("rnn", "relu", 1, True, False, False, 5),
]


def _module_id(cell, nl, layers, bidir, batch_first, packed, H):
    name = cell if cell != "rnn" else f"rnn_{nl}"
    flags = "-bidir" if bidir else ""
    flags += ("-batch_first" if batch_first else "") + ("-packed" if packed else "")
    return f"{name}-L{layers}-B3-T7-H{H}-fp32{flags}"


@pytest.mark.parametrize(
    "cell, nl, layers, bidir, batch_first, packed, H",
    [pytest.param(*c, id=_module_id(*c)) for c in MODULE_CASES],
)
def test_module_matches_torch_nn(nan_outputs, cell, nl, layers, bidir, batch_first, packed, H):
    """rnndeploy's module on backend='triton' against torch.nn with the very same weights."""
    T, B = 7, 3
    kwargs = dict(num_layers=layers, bidirectional=bidir, batch_first=batch_first)
    if cell == "rnn":
        kwargs["nonlinearity"] = nl
    torch_cls = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell]
    ours_cls = {"rnn": rnndeploy.RNN, "lstm": rnndeploy.LSTM, "gru": rnndeploy.GRU}[cell]
    theirs = torch_cls(IN, H, **kwargs).to(DEVICE)
    ours = ours_cls(IN, H, backend="triton", **kwargs).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())

    D = 2 if bidir else 1
    x = torch.randn(B, T, IN, device=DEVICE) if batch_first else torch.randn(T, B, IN, device=DEVICE)
    hx = tuple(torch.randn(layers * D, B, H, device=DEVICE) for _ in range(2 if cell == "lstm" else 1))
    lengths = torch.tensor([4, 7, 2])

    def run(module):
        xi = x.clone().requires_grad_()
        hi = tuple(h.clone().requires_grad_() for h in hx)
        inp = xi
        if packed:
            inp = pack_padded_sequence(xi, lengths, batch_first=batch_first, enforce_sorted=False)
        out, hn = module(inp, hi if cell == "lstm" else hi[0])
        if packed:
            out = pad_packed_sequence(out, batch_first=batch_first)[0]
        hn = hn if isinstance(hn, tuple) else (hn,)
        gen = torch.Generator().manual_seed(1)
        loss = sum((t * torch.randn(t.shape, generator=gen).to(DEVICE)).sum() for t in (out, *hn))
        params = list(module.parameters())
        grads = torch.autograd.grad(loss, [xi, *hi, *params])
        return (out, *hn), grads, [n for n, _ in module.named_parameters()]

    outs, grads, names = run(ours)
    ref_outs, ref_grads, _ = run(theirs)
    atol, rtol = TOL[torch.float32]
    for a, b in zip(outs, ref_outs, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    for name, a, b in zip(["x", "h0", "c0"][: 1 + len(hx)] + names, grads, ref_grads, strict=False):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, n=name: f"d{n}: {m}")


def test_mismatched_dtypes_are_refused_by_name():
    x, state, weights, _ = make_layer("rnn", 1, 2, 3)
    weights = (weights[0].detach().bfloat16(), *weights[1:])
    with pytest.raises(ValueError, match=r"w_ih is torch.bfloat16 but x is torch.float32"):
        kernels.triton_layer("rnn", x, state, weights)


def test_mismatched_shapes_are_refused_by_name():
    x, state, weights, _ = make_layer("gru", 3, 2, 5)
    with pytest.raises(ValueError, match=r"w_hh must have shape \(15, 5\)"):
        kernels.triton_layer("gru", x, state, (weights[0], weights[1][:, :4].contiguous(), *weights[2:]))
    with pytest.raises(ValueError, match=r"h0 must have shape \(3, 5\)"):
        kernels.triton_layer("gru", x, (state[0][:2],), weights)


@pytest.mark.parametrize("cell, nl", CELLS)
def test_empty_batch_matches_reference(cell, nl):
    """B=0: nothing to launch; the reference's empty outputs and zero weight gradients, as torch.nn gives."""
    for lengths in (False, True):
        assert_matches_reference(cell, nl, 0, 5, 5, torch.float32, lengths, lengths, True)


@pytest.mark.parametrize(
    "layer", [kernels.triton_layer, kernels.reference_layer], ids=["triton", "reference"]
)
@pytest.mark.parametrize("B", [2, 0])
def test_empty_sequence_raises_torchs_error(layer, B):
    x, state, weights, _ = make_layer("gru", B, 0, 5)
    with pytest.raises(
        RuntimeError, match=r"Expected sequence length to be larger than 0 in RNN, got x of shape"
    ):
        layer("gru", x, state, weights)


@pytest.mark.parametrize("B", [1, 3, 16])
def test_make_layer_gives_one_length_per_row(B):
    *_, lens = make_layer("lstm", B, 8, 5, lengths=True)
    assert lens.shape == (B,), f"lengths for B={B}: expected shape ({B},), got {tuple(lens.shape)}"
    assert 1 <= lens.min() and lens.max() <= 8


def test_barrier_strategies_are_refused_off_gpu():
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        make_config("lstm", 3, 33, torch.float32, torch.device("cpu"), "split")


def test_availability_and_auto_dispatch():
    assert kernels.triton_unavailable_reason(DEVICE) is None  # CPU: conftest sets TRITON_INTERPRET=1
    assert "not supported" in kernels.triton_unavailable_reason(torch.device("meta"))
    # no GPU measurement yet: backend="auto" keeps cuDNN everywhere
    for cell in ("rnn", "lstm", "gru"):
        assert not kernels.prefer_triton(cell, 16, 768, torch.bfloat16, torch.device("cuda"))
        assert not kernels.prefer_triton(cell, 16, 768, torch.float32, torch.device("cpu"))
