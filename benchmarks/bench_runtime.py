"""Runtime and server benchmarks (rnndeploy.bench.runtime): the same as `rnndeploy bench runtime`.

python benchmarks/bench_runtime.py [--quick] [--out DIR] [--no-server]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rnndeploy.bench.runtime import DEFAULT_OUT, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes (a smoke run)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default ./{DEFAULT_OUT})"
    )
    parser.add_argument("--no-server", action="store_true", help="skip the server benchmark")
    args = parser.parse_args()
    main(quick=args.quick, out=args.out, server=not args.no_server)
