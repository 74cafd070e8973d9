"""The planner: which strategy and block sizes one pass of one layer launches with, from resource models of
the target and a first-order cost estimate (the kernels' layout and strategies: `rnndeploy.kernels.common`).

`make_config` lists the candidates of each strategy (`_candidates`), drops those over the target's limits
(`model_shared`, `model_regs`, the co-resident grid) or refused by a row of `rnndeploy.kernels.rules.RULES`,
and keeps the cheapest by `estimate`. `plan_layer` plans both passes of a layer.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, replace

import torch
import triton

from . import GATES
from .rules import refusal


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


@dataclass(frozen=True)
class KernelConfig:
    """How one pass (forward or backward) of one layer is launched; the strategies: `rnndeploy.kernels.common`.

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
    buffers = cfg.num_stages  # a streamed loop: triton keeps num_stages chunks of each operand
    if cfg.PARTIAL:
        # the held rows; then one buffer at a time: a partial product's re-layout for its stores, or the gate
        # gradients' operand and the cross-warp sum of everyone's partials
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
    # flight across it): one piece in registers at a time, not the whole K
    held_k = max(cfg.BK1, cfg.BK2) if cfg.TAGGED else K
    if cfg.PARTIAL:
        # the held rows pass through once; per step: the partial products' fp32 results and everyone's partials
        # of the own columns, each element stored or polled on its own (an address each: x2), next to the
        # gate gradients and the cell's tiles
        # NOTE: the terms are fitted to the sm_90 compile of the grid (8 warps), between the largest pick that
        # fits and the smallest that spills per step (benchmarks/results/kernels-sm90-grid-triton3.8.md)
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
    # NOTE: x2 on what is staged every step: the compiler keeps loads in flight ahead of their stores; with less,
    # the model admits barrier paths that spill (the sm_90 grid, benchmarks/results/kernels-sm90-grid-triton3.8.md)
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
                # NOTE: 8 warps over 64 rows with two K pieces spill per step on sm_90
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
                    # held: two K slices per warp, half the operand staged per thread at once (one slice per
                    # warp spills); streamed: one slice per warp, small chunks; one wide product when a single
                    # program streams all units (every warp has output)
                    # NOTE: a slice sum over BB*BH > 512 spills on sm_90 (its result replicated in every warp):
                    # wide tiles take the plain streamed product, which has work for all warps
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


def record_failure(cfg: KernelConfig, B: int, H: int, dtype: torch.dtype) -> None:
    """Plans of this shape skip ``cfg``'s strategy from now on: it failed to launch on this GPU."""
    _FAILED.add((cfg.cell, cfg.backward, B, H, dtype, cfg.strategy))


# the triton release planned for, the installed one: its sm_90 code generation decides some spills (rules.RULES)
TRITON_VERSION: tuple[int, int] = tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2])


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
            why = _does_not_fit(cfg, B, H, dtype, gpu) or refusal(cfg, B, dtype, precision, TRITON_VERSION)
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
