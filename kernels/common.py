"""The ``@triton.jit`` helpers every cell's kernels share: activations, products, the grid barrier and the
tagged hand-off. The planner that chooses a launch is `rnndeploy.kernels.plan`, the launcher
`rnndeploy.kernels.launch`.

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

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# NOTE: triton 3.8's interpreter computes bf16 x bf16 tl.dot wrongly; there the operands are rounded to the
# weight dtype as on GPU, then multiplied in fp32.
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
