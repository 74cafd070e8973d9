"""Plain-torch reference cells: the oracle every fast path is tested against.

Written from the equations (see DESIGN.md, "The math"), one time step at a time, with PyTorch's parameter
layout: LSTM gates ``i, f, g, o``; GRU gates ``r, z, n`` with the reset gate applied after the recurrent
product. Each function runs ONE layer in ONE direction.

Common arguments:
    x: ``[T, B, I]`` input sequence (time-major).
    h0 (and c0 for LSTM): ``[B, H]`` initial state.
    w_ih: ``[G*H, I]``, w_hh: ``[G*H, H]``, b_ih / b_hh: ``[G*H]`` or ``None`` (G = 1, 4, 3 for RNN, LSTM, GRU).
    lengths: ``[B]`` valid length of each sequence, or ``None`` for all ``T``. Steps at ``t >= lengths[b]``
        leave the state of row ``b`` unchanged and write zeros to the output, as ``pad_packed_sequence`` does.
    reverse: run time backwards (step ``lengths[b] - 1`` first), for the second direction of a bidirectional layer.

Returns:
    y: ``[T, B, H]`` outputs, and the final state(s) ``[B, H]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return F.linear(x, w, b)


def _time_order(T: int, reverse: bool) -> range:
    return range(T - 1, -1, -1) if reverse else range(T)


def _valid_mask(lengths: Tensor | None, t: int, B: int, device: torch.device) -> Tensor | None:
    if lengths is None:
        return None
    return (lengths.to(device) > t).view(B, 1)


def _scan(step, x: Tensor, state: tuple[Tensor, ...], lengths: Tensor | None, reverse: bool):
    """Runs ``step(x_t, state) -> (y_t, state)`` over time with length masking."""
    T, B = x.shape[0], x.shape[1]
    ys: list[Tensor | None] = [None] * T
    for t in _time_order(T, reverse):
        y_t, new_state = step(x[t], state)
        mask = _valid_mask(lengths, t, B, x.device)
        if mask is not None:
            new_state = tuple(torch.where(mask, n, s) for n, s in zip(new_state, state))
            y_t = torch.where(mask, y_t, torch.zeros_like(y_t))
        state = new_state
        ys[t] = y_t
    return torch.stack(ys), state


def rnn_ref(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    lengths: Tensor | None = None,
    reverse: bool = False,
    nonlinearity: str = "tanh",
) -> tuple[Tensor, Tensor]:
    """Elman RNN: ``h_t = f(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``, f = tanh or relu."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    act = torch.tanh if nonlinearity == "tanh" else torch.relu

    def step(x_t, state):
        (h,) = state
        h = act(_linear(x_t, w_ih, b_ih) + _linear(h, w_hh, b_hh))
        return h, (h,)

    y, (h,) = _scan(step, x, (h0,), lengths, reverse)
    return y, h


def lstm_ref(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    lengths: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """LSTM with PyTorch's gate order ``i, f, g, o``: ``c = f*c + i*g``, ``h = o*tanh(c)``."""

    def step(x_t, state):
        h, c = state
        gates = _linear(x_t, w_ih, b_ih) + _linear(h, w_hh, b_hh)
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, (h, c)

    y, (h, c) = _scan(step, x, (h0, c0), lengths, reverse)
    return y, h, c


def gru_ref(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    lengths: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """GRU with PyTorch's gate order ``r, z, n``; the reset gate multiplies ``W_hn h + b_hn`` (linear before reset)."""

    def step(x_t, state):
        (h,) = state
        gi = _linear(x_t, w_ih, b_ih)
        gh = _linear(h, w_hh, b_hh)
        i_r, i_z, i_n = gi.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        h = (1 - z) * n + z * h
        return h, (h,)

    y, (h,) = _scan(step, x, (h0,), lengths, reverse)
    return y, h
