"""Shared pieces of the persistent kernels: activations, products, the grid barrier, the launch configuration
(with its resource and cost model) and the one launcher every cell uses.

Every kernel runs on a grid ``(cdiv(B, BB), NSPLIT)``: program ``(i_b, i_h)`` owns batch rows
``[i_b*BB, i_b*BB + BB)`` and hidden units ``[i_h*BH, i_h*BH + BH)`` of every gate, and runs the whole time
loop. The forward and the backward get a configuration each (their products have different shapes).

Forward, per step: one product ``[GP*BH, K] @ [K, BB]``: the program's ``W_hh`` rows of all gates (``GP``:
the gate count padded to a power of two, GRU's fourth block is zero) against ``h_{t-1}^T``. On sm_90 that is
one warpgroup of ``wgmma`` over distinct rows: no two warps issue the same MMA. Elementwise work runs on
``[BH, BB]`` tiles (units x batch).

Backward, per step, one of two forms (the estimate picks): by partial sums (split grids, `_bwd_partial`):
``dg [BB, GP*BH]`` of the program's own units times the same ``W_hh`` rows the forward holds, a partial ``dh``
over all ``H`` columns published in fp32 and the own columns of everyone's partials summed; or with the gate
gradients exchanged: ``dh_{t-1} [BB, BH] = dg [BB, G*H] @ W_hh[:, units] [G*H, BH]``, split over ``K`` into
``NKS`` slices, one warp each (a batched ``tl.dot`` summed over the slices): the output is too small for
every warp to own part of it, so the warps own parts of ``K`` instead.

The held paths walk ``K`` in at most two power-of-two pieces ``BK1 + BK2`` that stop at ``H`` (``G*H``
backward) rounded up to 16 (``NKS*16``): H=768 walks 512 + 256, not a padded 1024.

- ``resident``: ``NSPLIT == 1``, ``BH >= H``; the recurrent operand stays in registers.
- ``split`` (GPU only): ``NSPLIT > 1`` co-resident programs; after each step a program writes its slice of
  the recurrent operand (``h`` forward; gate gradients or its partial ``dh`` backward) to a double-buffered
  scratch and hands it over (below; cooperative launch, so an impossible grid is a launch error, not a
  hang); the next step reads the operand back through L2.
- ``stream`` / ``split-stream``: ``W_hh`` is re-read from L2 every step, ``BKC`` rows of ``K`` at a time,
  with the matching chunk of the operand from the scratch (for slices too large for one SM).
- ``resident-scratch``: ``resident`` through the scratch exchange, for the tests: the interpreter runs the
  exchange code of ``split`` (all but the barrier, which would deadlock there: programs run one after another).
- ``resident-tagged``: the same through tagged words (below), for the tests; ``resident-partial`` and
  ``resident-partial-tagged``: the backward by partial sums in one program, plain and tagged.

The hand-off between steps of a split grid is one of two, whichever `estimate` finds cheaper: a grid
barrier after the stores, or tagged words (each value stored with the step that wrote it, its readers poll
until every word they need carries the right tag: no barrier round, the data is its own flag; twice the
bytes through L2, except the partial sums, whose tag is their lowest bit). Both launch cooperatively: every
program must be resident for either to finish.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import GATES

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# NOTE: triton 3.8's interpreter computes bf16 x bf16 tl.dot wrongly (garbage of order 1e10); there the
# operands are rounded to the weight dtype as on GPU, then multiplied in fp32.
_DOT_FP32 = tl.constexpr(INTERPRET)


@triton.jit
def _sigmoid(x):
    # NOTE: exp of -|x| only, so |x| up to 1e4 (and beyond) cannot overflow.
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """``a @ b`` (2-D or batched 3-D), operands already in the weight dtype, fp32 accumulation."""
    if _DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _grid_barrier(p_bar, target):
    """Waits until ``target`` arrivals have been counted at ``p_bar`` (GPU only: spin-waits)."""
    # all warps of this program have written their slice before one thread publishes the arrival (scalar
    # atomics compile to thread 0 only, the result broadcast through shared memory: checked in sm_90 PTX)
    tl.debug_barrier()
    tl.atomic_add(p_bar, 1, sem="release", scope="gpu")
    while tl.atomic_add(p_bar, 0, sem="acquire", scope="gpu") < target:
        pass
    tl.debug_barrier()


@triton.jit
def _exchange(p_s, p_bar, i_b, s, NSPLIT: tl.constexpr, TAGGED: tl.constexpr):
    """Ends step ``s`` after this program stored its slice at ``p_s``: everyone's slice is visible after it
    (tagged words need nothing here: their readers wait for the tag, see `_poll`)."""
    if not TAGGED:
        if NSPLIT > 1:
            _grid_barrier(p_bar + i_b, (s + 1) * NSPLIT)
        else:
            tl.debug_barrier()


# The tagged hand-off: every exchanged value travels in one word with the step that wrote it, value in the low
# half, tag (the step, mod 2**16) above it: int32 words for bf16/fp16 operands, int64 for fp32. A single aligned
# store is seen whole or not at all, so a reader that finds the tag it waits for has the value too: no flag,
# no fence, no barrier between the writer's store and the reader's load. The double buffer keeps it safe: a
# writer cannot store step s+2 into a buffer before every reader has read step s from it (it needs their h_{s+1}).


@triton.jit
def _put(ptrs, v, mask, tag, TAGGED: tl.constexpr, DT: tl.constexpr):
    """Stores the fp32 tile ``v`` into the scratch at ``ptrs``: in ``DT`` or, ``TAGGED``, as tagged words."""
    if TAGGED:
        if DT == tl.float32:
            word = v.to(tl.uint32, bitcast=True).to(tl.int64) | (tl.cast(tag & 0xFFFF, tl.int64) << 32)
        else:
            word = v.to(DT).to(tl.uint16, bitcast=True).to(tl.int32) | (tl.cast(tag & 0xFFFF, tl.int32) << 16)
        # NOTE: a relaxed atomic, not a plain store: the readers' polls race with it, and the PTX memory model
        # defines a race only between strong operations (a weak store may be split, merged or delayed)
        tl.atomic_xchg(ptrs, word, mask=mask, sem="relaxed", scope="gpu")
    else:
        tl.store(ptrs, v.to(DT), mask=mask)


@triton.jit
def _first(ptrs, mask):
    """The first read of tagged words (loads that bypass L1: another program's store lands in L2)."""
    return tl.load(ptrs, mask=mask, other=0, volatile=True)


@triton.jit
def _poll(w, ptrs, mask, tag, DT: tl.constexpr):
    """The tagged words at ``ptrs`` (``w``: their `_first` read) once every one under ``mask`` carries
    ``tag``, as values in ``DT`` (0 where masked); re-read while any does not."""
    SHIFT: tl.constexpr = 32 if DT == tl.float32 else 16
    want = tag & 0xFFFF
    while tl.sum(tl.where(mask & (((w >> SHIFT) & 0xFFFF) != want), 1, 0)) > 0:
        w = tl.load(ptrs, mask=mask, other=0, volatile=True)
    # NOTE: if/else, not an early return: triton compiles the code after a constexpr-true return as well
    if DT == tl.float32:
        v = w.to(tl.uint32).to(tl.float32, bitcast=True)
    else:
        v = (w & 0xFFFF).to(tl.uint16).to(DT, bitcast=True)
    return v


# The partial backward's tagged words: fp32 partial sums, the tag in the lowest mantissa bit (an error of at most
# one ulp, far below the sum's own rounding): bit (s // 2) % 2 for step s. One bit is enough because a reader
# reads the same words every step: having seen step s-2 in a word it cannot see anything older there again
# (coherence), and no writer can be at step s+2 before it (it needs this reader's step s+1). Both buffers start
# at bit 1 (the launcher), which steps 0 and 1 do not write.


@triton.jit
def _put_lsb(ptrs, v, mask, s):
    """Stores the fp32 tile ``v`` at ``ptrs`` as words tagged for step ``s`` (relaxed atomics, see `_put`)."""
    word = (v.to(tl.int32, bitcast=True) & -2) | ((s // 2) % 2)
    tl.atomic_xchg(ptrs, word, mask=mask, sem="relaxed", scope="gpu")


@triton.jit
def _poll_lsb(w, ptrs, mask, s):
    """The fp32 words at ``ptrs`` (``w``: their `_first` read) once every one under ``mask`` carries step
    ``s``'s bit (0 where masked)."""
    want = (s // 2) % 2
    while tl.sum(tl.where(mask & ((w & 1) != want), 1, 0)) > 0:
        w = tl.load(ptrs, mask=mask, other=0, volatile=True)
    return w.to(tl.float32, bitcast=True)


@triton.jit
def _join_gates(a0, a1, a2, a3, G: tl.constexpr):
    """``[BB, GP*BH]`` gate-major from per-gate ``[BB, BH]`` tiles (the inverse of `_split4`'s layout;
    ``G == 1``: ``a0`` alone)."""
    if G == 1:
        out = a0
    else:
        even = tl.join(a0, a2)  # [BB, BH, 2]: gates 0, 2
        odd = tl.join(a1, a3)
        a = tl.permute(tl.join(even, odd), (0, 2, 3, 1))  # [BB, g // 2, g % 2, BH]
        out = tl.reshape(a, [a0.shape[0], 4 * a0.shape[1]])
    return out


@triton.jit
def _put_partial(p_s, o_b, m_b, b_g, w, k0, BK: tl.constexpr, H, SP, s, TAGGED: tl.constexpr,
                 PRECISION: tl.constexpr):  # fmt: skip
    """Publishes columns ``[k0, k0 + BK)`` of this program's partial ``b_g @ w`` (fp32) at ``p_s``."""
    o_k = k0 + tl.arange(0, BK)
    ptrs = p_s + o_b[:, None].to(tl.int64) * SP + o_k[None, :]
    part = _dot(b_g, w, PRECISION)
    m = m_b[:, None] & (o_k < H)[None, :]
    if TAGGED:
        _put_lsb(ptrs, part, m, s)
    else:
        tl.store(ptrs, part, mask=m)


@triton.jit
def _bwd_partial(dg, w1, w2, p_scr, p_bar, s, i_b, i_h, o_b, m_b, o_h, B, H, SP,
                 NSPLIT: tl.constexpr, NJ1: tl.constexpr, NJ2: tl.constexpr, BK1: tl.constexpr, BK2: tl.constexpr,
                 TAGGED: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """``dh_{t-1}`` of this program's units, ``[BB, BH]`` fp32, by partial sums: the program multiplies its own
    gate gradients ``dg [BB, GP*BH]`` by the ``W_hh`` rows of its units (held as the forward holds them,
    ``[GP*BH, BK1]`` and ``[GP*BH, BK2]``), publishes that partial ``dh`` over all ``H`` columns in fp32, and sums
    its own columns of everyone's partial. Exchanged: ``B*H`` values, where the gate gradients are ``B*G*H``."""
    p_s = p_scr + (s % 2) * NSPLIT * B * SP + i_h * B * SP
    DT: tl.constexpr = w1.dtype
    b_g = dg.to(DT)
    _put_partial(p_s, o_b, m_b, b_g, w1, 0, BK1, H, SP, s, TAGGED, PRECISION)
    if BK2 > 0:
        _put_partial(p_s, o_b, m_b, b_g, w2, BK1, BK2, H, SP, s, TAGGED, PRECISION)
    _exchange(p_s, p_bar, i_b, s, NSPLIT, TAGGED)
    return _sum_partials(p_scr, s, o_b, m_b, o_h, B, H, SP, NSPLIT, NJ1, NJ2, TAGGED)


@triton.jit
def _sum_partials(p_scr, s, o_b, m_b, o_h, B, H, SP, NSPLIT: tl.constexpr, NJ1: tl.constexpr, NJ2: tl.constexpr,
                  TAGGED: tl.constexpr):  # fmt: skip
    """The sum of everyone's step-``s`` partial over the columns ``o_h`` and rows ``o_b``, ``[BB, BH]`` fp32:
    programs ``[0, NJ1)`` and ``[NJ1, NJ1 + NJ2)`` in two pieces, both first reads in flight before either is
    waited for."""
    p_buf = p_scr + (s % 2) * NSPLIT * B * SP + o_b[None, :, None].to(tl.int64) * SP + o_h[None, None, :]
    m_bh = m_b[None, :, None] & (o_h < H)[None, None, :]
    o_j1 = tl.arange(0, NJ1)
    p1 = p_buf + o_j1[:, None, None].to(tl.int64) * B * SP
    m1 = (o_j1 < NSPLIT)[:, None, None] & m_bh
    if NJ2 > 0:
        o_j2 = NJ1 + tl.arange(0, NJ2)
        p2 = p_buf + o_j2[:, None, None].to(tl.int64) * B * SP
        m2 = (o_j2 < NSPLIT)[:, None, None] & m_bh
    if TAGGED:
        w1 = _first(p1, m1)
        if NJ2 > 0:
            w2 = _first(p2, m2)
        acc = tl.sum(_poll_lsb(w1, p1, m1, s), axis=0)
        if NJ2 > 0:
            acc += tl.sum(_poll_lsb(w2, p2, m2, s), axis=0)
    else:
        acc = tl.sum(tl.load(p1, mask=m1, other=0.0, cache_modifier=".cg"), axis=0)
        if NJ2 > 0:
            acc += tl.sum(tl.load(p2, mask=m2, other=0.0, cache_modifier=".cg"), axis=0)
    return acc


@triton.jit
def _gate_rows(i_h, H, G: tl.constexpr, GP: tl.constexpr, BH: tl.constexpr):
    """Rows of ``W_hh [G*H, H]`` a forward program holds, gate-major: ``[GP*BH]`` row ids and their mask."""
    o_r = tl.arange(0, GP * BH)
    o_u = i_h * BH + o_r % BH
    return (o_r // BH) * H + o_u, (o_u < H) & (o_r // BH < G)


@triton.jit
def _load_rows(p_w, o_row, m_row, o_k, H, SW):
    """``[len(o_row), len(o_k)]`` tile of ``W_hh`` (rows ``o_row`` of stride ``SW``, columns ``o_k < H``)."""
    m = m_row[:, None] & (o_k < H)[None, :]
    return tl.load(p_w + o_row[:, None].to(tl.int64) * SW + o_k[None, :], mask=m, other=0.0)


@triton.jit
def _op_t_words(p, o_b, m_b, o_k, stride, H):
    """Addresses and mask of the tagged words `_load_op_t` waits for: columns ``o_k < H``, transposed."""
    return p + o_b[None, :].to(tl.int64) * stride + o_k[:, None], (o_k < H)[:, None] & m_b[None, :]


@triton.jit
def _load_op_t(p, o_b, m_b, o_k, stride, K, H, tag, TAGGED: tl.constexpr, DT: tl.constexpr):
    """``[len(o_k), BB]``: columns ``o_k < K`` of a ``[B, stride]`` buffer, transposed, read through L2;
    ``TAGGED``: the columns ``o_k < H`` of step ``tag`` (the rest 0), waited for."""
    ptrs, m = _op_t_words(p, o_b, m_b, o_k, stride, H)
    if TAGGED:
        v = _poll(_first(ptrs, m), ptrs, m, tag, DT)
    else:
        v = tl.load(ptrs, mask=(o_k < K)[:, None] & m_b[None, :], other=0.0, cache_modifier=".cg")
    return v


@triton.jit
def _split4(acc, BH: tl.constexpr, BB: tl.constexpr):
    """The four gate blocks ``[BH, BB]`` of a gate-major ``[4*BH, BB]`` product."""
    a = tl.permute(tl.reshape(acc, [2, 2, BH, BB]), (2, 3, 0, 1))  # [BH, BB, g // 2, g % 2]
    even, odd = tl.split(a)  # gates 0, 2 and 1, 3
    a0, a2 = tl.split(even)
    a1, a3 = tl.split(odd)
    return a0, a1, a2, a3


@triton.jit
def _hold_rows(p_w, o_row, m_row, H, SW, BK1: tl.constexpr, BK2: tl.constexpr, STREAM_W: tl.constexpr):
    """The forward's held ``W_hh`` rows in two ``K`` pieces ``[M, BK1]``, ``[M, BK2]`` (dummies when streamed)."""
    if STREAM_W:
        w1 = tl.zeros([o_row.shape[0], 16], dtype=p_w.dtype.element_ty)
        w2 = w1
    else:
        w1 = _load_rows(p_w, o_row, m_row, tl.arange(0, BK1), SW, SW)
        if BK2 > 0:
            w2 = _load_rows(p_w, o_row, m_row, BK1 + tl.arange(0, BK2), SW, SW)
        else:
            w2 = tl.zeros([o_row.shape[0], 16], dtype=p_w.dtype.element_ty)
    return w1, w2


@triton.jit
def _fwd_product(p_w, p_scr, s, b_h, w1, w2, o_row, m_row, o_b, m_b, B, H, SW, SP,
                 BB: tl.constexpr, BK1: tl.constexpr, BK2: tl.constexpr, BKC: tl.constexpr,
                 STREAM_W: tl.constexpr, SCRATCH: tl.constexpr, PRECISION: tl.constexpr,
                 TAGGED: tl.constexpr):  # fmt: skip
    """``W_rows @ h_{t-1}^T`` at step ``s``: ``[M, BB]`` fp32. ``h_{t-1}`` comes from the scratch, where the
    previous step (``h_0``: the launcher) put it, or is ``b_h [BH, BB]``, the own state, when nothing is
    exchanged. Tagged, each piece (or streamed chunk) of ``K`` is waited for on its own: the product of the
    first runs while the rest is still arriving."""
    DT: tl.constexpr = p_w.dtype.element_ty
    if SCRATCH:
        p_prev = p_scr + ((s + 1) % 2) * B * SP
    if STREAM_W:
        acc = tl.zeros([o_row.shape[0], BB], dtype=tl.float32)
        for k0 in range(0, H, BKC):
            o_k = k0 + tl.arange(0, BKC)
            acc += _dot(
                _load_rows(p_w, o_row, m_row, o_k, SW, SW),
                _load_op_t(p_prev, o_b, m_b, o_k, SP, SP, H, s, TAGGED, DT),
                PRECISION,
            )
    elif SCRATCH and TAGGED and BK2 > 0:
        # the second piece's first read is in flight while the first piece's product runs: one L2 latency
        # per step, not one per piece (the poll's loads are volatile: issued where they are written)
        p1, m1 = _op_t_words(p_prev, o_b, m_b, tl.arange(0, BK1), SP, H)
        p2, m2 = _op_t_words(p_prev, o_b, m_b, BK1 + tl.arange(0, BK2), SP, H)
        op1 = _poll(_first(p1, m1), p1, m1, s, DT)
        first2 = _first(p2, m2)
        acc = _dot(w1, op1, PRECISION)
        acc += _dot(w2, _poll(first2, p2, m2, s, DT), PRECISION)
    elif SCRATCH:
        acc = _dot(w1, _load_op_t(p_prev, o_b, m_b, tl.arange(0, BK1), SP, SP, H, s, TAGGED, DT), PRECISION)
        if BK2 > 0:
            o_k = BK1 + tl.arange(0, BK2)
            acc += _dot(w2, _load_op_t(p_prev, o_b, m_b, o_k, SP, SP, H, s, TAGGED, DT), PRECISION)
    else:
        acc = _dot(w1, b_h.to(w1.dtype), PRECISION)
    return acc


@triton.jit
def _slices(k0, NKS: tl.constexpr, KS: tl.constexpr):
    """``[NKS, KS]`` indices ``k0 + i*KS + j``: one contiguous run of ``K`` per slice."""
    return k0 + tl.arange(0, NKS)[:, None] * KS + tl.arange(0, KS)[None, :]


@triton.jit
def _load_w_slices(p_w, o_k, o_h, K, H, SW):
    """``[NKS, KS, BH]``: ``W_hh[o_k, o_h]`` (rows ``o_k < K = G*H`` of stride ``SW``)."""
    m = (o_k < K)[:, :, None] & (o_h < SW)[None, None, :]
    return tl.load(p_w + o_k[:, :, None].to(tl.int64) * SW + o_h[None, None, :], mask=m, other=0.0)


@triton.jit
def _g_slices_words(p, o_b, m_b, o_k, K, SP):
    """Addresses and mask of the tagged words `_load_g_slices` waits for: ``[NKS, BB, KS]``, ``o_k < K``."""
    return p + o_b[None, :, None].to(tl.int64) * SP + o_k[:, None, :], m_b[None, :, None] & (o_k < K)[
        :, None, :
    ]


@triton.jit
def _load_g_slices(p, o_b, m_b, o_k, K, SP, tag, TAGGED: tl.constexpr, DT: tl.constexpr):
    """``[NKS, BB, KS]``: columns ``o_k < K`` of the gate-gradient scratch (rows of stride ``SP``), via L2;
    ``TAGGED``: those of step ``tag``, waited for."""
    p, m = _g_slices_words(p, o_b, m_b, o_k, K, SP)
    if TAGGED:
        v = _poll(_first(p, m), p, m, tag, DT)
    else:
        v = tl.load(p, mask=m_b[None, :, None] & (o_k < SP)[:, None, :], other=0.0, cache_modifier=".cg")
    return v


@triton.jit
def _hold_cols(p_w, o_h, K, H, SW, NKS: tl.constexpr, BK1: tl.constexpr, BK2: tl.constexpr,
               STREAM_W: tl.constexpr, SCRATCH: tl.constexpr):  # fmt: skip
    """The backward's held ``W_hh[:, units]`` as ``K`` slices ``[NKS, BK1/NKS, BH]`` and ``[NKS, BK2/NKS, BH]``."""
    if STREAM_W or not SCRATCH:
        w1 = tl.zeros([NKS, 16, o_h.shape[0]], dtype=p_w.dtype.element_ty)
        w2 = w1
    else:
        w1 = _load_w_slices(p_w, _slices(0, NKS, BK1 // NKS), o_h, K, H, SW)
        if BK2 > 0:
            w2 = _load_w_slices(p_w, _slices(BK1, NKS, BK2 // NKS), o_h, K, H, SW)
        else:
            w2 = tl.zeros([NKS, 16, o_h.shape[0]], dtype=p_w.dtype.element_ty)
    return w1, w2


@triton.jit
def _bwd_product(p_w, p_cur, w1, w2, o_b, m_b, o_h, K, H, SW, SP, tag,
                 NKS: tl.constexpr, BK1: tl.constexpr, BK2: tl.constexpr, BKC: tl.constexpr,
                 STREAM_W: tl.constexpr, PRECISION: tl.constexpr, TAGGED: tl.constexpr):  # fmt: skip
    """``dg @ W_hh[:, units]``: ``[BB, BH]`` fp32 from the gate gradients of this step in the scratch at
    ``p_cur`` (``[B, K]``, ``K = G*H``; tagged: words of step ``tag``), split over ``K`` into ``NKS`` slices
    summed at the end."""
    DT: tl.constexpr = p_w.dtype.element_ty
    if STREAM_W and NKS == 1:
        # wide tiles: the plain product has work for every warp, and a slice sum would replicate its result
        acc2 = tl.zeros([o_b.shape[0], o_h.shape[0]], dtype=tl.float32)
        for k0 in range(0, K, BKC):
            o_k = k0 + tl.arange(0, BKC)
            m_w = (o_k < K)[:, None] & (o_h < SW)[None, :]
            b_w = tl.load(p_w + o_k[:, None].to(tl.int64) * SW + o_h[None, :], mask=m_w, other=0.0)
            p_g = p_cur + o_b[:, None].to(tl.int64) * SP + o_k[None, :]
            if TAGGED:
                m_g = m_b[:, None] & (o_k < K)[None, :]
                b_g = _poll(_first(p_g, m_g), p_g, m_g, tag, DT)
            else:
                b_g = tl.load(p_g, mask=m_b[:, None] & (o_k < SP)[None, :], other=0.0, cache_modifier=".cg")
            acc2 += _dot(b_g.to(b_w.dtype), b_w, PRECISION)
        return acc2
    if STREAM_W:
        acc = tl.zeros([NKS, o_b.shape[0], o_h.shape[0]], dtype=tl.float32)
        for k0 in range(0, K, BKC):
            o_k = _slices(k0, NKS, BKC // NKS)
            b_w = _load_w_slices(p_w, o_k, o_h, K, H, SW)
            b_g = _load_g_slices(p_cur, o_b, m_b, o_k, K, SP, tag, TAGGED, DT)
            acc += _dot(b_g.to(b_w.dtype), b_w, PRECISION)
    elif TAGGED and BK2 > 0:
        # as the forward: the second piece's first read in flight while the first piece's product runs
        p1, m1 = _g_slices_words(p_cur, o_b, m_b, _slices(0, NKS, BK1 // NKS), K, SP)
        p2, m2 = _g_slices_words(p_cur, o_b, m_b, _slices(BK1, NKS, BK2 // NKS), K, SP)
        g1 = _poll(_first(p1, m1), p1, m1, tag, DT)
        first2 = _first(p2, m2)
        acc = _dot(g1, w1, PRECISION)
        acc += _dot(_poll(first2, p2, m2, tag, DT), w2, PRECISION)
    else:
        o_k = _slices(0, NKS, BK1 // NKS)
        acc = _dot(_load_g_slices(p_cur, o_b, m_b, o_k, K, SP, tag, TAGGED, DT), w1, PRECISION)
        if BK2 > 0:
            o_k = _slices(BK1, NKS, BK2 // NKS)
            acc += _dot(_load_g_slices(p_cur, o_b, m_b, o_k, K, SP, tag, TAGGED, DT), w2, PRECISION)
    return tl.sum(acc, axis=0)


@triton.jit
def _load_w_t(p_w, o_k, o_h, H, SW):
    """``[BK, BH]`` block ``W_g[o_k, o_h]`` of one gate (the backward's resident operand)."""
    m = (o_k < H)[:, None] & (o_h < H)[None, :]
    return tl.load(p_w + o_k[:, None].to(tl.int64) * SW + o_h[None, :], mask=m, other=0.0)


# ----------------------------------------------------------------------------------------------------------
# Configuration: what a launch costs on the target, modelled as the compiler and the hardware spend it


@dataclass(frozen=True)
class GPUSpec:
    """What limits and paces a launch: per-block limits and the published rates the cost model uses."""

    name: str
    sms: int
    shared_per_block: int  # bytes, opt-in maximum of one block
    regs_per_thread: int
    clock_ghz: float
    smem_bytes_per_clk: int  # per SM
    l2_bytes_per_clk: float  # per SM, L2 -> SM
    l2_latency_clk: int  # a dependent global load served by L2
    barrier_clk: int  # one grid barrier round (atomic release, acquire polling through L2)
    mma_flop_per_clk: dict  # per SM, dense tensor-core rates by operand dtype


# NOTE: H100/H200 SXM: 132 SMs, 227 KiB shared memory per block, 255 registers per thread, 1.98 GHz boost
# (H100 SXM datasheet); 128 B/clk shared memory per SM; dense tensor rates per SM from the datasheet's
# 989 TF bf16/fp16 and 495 TF tf32 at 132 SMs x 1.83 GHz (4096 and 2048 FLOP/clk; fp32 FMA 256 FLOP/clk).
# L2 -> SM ~64 B/clk and ~600 clk L2 latency, ~1500 clk per grid barrier round: microbenchmark figures
# (Luo et al. 2024, "Benchmarking and Dissecting the Nvidia Hopper GPU Architecture"; grid-sync costs from
# persistent-RNN work), first-order only.
H100 = GPUSpec(
    name="H100/H200 (sm_90)",
    sms=132,
    shared_per_block=232_448,
    regs_per_thread=255,
    clock_ghz=1.98,
    smem_bytes_per_clk=128,
    l2_bytes_per_clk=64.0,
    l2_latency_clk=600,
    barrier_clk=1500,
    mma_flop_per_clk={"bf16": 4096, "fp16": 4096, "tf32": 2048, "ieee": 256},
)

STRATEGIES = ("resident", "resident-scratch", "resident-tagged", "resident-partial", "resident-partial-tagged",
              "stream", "split", "split-stream")  # fmt: skip
_BARRIER = ("split", "split-stream")
_HANDOFFS = ("auto", "barrier", "tagged")
_ONE_PROGRAM = ("resident", "resident-scratch", "resident-tagged", "resident-partial", "resident-partial-tagged",
                "stream")  # fmt: skip
# the order a failed launch falls back along (each also tried with smaller blocks by make_config)
_FALLBACK = {
    "resident": "stream",
    "split": "split-stream",
    "split-stream": "stream",
    "resident-scratch": "stream",
    "resident-tagged": "stream",
    "resident-partial": "stream",
    "resident-partial-tagged": "stream",
}


@dataclass(frozen=True)
class KernelConfig:
    """How one pass (forward or backward) of one layer is launched; see the module docstring.

    ``BK1 + BK2``: the two power-of-two pieces of the product's ``K`` (``BK2 = 0``: one piece); ``BKC``: the
    streamed chunk; ``NKS``: the backward's split-K slices. ``shared`` and ``regs`` are the model's bytes of
    shared memory and registers per thread; ``step_us`` its first-order time per step (see `estimate`).
    """

    cell: str
    backward: bool
    strategy: str
    BB: int
    BH: int
    BK1: int
    BK2: int
    BKC: int
    NKS: int
    NSPLIT: int
    num_warps: int
    num_stages: int
    shared: int = 0
    regs: int = 0
    step_us: float = 0.0
    tagged: bool = False  # the exchange's hand-off: tagged words (no grid barrier) instead of a barrier
    partial: bool = (
        False  # backward by partial sums of dh (W_hh rows held as forward) instead of dg exchanged
    )

    @property
    def STREAM_W(self) -> bool:
        return self.strategy in ("stream", "split-stream")

    @property
    def SCRATCH(self) -> bool:
        return self.strategy != "resident"

    @property
    def TAGGED(self) -> bool:
        return self.tagged or self.strategy in ("resident-tagged", "resident-partial-tagged")

    @property
    def PARTIAL(self) -> bool:
        return self.backward and (self.partial or self.strategy.startswith("resident-partial"))

    @property
    def NJ(self) -> tuple[int, int]:
        """``NSPLIT`` as at most two powers of two: the partial backward reads everyone's partials in these two
        pieces (48: 32 + 16), no register spent on programs that do not exist."""
        return _pieces(self.NSPLIT, 1)

    def grid(self, B: int) -> tuple[int, int]:
        return triton.cdiv(B, self.BB), self.NSPLIT


def _pow2(n: int, lo: int = 16) -> int:
    # tl.dot needs every block dimension >= 16 on GPU
    return max(lo, triton.next_power_of_2(n))


def _pieces(K: int, unit: int) -> tuple[int, int]:
    """``K`` rounded up to ``unit`` as at most two powers of two ``(BK1, BK2)`` (``BK2`` 0 when one does)."""
    k = -(-K // unit) * unit
    bk1 = 1 << (k.bit_length() - 1)
    if bk1 == k:
        return bk1, 0
    bk2 = max(unit, triton.next_power_of_2(k - bk1))
    return (2 * bk1, 0) if bk2 == bk1 else (bk1, bk2)  # two equal halves walk what one piece does


def h_divisor(H: int) -> int:
    """The kernels' ``HDIV``: the power of two (2, 4 or 8) that ``H`` is a multiple of when triton's launch
    specialization (``H % 16 == 0``) does not say it already; 1 otherwise (aligned or odd ``H``)."""
    d = H & -H
    return d if d < 16 else 1


def _esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def dtype_key(dtype: torch.dtype, precision: str) -> str:
    """The tensor-core rate that applies: ``bf16``, ``fp16``, ``tf32`` or ``ieee`` (fp32 without TF32)."""
    if dtype == torch.float32:
        return precision
    return "bf16" if dtype == torch.bfloat16 else "fp16"


def model_shared(cfg: KernelConfig, H: int, dtype: torch.dtype) -> int:
    """Shared memory of one program, as triton allocates it on sm_90: every ``tl.dot`` operand is staged in
    shared memory (the held ``W_hh`` slice included, whatever it was loaded into), a streamed loop buffers
    ``num_stages`` chunks of both operands, and the fp32 accumulator's re-layout for the elementwise code
    (gate split forward, slice sum backward) takes a buffer of its own. Checked against the
    compiler over the whole dispatch grid (tests/kernels/test_compile_sm90.py)."""
    G = GATES[cfg.cell]
    es = _esize(dtype)
    buffers = cfg.num_stages  # a streamed loop: triton 3.8 keeps num_stages chunks of each operand
    if cfg.PARTIAL:
        # the held rows; then one buffer at a time: a partial product's re-layout for its stores, or the gate
        # gradients' operand and the cross-warp sum of everyone's partials (sm_90: LSTM H=768 131,072 B)
        M = (4 if G > 1 else 1) * cfg.BH
        staged = max(
            cfg.BB * max(cfg.BK1, cfg.BK2) * 4, cfg.BB * M * es + cfg.num_warps * cfg.BB * cfg.BH * 4
        )
        return M * (cfg.BK1 + cfg.BK2) * es + staged
    if not cfg.backward:
        M = 4 * cfg.BH if G > 1 else cfg.BH
        if cfg.STREAM_W:
            operands = buffers * (M * cfg.BKC + cfg.BKC * cfg.BB) * es
        else:
            K = cfg.BK1 + cfg.BK2
            operands = (M * K + K * cfg.BB) * es
        return operands + M * cfg.BB * 4
    if cfg.STREAM_W:
        operands = buffers * (cfg.BKC * cfg.BH + cfg.BB * cfg.BKC) * es
    elif cfg.SCRATCH:
        K = cfg.BK1 + cfg.BK2
        operands = (K * cfg.BH + cfg.BB * K) * es
    else:  # resident backward: one [BB, BK] x [BK, BH] product per gate, the W blocks held
        operands = G * (cfg.BK1 * cfg.BH + cfg.BB * cfg.BK1) * es
    return operands + (cfg.NKS if cfg.SCRATCH else 1) * cfg.BB * cfg.BH * 4


def model_regs(cfg: KernelConfig, H: int, dtype: torch.dtype) -> int:
    """Registers per thread. Every loaded ``tl.dot`` operand passes through registers on its way to shared
    memory, spread over the program's threads: the held ``W_hh`` slice once before the loop, the exchanged
    operand (or the streamed chunks) every step, next to the fp32 accumulator and the per-gate fp32 tiles of
    the elementwise code (no warp holds another's part). Plus a fixed cost for addresses and masks."""
    G = GATES[cfg.cell]
    es = _esize(dtype)
    ws = 2 * es if cfg.TAGGED else es  # the exchanged operand arrives as tagged words, unpacked in registers
    threads = 32 * cfg.num_warps
    K = cfg.BK1 + cfg.BK2
    # NOTE: tagged, each K piece is polled to completion before the next is loaded (a spin loop, nothing in
    # flight across it): one piece in registers at a time. LSTM B=16 H=768 BH=16 forward: 235 registers, no
    # spills, where a whole-K operand would have predicted > 255
    held_k = max(cfg.BK1, cfg.BK2) if cfg.TAGGED else K
    if cfg.PARTIAL:
        # the held rows pass through once; per step: the partial products' fp32 results and everyone's partials
        # of the own columns, each element stored or polled on its own (an address each: x2), next to the
        # gate gradients and the cell's tiles
        # NOTE: calibrated on sm_90 compiles (8 warps): 96 such values per thread fit (LSTM B=16 H=768), 128
        # spilled per step (GRU B=16 H=1024)
        M = (4 if G > 1 else 1) * cfg.BH
        step = 2 * (cfg.BB * K + sum(cfg.NJ) * cfg.BB * cfg.BH) * 4 + (G + 6) * cfg.BB * cfg.BH * 4
        return 40 + -(-max(M * K * es, step) // (4 * threads))
    if not cfg.backward:
        M = 4 * cfg.BH if G > 1 else cfg.BH
        held = 0 if cfg.STREAM_W else M * K * es
        operand = (M * cfg.BKC * es + cfg.BKC * cfg.BB * ws) if cfg.STREAM_W else held_k * cfg.BB * ws
        live = (M * cfg.BB * 3 + 3 * cfg.BH * cfg.BB) * 4  # accumulator, its gate split, state and outputs
    else:
        if cfg.STREAM_W:
            held = 0
        else:
            held = K * cfg.BH * es if cfg.SCRATCH else G * cfg.BK1 * cfg.BH * es
        operand = (cfg.BKC * cfg.BH * es + cfg.BB * cfg.BKC * ws) if cfg.STREAM_W else cfg.BB * held_k * ws
        live = ((cfg.NKS if cfg.SCRATCH else 1) + G + 3) * cfg.BB * cfg.BH * 4
    # NOTE: x2 on what is staged every step: the compiler keeps loads in flight ahead of their stores. Calibrated on
    # the sm_90 grid (benchmarks/results/kernels-sm90-grid-triton3.8.md): below this, barrier paths spilled.
    return 40 + -(-max(held, 2 * operand + live) // (4 * threads))


def estimate(
    cfg: KernelConfig, H: int, dtype: torch.dtype, precision: str = "tf32", gpu: GPUSpec = H100
) -> dict:
    """First-order time of one step of one program (all programs run in parallel), from published rates.

    Terms (clocks): the product, paced by the slower of its MMA work / tensor rate and its operands' shared
    memory traffic / bandwidth; the operand exchanged through L2 (bytes / bandwidth + one latency) and
    W_hh where it is streamed; one grid barrier where there is one. These are added: the step is a chain.
    Tagged (no barrier): the operand's bytes count twice (value and tag), and a reader's poll is in flight
    when the data lands, half a round trip late on average.
    """
    G = GATES[cfg.cell]
    es = _esize(dtype)
    if cfg.PARTIAL:
        return _estimate_partial(cfg, H, dtype, precision, gpu)
    K_logical = G * H if cfg.backward else H
    rows = cfg.BH if cfg.backward else (4 if G > 1 else 1) * cfg.BH
    cols = cfg.BB
    if cfg.STREAM_W:
        K = triton.cdiv(K_logical, cfg.BKC) * cfg.BKC
    elif cfg.backward and not cfg.SCRATCH:
        K = G * cfg.BK1
    else:
        K = cfg.BK1 + cfg.BK2
    flop = 2 * rows * cols * K
    mma_clk = flop / gpu.mma_flop_per_clk[dtype_key(dtype, precision)]
    w_bytes = rows * K * es
    op_bytes = cols * K * es
    # forward: warpgroups beyond the 64-row blocks of the slice split the columns and each re-reads the rows
    reads = 1 if cfg.backward else max(1, (cfg.num_warps // 4) // max(1, rows // 64))
    smem_clk = (w_bytes * reads + op_bytes) / gpu.smem_bytes_per_clk
    exchanged = (2 * op_bytes if cfg.TAGGED else op_bytes) if cfg.SCRATCH else 0
    return _chain(cfg, gpu, mma_clk, smem_clk, exchanged + (w_bytes if cfg.STREAM_W else 0))


def _chain(cfg: KernelConfig, gpu: GPUSpec, mma_clk: float, smem_clk: float, l2_bytes: int) -> dict:
    """The step as `estimate` adds it up: the product (the slower of its MMA work and its operands'
    shared-memory traffic: the tensor cores read them there), what goes through L2 (bytes and one latency;
    tagged, half a latency more), the grid barrier where there is one."""
    l2_clk = l2_bytes / gpu.l2_bytes_per_clk + (gpu.l2_latency_clk if l2_bytes else 0)
    if cfg.TAGGED and cfg.NSPLIT > 1:
        l2_clk += gpu.l2_latency_clk / 2
    barrier_clk = gpu.barrier_clk if cfg.NSPLIT > 1 and not cfg.TAGGED else 0
    total = max(mma_clk, smem_clk) + l2_clk + barrier_clk
    return {
        "mma_clk": mma_clk,
        "smem_clk": smem_clk,
        "l2_clk": l2_clk,
        "barrier_clk": barrier_clk,
        "l2_bytes": l2_bytes,
        "step_us": total / (gpu.clock_ghz * 1e3),
    }


def _estimate_partial(cfg: KernelConfig, H: int, dtype: torch.dtype, precision: str, gpu: GPUSpec) -> dict:
    """`estimate` of the backward by partial sums: the product ``dg [BB, GP*BH] @ W_rows [GP*BH, K]`` paced
    by its MMA work or by reading the held rows from shared memory; then the program's partial (``BB*K`` fp32)
    written and its columns of everyone's (``NSPLIT*BB*BH`` fp32) read through L2, one latency; the hand-off."""
    G = GATES[cfg.cell]
    es = _esize(dtype)
    rows = (4 if G > 1 else 1) * cfg.BH
    K = cfg.BK1 + cfg.BK2
    mma_clk = 2 * rows * cfg.BB * K / gpu.mma_flop_per_clk[dtype_key(dtype, precision)]
    smem_clk = (rows * K + cfg.BB * rows) * es / gpu.smem_bytes_per_clk
    l2_bytes = (cfg.BB * K + cfg.NSPLIT * cfg.BB * cfg.BH) * 4  # tagged: the tag rides in the lowest bit
    return _chain(cfg, gpu, mma_clk, smem_clk, l2_bytes)


def _candidates(cell: str, B: int, H: int, strategy: str, backward: bool, cpu: bool):
    G = GATES[cell]
    bb_max = _pow2(min(B, 16)) if cpu else _pow2(min(B, 256))
    bbs = [bb_max] if cpu else [bb for bb in (16, 32, 64, 128, 256) if bb <= bb_max]
    if strategy in _ONE_PROGRAM:
        bhs = [_pow2(H)]
    else:
        # forward RNN rows are units only: 64 of them fill one warpgroup's wgmma
        low = 64 if cell == "rnn" and not backward else 16
        bhs = [bh for bh in (16, 32, 64, 128, 256) if low <= bh < _pow2(H)]
    partial = strategy.startswith("resident-partial")
    if backward and (partial or strategy == "split"):
        # the backward by partial sums: W_hh rows held as the forward holds them, K pieces over H
        for BB in bbs:
            for BH in bhs:
                nsplit = 1 if strategy in _ONE_PROGRAM else triton.cdiv(H, BH)
                bk1, bk2 = _pieces(H, 16)
                for num_warps in [8, 4] if not cpu else [2]:
                    cfg = KernelConfig(cell, True, strategy, BB, BH, bk1, bk2, 64, 1, nsplit, num_warps, 1,
                                       partial=True)  # fmt: skip
                    yield cfg
                    if strategy in _BARRIER:
                        yield replace(cfg, tagged=True)
        if partial:
            return
    for BB in bbs:
        for BH in bhs:
            stream = strategy in ("stream", "split-stream")
            nsplit = 1 if strategy in _ONE_PROGRAM else triton.cdiv(H, BH)
            if not backward:
                if strategy == "resident":
                    bk1, bk2 = BH, 0
                else:
                    bk1, bk2 = _pieces(H, 16)
                M = (4 if G > 1 else 1) * BH
                # one warpgroup (wgmma over all rows, nothing repeated) unless the rows fill two; 8 warps
                # over 64 rows split the columns instead and both warpgroups read all of the slice
                # NOTE: 8 warps over 64 rows with two K pieces spilled per step on sm_90 (RNN H=768, 1000)
                warps_options = ([4, 8] if bk2 == 0 else [4]) if M < 128 else [8]
                warps_options = warps_options if not cpu else [4]
                nks = 1
            else:
                # more split-K slices first: shorter MMA chains per warp, less staged per thread
                warps_options = [8, 4] if not cpu else [2]
                nks = None
                bk1 = bk2 = 0
            for num_warps in warps_options:
                bkc = 16 if cpu else 64
                nks_options = [1]
                if backward:
                    # held: two K slices per warp, half the operand staged per thread at once (measured: no
                    # spills where one slice per warp spilled); streamed: one slice per warp, small chunks;
                    # one wide product when a single program streams all units (every warp has output)
                    # NOTE: a slice sum over BB*BH > 512 spilled kilobytes on sm_90 (its result replicated
                    # in every warp): wide tiles take the plain streamed product, which has work for all warps
                    wide = BB * BH > 512
                    if cpu:
                        # the interpreter runs both streamed products: split-K at B > 1, plain at B = 1
                        nks_options = [1] if strategy == "stream" and B == 1 else [2]
                    elif strategy in ("stream", "resident"):  # resident: one product per gate, no slices
                        nks_options = [1]
                    elif strategy == "split-stream":
                        nks_options = [1] if wide else [num_warps]
                    else:
                        nks_options = [] if wide else [2 * num_warps, num_warps]
                for nks in nks_options:
                    if backward:
                        bk1, bk2 = (BH, 0) if strategy == "resident" else _pieces(G * H, nks * 16)
                        bkc = 16 * nks if nks > 1 else (16 if strategy == "stream" or cpu else 64)
                    # streamed forward: the first chunk width (64, 32, 16) whose buffers fit
                    for chunk in (64, 32, 16) if stream and not backward and not cpu else (bkc,):
                        cfg = KernelConfig(cell, backward, strategy, BB, BH, bk1, bk2, chunk, nks, nsplit,
                                           num_warps, 2 if stream else 1)  # fmt: skip
                        yield cfg
                        if strategy in _BARRIER:
                            yield replace(cfg, tagged=True)


_FAILED: set[tuple] = set()  # (cell, backward, B, H, dtype, strategy) that failed to launch here

# the installed triton's (major, minor): its sm_90 code generation decides some spills (_triton_spills)
TRITON_VERSION: tuple[int, int] = tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2])


def _triton_spills(
    cfg: KernelConfig, B: int, dtype: torch.dtype, precision: str, version: tuple[int, int]
) -> str | None:
    """Why ``cfg`` fails when triton ``version`` compiles it for sm_90 where triton 3.8 does not (a split grid
    that spills inside the time loop, or a kernel the compiler aborts on); ``None`` otherwise. The releases
    the product meets: 3.6 (the GPU image), 3.8 and 3.9; each rule stands on that release's compiled grid
    (benchmarks/results/kernels-sm90-grid-triton*)."""
    fp32 = dtype == torch.float32
    ieee = fp32 and precision == "ieee"
    name = "triton {}.{}".format(*version)
    if cfg.NSPLIT == 1:
        if version >= (3, 9) and ieee and cfg.cell == "lstm" and cfg.backward:
            # NOTE: triton 3.9's LLVM aborts the whole process (an SLP-vectorizer assertion) compiling LSTM's
            # IEEE fp32 backward in one program (B=1, H=64); the TF32 form of the same kernel compiles
            return f"{name}: LSTM IEEE fp32 backward in one program aborts the compiler"
        return None
    held_forward = not cfg.backward and not cfg.STREAM_W
    if version >= (3, 9):
        if held_forward and cfg.TAGGED and cfg.BK2 and cfg.num_warps == 4:
            # NOTE: the tagged forward over two held K pieces in one warpgroup reaches 255 registers and
            # spills per step (every cell at H=768, every batch); a warpgroup per 64 rows (BH doubled, 8 warps)
            # does not
            return f"{name}: tagged forward over two held K pieces in one warpgroup"
        if cfg.PARTIAL and cfg.TAGGED and cfg.cell == "gru" and cfg.BH == 16 and cfg.BK2:
            # NOTE: GRU's tagged partial sums over two K pieces spill per step (H=768), where LSTM's do not
            return f"{name}: GRU tagged partial sums over two K pieces"
        if cfg.PARTIAL and cfg.TAGGED and cfg.cell == "gru" and fp32 and cfg.BK1 + cfg.BK2 == 512:
            # NOTE: what spills under 3.8 with masked batch rows alone (make_config) spills with full ones too
            return f"{name}: GRU fp32 tagged partial sums at K=512"
        if ieee and cfg.STREAM_W and not cfg.backward and cfg.cell != "rnn" and cfg.BB * cfg.BH == 1024:
            # NOTE: the gated cells' FMA outer product of a streamed chunk over a 1024-element tile ([64, 16]
            # or [32, 32], 4 or 8 warps) spills per step (H=512..1024, B=128 and 256); 2048-element tiles in 8
            # warps do not
            return f"{name}: IEEE fp32 gated streamed forward over a 1024-element tile"
    if version < (3, 8):
        if cfg.PARTIAL:
            # NOTE: the partial products' fp32 results, stored and polled one element each, spill per step
            # under 3.6 (LSTM and GRU at H=512 and 768, tagged or with a barrier; masked batch rows and BH=32 at
            # H=768 too); the few that did not sit at 255 registers
            return f"{name}: backward by partial sums"
        if cfg.TAGGED and not cfg.STREAM_W and B % 16:
            # NOTE: tagged words with masked batch rows spill per step (RNN and LSTM forward at H=512..1024,
            # RNN backward at H=1000 and 1024, B=1 and 3), where full 16-row blocks do not
            return f"{name}: tagged words with masked batch rows"
        if fp32 and cfg.STREAM_W and cfg.BB * cfg.BH == 512 and cfg.cell == "lstm":
            # NOTE: LSTM's fp32 streamed kernels over 512-element tiles ([32, 16] or [16, 32]) spill per step
            # (backward at H=256..1024, TF32 and IEEE, 4 and 8 warps; the IEEE forward at H=1000), GRU's and
            # RNN's do not
            return f"{name}: LSTM fp32 streamed over a 512-element tile"
        rnn_wide_bwd = cfg.cell == "rnn" and cfg.backward and cfg.BB * cfg.BH == 1024
        if ieee and cfg.STREAM_W and rnn_wide_bwd and cfg.num_warps == 8:
            # NOTE: RNN's IEEE streamed backward over a [32, 32] tile in 8 warps compiles to 80 registers a
            # thread and spills per step (H=512..1024, B=128 and 256); 4 warps get twice the registers
            return f"{name}: RNN IEEE fp32 streamed backward over a [32, 32] tile in 8 warps"
        if held_forward and cfg.TAGGED and cfg.BB > 16:
            # NOTE: the tagged forward over 32 batch rows spills per step (LSTM and GRU at H=512, B=256),
            # where 16 rows at the same BH do not
            return f"{name}: tagged forward over more than 16 batch rows"
        if held_forward and cfg.TAGGED and cfg.cell == "rnn" and cfg.num_warps == 8:
            # NOTE: two warpgroups over RNN's 64 rows, each reading the whole tagged operand, spill per step
            # (H=1000 and 1024, every batch), where the gated cells' 8-warp forward at the same K does not
            return f"{name}: RNN tagged forward with two warpgroups over 64 rows"
    return None


def make_config(
    cell: str,
    B: int,
    H: int,
    dtype: torch.dtype,
    device: torch.device,
    strategy: str | None = None,
    backward: bool = False,
    gpu: GPUSpec | None = None,
    precision: str = "tf32",
) -> KernelConfig:
    """Chooses the strategy and block sizes of one pass of one layer; ``strategy`` forces one of
    `STRATEGIES` (a ``ValueError`` says why when it cannot fit).

    On CUDA every candidate is checked against the target's limits with `model_shared` and
    `model_regs`, barrier grids against the SM count (one program per SM, co-resident), and the one
    with the smallest `estimate` wins. Nothing returned exceeds a limit of the model; the compile test
    checks the model against the compiler. ``gpu`` defaults to the current device (H100 rates, its SM count
    and shared memory) and lets a CPU machine plan for a GPU it does not have (``device`` of type cuda).

    The interpreter (CPU tensors) runs ``resident``, ``resident-scratch``, ``resident-tagged`` and ``stream``
    only. The environment variable ``RNNDEPLOY_HANDOFF`` (``barrier`` or ``tagged``; default: whichever the
    estimate prefers) fixes the hand-off of split grids, to measure one against the other.
    """
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    cpu = torch.device(device).type != "cuda"
    if cpu:
        if strategy in _BARRIER:
            raise ValueError(
                f"strategy {strategy!r} needs a CUDA GPU (grid barrier); the interpreter runs "
                "'resident', 'resident-scratch', 'resident-tagged' or 'stream'"
            )
        return next(_candidates(cell, B, H, strategy or "resident", backward, cpu=True))
    if gpu is None:
        gpu = _device_spec(torch.device(device))
    handoff = os.environ.get("RNNDEPLOY_HANDOFF", "auto")
    if handoff not in _HANDOFFS:
        raise ValueError(f"RNNDEPLOY_HANDOFF must be one of {_HANDOFFS}, got {handoff!r}")
    tried = [strategy] if strategy is not None else ["resident", "split", "split-stream", "stream"]
    best, best_key, reasons = None, None, []
    for s in tried:
        if strategy is None and (cell, backward, B, H, dtype, s) in _FAILED:
            reasons.append(f"{s}: failed to launch on this GPU before")
            continue
        for cfg in _candidates(cell, B, H, s, backward, cpu=False):
            if cfg.NSPLIT > 1 and handoff != "auto" and cfg.tagged != (handoff == "tagged"):
                continue
            why = _does_not_fit(cfg, B, H, dtype, gpu)
            if why is None and precision == "ieee" and dtype == torch.float32 and s == "split":
                # NOTE: without tensor cores tl.dot is an outer product held in registers: K > 256 in one
                # product spills kilobytes per thread (sm_90 grid); the streamed chunks keep it small
                if max(cfg.BK1, cfg.BK2) > 256:
                    why = "IEEE fp32 product over K > 256 in registers"
            ieee = precision == "ieee" and dtype == torch.float32
            if why is None and ieee and cfg.STREAM_W and not backward and GATES[cell] == 1 and cfg.BKC == 64:
                # NOTE: the same outer product per streamed chunk: the RNN forward's 64-wide chunks spilled per
                # step (B=256 H=768, 1024: BB=32 BH=64, 4 warps), 32-wide did not, at the same estimate (gated
                # cells: the other way round at B <= 64, H >= 512)
                why = "IEEE fp32 streamed chunk of 64 in registers"
            if why is None and ieee and cfg.STREAM_W and backward and cfg.NKS == 8 and cfg.BB * cfg.BH >= 512:
                # NOTE: eight FMA slice sums over a [32, 16] tile spilled per step (RNN B=64 H=1000), four did not
                why = "IEEE fp32: eight slice sums over a 512-element tile"
            if why is None and ieee and cfg.PARTIAL and cfg.BK1 + cfg.BK2 > 128:
                # NOTE: the partial product [BB, G*BH] x [G*BH, K] as an FMA outer product: K=256 spilled ~1700
                # instructions per step on sm_90 (LSTM, GRU; 32 registers, 3.5 KB of stack), K=128 did not
                why = "IEEE fp32 partial product over K > 128 in registers"
            if why is None and ieee and cfg.TAGGED and cfg.NSPLIT > 1:
                # NOTE: the FMA outer product in registers and the poll's words beside it: tagged IEEE fp32 picks
                # spilled per step on sm_90, up to kilobytes (LSTM H=64..1024 forward and backward, RNN backward)
                why = "IEEE fp32 with tagged words in registers"
            if (
                why is None
                and cfg.TAGGED
                and cfg.NSPLIT > 1
                and not backward
                and dtype == torch.float16
                and B % 16
            ):
                # NOTE: fp16 tagged forward with masked batch rows spilled 23-56 instructions per step on sm_90 at
                # 255 registers (every cell, B=1 and 3, H=512..1024, 4 and 8 warps), where bf16 and B=16 did not
                why = "fp16 tagged words with masked batch rows"
            if (
                why is None
                and cfg.TAGGED
                and backward
                and cfg.STREAM_W
                and not cfg.PARTIAL
                and cfg.BB * cfg.BH > 512
            ):
                # NOTE: a streamed backward polling wide gate-gradient tiles spilled per step on sm_90 (RNN B=128,
                # [32, 32] tiles, bf16 H=1000 and fp16 H=768/1024, capped at 64 registers)
                why = "tagged streamed gate gradients over a wide tile"
            if (why is None and cfg.PARTIAL and cfg.TAGGED and cell == "gru" and dtype == torch.float32 and B % 16
                    and cfg.BK1 + cfg.BK2 == 512):  # fmt: skip
                # NOTE: GRU fp32 partial sums with masked batch rows at H=512 spilled 4 per step on sm_90 (capped at
                # 128 registers; H=256 and 768 did not)
                why = "GRU fp32 tagged partial sums at K=512 with masked batch rows"
            if why is None:
                why = _triton_spills(cfg, B, dtype, precision, TRITON_VERSION)
            if why:
                reasons.append(f"{s} BB={cfg.BB} BH={cfg.BH} warps={cfg.num_warps}: {why}")
                continue
            cost = estimate(cfg, H, dtype, precision, gpu)["step_us"]
            cfg = replace(
                cfg, shared=model_shared(cfg, H, dtype), regs=model_regs(cfg, H, dtype), step_us=cost
            )
            # at equal cost fewer batch blocks (W_hh held fewer times), then fewer programs
            key = (round(cost, 6), triton.cdiv(B, cfg.BB), cfg.NSPLIT)
            if best is None or key < best_key:
                best, best_key = cfg, key
    if best is None:
        pass_ = "backward" if backward else "forward"
        raise ValueError(
            f"no launch configuration of {cell} {pass_} B={B} H={H} {dtype} fits {gpu.name} with strategy "
            f"{strategy or 'any'}: " + "; ".join(reasons[-4:]) + ". Use backend='torch' for this layer."
        )
    return best


@dataclass(frozen=True)
class LayerPlan:
    """The forward and the backward configuration of one layer (their products differ in shape)."""

    forward: KernelConfig
    backward: KernelConfig

    @property
    def strategy(self) -> str:
        f, b = self.forward.strategy, self.backward.strategy
        return f if f == b else f"{f}/{b}"


def plan_layer(
    cell: str, B: int, H: int, dtype: torch.dtype, device: torch.device, strategy: str | None = None,
    gpu: GPUSpec | None = None,
) -> LayerPlan:  # fmt: skip
    """`make_config` for both passes of one layer."""
    precision = dot_precision(dtype)
    return LayerPlan(
        *(make_config(cell, B, H, dtype, device, strategy, bwd, gpu, precision) for bwd in (False, True))
    )


def _does_not_fit(cfg: KernelConfig, B: int, H: int, dtype: torch.dtype, gpu: GPUSpec) -> str | None:
    shared = model_shared(cfg, H, dtype)
    if shared > gpu.shared_per_block:
        return f"{shared} B shared memory > {gpu.shared_per_block}"
    regs = model_regs(cfg, H, dtype)
    if regs > gpu.regs_per_thread:
        return f"{regs} registers per thread > {gpu.regs_per_thread}"
    programs = triton.cdiv(B, cfg.BB) * cfg.NSPLIT
    if cfg.NSPLIT > 1 and programs > gpu.sms:
        return f"barrier grid of {programs} programs > {gpu.sms} SMs (all must be co-resident)"
    if cfg.NSPLIT == 1 and cfg.strategy in _BARRIER:
        return "one program: no split"
    return None


@contextlib.contextmanager
def forced_handoff(value: str):
    """Inside, split grids take the hand-off ``value`` (``barrier``, ``tagged`` or ``auto``): sets
    ``RNNDEPLOY_HANDOFF``, which `make_config` reads, and restores it after."""
    saved = os.environ.get("RNNDEPLOY_HANDOFF")
    os.environ["RNNDEPLOY_HANDOFF"] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ["RNNDEPLOY_HANDOFF"]
        else:
            os.environ["RNNDEPLOY_HANDOFF"] = saved


def _device_spec(device: torch.device) -> GPUSpec:
    props = torch.cuda.get_device_properties(device)
    shared = getattr(props, "shared_memory_per_block_optin", H100.shared_per_block)
    return replace(H100, name=props.name, sms=props.multi_processor_count, shared_per_block=shared)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows cuDNN's switch: TF32 tensor cores unless ``torch.backends.cudnn.allow_tf32`` is off; the
    setting means nothing to bf16/fp16 operands, which get triton's default."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32 else "tf32"


# ----------------------------------------------------------------------------------------------------------
# The launcher


_RESOURCE_ERROR = re.compile(
    r"out of resource|too many resources|cooperative launch|TOO_LARGE", re.IGNORECASE
)
_WARNED: set[tuple] = set()


def launch(
    kernel: triton.JITFunction,
    config: KernelConfig,
    tensors: dict[str, Tensor | None],
    T: int,
    B: int,
    H: int,
    scratch_gates: int,
    first_operand: Tensor | None = None,
    gpu: GPUSpec | None = None,
    **flags,
) -> KernelConfig:
    """Launches one pass: allocates the exchange scratch ``[2, B, scratch_gates*H]`` (compute dtype, rows
    padded to 16 elements, as are ``W_hh``'s when ``H % 16 != 0``; the partial backward's ``[2, NSPLIT, B, H]``
    fp32) and the barrier counters, passes every ``p_*`` argument by name from ``tensors``, the block sizes of
    ``config``
    and ``flags`` (the kernel's other constexprs). ``first_operand`` is what the first step reads from the
    scratch (``h_0`` forward). Barrier grids launch cooperatively.

    Where a launch fails for resources on a GPU, the next strategy (``split`` -> ``split-stream`` ->
    ``stream``) runs instead, with one warning, and later layers of that shape skip the failed one.
    Returns the configuration that ran. ``gpu`` plans the fallback for that target instead of the current
    device (tests).
    """
    ref = next(t for name, t in tensors.items() if t is not None and name != "p_len")
    # NOTE: rows of W_hh and of the scratch are padded with zeros to 16 elements and loaded up to the padded
    # width, so every load of them vectorizes: with H % 16 != 0 they were scalar loads, an address register
    # each, and the sm_90 code spilled
    SW = -(-H // 16) * 16
    SP = SW if config.PARTIAL else -(-scratch_gates * H // 16) * 16
    # NOTE: the rows of the other H-strided tensors (inputs, outputs, workspace) cannot be padded without a
    # copy; HDIV tells the compiler the power of two H is a multiple of (H=1000: 8), enough for vectorized
    # loads and stores. Without it every element had an address of its own: 255 registers and spills per
    # step at H=1000 where H=1024 took 128-250 (sm_90 grid)
    w = tensors["p_w"]
    if SW != H:
        tensors = {**tensors, "p_w": F.pad(w, (0, SW - H))}
    while True:
        scr = bar = None
        if config.PARTIAL:
            # everyone's fp32 partial dh, double-buffered; tagged: every word at bit 1, which steps 0 and 1
            # do not write (common._put_lsb)
            shape = (2, config.NSPLIT, B, SP)
            if config.TAGGED:
                scr = torch.ones(shape, dtype=torch.int32, device=ref.device)
            else:
                scr = torch.zeros(shape, dtype=torch.float32, device=ref.device)
        elif config.SCRATCH:
            # zeros: the padding columns meet W_hh's zero padding in the product (empty could hold NaN);
            # tagged: tag 0 (h_0's, written here), which no kernel step writes into buffer 0 first
            word = _tag_word(ref.dtype) if config.TAGGED else ref.dtype
            scr = torch.zeros(2, B, SP, dtype=word, device=ref.device)
            if first_operand is not None:
                scr[1, :, :H].copy_(_tagged(first_operand, ref.dtype) if config.TAGGED else first_operand)
        if config.NSPLIT > 1:
            bar = torch.zeros(triton.cdiv(B, config.BB), dtype=torch.int32, device=ref.device)
        args = {**tensors, "p_scr": scr, "p_bar": bar}
        pointers = [args[name] for name in kernel.arg_names if name.startswith("p_")]
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        if config.NSPLIT > 1:
            options["launch_cooperative_grid"] = True
        # the backward kernels' partial-sum constexprs (the forward kernels have none)
        pieces = (("PARTIAL", config.PARTIAL), ("NJ1", config.NJ[0]), ("NJ2", config.NJ[1]))
        extra = {k: v for k, v in pieces if k in kernel.arg_names}
        try:
            kernel[config.grid(B)](
                *pointers, T, B, H, SW, SP,
                BB=config.BB, BH=config.BH, BK1=config.BK1, BK2=config.BK2, BKC=config.BKC, NKS=config.NKS,
                NSPLIT=config.NSPLIT, STREAM_W=config.STREAM_W, SCRATCH=config.SCRATCH,
                PRECISION=dot_precision(ref.dtype), HDIV=h_divisor(H), TAGGED=config.TAGGED, **extra, **flags,
                **options,
            )  # fmt: skip
            return config
        except Exception as e:
            on_gpu = ref.device.type == "cuda" or gpu is not None
            if not on_gpu or not _RESOURCE_ERROR.search(str(e)) or config.strategy == "stream":
                raise
            config = _fall_back(config, B, H, ref.dtype, e, gpu)


def _fall_back(
    config: KernelConfig, B: int, H: int, dtype: torch.dtype, error: Exception, gpu: GPUSpec | None
):
    """The next strategy along `_FALLBACK` that has a configuration, with one warning per shape."""
    _FAILED.add((config.cell, config.backward, B, H, dtype, config.strategy))
    pass_ = "backward" if config.backward else "forward"
    nxt = _FALLBACK.get(config.strategy)
    while nxt is not None:
        try:
            new = make_config(config.cell, B, H, dtype, torch.device("cuda"), nxt, config.backward, gpu,
                              dot_precision(dtype))  # fmt: skip
            break
        except ValueError:
            nxt = _FALLBACK.get(nxt)
    else:
        raise RuntimeError(
            f"rnndeploy.kernels: {config.cell} {pass_} B={B} H={H} {dtype}: strategy {config.strategy!r} failed "
            f"to launch ({error}) and no other strategy fits: use backend='torch' for this layer"
        ) from error
    key = (config.cell, config.backward, B, H, dtype, config.strategy)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(
            f"rnndeploy.kernels: {config.cell} {pass_} B={B} H={H} {dtype}: strategy {config.strategy!r} "
            f"failed to launch ({str(error).splitlines()[0][:200]}); running {nxt!r} instead",
            RuntimeWarning,
            stacklevel=4,
        )
    return new


def _tag_word(dtype: torch.dtype) -> torch.dtype:
    """The scratch's element of the tagged hand-off: value and tag in one word."""
    return torch.int64 if dtype == torch.float32 else torch.int32


def _tagged(values: Tensor, dtype: torch.dtype) -> Tensor:
    """``values`` in ``dtype`` as tagged words of tag 0 (what `_put` stores at step -1)."""
    v = values.to(dtype).contiguous()
    if dtype == torch.float32:
        return v.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return v.view(torch.int16).to(torch.int32) & 0xFFFF


def previous_states(y: Tensor, h0: Tensor, lengths: Tensor | None, reverse: bool) -> Tensor:
    """``h_{t-1}`` for every step ``t`` in processing order, ``[T, B, H]``, rebuilt from the outputs ``y``.

    Steps past a row's length get any value: their gate gradients are zero.
    """
    h0 = h0.to(y.dtype)[None]
    if not reverse:
        return torch.cat([h0, y[:-1]])
    hp = torch.cat([y[1:], h0])
    if lengths is not None:
        first = torch.arange(y.shape[0], device=y.device)[:, None] == (lengths - 1)[None, :]  # [T, B]
        hp = torch.where(first[..., None], h0, hp)
    return hp


def projection_grads(ctx, dg_in: Tensor, dg_hh: Tensor, x: Tensor, hp: Tensor | None, w_ih: Tensor, k: int):
    """The gradients that are plain matmuls over all steps at once, given the gate gradients.

    ``dg_in [T, B, G*H]`` reaches ``x``, ``W_ih``, ``b_ih``; ``dg_hh`` reaches ``W_hh`` (through ``hp``, the
    previous states ``[T, B, H]``) and ``b_hh``. ``k`` is the index of ``w_ih`` among the Function's inputs.
    Returns ``dx, dw_ih, dw_hh, db_ih, db_hh`` (``None`` where no gradient is needed).
    """
    need = ctx.needs_input_grad
    T, B = x.shape[0], x.shape[1]
    g_in = dg_in.reshape(T * B, -1)
    g_hh = dg_hh.reshape(T * B, -1)
    dx = (g_in @ w_ih).view(T, B, -1) if need[0] else None
    dw_ih = g_in.t() @ x.reshape(T * B, -1) if need[k] else None
    dw_hh = g_hh.t() @ hp.reshape(T * B, -1) if need[k + 1] else None
    db_ih = g_in.sum(0) if ctx.has_bias and need[k + 2] else None
    db_hh = g_hh.sum(0) if ctx.has_bias and need[k + 3] else None
    return dx, dw_ih, dw_hh, db_ih, db_hh
