"""Long time lags on the Python API: the adding problem of Hochreiter & Schmidhuber (1997), RNN against LSTM.

Trains each cell online on fresh sequences until the paper's stop criterion (average error below 0.01 and
the last 2,000 sequences all within 0.04) or the budget, tests it on 2,560 fresh sequences against the
baseline that always predicts the mean, and draws how much of the gradient of the loss at the last step
reaches each earlier hidden state (``rnndeploy.diagnostics.gradient_flow``).

    python examples/long_lag.py                          # T=50, RNN and LSTM: about a minute on 2 CPU cores
    python examples/long_lag.py --T 20 --budget 2000     # a smoke run
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from rnndeploy.diagnostics import gradient_flow, write_report
from rnndeploy.longlag import AddingProblem, TrainSettings, train_on_task


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--T", type=int, default=50, help="minimal sequence length")
    parser.add_argument("--cells", default="rnn,lstm", help="comma-separated: rnn, lstm, gru")
    parser.add_argument("--budget", type=int, default=100_000, help="most training sequences per cell")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/long_lag"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    task = AddingProblem(args.T)
    settings = TrainSettings(hidden=args.hidden, budget=args.budget, gate_bias=5.0, backend="torch")
    probe = task.sample(256, torch.Generator().manual_seed(1), length=args.T)
    print(f"adding problem, T={args.T}: {'cell':5} {'solved after':>14} {'test MSE':>9} {'correct':>8}")
    flows = []
    for cell in args.cells.split(","):
        result = train_on_task(task, cell, settings)
        solved = f"{result.solved_at:,} seq" if result.solved_at is not None else "not solved"
        print(f"{'':22}{cell:5} {solved:>14} {result.test_error:9.4f} {result.test_correct:8.3f}")
        flows.append(gradient_flow(result.model, probe.x, probe.target, label=cell.upper()))
    print(f"{'':22}{'mean':5} {'baseline':>14} {result.baseline_error:9.4f} {result.baseline_correct:8.3f}")
    for flow in flows:
        norms = flow.h_norm[0]
        print(f"{flow.label}: ||dL/dh_0|| / ||dL/dh_{args.T - 1}|| = {norms[0] / norms[-1]:.3g}")
    png, json_path = args.out_dir / "gradflow.png", args.out_dir / "gradflow.json"
    write_report(flows, png, json_path, f"adding problem, T={args.T}, trained models")
    print(f"wrote {png} and {json_path}")


if __name__ == "__main__":
    main()
