"""The run's JSON-lines log (one record per start, validation, end and event) and its loss-curve plot."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from rnndeploy.checkpoint import atomic_write, write_error
from rnndeploy.data import Dataset
from rnndeploy.training.options import TrainError, TrainOptions, log_path, plot_path


class RunLog:
    """The run's JSON-lines log and loss-curve plot beside checkpoint ``out``; only rank 0 writes them."""

    def __init__(self, out: Path, writes: bool) -> None:
        self.file, self.plot_file, self.writes = log_path(out), plot_path(out), writes

    def restart(self, resumed: Path | None, upto: int) -> list[dict[str, Any]]:
        """Rewrites the log with the records of ``resumed``'s log up to step ``upto``; returns their evals."""
        if not self.writes:
            return []
        records = []
        if resumed is not None and log_path(resumed).is_file():
            records = [r for r in read_log(log_path(resumed)) if r.get("step", 0) <= upto]
        text = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write(self.file, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return [r for r in records if r.get("event") == "eval"]

    def append(self, **record: Any) -> None:
        if not self.writes:
            return
        record["time"] = time.time()
        try:
            with self.file.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise write_error(self.file, exc, "appending a record", kept=False) from None

    def start(
        self,
        step: int,
        options: TrainOptions,
        world_size: int,
        device: torch.device,
        data: Dataset,
        parameters: int,
    ) -> None:
        """The record that opens a session: its options, where it runs, its data and model size."""
        self.append(
            event="start",
            step=step,
            options=options.to_dict(),
            world_size=world_size,
            device=str(device),
            torch=torch.__version__,
            data={
                "kind": data.kind,
                "source": data.source,
                "train_steps": len(data.train),
                "valid_steps": len(data.valid),
                "vocab_size": len(data.vocab) if data.vocab else None,
            },
            parameters=parameters,
        )

    def replicas(self, step: int, world_size: int, difference: float | None) -> bool | None:
        """Logs whether every replica holds the same parameters, given their largest difference
        (``None``: one process, nothing to compare)."""
        if difference is None:
            return None
        self.append(
            event="replicas",
            step=step,
            world_size=world_size,
            identical=difference == 0.0,
            max_abs_diff=difference,
        )
        return difference == 0.0

    def plot(self, history: list[dict[str, Any]], metric: str, title: str) -> None:
        """Draws the training and validation curves of ``history`` (eval records)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        unit = "bits per character" if metric == "bpc" else "mean squared error (normalised)"
        trained = [r for r in history if f"train_{metric}" in r]
        if trained:
            ax.plot(
                [r["step"] for r in trained],
                [r[f"train_{metric}"] for r in trained],
                label="train (mean since the previous point)",
            )
        ax.plot(
            [r["step"] for r in history], [r[f"valid_{metric}"] for r in history], "o-", label="validation"
        )
        ax.set_xlabel("step")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write(self.plot_file, lambda tmp: fig.savefig(tmp, format="png"))


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log; a torn last line (a write cut short by a crash) is left out."""
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise TrainError(
                f"log {path} line {number} is not JSON; move the log aside to resume without its history"
            ) from None
        if isinstance(record, dict):
            records.append(record)
    return records
