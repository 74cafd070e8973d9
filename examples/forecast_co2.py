"""Forecast the Mauna Loa CO2 record one month ahead with a small GRU, against a seasonal-naive baseline.

The weekly series that statsmodels ships (1958-2001, with gaps) is averaged to months; the model learns the
month-to-month change (the seasonal cycle) from the earlier years, and the last `--test-years` years are
forecast one step ahead (each month from the true history before it). The baseline repeats the value of
the same month one year earlier.

    pip install "rnndeploy[examples]"             # statsmodels
    python examples/forecast_co2.py               # ~1 minute on 2 CPU cores
    python examples/forecast_co2.py --steps 20    # a smoke run
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from rnndeploy.checkpoint import load_checkpoint
from rnndeploy.train import TrainOptions, train


def monthly_co2() -> np.ndarray:
    """Monthly mean CO2 in ppm (missing months interpolated), ``[months]`` float64."""
    try:
        from statsmodels.datasets import co2
    except ImportError:
        sys.exit("forecast_co2.py needs statsmodels for its data set: pip install 'rnndeploy[examples]'")
    weekly = co2.load_pandas().data["co2"]
    return weekly.resample("MS").mean().interpolate().to_numpy()


def errors(forecast: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    """Mean absolute error and root mean squared error."""
    return float(np.abs(forecast - actual).mean()), float(math.sqrt(((forecast - actual) ** 2).mean()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out-dir", type=Path, default=Path("runs/co2"))
    parser.add_argument("--test-years", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=100)
    args = parser.parse_args()

    level = monthly_co2()  # x[0..N-1]
    change = np.diff(level)  # d[k] = x[k+1] - x[k]
    n_test = 12 * args.test_years
    first_test = len(level) - n_test
    # train on the changes whose targets lie before the test months: d[0..first_test-2]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    train_file = args.out_dir / "co2_change.npy"
    np.save(train_file, change[: first_test - 1].astype(np.float32))
    print(f"{len(level)} months of CO2; training on the first {first_test}, forecasting the last {n_test}")

    options = TrainOptions(
        data=str(train_file),
        cell="gru",
        hidden=args.hidden,
        embed=16,
        seq_len=24,
        batch=4,
        steps=args.steps,
        lr=3e-3,
        eval_every=args.eval_every,
        valid_fraction=0.1,
        device="cpu",
        out=args.out_dir / "model.pt",
        overwrite=True,  # the example's folder is its own; a rerun starts over
    )
    result = train(options)
    print(f"validation MSE (normalised change): {result.first_valid:.3f} -> {result.last_valid:.3f}")

    # One forward pass over the whole history; the output at position k predicts d[k+1].
    ckpt = load_checkpoint(result.checkpoint)
    mean, std = ckpt.data_stats["mean"][0], ckpt.data_stats["std"][0]
    x = torch.tensor((change - mean) / std, dtype=torch.float32)[None, :, None]  # [1, N-1, 1]
    with torch.no_grad():
        y, _ = ckpt.model(x)
    predicted_change = y[0, :, 0].numpy() * std + mean  # predicted_change[k] ~ d[k+1] = x[k+2] - x[k+1]
    months = np.arange(first_test, len(level))
    model_forecast = level[months - 1] + predicted_change[months - 2]
    seasonal_naive = level[months - 12]
    actual = level[months]

    print(f"{'one month ahead':<28}{'MAE (ppm)':>10}{'RMSE (ppm)':>12}")
    for name, forecast in (
        (f"{options.cell.upper()} {args.hidden}", model_forecast),
        ("seasonal naive", seasonal_naive),
    ):
        mae, rmse = errors(forecast, actual)
        print(f"{name:<28}{mae:>10.3f}{rmse:>12.3f}")
    print(f"checkpoint {result.checkpoint}, log {result.log}, loss curve {result.plot}")


if __name__ == "__main__":
    main()
