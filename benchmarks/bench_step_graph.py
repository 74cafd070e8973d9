"""The one-step graph against the sequence graph (rnndeploy.bench.forms; also part of `rnndeploy bench runtime`),
here with int8's accuracy change on trained checkpoints: ``--checkpoints DIR`` holding ``gru.pt``, ``rnn.pt``,
``lstm.pt``. The committed results used: ``gru.pt`` from ``python examples/forecast_co2.py --hidden 64``
(monthly CO2, GRU 1x64, embed 16), ``rnn.pt`` from ``rnndeploy train --cell rnn --hidden 128 --steps 500
--device cpu`` and ``lstm.pt`` from ``rnndeploy train --layers 2 --steps 200 --device cpu`` (the builtin text).

    python benchmarks/bench_step_graph.py [--checkpoints DIR] [--steps 200] [--blocks 15]

Writes benchmarks/results/step-graph.json, .csv and .png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rnndeploy.bench.forms import MODELS, run

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoints", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=200, help="calls per block")
    parser.add_argument("--blocks", type=int, default=15, help="alternating blocks per case")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    run(RESULTS, args.steps, args.blocks, args.models, args.checkpoints)
