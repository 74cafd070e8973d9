"""Training compute for rnndeploy: the plain-torch reference cells and the persistent Triton kernels.

This package knows torch and triton only. ``rnndeploy.modules`` calls into it through one entry point per
backend with a common per-layer signature (see `reference_layer`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import gru_ref, lstm_ref, rnn_ref

__all__ = [
    "gru_ref",
    "lstm_ref",
    "rnn_ref",
    "reference_layer",
    "triton_unavailable_reason",
    "triton_layer",
    "prefer_triton",
]

CELLS = ("rnn", "lstm", "gru")
GATES = {"rnn": 1, "lstm": 4, "gru": 3}


def reference_layer(
    cell: str,
    x: Tensor,
    state: tuple[Tensor, ...],
    weights: tuple[Tensor, Tensor, Tensor | None, Tensor | None],
    lengths: Tensor | None = None,
    reverse: bool = False,
    nonlinearity: str = "tanh",
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Runs one layer in one direction with the plain-torch reference.

    Args:
        cell: ``"rnn"``, ``"lstm"`` or ``"gru"``.
        x: ``[T, B, I]``.
        state: ``(h0,)`` or ``(h0, c0)`` for LSTM, each ``[B, H]``.
        weights: ``(w_ih [G*H, I], w_hh [G*H, H], b_ih [G*H] | None, b_hh [G*H] | None)``.
        lengths: ``[B]`` int64 or ``None``.
        reverse: run time backwards.
        nonlinearity: ``"tanh"`` or ``"relu"`` (RNN only).

    Returns:
        ``y [T, B, H]`` and the final state tuple, each ``[B, H]``.

    Raises:
        RuntimeError: ``T == 0``, as torch.nn's recurrent layers do.
    """
    _check_steps(x)
    if cell == "lstm":
        y, h, c = lstm_ref(x, *state, *weights, lengths=lengths, reverse=reverse)
        return y, (h, c)
    if cell == "gru":
        y, h = gru_ref(x, *state, *weights, lengths=lengths, reverse=reverse)
        return y, (h,)
    if cell == "rnn":
        y, h = rnn_ref(x, *state, *weights, lengths=lengths, reverse=reverse, nonlinearity=nonlinearity)
        return y, (h,)
    raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` here, or ``None`` when they can.

    CUDA tensors need triton and a visible GPU; CPU tensors need the interpreter (``TRITON_INTERPRET=1`` set
    before rnndeploy is imported, triton >= 3.8).
    """
    device = torch.device(device)
    try:
        import triton
    except ImportError:
        return "triton is not installed (pip install 'triton>=3.6'; Linux only)"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available to torch"
    if device.type != "cpu":
        return f"device type {device.type!r} is not supported; use a CUDA GPU"
    from .common import INTERPRET

    if not INTERPRET:
        return (
            "CPU tensors run the kernels only in Triton's interpreter: "
            "set TRITON_INTERPRET=1 before importing rnndeploy"
        )
    version = tuple(int(v) for v in triton.__version__.split(".")[:2])
    if version < (3, 8):
        return f"the Triton interpreter needs triton>=3.8 (runtime loop bounds), found {triton.__version__}"
    return None


def _check_steps(x: Tensor) -> None:
    if x.dim() == 3 and x.shape[0] == 0:
        raise RuntimeError(
            f"Expected sequence length to be larger than 0 in RNN, got x of shape {tuple(x.shape)} ([T, B, I])"
        )


def _check_inputs(cell: str, x: Tensor, state: tuple[Tensor, ...], weights: tuple, nonlinearity: str) -> None:
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    if x.dim() != 3:
        raise ValueError(f"x must be [T, B, I], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    n_state = 2 if cell == "lstm" else 1
    if len(state) != n_state:
        raise ValueError(f"state must hold {n_state} tensor(s) for {cell}, got {len(state)}")
    names = ("h0", "c0")[:n_state] + ("w_ih", "w_hh", "b_ih", "b_hh")
    for name, t in zip(names, (*state, *weights), strict=True):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{name} is {t.dtype} but x is {x.dtype}: use one dtype for all, or autocast")
    G = GATES[cell]
    H = state[0].shape[-1]
    B, n_in = x.shape[1], x.shape[2]
    expected = (*[(B, H)] * n_state, (G * H, n_in), (G * H, H), (G * H,), (G * H,))
    for name, t, shape in zip(names, (*state, *weights), expected, strict=True):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for x {tuple(x.shape)}, got {tuple(t.shape)}")


def triton_layer(
    cell: str,
    x: Tensor,
    state: tuple[Tensor, ...],
    weights: tuple[Tensor, Tensor, Tensor | None, Tensor | None],
    lengths: Tensor | None = None,
    reverse: bool = False,
    nonlinearity: str = "tanh",
    strategy: str | None = None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Same contract as `reference_layer`, on the persistent Triton kernels (differentiable).

    One forward launch per call (plus the input projection, one matmul over all steps); the backward is one
    reverse-time launch plus matmuls. Inputs may be float32, bfloat16 or float16 (all one dtype); state and
    accumulation are float32, outputs come in the input dtype. Under ``torch.autocast`` everything is cast to
    the autocast dtype first, as torch does for its own recurrent layers. Gradients are first-order only, as
    cuDNN's: differentiating them again raises (``rnndeploy.kernels.autograd``). An empty batch runs
    `reference_layer` (nothing to launch).

    Args:
        strategy: force a launch strategy (``rnndeploy.kernels.plan.STRATEGIES``); ``None`` picks one.

    Raises:
        RuntimeError: ``T == 0``, as torch.nn's recurrent layers do; double backward.
        ValueError: inputs of mismatched dtypes or shapes, named.
    """
    reason = triton_unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(f"backend='triton' cannot run on {x.device}: {reason}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x = x.to(dtype)
        state = tuple(s.to(dtype) for s in state)
        weights = tuple(None if w is None else w.to(dtype) for w in weights)
        with torch.autocast(device_type, enabled=False):
            return triton_layer(cell, x, state, weights, lengths, reverse, nonlinearity, strategy)
    _check_inputs(cell, x, state, weights, nonlinearity)
    _check_steps(x)
    if x.shape[1] == 0:
        # an empty batch has no recurrence to run (and no grid to launch): the plain-torch layer gives torch.nn's
        # empty outputs and zero weight gradients
        return reference_layer(cell, x, state, weights, lengths, reverse, nonlinearity)

    from .gru import GRUFunction
    from .lstm import LSTMFunction
    from .plan import plan_layer
    from .rnn import RNNFunction

    w_ih, w_hh, b_ih, b_hh = (None if w is None else w.contiguous() for w in weights)
    state = tuple(s.contiguous() for s in state)
    B, H = x.shape[1], w_hh.shape[1]
    if lengths is not None:
        if tuple(lengths.shape) != (B,):
            raise ValueError(f"lengths must be [B]=[{B}], got shape {tuple(lengths.shape)}")
        lengths = lengths.to(device=x.device, dtype=torch.int64).contiguous()
    needs_grad = any(t is not None and t.requires_grad for t in (x, *state, *weights))
    store_ws = torch.is_grad_enabled() and needs_grad
    plan = plan_layer(cell, B, H, x.dtype, x.device, strategy)
    if cell == "lstm":
        y, h, c = LSTMFunction.apply(x, *state, w_ih, w_hh, b_ih, b_hh, lengths, reverse, plan, store_ws)
        return y, (h, c)
    if cell == "gru":
        y, h = GRUFunction.apply(x, *state, w_ih, w_hh, b_ih, b_hh, lengths, reverse, plan, store_ws)
        return y, (h,)
    relu = nonlinearity == "relu"
    y, h = RNNFunction.apply(x, *state, w_ih, w_hh, b_ih, b_hh, lengths, reverse, plan, relu)
    return y, (h,)


# The measured dispatch table for backend="auto": (cell, dtype) -> {(batch, hidden)} where the Triton kernels
# beat cuDNN on forward+backward in a GPU run of benchmarks/gpu_session.sh (benchmarks/results/kernels.json).
# A shape that is not listed runs on cuDNN: the kernels are chosen only where a measurement shows them faster.
MEASURED_FASTER: dict[tuple[str, torch.dtype], frozenset[tuple[int, int]]] = {}


def prefer_triton(cell: str, batch: int, hidden: int, dtype: torch.dtype, device: torch.device) -> bool:
    """The measured dispatch table for ``backend='auto'``: True where the Triton kernels beat cuDNN."""
    if torch.device(device).type != "cuda":
        return False
    return (batch, hidden) in MEASURED_FASTER.get((cell, dtype), frozenset())
