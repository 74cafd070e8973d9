"""Ahead-of-time compilation of the kernels for a GPU target, on a machine without one.

Triton's compiler targets sm_90 (H100/H200) from a CPU; the result tells what a launch would need (shared
memory, registers, spills) and what a step executes (instructions in PTX and SASS). Used by the compile
tests (tests/kernels/compile_sm90.py) and the static cost report (bench_kernels.py static); not part of
the installed package. Run with ``TRITON_INTERPRET`` unset: the interpreter replaces kernels.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rnndeploy.kernels import GATES
from rnndeploy.kernels.plan import H100, KernelConfig, estimate, h_divisor, make_config

TARGET = GPUTarget("cuda", 90, 32)
_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_POINTER = {"p_len": "*i64", "p_bar": "*i32"}


@dataclass(frozen=True)
class Compiled:
    """What one compiled kernel needs and does. Counts are static (instructions in the code): ``*_loop``
    counts are inside the time loop's body, i.e. per step for held paths and per streamed chunk otherwise."""

    name: str
    shared: int  # bytes per block (triton's allocation)
    regs: int  # per thread (cuobjdump -res-usage)
    stack: int  # bytes per thread of local memory: spills
    spill_stores: int  # SASS STL instructions
    loop_spills: int  # SASS STL/LDL inside a loop (the time loop and what it contains): paid every step
    ptx: str
    sass: str


def results_stem(kind: str) -> str:
    """The name, without suffix, of a result file of this module for the installed triton (``kind``: ``static``
    or ``sm90-grid``), e.g. ``kernels-static-triton3.9``: code generation differs by release, so each release
    the product meets keeps its own files in benchmarks/results."""
    major, minor = triton.__version__.split(".")[:2]
    return f"kernels-{kind}-triton{major}.{minor}"


def _kernel(cell: str, backward: bool):
    module = importlib.import_module(f"rnndeploy.kernels.{cell}")
    return getattr(module, f"{cell}_{'bwd' if backward else 'fwd'}_kernel")


