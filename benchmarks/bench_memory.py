"""Long-time-lag benchmark (rnndeploy.bench.memory) with its default settings; `rnndeploy bench memory` takes
every option (hidden size, batch, budget, learning rate, gate bias, backends).

    python benchmarks/bench_memory.py [--quick] [--device cpu] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from rnndeploy.bench.memory import DEFAULT_OUT, QUICK_BUDGET, QUICK_LENGTHS, main, task_settings
from rnndeploy.train import resolve_device

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="T=20 and 2000 sequences per run (a smoke run)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default ./{DEFAULT_OUT})"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    tasks = ["adding", "copy"]
    device = str(resolve_device(args.device))
    budget = QUICK_BUDGET if args.quick else None
    settings = task_settings(tasks, 32, 32, None, budget, 0, device, 5.0)
    lengths = QUICK_LENGTHS if args.quick else [50, 100, 200]
    main(tasks, ["rnn", "lstm", "gru"], lengths, ["torch"], settings, None, args.out,
         progress=lambda s: print(f"  {s}", file=sys.stderr))  # fmt: skip
