"""Elman RNN: persistent forward and reverse-time backward kernels, their launchers and `RNNFunction`.

``h_t = f(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``, f = tanh or relu.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .autograd import first_order_only, previous_states, projection_grads
from .common import (
    _bwd_partial,
    _bwd_product,
    _dot,
    _exchange,
    _fwd_product,
    _gate_rows,
    _hold_cols,
    _hold_rows,
    _join_gates,
    _load_w_t,
    _put,
    _tanh,
)
from .launch import launch
from .plan import KernelConfig


@triton.jit(do_not_specialize=["T"])
def rnn_fwd_kernel(
    p_gx,  # [T, B, H] x @ W_ih^T + b_ih
    p_w,  # [H, H] W_hh
    p_b,  # [H] b_hh
    p_h0,  # [B, H]
    p_len,  # [B] int64
    p_y,  # [T, B, H]
    p_hT,  # [B, H]
    p_scr,  # [2, B, H] exchange of h, compute dtype
    p_bar,  # [cdiv(B, BB)] int32
    T,
    B,
    H,
    SW,  # row stride of W_hh (H rounded up to 16: aligned rows)
    SP,  # row stride of the scratch
    BB: tl.constexpr,
    BH: tl.constexpr,
    BK1: tl.constexpr,
    BK2: tl.constexpr,
    BKC: tl.constexpr,
    NKS: tl.constexpr,
    NSPLIT: tl.constexpr,
    STREAM_W: tl.constexpr,
    SCRATCH: tl.constexpr,
    PRECISION: tl.constexpr,
    TAGGED: tl.constexpr,  # exchange through tagged words, no grid barrier (common._poll)
    HDIV: tl.constexpr,  # a power of two H is a multiple of (1: nothing to add)
    REVERSE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    RELU: tl.constexpr,
):
    if HDIV > 1:
        H = (H // HDIV) * HDIV  # states H's alignment for vectorized H-strided loads and stores
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    o_b = i_b * BB + tl.arange(0, BB)
    o_h = i_h * BH + tl.arange(0, BH)
    m_b = o_b < B
    m_hb = (o_h < H)[:, None] & m_b[None, :]
    o_hb = o_b[None, :].to(tl.int64) * H + o_h[:, None]  # [BH, BB] units x batch
    o_sb = o_b[None, :].to(tl.int64) * SP + o_h[:, None]  # into the scratch
    o_row, m_row = _gate_rows(i_h, H, 1, 1, BH)

    b_h = tl.load(p_h0 + o_hb, mask=m_hb, other=0.0).to(tl.float32)  # [BH, BB] own slice
    b_w1, b_w2 = _hold_rows(p_w, o_row, m_row, H, SW, BK1, BK2, STREAM_W)  # [BH, BK1], [BH, BK2]
    if HAS_BIAS:
        b_b = tl.load(p_b + o_h, mask=o_h < H, other=0.0).to(tl.float32)[:, None]
    if HAS_LENGTHS:
        b_len = tl.load(p_len + o_b, mask=m_b, other=0)[None, :]

    for s in range(T):
        t = T - 1 - s if REVERSE else s
        b_a = _fwd_product(p_w, p_scr, s, b_h, b_w1, b_w2, o_row, m_row, o_b, m_b, B, H, SW, SP, BB,
                           BK1, BK2, BKC,
                           STREAM_W, SCRATCH, PRECISION, TAGGED)  # fmt: skip
        b_a += tl.load(p_gx + t.to(tl.int64) * B * H + o_hb, mask=m_hb, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b_a += b_b
        if RELU:
            b_new = tl.maximum(b_a, 0.0)
        else:
            b_new = _tanh(b_a)
        if HAS_LENGTHS:
            m_t = t < b_len
            b_h = tl.where(m_t, b_new, b_h)
            b_out = tl.where(m_t, b_new, 0.0)
        else:
            b_h = b_new
            b_out = b_new
        tl.store(p_y + t.to(tl.int64) * B * H + o_hb, b_out.to(p_y.dtype.element_ty), mask=m_hb)
        if SCRATCH:
            p_s = p_scr + (s % 2) * B * SP
            _put(p_s + o_sb, b_h, m_hb, s + 1, TAGGED, p_w.dtype.element_ty)
            _exchange(p_s, p_bar, i_b, s, NSPLIT, TAGGED)
    tl.store(p_hT + o_hb, b_h.to(p_hT.dtype.element_ty), mask=m_hb)


@triton.jit(do_not_specialize=["T"])
def rnn_bwd_kernel(
    p_dy,  # [T, B, H]
    p_dhT,  # [B, H]
    p_y,  # [T, B, H] forward outputs: the activations themselves
    p_w,  # [H, H] W_hh
    p_len,  # [B] int64
    p_dg,  # [T, B, H] pre-activation gradients
    p_dh0,  # [B, H]
    p_scr,  # [2, B, H] exchange of the pre-activation gradients, compute dtype
    p_bar,  # [cdiv(B, BB)] int32
    T,
    B,
    H,
    SW,  # row stride of W_hh (H rounded up to 16: aligned rows)
    SP,  # row stride of the scratch
    BB: tl.constexpr,
    BH: tl.constexpr,
    BK1: tl.constexpr,
    BK2: tl.constexpr,
    BKC: tl.constexpr,
    NKS: tl.constexpr,
    NSPLIT: tl.constexpr,
    STREAM_W: tl.constexpr,
    SCRATCH: tl.constexpr,
    PRECISION: tl.constexpr,
    TAGGED: tl.constexpr,  # exchange through tagged words, no grid barrier (common._poll)
    PARTIAL: tl.constexpr,  # by partial sums of dh (common._bwd_partial): W_hh rows held as forward
    NJ1: tl.constexpr,  # NSPLIT as two powers of two (plan.KernelConfig.NJ)
    NJ2: tl.constexpr,
    HDIV: tl.constexpr,  # a power of two H is a multiple of (1: nothing to add)
    REVERSE: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    RELU: tl.constexpr,
):
    if HDIV > 1:
        H = (H // HDIV) * HDIV  # states H's alignment for vectorized H-strided loads and stores
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    o_b = i_b * BB + tl.arange(0, BB)
    o_h = i_h * BH + tl.arange(0, BH)
    m_b = o_b < B
    m_bh = m_b[:, None] & (o_h < H)[None, :]
    o_bh = o_b[:, None].to(tl.int64) * H + o_h[None, :]  # [BB, BH] batch x units
    o_bs = o_b[:, None].to(tl.int64) * SP + o_h[None, :]  # into the scratch

    b_dh = tl.load(p_dhT + o_bh, mask=m_bh, other=0.0).to(tl.float32)  # [BB, BH]
    if PARTIAL:
        o_row, m_row = _gate_rows(i_h, H, 1, 1, BH)  # [GP*BH] rows of W_hh, gate-major
        b_w1, b_w2 = _hold_rows(p_w, o_row, m_row, H, SW, BK1, BK2, False)  # [GP*BH, BK1], [GP*BH, BK2]
    else:
        b_w1, b_w2 = _hold_cols(p_w, o_h, H, H, SW, NKS, BK1, BK2, STREAM_W, SCRATCH)  # [NKS, BK/NKS, BH]
    if not SCRATCH:
        b_w = _load_w_t(p_w, tl.arange(0, BK1), o_h, H, SW)  # [BK, BH] W[j, k]
    if HAS_LENGTHS:
        b_len = tl.load(p_len + o_b, mask=m_b, other=0)[:, None]

    for s in range(T):
        t = s if REVERSE else T - 1 - s
        o_t = t.to(tl.int64) * B * H + o_bh
        b_y = tl.load(p_y + o_t, mask=m_bh, other=0.0).to(tl.float32)
        b_dht = b_dh + tl.load(p_dy + o_t, mask=m_bh, other=0.0).to(tl.float32)
        if RELU:
            b_da = tl.where(b_y > 0.0, b_dht, 0.0)
        else:
            b_da = b_dht * (1.0 - b_y * b_y)
        if HAS_LENGTHS:
            m_t = t < b_len
            b_da = tl.where(m_t, b_da, 0.0)
        tl.store(p_dg + o_t, b_da.to(p_dg.dtype.element_ty), mask=m_bh)
        if SCRATCH:
            if PARTIAL:
                b_dg_all = _join_gates(b_da, b_da, b_da, b_da, 1)  # [BB, GP*BH]
                b_dhp = _bwd_partial(b_dg_all, b_w1, b_w2, p_scr, p_bar, s, i_b, i_h, o_b, m_b, o_h, B, H, SP,
                                      NSPLIT, NJ1, NJ2, BK1, BK2, TAGGED, PRECISION)  # fmt: skip
            else:
                p_s = p_scr + (s % 2) * B * SP
                _put(p_s + o_bs, b_da, m_bh, s + 1, TAGGED, p_w.dtype.element_ty)
                _exchange(p_s, p_bar, i_b, s, NSPLIT, TAGGED)
                b_dhp = _bwd_product(p_w, p_s, b_w1, b_w2, o_b, m_b, o_h, H, H, SW, SP, s + 1, NKS, BK1, BK2, BKC, STREAM_W,
                                     PRECISION, TAGGED)  # fmt: skip
        else:
            b_dhp = _dot(b_da.to(b_w.dtype), b_w, PRECISION)
        if HAS_LENGTHS:
            b_dh = tl.where(m_t, b_dhp, b_dh)
        else:
            b_dh = b_dhp
    tl.store(p_dh0 + o_bh, b_dh.to(p_dh0.dtype.element_ty), mask=m_bh)


def rnn_fwd(
    gx: Tensor,
    w_hh: Tensor,
    b_hh: Tensor | None,
    h0: Tensor,
    lengths: Tensor | None,
    reverse: bool,
    relu: bool,
    config: KernelConfig,
) -> tuple[Tensor, Tensor]:
    """Runs the recurrence over ``gx [T, B, H]``. Returns ``y [T, B, H]`` and ``h_T``.

    The backward needs nothing but ``y``: the activation's derivative is a function of its output.
    """
    T, B, H = gx.shape[0], gx.shape[1], w_hh.shape[1]
    y, hT = gx.new_empty(T, B, H), torch.empty_like(h0)
    tensors = dict(p_gx=gx, p_w=w_hh, p_b=b_hh, p_h0=h0, p_len=lengths, p_y=y, p_hT=hT)
    launch(rnn_fwd_kernel, config, tensors, T, B, H, 1, h0, REVERSE=reverse, HAS_BIAS=b_hh is not None,
           HAS_LENGTHS=lengths is not None, RELU=relu)  # fmt: skip
    return y, hT


def rnn_bwd(
    dy: Tensor,
    dhT: Tensor,
    y: Tensor,
    w_hh: Tensor,
    lengths: Tensor | None,
    reverse: bool,
    relu: bool,
    config: KernelConfig,
) -> tuple[Tensor, Tensor]:
    """Reverse-time pass. Returns pre-activation gradients ``[T, B, H]`` and ``dh_0``."""
    T, B, H = dy.shape[0], dy.shape[1], w_hh.shape[1]
    dg, dh0 = y.new_empty(T, B, H), torch.empty_like(dhT)
    tensors = dict(p_dy=dy, p_dhT=dhT, p_y=y, p_w=w_hh, p_len=lengths, p_dg=dg, p_dh0=dh0)
    launch(rnn_bwd_kernel, config, tensors, T, B, H, 1, REVERSE=reverse, HAS_LENGTHS=lengths is not None,
           RELU=relu)  # fmt: skip
    return dg, dh0


class RNNFunction(torch.autograd.Function):
    """One Elman RNN layer in one direction; see `rnndeploy.kernels.triton_layer` for the arguments."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, plan, relu):
        gx = F.linear(x, w_ih, b_ih)
        y, hT = rnn_fwd(gx, w_hh, b_hh, h0, lengths, reverse, relu, plan.forward)
        ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, y, lengths)
        ctx.reverse, ctx.plan, ctx.has_bias, ctx.relu = reverse, plan, b_ih is not None, relu
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        inputs = ctx.saved_tensors[:6]  # x, h0, w_ih, w_hh, b_ih, b_hh
        grads = first_order_only("rnn", lambda: _rnn_grads(ctx, dy, dhT), inputs)
        return *grads, None, None, None, None


def _rnn_grads(ctx, dy: Tensor, dhT: Tensor) -> tuple[Tensor | None, ...]:
    x, h0, w_ih, w_hh, _, _, y, lengths = ctx.saved_tensors
    dg, dh0 = rnn_bwd(
        dy.contiguous(), dhT.contiguous(), y, w_hh, lengths, ctx.reverse, ctx.relu, ctx.plan.backward
    )
    hp = previous_states(y, h0, lengths, ctx.reverse) if ctx.needs_input_grad[3] else None
    dx, dw_ih, dw_hh, db_ih, db_hh = projection_grads(ctx, dg, dg, x, hp, w_ih, 2)
    return dx, dh0, dw_ih, dw_hh, db_ih, db_hh
