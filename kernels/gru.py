"""GRU: persistent forward and reverse-time backward kernels, their launchers and `GRUFunction`.

Gate order ``r, z, n`` (PyTorch's), reset applied after the recurrent product:
``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``, ``h_t = (1 - z) * n + z * h_{t-1}``.
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
    _sigmoid,
    _split4,
    _tanh,
)
from .launch import launch
from .plan import KernelConfig

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
    STORE_WS: tl.constexpr,
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
    o_gb = o_b[None, :].to(tl.int64) * 3 * H + o_h[:, None]
    o_wb = o_b[None, :].to(tl.int64) * WS * H + o_h[:, None]
    o_row, m_row = _gate_rows(i_h, H, 3, 4, BH)  # [4BH] rows of W_hh, gate-major; the 4th block is zero

    b_h = tl.load(p_h0 + o_hb, mask=m_hb, other=0.0).to(tl.float32)  # [BH, BB] own slice
    b_w1, b_w2 = _hold_rows(p_w, o_row, m_row, H, SW, BK1, BK2, STREAM_W)  # [4BH, BK1], [4BH, BK2]
    if HAS_BIAS:
        m_h = o_h < H
        b_br = tl.load(p_b + o_h, mask=m_h, other=0.0).to(tl.float32)[:, None]
        b_bz = tl.load(p_b + H + o_h, mask=m_h, other=0.0).to(tl.float32)[:, None]
        b_bn = tl.load(p_b + 2 * H + o_h, mask=m_h, other=0.0).to(tl.float32)[:, None]
    if HAS_LENGTHS:
        b_len = tl.load(p_len + o_b, mask=m_b, other=0)[None, :]

    for s in range(T):
        t = T - 1 - s if REVERSE else s
        b_a = _fwd_product(p_w, p_scr, s, b_h, b_w1, b_w2, o_row, m_row, o_b, m_b, B, H, SW, SP, BB,
                           BK1, BK2, BKC,
                           STREAM_W, SCRATCH, PRECISION, TAGGED)  # fmt: skip
        b_ar, b_az, b_hn, _ = _split4(b_a, BH, BB)
        p_gt = p_gx + t.to(tl.int64) * B * 3 * H + o_gb
        b_ar += tl.load(p_gt, mask=m_hb, other=0.0).to(tl.float32)
        b_az += tl.load(p_gt + H, mask=m_hb, other=0.0).to(tl.float32)
        b_an = tl.load(p_gt + 2 * H, mask=m_hb, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b_ar += b_br
            b_az += b_bz
            b_hn += b_bn
        b_r = _sigmoid(b_ar)
        b_z = _sigmoid(b_az)
        b_n = _tanh(b_an + b_r * b_hn)
        b_new = (1.0 - b_z) * b_n + b_z * b_h
        if STORE_WS:
            p_wt = p_ws + t.to(tl.int64) * B * WS * H + o_wb
            tl.store(p_wt, b_r.to(p_ws.dtype.element_ty), mask=m_hb)
            tl.store(p_wt + H, b_z.to(p_ws.dtype.element_ty), mask=m_hb)
            tl.store(p_wt + 2 * H, b_n.to(p_ws.dtype.element_ty), mask=m_hb)
            tl.store(p_wt + 3 * H, b_hn.to(p_ws.dtype.element_ty), mask=m_hb)
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
def gru_bwd_kernel(
    p_dy,  # [T, B, H]
    p_dhT,  # [B, H]
    p_ws,  # [T, B, 4H] from the forward
    p_hp,  # [T, B, H] h_{t-1} of every step
    p_w,  # [3H, H] W_hh
    p_len,  # [B] int64
    p_dg,  # [T, B, 4H] d(r, z pre-activations), d(W_hn h + b_hn), d(n pre-activation)
    p_dh0,  # [B, H]
    p_scr,  # [2, B, 3H] exchange of the hidden-side gate gradients, compute dtype
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
    o_bw = o_b[:, None].to(tl.int64) * WS * H + o_h[None, :]
    HH = tl.cast(H, tl.int64) * SW  # one gate's block of W_hh (H == 1 arrives as a constexpr on GPU)

    b_dh = tl.load(p_dhT + o_bh, mask=m_bh, other=0.0).to(tl.float32)  # [BB, BH]
    if PARTIAL:
        o_row, m_row = _gate_rows(i_h, H, 3, 4, BH)  # [GP*BH] rows of W_hh, gate-major
        b_w1, b_w2 = _hold_rows(p_w, o_row, m_row, H, SW, BK1, BK2, False)  # [GP*BH, BK1], [GP*BH, BK2]
    else:
        b_w1, b_w2 = _hold_cols(p_w, o_h, 3 * H, H, SW, NKS, BK1, BK2, STREAM_W, SCRATCH)  # [NKS, BK/NKS, BH]
    if not SCRATCH:
        o_k = tl.arange(0, BK1)
        b_wr = _load_w_t(p_w, o_k, o_h, H, SW)  # [BK, BH] W_r[j, k]
        b_wz = _load_w_t(p_w + HH, o_k, o_h, H, SW)
        b_wn = _load_w_t(p_w + 2 * HH, o_k, o_h, H, SW)
    if HAS_LENGTHS:
        b_len = tl.load(p_len + o_b, mask=m_b, other=0)[:, None]

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
            m_t = t < b_len
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
            if PARTIAL:
                b_dg_all = _join_gates(b_dar, b_daz, b_dhn, tl.zeros_like(b_dhn), 3)  # [BB, GP*BH]
                b_dhp = b_direct + _bwd_partial(b_dg_all, b_w1, b_w2, p_scr, p_bar, s, i_b, i_h, o_b, m_b, o_h, B, H, SP,
                                      NSPLIT, NJ1, NJ2, BK1, BK2, TAGGED, PRECISION)  # fmt: skip
            else:
                p_s = p_scr + (s % 2) * B * SP
                _put(p_s + o_bs, b_dar, m_bh, s + 1, TAGGED, p_w.dtype.element_ty)
                _put(p_s + H + o_bs, b_daz, m_bh, s + 1, TAGGED, p_w.dtype.element_ty)
                _put(p_s + 2 * H + o_bs, b_dhn, m_bh, s + 1, TAGGED, p_w.dtype.element_ty)
                _exchange(p_s, p_bar, i_b, s, NSPLIT, TAGGED)
                b_dhp = b_direct + _bwd_product(p_w, p_s, b_w1, b_w2, o_b, m_b, o_h, 3 * H, H, SW, SP, s + 1, NKS, BK1, BK2, BKC,
                                                STREAM_W, PRECISION, TAGGED)  # fmt: skip
        else:
            b_dhp = b_direct + _dot(b_dar.to(b_wr.dtype), b_wr, PRECISION)
            b_dhp += _dot(b_daz.to(b_wr.dtype), b_wz, PRECISION)
            b_dhp += _dot(b_dhn.to(b_wr.dtype), b_wn, PRECISION)
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
    y, hT = gx.new_empty(T, B, H), torch.empty_like(h0)
    ws = gx.new_empty(T, B, WS.value * H) if store_ws else None
    tensors = dict(p_gx=gx, p_w=w_hh, p_b=b_hh, p_h0=h0, p_len=lengths, p_y=y, p_hT=hT, p_ws=ws)
    launch(gru_fwd_kernel, config, tensors, T, B, H, 1, h0, REVERSE=reverse, HAS_BIAS=b_hh is not None,
           HAS_LENGTHS=lengths is not None, STORE_WS=store_ws)  # fmt: skip
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
    dg, dh0 = ws.new_empty(T, B, 4 * H), torch.empty_like(dhT)
    tensors = dict(p_dy=dy, p_dhT=dhT, p_ws=ws, p_hp=hp, p_w=w_hh, p_len=lengths, p_dg=dg, p_dh0=dh0)
    launch(gru_bwd_kernel, config, tensors, T, B, H, 3, REVERSE=reverse, HAS_LENGTHS=lengths is not None)
    return dg, dh0


class GRUFunction(torch.autograd.Function):
    """One GRU layer in one direction; see `rnndeploy.kernels.triton_layer` for the arguments."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, plan, store_ws):
        gx = F.linear(x, w_ih, b_ih)
        y, hT, ws = gru_fwd(gx, w_hh, b_hh, h0, lengths, reverse, store_ws, plan.forward)
        ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, y, ws, lengths)
        ctx.reverse, ctx.plan, ctx.has_bias = reverse, plan, b_ih is not None
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        inputs = ctx.saved_tensors[:6]  # x, h0, w_ih, w_hh, b_ih, b_hh
        grads = first_order_only("gru", lambda: _gru_grads(ctx, dy, dhT), inputs)
        return *grads, None, None, None, None


def _gru_grads(ctx, dy: Tensor, dhT: Tensor) -> tuple[Tensor | None, ...]:
    x, h0, w_ih, w_hh, _, _, y, ws, lengths = ctx.saved_tensors
    if ws is None:
        raise RuntimeError("GRUFunction: forward ran with store_ws=False: nothing to backprop")
    hp = previous_states(y, h0, lengths, ctx.reverse)
    dg, dh0 = gru_bwd(
        dy.contiguous(), dhT.contiguous(), ws, hp, w_hh, lengths, ctx.reverse, ctx.plan.backward
    )
    H = w_hh.shape[1]
    dg_in = torch.cat([dg[..., : 2 * H], dg[..., 3 * H :]], dim=-1)  # r, z, n pre-activations
    dx, dw_ih, dw_hh, db_ih, db_hh = projection_grads(ctx, dg_in, dg[..., : 3 * H], x, hp, w_ih, 2)
    return dx, dh0, dw_ih, dw_hh, db_ih, db_hh
