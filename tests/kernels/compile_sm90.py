"""Compiles the dispatcher's picks for sm_90 (H100/H200) ahead of time, without a GPU; one JSON line each.

    python tests/kernels/compile_sm90.py            # the representative subset (the default test runs it)
    python tests/kernels/compile_sm90.py --grid     # the whole grid of the issue (slow: minutes)

Run WITHOUT TRITON_INTERPRET (the interpreter replaces the kernels). Each line holds the configuration, the
model's shared memory and registers, and the compiler's (``shared`` from triton's metadata, ``regs`` and
``stack`` from ``cuobjdump -res-usage``); a shape nothing fits prints ``{"error": ...}``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # kernels_aot: not installed

from kernels_aot import SUBSET, grid_cases, picks  # noqa: E402


def main(argv: list[str]) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels")
    cases = grid_cases() if "--grid" in argv else SUBSET
    for pick in picks(cases):
        if isinstance(pick, tuple):
            (cell, direction, dtype, precision, B, H), error = pick
            line = dict(
                cell=cell, direction=direction, dtype=dtype, precision=precision, B=B, H=H, error=str(error)
            )
            print(json.dumps(line), flush=True)
        else:
            print(json.dumps(pick.row()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