def compile_config(
    config: KernelConfig,
    B: int,
    H: int,
    dtype: torch.dtype,
    precision: str = "tf32",
    lengths: bool = True,
    reverse: bool = True,
    bias: bool = True,
    store_ws: bool = True,
    relu: bool = False,
) -> Compiled:
    """Compiles the kernel ``config`` launches for sm_90 at batch ``B`` and hidden size ``H``, with the
    launch options the launcher passes and the specialization a launch gets (pointers 16-byte aligned,
    integer arguments divisible by 16 marked so: that decides vectorized loads)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels")
    return _compile(
        config,
        B % 16 == 0,
        H % 16 == 0,
        h_divisor(H),
        dtype,
        precision,
        lengths,
        reverse,
        bias,
        store_ws,
        relu,
    )


@functools.cache
def _compile(config, b16, h16, hdiv, dtype, precision, lengths, reverse, bias, store_ws, relu) -> Compiled:
    fn = _kernel(config.cell, config.backward)
    consts = dict(BB=config.BB, BH=config.BH, BK1=config.BK1, BK2=config.BK2, BKC=config.BKC, NKS=config.NKS,
                  NSPLIT=config.NSPLIT, STREAM_W=config.STREAM_W, SCRATCH=config.SCRATCH, PRECISION=precision,
                  REVERSE=reverse, HAS_LENGTHS=lengths, HAS_BIAS=bias, STORE_WS=store_ws, RELU=relu,
                  HDIV=hdiv, TAGGED=config.TAGGED, PARTIAL=config.PARTIAL, NJ1=config.NJ[0], NJ2=config.NJ[1])  # fmt: skip
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    signature = {}
    for name in fn.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name.startswith("p_"):
            signature[name] = _POINTER.get(name, f"*{_TRITON_DTYPE[dtype]}")
            if name == "p_scr" and config.PARTIAL:  # fp32 partial sums, tagged in their lowest bit
                signature[name] = "*i32" if config.TAGGED else "*fp32"
            elif name == "p_scr" and config.TAGGED:  # value and tag in one word (kernels/common.py _put)
                signature[name] = "*i64" if dtype == torch.float32 else "*i32"
        else:
            signature[name] = "i32"
    aligned = {name for name in fn.arg_names if name.startswith("p_")} | {"SW", "SP"}
    aligned |= {name for name, divisible in (("B", b16), ("H", h16)) if divisible}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in aligned}
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if config.NSPLIT > 1:
        options["launch_cooperative_grid"] = True
    source = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    kernel = triton.compile(source, target=TARGET, options=options)
    regs, stack, sass = _cubin_facts(kernel.asm["cubin"])
    return Compiled(fn.__name__, kernel.metadata.shared, regs, stack, len(re.findall(r"\bSTL\b", sass)),
                    _loop_spills(sass), kernel.asm["ptx"], sass)  # fmt: skip


def _loop_spills(sass: str) -> int:
    """Local-memory loads and stores inside a loop of the SASS (a backward branch spans a loop)."""
    code = [
        (int(m.group(1), 16), line)
        for line in sass.splitlines()
        if (m := re.match(r"\s*/\*([0-9a-f]{4,})\*/", line))
    ]
    loops = []
    for addr, line in code:
        m = re.search(r"\bBRA\s+(?:`\()?0x([0-9a-f]+)", line)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    return sum(
        1
        for addr, line in code
        if re.search(r"\b(?:STL|LDL)\b", line) and any(a <= addr <= b for a, b in loops)
    )


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _cubin_facts(cubin: bytes) -> tuple[int, int, str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run(
            [_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True
        ).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no REG/STACK line: {res[:500]!r}")
    return int(m.group(1)), int(m.group(2)), sass


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# the issue's grid: every cell, fp32 (TF32 and IEEE), bf16, fp16, these batches and hidden sizes, both passes
GRID_DTYPES = (("fp32", "tf32"), ("fp32", "ieee"), ("bf16", "tf32"), ("fp16", "tf32"))
GRID_B = (1, 3, 16, 32, 64, 128, 256)
GRID_H = (16, 33, 64, 100, 128, 256, 512, 768, 1000, 1024)
# a representative subset (the default test): the headline shape of every cell, each strategy, fp32 and fp16
SUBSET = (
    ("lstm", "bf16", "tf32", 16, 768, None),
    ("gru", "bf16", "tf32", 16, 768, None),
    ("rnn", "bf16", "tf32", 16, 768, None),
    ("lstm", "fp32", "tf32", 64, 1024, None),
    ("gru", "fp16", "tf32", 3, 100, None),
    ("rnn", "fp32", "ieee", 1, 33, None),
    ("lstm", "fp32", "tf32", 16, 128, "stream"),
    ("gru", "bf16", "tf32", 256, 512, None),
)


@dataclass(frozen=True)
class Pick:
    """One dispatcher pick compiled: the configuration, the model's numbers and the compiler's."""

    cell: str
    direction: str
    dtype: str
    precision: str
    B: int
    H: int
    config: KernelConfig
    compiled: Compiled

    def row(self) -> dict:
        c, k = self.config, self.compiled
        mma = len(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)\S*", k.ptx))
        return {
            "cell": self.cell, "pass": self.direction, "dtype": self.dtype, "precision": self.precision,
            "B": self.B, "H": self.H, "strategy": c.strategy, "BB": c.BB, "BH": c.BH, "BK": f"{c.BK1}+{c.BK2}",
            "NKS": c.NKS, "NSPLIT": c.NSPLIT, "tagged": c.TAGGED, "partial": c.PARTIAL, "warps": c.num_warps, "stages": c.num_stages,
            "shared": k.shared, "shared_model": c.shared, "regs": k.regs, "regs_model": c.regs,
            "stack": k.stack, "loop_spills": k.loop_spills, "mma_static": mma, "est_step_us": round(c.step_us, 3),
        }  # fmt: skip


def picks(cases, gpu=None):
    """Compiles what `plan_layer` picks for each
    ``(cell, dtype, precision, B, H, strategy)`` (both passes, lengths and reverse on), yielding
    `Pick` or, where no configuration fits, ``(case, ValueError)``."""
    gpu = gpu or H100
    for cell, dtype_name, precision, B, H, strategy in cases:
        dtype = DTYPES[dtype_name]
        for backward in (False, True):
            try:
                cfg = make_config(cell, B, H, dtype, torch.device("cuda"), strategy, backward, gpu, precision)
            except ValueError as e:
                yield (cell, "bwd" if backward else "fwd", dtype_name, precision, B, H), e
                continue
            compiled = compile_config(cfg, B, H, dtype, precision)
            yield Pick(cell, "bwd" if backward else "fwd", dtype_name, precision, B, H, cfg, compiled)


def grid_cases():
    return [
        (cell, d, p, B, H, None) for cell in ("rnn", "lstm", "gru") for d, p in GRID_DTYPES for B in GRID_B
        for H in GRID_H
    ]  # fmt: skip


_MMA = re.compile(r"\b(wgmma\.mma_async|mma\.sync)\.\S*?\.m(\d+)n(\d+)k(\d+)")
_LD_GLOBAL = re.compile(r"\bld(?:\.volatile)?\.global(?:\.\w+)*?(?:\.v(\d))?\.(?:b|u|s|f)(\d+)\b")
_SHARED = re.compile(r"\b(?:ld\.shared|st\.shared|ldmatrix|stmatrix|cp\.async)\b")
_CP_ASYNC = re.compile(r"\bcp\.async\.\w+\.shared\.global\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(\d+)")


def _loop_blocks(ptx: str) -> dict[int, list[list[str]]]:
    """PTX instruction lines grouped by the loop they sit in, keyed by loop depth (0: outside every loop).

    A loop is a backward branch: the lines from the target label to the branch. Each innermost run of lines
    at one depth is one group. The retry loops of the tagged hand-off's polls (a loop of volatile loads, no
    MMA and no loop inside) are keyed ``"poll"``: they run only while a reader waits."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\$L__BB\d+_\d+):", line))}
    loops = []
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if m and labels.get(m.group(1), i + 1) <= i:
            loops.append((labels[m.group(1)], i))

    def is_poll(loop):
        a, b = loop
        text = "\n".join(lines[a : b + 1])
        nested = any(a < c <= d < b for c, d in loops)
        return "ld.volatile.global" in text and not _MMA.search(text) and not nested

    polls = {loop for loop in loops if is_poll(loop)}
    blocks: dict = {}
    previous = None
    for i, line in enumerate(lines):
        if not line.startswith("\t") or line.strip().startswith("//"):
            continue
        inside = tuple(loop for loop in loops if loop[0] <= i <= loop[1])
        key = "poll" if polls & set(inside) else len(inside)
        if inside != previous:
            blocks.setdefault(key, []).append([])
            previous = inside
        blocks[key][-1].append(line)
    return blocks


def step_costs(pick: Pick, gpu=None) -> dict:
    """Per time step of one program, from its sm_90 PTX: MMA and shared-memory instructions per warp, global
    bytes loaded, CTA barriers, and the MMA duplication against the program's minimum; with the model's
    first-order time (`estimate`) and its terms.

    Counting: instructions in the time loop's body once; in an inner loop (the streamed K chunks) times its
    trip count; the grid barrier's spin loop once (one poll); a tagged poll's retries not at all (its first load is
    counted where it sits). Global bytes are per program (all threads).
    """
    gpu = gpu or H100
    cfg, H = pick.config, pick.H
    G = GATES[pick.cell]
    blocks = _loop_blocks(pick.compiled.ptx)
    K_logical = G * H if cfg.backward and not cfg.PARTIAL else H
    trips = triton.cdiv(K_logical, cfg.BKC) if cfg.STREAM_W else 1
    mma = smem = bars = 0
    ld_bytes = 0
    shape = None
    polls = sum(len(_LD_GLOBAL.findall("\n".join(block))) for block in blocks.get("poll", []))
    for depth, blist in blocks.items():
        if depth == 0 or depth == "poll":
            continue
        for block in blist:
            text = "\n".join(block)
            spin = "atom.global" in text and depth >= 2
            n = 1 if depth == 1 or spin else trips
            found = _MMA.findall(text)
            if found:
                shape = tuple(int(v) for v in found[0][1:])
            mma += n * len(found)
            smem += n * len(_SHARED.findall(text))
            bars += n * len(re.findall(r"\bbar\.sync\b|\bbarrier\.sync\b", text))
            for vec, bits in _LD_GLOBAL.findall(text):
                ld_bytes += n * int(vec or 1) * int(bits) // 8
            ld_bytes += n * sum(int(size) for size in _CP_ASYNC.findall(text))
    threads = 32 * cfg.num_warps
    rows = cfg.BH if cfg.backward and not cfg.PARTIAL else (4 if G > 1 else 1) * cfg.BH
    if cfg.STREAM_W:
        K = trips * cfg.BKC
    elif cfg.backward and not cfg.SCRATCH:
        K = G * cfg.BK1
    else:
        K = cfg.BK1 + cfg.BK2
    out = {"mma_per_warp": mma, "mma_shape": "m{}n{}k{}".format(*shape) if shape else "none (FMA)"}
    if shape:
        m, n, k = shape
        minimum = rows * cfg.BB * K / (m * n * k)
        # wgmma is issued once per warpgroup (4 warps), mma.sync once per warp
        issuers = cfg.num_warps // 4 if m == 64 else cfg.num_warps
        out["mma_min_per_warp"] = minimum / issuers
        out["mma_duplication"] = mma * issuers / minimum
    out.update(
        smem_instr_per_warp=smem,
        cta_barriers=bars,
        handoff="-" if cfg.NSPLIT == 1 else ("tagged" if cfg.TAGGED else "barrier"),
        polls=polls,
        global_bytes_loaded=ld_bytes * threads,
        k_walked=K,
        k_needed=K_logical,
        regs=pick.compiled.regs,
        stack=pick.compiled.stack,
        loop_spills=pick.compiled.loop_spills,
        shared=pick.compiled.shared,
    )
    est = estimate(cfg, H, DTYPES[pick.dtype], pick.precision, gpu)
    out.update({f"est_{k}": v for k, v in est.items()})
    return out


# the static cost report: the headline shape of every cell in each dtype, and larger batches
REPORT_CASES = (
    ("lstm", "bf16", "tf32", 16, 768, None),
    ("gru", "bf16", "tf32", 16, 768, None),
    ("rnn", "bf16", "tf32", 16, 768, None),
    ("lstm", "fp16", "tf32", 16, 768, None),
    ("lstm", "fp32", "tf32", 16, 768, None),
    ("lstm", "bf16", "tf32", 64, 768, None),
    ("lstm", "bf16", "tf32", 256, 768, None),
    ("lstm", "bf16", "tf32", 16, 256, None),
    ("gru", "bf16", "tf32", 16, 1024, None),
)
# per layer-step at the headline shape (LSTM B=16 H=768 T=1024): the issue's targets and cuDNN fp16 on an H100
# (FlashRNN's published 2.0 ms forward, 5.2 ms forward+backward over 1024 steps)
TARGET_US = {"fwd": 1.0, "bwd": 2.0}
CUDNN_US = {"fwd": 2.0e3 / 1024, "bwd": (5.2e3 - 2.0e3) / 1024}


def static_report(cases=REPORT_CASES, gpu=None) -> tuple[list[dict], str]:
    """Compiles ``cases`` for sm_90 and returns one row per kernel (`step_costs` plus the configuration)
    and a Markdown report: the table, the rates the estimate uses, and the headline against the targets."""
    gpu = gpu or H100
    rows = []
    for pick in picks(cases, gpu):
        if isinstance(pick, tuple):
            (cell, direction, dtype, precision, B, H), error = pick
            rows.append(dict(cell=cell, pass_=direction, dtype=dtype, B=B, H=H, error=str(error)[:300]))
            continue
        c = pick.config
        rows.append(dict(cell=pick.cell, pass_=pick.direction, dtype=pick.dtype, B=pick.B, H=pick.H,
                         strategy=c.strategy, BB=c.BB, BH=c.BH, NSPLIT=c.NSPLIT, warps=c.num_warps,
                         **step_costs(pick, gpu)))  # fmt: skip
    head = ("| cell | pass | dtype | B | H | strategy | grid | warps | MMA/warp (shape) | min | dup | smem instr/warp "
            "| global B/step | CTA bar | hand-off (polled loads) | regs | stack (in-loop spill instr) | shared B | K walked/needed "
            "| est us/step |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['cell']} | {r['pass_']} | {r['dtype']} | {r['B']} | {r['H']} | no fit: {r['error']} |"
            )
            continue
        lines.append(
            f"| {r['cell']} | {r['pass_']} | {r['dtype']} | {r['B']} | {r['H']} | {r['strategy']} "
            f"| {triton.cdiv(r['B'], r['BB'])}x{r['NSPLIT']} | {r['warps']} | {r['mma_per_warp']} ({r['mma_shape']}) "
            f"| {r.get('mma_min_per_warp', 0):.0f} | {r.get('mma_duplication', 0):.2f} | {r['smem_instr_per_warp']} "
            f"| {r['global_bytes_loaded']} | {r['cta_barriers']} | {r['handoff']} ({r['polls']}) | {r['regs']} "
            f"| {r['stack']} ({r['loop_spills']}) "
            f"| {r['shared']} | {r['k_walked']}/{r['k_needed']} | {r['est_step_us']:.2f} |"
        )  # fmt: skip
    rates = (
        f"Rates ({gpu.name}, first order): {gpu.sms} SMs at {gpu.clock_ghz} GHz; shared memory "
        f"{gpu.smem_bytes_per_clk} B/clk/SM; L2 -> SM {gpu.l2_bytes_per_clk:.0f} B/clk/SM and {gpu.l2_latency_clk} "
        f"clk latency; one grid barrier {gpu.barrier_clk} clk; dense tensor rates per SM and clock: "
        + ", ".join(f"{k} {v}" for k, v in gpu.mma_flop_per_clk.items())
        + " FLOP. Step = max(MMA, shared-memory operand traffic) + L2 exchange (bytes + latency) + barrier; "
        "the tagged hand-off has no barrier, moves the exchanged operand as words twice its size (value and "
        "tag) and adds half an L2 latency (a reader's poll is in flight when the data lands)."
    )
    verdict = []
    for r in rows:
        if (r["cell"], r["dtype"], r["B"], r["H"]) == ("lstm", "bf16", 16, 768) and "error" not in r:
            p = r["pass_"]
            ok = r["est_step_us"] <= TARGET_US[p]
            verdict.append(
                f"- LSTM bf16 B=16 H=768 {p}: estimated {r['est_step_us']:.2f} us/step, target <= {TARGET_US[p]} us "
                f"({'met' if ok else 'NOT met'}), cuDNN fp16 ~{CUDNN_US[p]:.2f} us/step; MMA duplication "
                f"{r.get('mma_duplication', 0):.2f} (target <= 1.10); K walked {r['k_walked']} of {r['k_needed']}; "
                f"terms (clk): MMA {r['est_mma_clk']:.0f}, shared {r['est_smem_clk']:.0f}, L2 {r['est_l2_clk']:.0f}, "
                f"barrier {r['est_barrier_clk']}"
            )  # fmt: skip
    us = 1 / (gpu.clock_ghz * 1e3)
    barrier_floor = gpu.barrier_clk + gpu.l2_latency_clk
    tagged_floor = 1.5 * gpu.l2_latency_clk
    floor = (
        f"Floors under these rates of the step-to-step hand-off alone (no MMA, no bytes): publish, grid barrier, "
        f"read: {gpu.barrier_clk} + {gpu.l2_latency_clk} = {barrier_floor} clk = {barrier_floor * us:.2f} us, over "
        f"the forward target of {TARGET_US['fwd']} us by itself; tagged words: {gpu.l2_latency_clk} + "
        f"{gpu.l2_latency_clk // 2} = {tagged_floor:.0f} clk = {tagged_floor * us:.2f} us. The barrier's and L2's "
        f"costs are the estimate's least certain rates; the GPU session's headline stage times both hand-offs."
    )  # fmt: skip
    fwd = next((r for r in rows if (r["cell"], r["pass_"], r["dtype"], r["B"], r["H"])
                == ("lstm", "fwd", "bf16", 16, 768) and "error" not in r), None)  # fmt: skip
    if fwd is not None and fwd["est_step_us"] > TARGET_US["fwd"]:
        # the same step with the held slice out of shared memory: only the exchanged operand is staged there
        op_smem = fwd["BB"] * fwd["k_walked"] * 2 / gpu.smem_bytes_per_clk
        no_smem = max(fwd["est_mma_clk"], op_smem) + fwd["est_l2_clk"] + fwd["est_barrier_clk"]
        half = (
            max(fwd["est_mma_clk"], op_smem)
            + fwd["est_l2_clk"]
            - fwd["BB"] * fwd["k_walked"] * 2 / gpu.l2_bytes_per_clk
        )
        floor += (
            f" What the headline forward spends over its target: the product, paced by shared memory "
            f"({fwd['est_smem_clk']:.0f} clk: wgmma reads the held W_hh slice from shared memory every step; "
            f"triton places a held dot operand there, benchmarks/results/probe-held-operand.txt), and the exchange "
            f"({fwd['est_l2_clk']:.0f} clk, tagged words twice the operand's bytes). With the slice out of shared "
            f"memory the step would be {no_smem * us:.2f} us, still over; with that and a hand-off at the "
            f"operand's own 2 bytes a value, {half * us:.2f} us. Both need what triton's tl language does not "
            f"express (wgmma with its A operand in registers; per-producer flags behind a fence, or a cluster's "
            f"distributed shared memory), and a GPU to measure the fence."
        )  # fmt: skip
    return rows, "\n".join([*lines, "", rates, "", *verdict, "", floor])
