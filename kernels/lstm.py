"""LSTM: persistent forward and reverse-time backward kernels, their launchers and `LSTMFunction`.

Gate order ``i, f, g, o`` (PyTorch's): ``c_t = f*c_{t-1} + i*g``, ``h_t = o*tanh(c_t)``.
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

# NOTE: store, not recompute. The forward writes the gate activations and c_{t-1} (5 values per unit, input
# dtype) for the backward. Recomputing them would add a full W_hh product to every backward step, and that
# product sits on the serial critical path; the workspace costs 5*T*B*H elements, about what cuDNN reserves.
WS = tl.constexpr(5)


@triton.jit(do_not_specialize=["T"])
def lstm_fwd_kernel(
    p_gx,  # [T, B, 4H] x @ W_ih^T + b_ih
    p_w,  # [4H, H] W_hh
    p_b,  # [4H] b_hh
    p_h0,  # [B, H]
    p_c0,  # [B, H]
    p_len,  # [B] int64
    p_y,  # [T, B, H]
    p_hT,  # [B, H]
    p_cT,  # [B, H]
    p_ws,  # [T, B, 5H] i, f, g, o, c_{t-1}
    p_scr,  # [2, B, H] exchange of h, compute dtype
    p_bar,  # [cdiv(B, BB)] int32 barrier counters
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
    o_gb = o_b[None, :].to(tl.int64) * 4 * H + o_h[:, None]
    o_wb = o_b[None, :].to(tl.int64) * WS * H + o_h[:, None]
    o_row, m_row = _gate_rows(i_h, H, 4, 4, BH)  # [4BH] rows of W_hh, gate-major

    b_h = tl.load(p_h0 + o_hb, mask=m_hb, other=0.0).to(tl.float32)  # [BH, BB] own slice
    b_c = tl.load(p_c0 + o_hb, mask=m_hb, other=0.0).to(tl.float32)
    b_w1, b_w2 = _hold_rows(p_w, o_row, m_row, H, SW, BK1, BK2, STREAM_W)  # [4BH, BK1], [4BH, BK2]
    if HAS_BIAS:
        m_h = o_h < H
        b_bi = tl.load(p_b + o_h, mask=m_h, other=0.0).to(tl.float32)[:, None]
        b_bf = tl.load(p_b + H + o_h, mask=m_h, other=0.0).to(tl.float32)[:, None]
        b_bg = tl.load(p_b + 2 * H + o_h, mask=m_h, other=0.0).to(tl.float32)[:, None]
        b_bo = tl.load(p_b + 3 * H + o_h, mask=m_h, other=0.0).to(tl.float32)[:, None]
    if HAS_LENGTHS:
        b_len = tl.load(p_len + o_b, mask=m_b, other=0)[None, :]

    for s in range(T):
        t = T - 1 - s if REVERSE else s
        b_a = _fwd_product(p_w, p_scr, s, b_h, b_w1, b_w2, o_row, m_row, o_b, m_b, B, H, SW, SP, BB,
                           BK1, BK2, BKC,
                           STREAM_W, SCRATCH, PRECISION, TAGGED)  # fmt: skip
        b_ai, b_af, b_ag, b_ao = _split4(b_a, BH, BB)
        p_gt = p_gx + t.to(tl.int64) * B * 4 * H + o_gb
        b_ai += tl.load(p_gt, mask=m_hb, other=0.0).to(tl.float32)
        b_af += tl.load(p_gt + H, mask=m_hb, other=0.0).to(tl.float32)
        b_ag += tl.load(p_gt + 2 * H, mask=m_hb, other=0.0).to(tl.float32)
        b_ao += tl.load(p_gt + 3 * H, mask=m_hb, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b_ai += b_bi
            b_af += b_bf
            b_ag += b_bg
            b_ao += b_bo
        b_i = _sigmoid(b_ai)
        b_f = _sigmoid(b_af)
        b_g = _tanh(b_ag)
        b_o = _sigmoid(b_ao)
        b_cn = b_f * b_c + b_i * b_g
        b_hn = b_o * _tanh(b_cn)
        if STORE_WS:
            p_wt = p_ws + t.to(tl.int64) * B * WS * H + o_wb
            tl.store(p_wt, b_i.to(p_ws.dtype.element_ty), mask=m_hb)
            tl.store(p_wt + H, b_f.to(p_ws.dtype.element_ty), mask=m_hb)
            tl.store(p_wt + 2 * H, b_g.to(p_ws.dtype.element_ty), mask=m_hb)
            tl.store(p_wt + 3 * H, b_o.to(p_ws.dtype.element_ty), mask=m_hb)
            tl.store(p_wt + 4 * H, b_c.to(p_ws.dtype.element_ty), mask=m_hb)
        if HAS_LENGTHS:
            m_t = t < b_len
            b_h = tl.where(m_t, b_hn, b_h)
            b_c = tl.where(m_t, b_cn, b_c)
            b_out = tl.where(m_t, b_hn, 0.0)
        else:
            b_h = b_hn
            b_c = b_cn
            b_out = b_hn
        tl.store(p_y + t.to(tl.int64) * B * H + o_hb, b_out.to(p_y.dtype.element_ty), mask=m_hb)
        if SCRATCH:
            p_s = p_scr + (s % 2) * B * SP
            _put(p_s + o_sb, b_h, m_hb, s + 1, TAGGED, p_w.dtype.element_ty)
            _exchange(p_s, p_bar, i_b, s, NSPLIT, TAGGED)
    tl.store(p_hT + o_hb, b_h.to(p_hT.dtype.element_ty), mask=m_hb)
    tl.store(p_cT + o_hb, b_c.to(p_cT.dtype.element_ty), mask=m_hb)


@triton.jit(do_not_specialize=["T"])
def lstm_bwd_kernel(
    p_dy,  # [T, B, H]
    p_dhT,  # [B, H]
    p_dcT,  # [B, H]
    p_ws,  # [T, B, 5H] from the forward
    p_w,  # [4H, H] W_hh
    p_len,  # [B] int64
    p_dg,  # [T, B, 4H] gate pre-activation gradients
    p_dh0,  # [B, H]
    p_dc0,  # [B, H]
    p_scr,  # [2, B, 4H] exchange of gate gradients, compute dtype
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
    o_bg = o_b[:, None].to(tl.int64) * 4 * H + o_h[None, :]
    o_bw = o_b[:, None].to(tl.int64) * WS * H + o_h[None, :]
    o_bs = o_b[:, None].to(tl.int64) * SP + o_h[None, :]  # into the scratch
    HH = tl.cast(H, tl.int64) * SW  # one gate's block of W_hh (H == 1 arrives as a constexpr on GPU)

    b_dh = tl.load(p_dhT + o_bh, mask=m_bh, other=0.0).to(tl.float32)  # [BB, BH] dL/dh of the carried state
    b_dc = tl.load(p_dcT + o_bh, mask=m_bh, other=0.0).to(tl.float32)
    if PARTIAL:
        o_row, m_row = _gate_rows(i_h, H, 4, 4, BH)  # [GP*BH] rows of W_hh, gate-major
        b_w1, b_w2 = _hold_rows(p_w, o_row, m_row, H, SW, BK1, BK2, False)  # [GP*BH, BK1], [GP*BH, BK2]
    else:
        b_w1, b_w2 = _hold_cols(p_w, o_h, 4 * H, H, SW, NKS, BK1, BK2, STREAM_W, SCRATCH)  # [NKS, BK/NKS, BH]
    if not SCRATCH:
        o_k = tl.arange(0, BK1)
        b_wi = _load_w_t(p_w, o_k, o_h, H, SW)  # [BK, BH] W_i[j, k]: gate unit j -> state unit k
        b_wf = _load_w_t(p_w + HH, o_k, o_h, H, SW)
        b_wg = _load_w_t(p_w + 2 * HH, o_k, o_h, H, SW)
        b_wo = _load_w_t(p_w + 3 * HH, o_k, o_h, H, SW)
    if HAS_LENGTHS:
        b_len = tl.load(p_len + o_b, mask=m_b, other=0)[:, None]

    for s in range(T):
        t = s if REVERSE else T - 1 - s
        p_wt = p_ws + t.to(tl.int64) * B * WS * H + o_bw
        b_i = tl.load(p_wt, mask=m_bh, other=0.0).to(tl.float32)
        b_f = tl.load(p_wt + H, mask=m_bh, other=0.0).to(tl.float32)
        b_g = tl.load(p_wt + 2 * H, mask=m_bh, other=0.0).to(tl.float32)
        b_o = tl.load(p_wt + 3 * H, mask=m_bh, other=0.0).to(tl.float32)
        b_cp = tl.load(p_wt + 4 * H, mask=m_bh, other=0.0).to(tl.float32)
        b_dht = b_dh + tl.load(p_dy + t.to(tl.int64) * B * H + o_bh, mask=m_bh, other=0.0).to(tl.float32)
        b_tc = _tanh(b_f * b_cp + b_i * b_g)
        b_dct = b_dc + b_dht * b_o * (1.0 - b_tc * b_tc)
        b_do = b_dht * b_tc * b_o * (1.0 - b_o)
        b_di = b_dct * b_g * b_i * (1.0 - b_i)
        b_df = b_dct * b_cp * b_f * (1.0 - b_f)
        b_dg = b_dct * b_i * (1.0 - b_g * b_g)
        b_dcp = b_dct * b_f
        if HAS_LENGTHS:
            m_t = t < b_len
            b_di = tl.where(m_t, b_di, 0.0)
            b_df = tl.where(m_t, b_df, 0.0)
            b_dg = tl.where(m_t, b_dg, 0.0)
            b_do = tl.where(m_t, b_do, 0.0)
            b_dc = tl.where(m_t, b_dcp, b_dc)
        else:
            b_dc = b_dcp
        p_gt = p_dg + t.to(tl.int64) * B * 4 * H + o_bg
        tl.store(p_gt, b_di.to(p_dg.dtype.element_ty), mask=m_bh)
        tl.store(p_gt + H, b_df.to(p_dg.dtype.element_ty), mask=m_bh)
        tl.store(p_gt + 2 * H, b_dg.to(p_dg.dtype.element_ty), mask=m_bh)
        tl.store(p_gt + 3 * H, b_do.to(p_dg.dtype.element_ty), mask=m_bh)
        if SCRATCH:
            if PARTIAL:
                b_dg_all = _join_gates(b_di, b_df, b_dg, b_do, 4)  # [BB, GP*BH]
                b_dhp = _bwd_partial(b_dg_all, b_w1, b_w2, p_scr, p_bar, s, i_b, i_h, o_b, m_b, o_h, B, H, SP,
                                      NSPLIT, NJ1, NJ2, BK1, BK2, TAGGED, PRECISION)  # fmt: skip
            else:
                p_s = p_scr + (s % 2) * B * SP
                _put(p_s + o_bs, b_di, m_bh, s + 1, TAGGED, p_w.dtype.element_ty)
                _put(p_s + H + o_bs, b_df, m_bh, s + 1, TAGGED, p_w.dtype.element_ty)
                _put(p_s + 2 * H + o_bs, b_dg, m_bh, s + 1, TAGGED, p_w.dtype.element_ty)
                _put(p_s + 3 * H + o_bs, b_do, m_bh, s + 1, TAGGED, p_w.dtype.element_ty)
                _exchange(p_s, p_bar, i_b, s, NSPLIT, TAGGED)
                b_dhp = _bwd_product(p_w, p_s, b_w1, b_w2, o_b, m_b, o_h, 4 * H, H, SW, SP, s + 1, NKS, BK1, BK2, BKC, STREAM_W,
                                     PRECISION, TAGGED)  # fmt: skip
        else:
            b_dhp = _dot(b_di.to(b_wi.dtype), b_wi, PRECISION)
            b_dhp += _dot(b_df.to(b_wi.dtype), b_wf, PRECISION)
            b_dhp += _dot(b_dg.to(b_wi.dtype), b_wg, PRECISION)
            b_dhp += _dot(b_do.to(b_wi.dtype), b_wo, PRECISION)
        if HAS_LENGTHS:
            b_dh = tl.where(m_t, b_dhp, b_dh)
        else:
            b_dh = b_dhp
    tl.store(p_dh0 + o_bh, b_dh.to(p_dh0.dtype.element_ty), mask=m_bh)
    tl.store(p_dc0 + o_bh, b_dc.to(p_dc0.dtype.element_ty), mask=m_bh)


def lstm_fwd(
    gx: Tensor,
    w_hh: Tensor,
    b_hh: Tensor | None,
    h0: Tensor,
    c0: Tensor,
    lengths: Tensor | None,
    reverse: bool,
    store_ws: bool,
    config: KernelConfig,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Runs the recurrence over ``gx [T, B, 4H]``. Returns ``y [T, B, H]``, ``h_T``, ``c_T``, workspace."""
    T, B, H = gx.shape[0], gx.shape[1], w_hh.shape[1]
    y = gx.new_empty(T, B, H)
    ws = gx.new_empty(T, B, WS.value * H) if store_ws else None
    hT, cT = torch.empty_like(h0), torch.empty_like(c0)
    tensors = dict(
        p_gx=gx, p_w=w_hh, p_b=b_hh, p_h0=h0, p_c0=c0, p_len=lengths, p_y=y, p_hT=hT, p_cT=cT, p_ws=ws
    )
    launch(lstm_fwd_kernel, config, tensors, T, B, H, 1, h0, REVERSE=reverse, HAS_BIAS=b_hh is not None,
           HAS_LENGTHS=lengths is not None, STORE_WS=store_ws)  # fmt: skip
    return y, hT, cT, ws


