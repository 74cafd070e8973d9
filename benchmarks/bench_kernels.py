"""Kernel benchmark script: the same as `rnndeploy bench kernels` (all options pass through).

python benchmarks/bench_kernels.py --cells lstm --batch 16 --hidden 768 --seq-len 1024 --dtypes bf16
"""

import sys

from rnndeploy.cli import main

if __name__ == "__main__":
    main(["bench", "kernels", *sys.argv[1:]], prog_name="bench_kernels.py")
