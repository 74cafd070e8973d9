"""Where triton keeps a dot operand that is loaded once and used every step (sm_90, no GPU needed).

The forward's held ``W_hh`` slice is read from shared memory by every step's product, and that read paces the
step at the headline shape (benchmarks/results/kernels-static-triton*.md). If the compiler kept the slice in
registers (wgmma's register-A form, or mma.sync fragments held across steps), the step would lose that term. This probe
compiles the smallest kernel of that shape, a ``[M, K]`` operand loaded before a time loop and multiplied with a
fresh ``[K, N]`` operand each step, in the plain 2-D form and in the split-K batched form (``[S, M, K/S]``, one
slice per warp group of the warps), and prints what the compiler did: shared memory per block, and the shared
memory reads (``ldmatrix``, ``ld.shared``) and MMAs inside the loop.

    python benchmarks/probe_held_operand.py

Run with ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@triton.jit
def _held(p_w, p_x, p_o, T, S: tl.constexpr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    if S == 1:
        w = tl.load(p_w + tl.arange(0, M)[:, None] * K + tl.arange(0, K)[None, :])
        acc = tl.zeros([M, N], dtype=tl.float32)
        for t in range(T):
            x = tl.load(
                p_x + t * K * N + tl.arange(0, K)[:, None] * N + tl.arange(0, N)[None, :], volatile=True
            )
            acc = tl.dot(w, x) + acc * 0.5
            tl.store(p_o + t * M * N + tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :], acc)
    else:
        KS: tl.constexpr = K // S
        o_s = tl.arange(0, S)[:, None, None]
        w = tl.load(p_w + tl.arange(0, M)[None, :, None] * K + o_s * KS + tl.arange(0, KS)[None, None, :])
        acc = tl.zeros([M, N], dtype=tl.float32)
        for t in range(T):
            p = (
                p_x
                + t * K * N
                + (o_s * KS + tl.arange(0, KS)[None, :, None]) * N
                + tl.arange(0, N)[None, None, :]
            )
            x = tl.load(p, volatile=True)
            acc = tl.sum(tl.dot(w, x), axis=0) + acc * 0.5
            tl.store(p_o + t * M * N + tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :], acc)


def _in_loop(ptx: str, pattern: str) -> int:
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\$L__BB\d+_\d+):", line))}
    count = 0
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if m and labels.get(m.group(1), i + 1) <= i:
            count += sum(len(re.findall(pattern, x)) for x in lines[labels[m.group(1)] : i + 1])
    return count


def probe(S: int, M: int = 64, K: int = 1024, N: int = 16, warps: int = 4) -> dict:
    sig = {"p_w": "*bf16", "p_x": "*bf16", "p_o": "*fp32", "T": "i32"}
    sig.update({k: "constexpr" for k in ("S", "M", "K", "N")})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(3)}
    src = ASTSource(fn=_held, signature=sig, constexprs=dict(S=S, M=M, K=K, N=N), attrs=attrs)
    kernel = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1}
    )
    ptx = kernel.asm["ptx"]
    return {
        "form": "2-D" if S == 1 else f"batched, {S} K slices",
        "warps": warps,
        "held_bytes": M * K * 2,
        "shared": kernel.metadata.shared,
        "shared_reads_in_loop": _in_loop(ptx, r"\bldmatrix\b|\bld\.shared\b"),
        "mma_in_loop": _in_loop(ptx, r"\bwgmma\.mma_async\b|\bmma\.sync\b"),
        "register_A_wgmma": bool(re.search(r"wgmma\.mma_async\S*\s+\{[^}]*\},\s*\{", ptx)),
    }


def main() -> None:
    import platform
    from pathlib import Path

    import torch

    from rnndeploy.provenance import git_commit

    commit = git_commit(Path(__file__).resolve().parent)
    print(
        f"sm_90, compiled ahead of time without a GPU on {platform.node()} ({platform.machine()}); triton "
        f"{triton.__version__}, torch {torch.__version__}, python {platform.python_version()}, commit {commit}"
    )
    print("held operand [64, 1024] bf16 (131072 B) x [1024, 16] per step")
    for S, warps in ((1, 4), (2, 8), (4, 8), (8, 8)):
        r = probe(S, warps=warps)
        print(
            f"{r['form']:22} warps={r['warps']}: shared {r['shared']} B (held operand there: "
            f"{r['shared'] >= r['held_bytes']}), in the loop {r['shared_reads_in_loop']} ldmatrix/ld.shared and "
            f"{r['mma_in_loop']} MMAs, wgmma with A in registers: {r['register_A_wgmma']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
