"""Shared pieces of the persistent kernels: stable activations, the grid barrier, the launch configuration.

Every kernel in this package runs on a grid ``(cdiv(B, BB), NSPLIT)``: program ``(i_b, i_h)`` owns batch
rows ``[i_b*BB, i_b*BB + BB)`` and hidden units ``[i_h*BH, i_h*BH + BH)`` of every gate, and runs the whole
time loop.

- ``NSPLIT == 1`` and ``BH >= H``: one program holds the full state; without ``SCRATCH`` the recurrent
  operand stays in registers.
- ``NSPLIT > 1`` (GPU only): the hidden dimension is split over co-resident programs; after each step a
  program writes its slice of the recurrent operand (``h`` forward, gate gradients backward) to a
  double-buffered fp32 scratch and waits at a grid barrier; the next step reads the full operand back from L2.
- ``STREAM_W``: the program's ``W_hh`` slice is re-read from L2 every step, ``BKC`` rows at a time together
  with the matching chunk of the operand from the scratch (needs ``SCRATCH``), instead of being held on chip
  (for slices too large for one SM).
- ``SCRATCH``: exchange the recurrent operand through the scratch buffer. Always on when ``NSPLIT > 1``; the
  tests switch it on for ``NSPLIT == 1`` so the interpreter runs the exchange code of the split path (all but
  the barrier itself, which would deadlock there: the interpreter runs programs one after another).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
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
def _dot(a, w, PRECISION: tl.constexpr):
    """``a @ w`` with ``a`` rounded to ``w``'s dtype first and fp32 accumulation."""
    a = a.to(w.dtype)
    if _DOT_FP32:
        return tl.dot(a.to(tl.float32), w.to(tl.float32))
    return tl.dot(a, w, input_precision=PRECISION)


@triton.jit
def _load_op(p, o_b, o_k, stride, H, m_b):
    """``[BB, len(o_k)]`` chunk of a ``[B, stride]`` buffer, read through L2 (other programs wrote it)."""
    m = m_b[:, None] & (o_k < H)[None, :]
    return tl.load(
        p + o_b[:, None].to(tl.int64) * stride + o_k[None, :], mask=m, other=0.0, cache_modifier=".cg"
    )


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
def _load_w(p_w, o_row, o_col, H, TRANSPOSE: tl.constexpr):
    """One gate's ``W_hh`` tile; rows/cols index the ``[H, H]`` gate block. ``TRANSPOSE`` loads ``W^T``."""
    m = (o_row[:, None] < H) & (o_col[None, :] < H)
    if TRANSPOSE:
        return tl.load(p_w + o_col[None, :].to(tl.int64) * H + o_row[:, None], mask=m, other=0.0)
    return tl.load(p_w + o_row[:, None].to(tl.int64) * H + o_col[None, :], mask=m, other=0.0)


@dataclass(frozen=True)
class KernelConfig:
    """How one layer is launched (see the module docstring). ``BK`` is ``H`` padded to a power of two; the
    streamed path walks it in chunks of ``BKC``."""

    BB: int
    BH: int
    BK: int
    BKC: int
    NSPLIT: int
    STREAM_W: bool
    SCRATCH: bool
    num_warps: int

    @property
    def strategy(self) -> str:
        if self.NSPLIT > 1:
            return "split-stream" if self.STREAM_W else "split"
        return "stream" if self.STREAM_W else ("resident-scratch" if self.SCRATCH else "resident")


STRATEGIES = ("resident", "resident-scratch", "stream", "split", "split-stream")

# The PROVISIONAL dispatch table (README, "Kernels"). Nothing here is measured yet: no GPU run has happened.
# Byte budgets for a program's W_hh slice held in registers across the time loop:
_RESIDENT_BYTES = 64 * 1024  # whole W_hh in one program (8 warps): H <= 64 for every cell and dtype
_SPLIT_RESIDENT_BYTES = 128 * 1024  # one program's column slice when split (8 warps)


def _pow2(n: int, lo: int = 16) -> int:
    # tl.dot needs every block dimension >= 16 on GPU
    return max(lo, triton.next_power_of_2(n))


