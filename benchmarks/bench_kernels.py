"""Static cost report of the kernels (GPU timings: `rnndeploy bench kernels`, rnndeploy.bench.kernels).

    python benchmarks/bench_kernels.py static         # static cost report: sm_90 compiles, no GPU needed
    python benchmarks/bench_kernels.py static --grid  # + every dispatcher pick of the issue's grid (slow)

The static report compiles what the dispatcher picks for sm_90 (H100/H200) on this machine and writes
benchmarks/results/kernels-static-triton<release>.{md,json} (with --grid also
kernels-sm90-grid-triton<release>.{md,jsonl}; code generation differs by triton release, so a file each): per
kernel and time step, MMA and shared-memory instructions per warp (PTX), global bytes, barriers, registers,
spills, shared memory and a first-order time estimate from published H100 rates.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _provenance() -> dict:
    import torch
    import triton

    from rnndeploy.provenance import git_commit

    return {"target": "sm_90 (H100/H200), compiled ahead of time without a GPU", "triton": triton.__version__,
            "torch": torch.__version__, "python": platform.python_version(),
            "commit": git_commit(Path(__file__).resolve().parent)}  # fmt: skip


def static(grid: bool) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels")
    from kernels_aot import grid_cases, picks, results_stem, static_report

    env = _provenance()
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    rows, text = static_report()
    print(text, flush=True)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / results_stem("static")
    Path(f"{stem}.md").write_text(f"# Static cost per time step (sm_90)\n\n{header}\n\n{text}\n")
    Path(f"{stem}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    print(f"wrote {stem}.md and .json", flush=True)
    if not grid:
        return
    keys = ("cell", "pass", "dtype", "precision", "B", "H", "strategy", "tagged", "partial", "BB", "BH", "BK", "NKS",
            "NSPLIT", "warps", "stages", "shared", "shared_model", "regs", "regs_model", "stack", "loop_spills", "mma_static",
            "est_step_us")  # fmt: skip
    table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    stem = RESULTS / results_stem("sm90-grid")
    with open(f"{stem}.jsonl", "w") as lines:
        for pick in picks(grid_cases()):
            if isinstance(pick, tuple):
                (cell, direction, dtype, precision, B, H), error = pick
                row = dict(
                    cell=cell,
                    direction=direction,
                    dtype=dtype,
                    precision=precision,
                    B=B,
                    H=H,
                    error=str(error),
                )
                table.append(
                    f"| {cell} | {direction} | {dtype} | {precision} | {B} | {H} | no fit: {error} |"
                )
            else:
                row = pick.row()
                table.append("| " + " | ".join(str(row[k]) for k in keys) + " |")
            lines.write(json.dumps(row) + "\n")
            lines.flush()
    Path(f"{stem}.md").write_text(
        f"# Every dispatcher pick compiled for sm_90\n\n{header}\n\n" + "\n".join(table) + "\n"
    )
    print(f"wrote {stem}.md ({len(table) - 2} kernels)", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] != ["static"]:
        sys.exit(f"usage: python {sys.argv[0]} static [--grid]; GPU timings: rnndeploy bench kernels --help")
    static("--grid" in sys.argv[2:])