def lstm_bwd(
    dy: Tensor,
    dhT: Tensor,
    dcT: Tensor,
    ws: Tensor,
    w_hh: Tensor,
    lengths: Tensor | None,
    reverse: bool,
    config: KernelConfig,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reverse-time pass. Returns gate gradients ``[T, B, 4H]`` (pre-activation), ``dh_0`` and ``dc_0``."""
    T, B, H = dy.shape[0], dy.shape[1], w_hh.shape[1]
    dg = ws.new_empty(T, B, 4 * H)
    dh0, dc0 = torch.empty_like(dhT), torch.empty_like(dcT)
    tensors = dict(
        p_dy=dy, p_dhT=dhT, p_dcT=dcT, p_ws=ws, p_w=w_hh, p_len=lengths, p_dg=dg, p_dh0=dh0, p_dc0=dc0
    )
    launch(lstm_bwd_kernel, config, tensors, T, B, H, 4, REVERSE=reverse, HAS_LENGTHS=lengths is not None)
    return dg, dh0, dc0


class LSTMFunction(torch.autograd.Function):
    """One LSTM layer in one direction; see `rnndeploy.kernels.triton_layer` for the arguments."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, plan, store_ws):
        gx = F.linear(x, w_ih, b_ih)
        y, hT, cT, ws = lstm_fwd(gx, w_hh, b_hh, h0, c0, lengths, reverse, store_ws, plan.forward)
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, y, ws, lengths)
        ctx.reverse, ctx.plan, ctx.has_bias = reverse, plan, b_ih is not None
        return y, hT, cT

    @staticmethod
    def backward(ctx, dy, dhT, dcT):
        inputs = ctx.saved_tensors[:7]  # x, h0, c0, w_ih, w_hh, b_ih, b_hh
        grads = first_order_only("lstm", lambda: _lstm_grads(ctx, dy, dhT, dcT), inputs)
        return *grads, None, None, None, None


def _lstm_grads(ctx, dy: Tensor, dhT: Tensor, dcT: Tensor) -> tuple[Tensor | None, ...]:
    x, h0, _, w_ih, w_hh, _, _, y, ws, lengths = ctx.saved_tensors
    if ws is None:
        raise RuntimeError("LSTMFunction: forward ran with store_ws=False: nothing to backprop")
    dg, dh0, dc0 = lstm_bwd(dy.contiguous(), dhT.contiguous(), dcT.contiguous(), ws, w_hh, lengths, ctx.reverse,
                            ctx.plan.backward)  # fmt: skip
    hp = previous_states(y, h0, lengths, ctx.reverse) if ctx.needs_input_grad[4] else None
    dx, dw_ih, dw_hh, db_ih, db_hh = projection_grads(ctx, dg, dg, x, hp, w_ih, 3)
    return dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh
