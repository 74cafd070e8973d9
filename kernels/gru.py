"""GRU: persistent forward and reverse-time backward kernels, their launchers and :class:`GRUFunction`.

Gate order ``r, z, n`` (PyTorch's), reset applied after the recurrent product:
``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``, ``h_t = (1 - z) * n + z * h_{t-1}``.
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
    _sigmoid,
    _tanh,
    launch_buffers,
    previous_states,
    projection_grads,
)

# NOTE: store, not recompute (see lstm.py): r, z, n and W_hn h + b_hn, 4 values per unit. h_{t-1} is not
# stored: the backward rebuilds it from the outputs.
WS = tl.constexpr(4)


@triton.jit(do_not_specialize=["T"])
def gru_fwd_kernel(
    p_gx,  # [T, B, 3H] x @ W_ih^T + b_ih
    p_w,  # [3H, H] W_hh
    p_b,  # [3H] b_hh
    p_h0,  # [B, H]
    p_len,  # [B] int64
    p_y,  # [T, B, H]
    p_hT,  # [B, H]
    p_ws,  # [T, B, 4H] r, z, n, W_hn h + b_hn
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
    STORE_WS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    o_b = i_b * BB + tl.arange(0, BB)
    o_h = i_h * BH + tl.arange(0, BH)
    o_k = tl.arange(0, BK)
    m_b = o_b < B
    m_bh = m_b[:, None] & (o_h < H)[None, :]
    o_bh = o_b[:, None].to(tl.int64) * H + o_h[None, :]
    o_bg = o_b[:, None].to(tl.int64) * 3 * H + o_h[None, :]
    o_bw = o_b[:, None].to(tl.int64) * WS * H + o_h[None, :]
    HH = tl.cast(H, tl.int64) * H  # H == 1 arrives as a constexpr on GPU

    b_h = tl.load(p_h0 + o_bh, mask=m_bh, other=0.0).to(tl.float32)  # [BB, BH] own slice
    if not STREAM_W:
        b_hk = _load_op(p_h0, o_b, o_k, H, H, m_b).to(tl.float32)  # [BB, BK] recurrent operand
        b_wr = _load_w(p_w, o_k, o_h, H, True)  # [BK, BH] W_r^T
        b_wz = _load_w(p_w + HH, o_k, o_h, H, True)
        b_wn = _load_w(p_w + 2 * HH, o_k, o_h, H, True)
    if HAS_BIAS:
        m_h = o_h < H
        b_br = tl.load(p_b + o_h, mask=m_h, other=0.0).to(tl.float32)[None, :]
        b_bz = tl.load(p_b + H + o_h, mask=m_h, other=0.0).to(tl.float32)[None, :]
        b_bn = tl.load(p_b + 2 * H + o_h, mask=m_h, other=0.0).to(tl.float32)[None, :]
    if HAS_LENGTHS:
        b_len = tl.load(p_len + o_b, mask=m_b, other=0)

    for s in range(T):
        t = T - 1 - s if REVERSE else s
        p_gt = p_gx + t.to(tl.int64) * B * 3 * H + o_bg
        b_ar = tl.load(p_gt, mask=m_bh, other=0.0).to(tl.float32)
        b_az = tl.load(p_gt + H, mask=m_bh, other=0.0).to(tl.float32)
        b_an = tl.load(p_gt + 2 * H, mask=m_bh, other=0.0).to(tl.float32)
        if STREAM_W:
            # h_{t-1} was written by the previous step (h_0: by the launcher); W_hh streams from L2
            p_prev = p_scr + ((s + 1) % 2) * B * H
            b_hn = tl.zeros([BB, BH], dtype=tl.float32)
            for k0 in range(0, BK, BKC):
                o_kc = k0 + tl.arange(0, BKC)
                b_hc = _load_op(p_prev, o_b, o_kc, H, H, m_b)  # [BB, BKC]
                b_ar += _dot(b_hc, _load_w(p_w, o_kc, o_h, H, True), PRECISION)
                b_az += _dot(b_hc, _load_w(p_w + HH, o_kc, o_h, H, True), PRECISION)
                b_hn += _dot(b_hc, _load_w(p_w + 2 * HH, o_kc, o_h, H, True), PRECISION)
        else:
            b_ar += _dot(b_hk, b_wr, PRECISION)
            b_az += _dot(b_hk, b_wz, PRECISION)
            b_hn = _dot(b_hk, b_wn, PRECISION)
        if HAS_BIAS:
            b_ar += b_br
            b_az += b_bz
            b_hn += b_bn
        b_r = _sigmoid(b_ar)
        b_z = _sigmoid(b_az)
        b_n = _tanh(b_an + b_r * b_hn)
        b_new = (1.0 - b_z) * b_n + b_z * b_h
        if STORE_WS:
            p_wt = p_ws + t.to(tl.int64) * B * WS * H + o_bw
            tl.store(p_wt, b_r.to(p_ws.dtype.element_ty), mask=m_bh)
            tl.store(p_wt + H, b_z.to(p_ws.dtype.element_ty), mask=m_bh)
            tl.store(p_wt + 2 * H, b_n.to(p_ws.dtype.element_ty), mask=m_bh)
            tl.store(p_wt + 3 * H, b_hn.to(p_ws.dtype.element_ty), mask=m_bh)
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
def gru_bwd_kernel(
    p_dy,  # [T, B, H]
    p_dhT,  # [B, H]
    p_ws,  # [T, B, 4H] from the forward
    p_hp,  # [T, B, H] h_{t-1} of every step
    p_w,  # [3H, H] W_hh
    p_len,  # [B] int64
    p_dg,  # [T, B, 4H] d(r, z pre-activations), d(W_hn h + b_hn), d(n pre-activation)
    p_dh0,  # [B, H]
    p_scr,  # [2, B, 3H] fp32 exchange of the hidden-side gate gradients
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
    PRECISION: tl.constexpr,
):
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    o_b = i_b * BB + tl.arange(0, BB)
    o_h = i_h * BH + tl.arange(0, BH)
    o_k = tl.arange(0, BK)
    m_b = o_b < B
    m_bh = m_b[:, None] & (o_h < H)[None, :]
    o_bh = o_b[:, None].to(tl.int64) * H + o_h[None, :]
    o_bs = o_b[:, None].to(tl.int64) * 3 * H + o_h[None, :]
    o_bw = o_b[:, None].to(tl.int64) * WS * H + o_h[None, :]
    HH = tl.cast(H, tl.int64) * H  # H == 1 arrives as a constexpr on GPU

    b_dh = tl.load(p_dhT + o_bh, mask=m_bh, other=0.0).to(tl.float32)  # [BB, BH]
    if not STREAM_W:
        b_wr = _load_w(p_w, o_k, o_h, H, False)  # [BK, BH] W_r[j, k]
        b_wz = _load_w(p_w + HH, o_k, o_h, H, False)
        b_wn = _load_w(p_w + 2 * HH, o_k, o_h, H, False)
    if HAS_LENGTHS:
        b_len = tl.load(p_len + o_b, mask=m_b, other=0)

    for s in range(T):
        t = s if REVERSE else T - 1 - s
        p_wt = p_ws + t.to(tl.int64) * B * WS * H + o_bw
        b_r = tl.load(p_wt, mask=m_bh, other=0.0).to(tl.float32)
        b_z = tl.load(p_wt + H, mask=m_bh, other=0.0).to(tl.float32)
        b_n = tl.load(p_wt + 2 * H, mask=m_bh, other=0.0).to(tl.float32)
        b_hn = tl.load(p_wt + 3 * H, mask=m_bh, other=0.0).to(tl.float32)
        b_hp = tl.load(p_hp + t.to(tl.int64) * B * H + o_bh, mask=m_bh, other=0.0).to(tl.float32)
        b_dht = b_dh + tl.load(p_dy + t.to(tl.int64) * B * H + o_bh, mask=m_bh, other=0.0).to(tl.float32)
        b_dan = b_dht * (1.0 - b_z) * (1.0 - b_n * b_n)
        b_dar = b_dan * b_hn * b_r * (1.0 - b_r)
        b_daz = b_dht * (b_hp - b_n) * b_z * (1.0 - b_z)
        b_dhn = b_dan * b_r
        b_direct = b_dht * b_z
        if HAS_LENGTHS:
            m_t = (t < b_len)[:, None]
            b_dar = tl.where(m_t, b_dar, 0.0)
            b_daz = tl.where(m_t, b_daz, 0.0)
            b_dhn = tl.where(m_t, b_dhn, 0.0)
            b_dan = tl.where(m_t, b_dan, 0.0)
        p_gt = p_dg + t.to(tl.int64) * B * 4 * H + o_b[:, None].to(tl.int64) * 4 * H + o_h[None, :]
        tl.store(p_gt, b_dar.to(p_dg.dtype.element_ty), mask=m_bh)
        tl.store(p_gt + H, b_daz.to(p_dg.dtype.element_ty), mask=m_bh)
        tl.store(p_gt + 2 * H, b_dhn.to(p_dg.dtype.element_ty), mask=m_bh)
        tl.store(p_gt + 3 * H, b_dan.to(p_dg.dtype.element_ty), mask=m_bh)
        if SCRATCH:
            p_s = p_scr + (s % 2) * B * 3 * H
            tl.store(p_s + o_bs, b_dar, mask=m_bh)
            tl.store(p_s + H + o_bs, b_daz, mask=m_bh)
            tl.store(p_s + 2 * H + o_bs, b_dhn, mask=m_bh)
            if NSPLIT > 1:
                _grid_barrier(p_bar + i_b, (s + 1) * NSPLIT)
            else:
                tl.debug_barrier()
            if STREAM_W:
                b_dhp = b_direct
                for k0 in range(0, BK, BKC):
                    o_kc = k0 + tl.arange(0, BKC)
                    b_dhp += _dot(
                        _load_op(p_s, o_b, o_kc, 3 * H, H, m_b), _load_w(p_w, o_kc, o_h, H, False), PRECISION
                    )
                    b_dhp += _dot(
                        _load_op(p_s + H, o_b, o_kc, 3 * H, H, m_b),
                        _load_w(p_w + HH, o_kc, o_h, H, False),
                        PRECISION,
                    )
                    b_dhp += _dot(
                        _load_op(p_s + 2 * H, o_b, o_kc, 3 * H, H, m_b),
                        _load_w(p_w + 2 * HH, o_kc, o_h, H, False),
                        PRECISION,
                    )
            else:
                # one gate's operand live at a time keeps the register file for the resident W_hh slice
                b_dhp = b_direct + _dot(_load_op(p_s, o_b, o_k, 3 * H, H, m_b), b_wr, PRECISION)
                b_dhp += _dot(_load_op(p_s + H, o_b, o_k, 3 * H, H, m_b), b_wz, PRECISION)
                b_dhp += _dot(_load_op(p_s + 2 * H, o_b, o_k, 3 * H, H, m_b), b_wn, PRECISION)
        else:
            b_dhp = b_direct + _dot(b_dar, b_wr, PRECISION)
            b_dhp += _dot(b_daz, b_wz, PRECISION)
            b_dhp += _dot(b_dhn, b_wn, PRECISION)
        if HAS_LENGTHS:
            b_dh = tl.where(m_t, b_dhp, b_dh)
        else:
            b_dh = b_dhp
    tl.store(p_dh0 + o_bh, b_dh.to(p_dh0.dtype.element_ty), mask=m_bh)


def gru_fwd(
    gx: Tensor,
    w_hh: Tensor,
    b_hh: Tensor | None,
    h0: Tensor,
    lengths: Tensor | None,
    reverse: bool,
    store_ws: bool,
    config: KernelConfig,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Runs the recurrence over ``gx [T, B, 3H]``. Returns ``y [T, B, H]``, ``h_T`` and the workspace."""
    T, B, H = gx.shape[0], gx.shape[1], w_hh.shape[1]
    y, ws, scr, bar, grid, precision = launch_buffers(gx, H, 1, WS.value if store_ws else 0, 1, config)
    if config.STREAM_W:
        scr[1].copy_(h0)  # the operand of step 0
    hT = torch.empty_like(h0)
    gru_fwd_kernel[grid](
        gx, w_hh, b_hh, h0, lengths, y, hT, ws, scr, bar, T, B, H,
        BB=config.BB, BH=config.BH, BK=config.BK, BKC=config.BKC, NSPLIT=config.NSPLIT,
        STREAM_W=config.STREAM_W,
        SCRATCH=config.SCRATCH, REVERSE=reverse, HAS_BIAS=b_hh is not None, HAS_LENGTHS=lengths is not None,
        STORE_WS=store_ws, PRECISION=precision, num_warps=config.num_warps,
    )  # fmt: skip
    return y, hT, ws


def gru_bwd(
    dy: Tensor,
    dhT: Tensor,
    ws: Tensor,
    hp: Tensor,
    w_hh: Tensor,
    lengths: Tensor | None,
    reverse: bool,
    config: KernelConfig,
) -> tuple[Tensor, Tensor]:
    """Reverse-time pass. Returns gate gradients ``[T, B, 4H]`` (see the kernel) and ``dh_0``."""
    T, B, H = dy.shape[0], dy.shape[1], w_hh.shape[1]
    dg, _, scr, bar, grid, precision = launch_buffers(ws, H, 4, 0, 3, config)
    dh0 = torch.empty_like(dhT)
    gru_bwd_kernel[grid](
        dy, dhT, ws, hp, w_hh, lengths, dg, dh0, scr, bar, T, B, H,
        BB=config.BB, BH=config.BH, BK=config.BK, BKC=config.BKC, NSPLIT=config.NSPLIT,
        STREAM_W=config.STREAM_W,
        SCRATCH=config.SCRATCH, REVERSE=reverse, HAS_LENGTHS=lengths is not None, PRECISION=precision,
        num_warps=config.num_warps,
    )  # fmt: skip
    return dg, dh0


class GRUFunction(torch.autograd.Function):
    """One GRU layer in one direction; see :func:`rnndeploy.kernels.triton_layer` for the arguments."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, config, store_ws):
        gx = F.linear(x, w_ih, b_ih)
        y, hT, ws = gru_fwd(gx, w_hh, b_hh, h0, lengths, reverse, store_ws, config)
        ctx.save_for_backward(x, h0, w_ih, w_hh, y, ws, lengths)
        ctx.reverse, ctx.config, ctx.has_bias = reverse, config, b_ih is not None
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        x, h0, w_ih, w_hh, y, ws, lengths = ctx.saved_tensors
        if ws is None:
            raise RuntimeError("GRUFunction: forward ran with store_ws=False: nothing to backprop")
        hp = previous_states(y, h0, lengths, ctx.reverse)
        dg, dh0 = gru_bwd(dy.contiguous(), dhT.contiguous(), ws, hp, w_hh, lengths, ctx.reverse, ctx.config)
        H = w_hh.shape[1]
        dg_in = torch.cat([dg[..., : 2 * H], dg[..., 3 * H :]], dim=-1)  # r, z, n pre-activations
        dx, dw_ih, dw_hh, db_ih, db_hh = projection_grads(ctx, dg_in, dg[..., : 3 * H], x, hp, w_ih, 2)
        return dx, dh0, dw_ih, dw_hh, db_ih, db_hh, None, None, None, None
