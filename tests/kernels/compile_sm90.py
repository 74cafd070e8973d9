"""Compiles every kernel for sm_90 (H100) ahead of time, without a GPU, and prints its resource use.

Run as a script WITHOUT TRITON_INTERPRET (the interpreter replaces the kernels): one line per kernel and
launch strategy, ``name strategy dtype shared_bytes registers stack_bytes``. Used by test_kernels.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rnndeploy.kernels import gru, lstm, rnn

POINTER = {"p_len": "*i64", "p_bar": "*i32", "p_scr": "*fp32"}
# (strategy, dtype, BB, BH, BK, NSPLIT, STREAM_W, SCRATCH): what make_config picks for B=16 and H = 64, 128,
# 768 bf16 and 768 fp32 on a 132-SM H100
CASES = [
    ("resident", "fp32", 16, 64, 64, 1, False, False),
    ("stream", "bf16", 16, 128, 128, 1, True, True),
    ("split", "bf16", 16, 16, 1024, 48, False, True),
    ("split-stream", "fp32", 16, 16, 1024, 48, True, True),
]


def resources(kernel) -> tuple[int, int]:
    """(registers, stack bytes) per thread, from the cubin."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return int(m.group(1)), int(m.group(2))


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels")
    for module, cell in ((rnn, "rnn"), (lstm, "lstm"), (gru, "gru")):
        for kind in ("fwd", "bwd"):
            fn = getattr(module, f"{cell}_{kind}_kernel")
            for strategy, dtype, BB, BH, BK, NSPLIT, STREAM_W, SCRATCH in CASES:
                consts = dict(BB=BB, BH=BH, BK=BK, BKC=min(BK, 64), NSPLIT=NSPLIT, STREAM_W=STREAM_W,
                              SCRATCH=SCRATCH, REVERSE=True, HAS_LENGTHS=True, PRECISION="tf32")  # fmt: skip
                for flag in ("HAS_BIAS", "STORE_WS"):
                    if flag in fn.arg_names:
                        consts[flag] = True
                if "RELU" in fn.arg_names:
                    consts["RELU"] = False
                signature = {
                    name: "constexpr"
                    if name in consts
                    else POINTER.get(name, f"*{dtype}")
                    if name[:2] == "p_"
                    else "i32"
                    for name in fn.arg_names
                }
                kernel = triton.compile(
                    ASTSource(fn=fn, signature=signature, constexprs=consts),
                    target=GPUTarget("cuda", 90, 32),
                    options={"num_warps": 8},
                )
                regs, stack = resources(kernel)
                print(
                    f"{cell}_{kind}_kernel {strategy} {dtype} {kernel.metadata.shared} {regs} {stack}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
