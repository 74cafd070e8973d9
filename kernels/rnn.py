"""Elman RNN: persistent forward and reverse-time backward kernels, their launchers and :class:`RNNFunction`.

``h_t = f(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``, f = tanh or relu.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    KernelConfig,
    _dot,
    _grid_barrier,
    _load_op,
    _load_w,
    _tanh,
    launch_buffers,
    previous_states,
    projection_grads,
)


@triton.jit(do_not_specialize=["T"])
def rnn_fwd_kernel(
    p_gx,  # [T, B, H] x @ W_ih^T + b_ih
    p_w,  # [H, H] W_hh
    p_b,  # [H] b_hh
    p_h0,  # [B, H]
    p_len,  # [B] int64
    p_y,  # [T, B, H]
    p_hT,  # [B, H]
    p_scr,  # [2, B, H] fp32 exchange of h
    p_bar,  # [cdiv(B, BB)] int32
    T,
    B,
    H,
    BB: tl.constexpr,
    BH: tl.constexpr,
    BK: tl.constexpr,
    BKC: tl.constexpr,
    NSPLIT: tl.constexpr,
    STREAM_W: tl.constexpr,
    SCRATCH: tl.constexpr,
    REVERSE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    RELU: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    o_b = i_b * BB + tl.arange(0, BB)
    o_h = i_h * BH + tl.arange(0, BH)
    o_k = tl.arange(0, BK)
    m_b = o_b < B
    m_bh = m_b[:, None] & (o_h < H)[None, :]
    o_bh = o_b[:, None].to(tl.int64) * H + o_h[None, :]

    b_h = tl.load(p_h0 + o_bh, mask=m_bh, other=0.0).to(tl.float32)  # [BB, BH] own slice
    if not STREAM_W:
        b_hk = _load_op(p_h0, o_b, o_k, H, H, m_b).to(tl.float32)  # [BB, BK] recurrent operand
        b_w = _load_w(p_w, o_k, o_h, H, True)  # [BK, BH] W^T
    if HAS_BIAS:
        b_b = tl.load(p_b + o_h, mask=o_h < H, other=0.0).to(tl.float32)[None, :]
    if HAS_LENGTHS:
        b_len = tl.load(p_len + o_b, mask=m_b, other=0)

    for s in range(T):
        t = T - 1 - s if REVERSE else s
        b_a = tl.load(p_gx + t.to(tl.int64) * B * H + o_bh, mask=m_bh, other=0.0).to(tl.float32)
        if STREAM_W:
            # h_{t-1} was written by the previous step (h_0: by the launcher); W_hh streams from L2
            p_prev = p_scr + ((s + 1) % 2) * B * H
            for k0 in range(0, BK, BKC):
                o_kc = k0 + tl.arange(0, BKC)
                b_a += _dot(
                    _load_op(p_prev, o_b, o_kc, H, H, m_b), _load_w(p_w, o_kc, o_h, H, True), PRECISION
                )
        else:
            b_a += _dot(b_hk, b_w, PRECISION)
        if HAS_BIAS:
            b_a += b_b
        if RELU:
            b_new = tl.maximum(b_a, 0.0)
        else:
            b_new = _tanh(b_a)
        if HAS_LENGTHS:
            m_t = (t < b_len)[:, None]
            b_h = tl.where(m_t, b_new, b_h)
            b_out = tl.where(m_t, b_new, 0.0)
        else:
            b_h = b_new
            b_out = b_new
        tl.store(p_y + t.to(tl.int64) * B * H + o_bh, b_out.to(p_y.dtype.element_ty), mask=m_bh)
        if SCRATCH:
            p_s = p_scr + (s % 2) * B * H
            tl.store(p_s + o_bh, b_h, mask=m_bh)
            if NSPLIT > 1:
                _grid_barrier(p_bar + i_b, (s + 1) * NSPLIT)
            else:
                tl.debug_barrier()
            if not STREAM_W:
                b_hk = _load_op(p_s, o_b, o_k, H, H, m_b)
        else:
            b_hk = b_h
    tl.store(p_hT + o_bh, b_h.to(p_hT.dtype.element_ty), mask=m_bh)


@triton.jit(do_not_specialize=["T"])
def rnn_bwd_kernel(
    p_dy,  # [T, B, H]
    p_dhT,  # [B, H]
    p_y,  # [T, B, H] forward outputs: the activations themselves
    p_w,  # [H, H] W_hh
    p_len,  # [B] int64
    p_dg,  # [T, B, H] pre-activation gradients
    p_dh0,  # [B, H]
    p_scr,  # [2, B, H] fp32 exchange of the pre-activation gradients
    p_bar,  # [cdiv(B, BB)] int32
    T,
    B,
    H,
    BB: tl.constexpr,
    BH: tl.constexpr,
    BK: tl.constexpr,
    BKC: tl.constexpr,
    NSPLIT: tl.constexpr,
    STREAM_W: tl.constexpr,
    SCRATCH: tl.constexpr,
    REVERSE: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    RELU: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    o_b = i_b * BB + tl.arange(0, BB)
    o_h = i_h * BH + tl.arange(0, BH)
    o_k = tl.arange(0, BK)
    m_b = o_b < B
    m_bh = m_b[:, None] & (o_h < H)[None, :]
    o_bh = o_b[:, None].to(tl.int64) * H + o_h[None, :]

    b_dh = tl.load(p_dhT + o_bh, mask=m_bh, other=0.0).to(tl.float32)  # [BB, BH]
    if not STREAM_W:
        b_w = _load_w(p_w, o_k, o_h, H, False)  # [BK, BH] W[j, k]
    if HAS_LENGTHS:
        b_len = tl.load(p_len + o_b, mask=m_b, other=0)

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
            m_t = (t < b_len)[:, None]
            b_da = tl.where(m_t, b_da, 0.0)
        tl.store(p_dg + o_t, b_da.to(p_dg.dtype.element_ty), mask=m_bh)
        if SCRATCH:
            p_s = p_scr + (s % 2) * B * H
            tl.store(p_s + o_bh, b_da, mask=m_bh)
            if NSPLIT > 1:
                _grid_barrier(p_bar + i_b, (s + 1) * NSPLIT)
            else:
                tl.debug_barrier()
            if STREAM_W:
                b_dhp = tl.zeros([BB, BH], dtype=tl.float32)
                for k0 in range(0, BK, BKC):
                    o_kc = k0 + tl.arange(0, BKC)
                    b_dhp += _dot(
                        _load_op(p_s, o_b, o_kc, H, H, m_b), _load_w(p_w, o_kc, o_h, H, False), PRECISION
                    )
            else:
                b_dhp = _dot(_load_op(p_s, o_b, o_k, H, H, m_b), b_w, PRECISION)
        else:
            b_dhp = _dot(b_da, b_w, PRECISION)
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
    y, _, scr, bar, grid, precision = launch_buffers(gx, H, 1, 0, 1, config)
    if config.STREAM_W:
        scr[1].copy_(h0)  # the operand of step 0
    hT = torch.empty_like(h0)
    rnn_fwd_kernel[grid](
        gx, w_hh, b_hh, h0, lengths, y, hT, scr, bar, T, B, H,
        BB=config.BB, BH=config.BH, BK=config.BK, BKC=config.BKC, NSPLIT=config.NSPLIT,
        STREAM_W=config.STREAM_W,
        SCRATCH=config.SCRATCH, REVERSE=reverse, HAS_BIAS=b_hh is not None, HAS_LENGTHS=lengths is not None,
        RELU=relu, PRECISION=precision, num_warps=config.num_warps,
    )  # fmt: skip
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
    dg, _, scr, bar, grid, precision = launch_buffers(y, H, 1, 0, 1, config)
    dh0 = torch.empty_like(dhT)
    rnn_bwd_kernel[grid](
        dy, dhT, y, w_hh, lengths, dg, dh0, scr, bar, T, B, H,
        BB=config.BB, BH=config.BH, BK=config.BK, BKC=config.BKC, NSPLIT=config.NSPLIT,
        STREAM_W=config.STREAM_W,
        SCRATCH=config.SCRATCH, REVERSE=reverse, HAS_LENGTHS=lengths is not None, RELU=relu,
        PRECISION=precision, num_warps=config.num_warps,
    )  # fmt: skip
    return dg, dh0


class RNNFunction(torch.autograd.Function):
    """One Elman RNN layer in one direction; see :func:`rnndeploy.kernels.triton_layer` for the arguments."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, config, relu):
        gx = F.linear(x, w_ih, b_ih)
        y, hT = rnn_fwd(gx, w_hh, b_hh, h0, lengths, reverse, relu, config)
        ctx.save_for_backward(x, h0, w_ih, w_hh, y, lengths)
        ctx.reverse, ctx.config, ctx.has_bias, ctx.relu = reverse, config, b_ih is not None, relu
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        x, h0, w_ih, w_hh, y, lengths = ctx.saved_tensors
        dy, dhT = dy.contiguous(), dhT.contiguous()
        dg, dh0 = rnn_bwd(dy, dhT, y, w_hh, lengths, ctx.reverse, ctx.relu, ctx.config)
        hp = previous_states(y, h0, lengths, ctx.reverse) if ctx.needs_input_grad[3] else None
        dx, dw_ih, dw_hh, db_ih, db_hh = projection_grads(ctx, dg, dg, x, hp, w_ih, 2)
        return dx, dh0, dw_ih, dw_hh, db_ih, db_hh, None, None, None, None
