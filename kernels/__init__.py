"""Training compute for rnndeploy: the plain-torch reference cells and the persistent Triton kernels.

This package knows torch and triton only. ``rnndeploy.modules`` calls into it through one entry point per
backend with a common per-layer signature (see :func:`reference_layer`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import gru_ref, lstm_ref, rnn_ref

__all__ = ["gru_ref", "lstm_ref", "rnn_ref", "reference_layer", "triton_unavailable_reason", "triton_layer"]

CELLS = ("rnn", "lstm", "gru")


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
    """
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
    """Why the Triton kernels cannot run on ``device`` here, or ``None`` when they can."""
    return (
        "the persistent Triton kernels are not part of this build yet; "
        "use backend='torch' (cuDNN on GPU) or backend='auto'"
    )


def triton_layer(
    cell: str,
    x: Tensor,
    state: tuple[Tensor, ...],
    weights: tuple[Tensor, Tensor, Tensor | None, Tensor | None],
    lengths: Tensor | None = None,
    reverse: bool = False,
    nonlinearity: str = "tanh",
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Same contract as :func:`reference_layer`, on the persistent Triton kernels."""
    raise RuntimeError(f"backend='triton' is unavailable: {triton_unavailable_reason(x.device)}")


def prefer_triton(cell: str, batch: int, hidden: int, dtype: torch.dtype, device: torch.device) -> bool:
    """The measured dispatch table for ``backend='auto'``: True where the Triton kernels beat cuDNN."""
    return False