def make_config(
    cell: str, B: int, H: int, dtype: torch.dtype, device: torch.device, strategy: str | None = None
) -> KernelConfig:
    """Chooses block sizes and the strategy for one layer; ``strategy`` forces one of :data:`STRATEGIES`.

    Provisional rules (no GPU measurement yet):

    - ``resident`` when the whole ``W_hh`` fits ``_RESIDENT_BYTES`` (one program per batch block);
    - otherwise ``split``: the narrowest column slice ``BH >= 16`` whose grid ``cdiv(B, BB) * cdiv(H, BH)``
      fits the SM count, held in registers when it fits ``_SPLIT_RESIDENT_BYTES``, else ``split-stream``;
    - when no split fits the SM count: ``stream`` (one program per batch block re-reading ``W_hh``: correct,
      slow).

    The interpreter (CPU tensors) runs ``resident``, ``resident-scratch`` and ``stream`` only.
    """
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    G = GATES[cell]
    BK = _pow2(H)
    esize = torch.empty((), dtype=dtype).element_size()
    if device.type != "cuda":
        if strategy in ("split", "split-stream"):
            raise ValueError(
                f"strategy {strategy!r} needs a CUDA GPU (grid barrier); the interpreter runs "
                "'resident', 'resident-scratch' or 'stream'"
            )
        strategy = strategy or "resident"
        # chunks of 16 so that H=33 already walks several chunks in the tests
        stream = strategy == "stream"
        return KernelConfig(_pow2(min(B, 16)), BK, BK, 16, 1, stream, strategy != "resident", 4)
    BB = _pow2(min(B, 64))
    BKC = min(BK, 64)
    n_b = triton.cdiv(B, BB)
    if strategy is None:
        strategy = "resident" if G * min(H, BK) * BK * esize <= _RESIDENT_BYTES else "split"
    if strategy in ("resident", "resident-scratch", "stream"):
        return KernelConfig(BB, BK, BK, BKC, 1, strategy == "stream", strategy != "resident", 8)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    BH = 16
    while n_b * triton.cdiv(H, BH) > sms and BH < BK:
        BH *= 2
    nsplit = triton.cdiv(H, BH)
    if nsplit == 1 or n_b * nsplit > sms:
        # NOTE: the spin barrier is safe only when the whole grid is co-resident: never more programs than SMs
        return KernelConfig(BB, BK, BK, BKC, 1, True, True, 8)
    stream = strategy == "split-stream" or G * min(H, BK) * BH * esize > _SPLIT_RESIDENT_BYTES
    return KernelConfig(BB, BH, BK, BKC, nsplit, stream, True, 8)


def launch_buffers(ref: Tensor, H: int, out_gates: int, ws_gates: int, scr_gates: int, config: KernelConfig):
    """Allocates a kernel's outputs and work buffers; also computes the grid and the dot precision.

    ``out [T, B, out_gates*H]`` and ``ws [T, B, ws_gates*H]`` in ``ref``'s dtype, the fp32 exchange scratch
    ``[2, B, scr_gates*H]`` and the barrier counters ``[cdiv(B, BB)]``.
    """
    T, B = ref.shape[0], ref.shape[1]
    out = ref.new_empty(T, B, out_gates * H)
    ws = ref.new_empty(T, B, ws_gates * H) if ws_gates else None
    scr = torch.empty(2, B, scr_gates * H, dtype=torch.float32, device=ref.device) if config.SCRATCH else None
    n_b = triton.cdiv(B, config.BB)
    bar = torch.zeros(n_b, dtype=torch.int32, device=ref.device) if config.NSPLIT > 1 else None
    # fp32 follows cuDNN's switch: TF32 tensor cores unless torch.backends.cudnn.allow_tf32 is off; the
    # setting means nothing to bf16/fp16 operands, which get triton's default
    precision = "ieee" if ref.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32 else "tf32"
    return out, ws, scr, bar, (n_b, config.NSPLIT), precision


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
