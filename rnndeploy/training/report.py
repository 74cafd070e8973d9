"""What a person at the terminal is told: what runs where before the first step, and a line per validation
when there is no progress bar."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rnndeploy.data import Dataset
from rnndeploy.models import SequenceModel
from rnndeploy.training.options import TrainOptions
from rnndeploy.training.runlog import RunLog
from rnndeploy.training.validation import metric_value


def describe_device(device: torch.device, backend: str, threads: int) -> str:
    """One line naming the device, the recurrent backend that runs there and the CPU thread count."""
    if backend == "auto":
        backend = "auto (Triton kernels where measured faster, else cuDNN)"
        if device.type != "cuda":
            backend = "auto: torch (the Triton kernels are for CUDA GPUs)"
    return f"{device}; recurrent backend {backend}; {threads} CPU thread{'s' if threads > 1 else ''}"


def start_report(
    options: TrainOptions,
    device: torch.device,
    world_size: int,
    data: Dataset,
    model: SequenceModel,
    start: int,
    log: RunLog,
) -> str:
    """The lines printed before the first step: device, data, model and the files the run writes."""
    why = ""
    if options.device == "auto":
        why = " (auto: CUDA GPU found)" if device.type == "cuda" else " (auto: torch sees no CUDA GPU)"
    source = "builtin corpus (Python's pydoc topics)" if data.source == "builtin" else data.source
    unit = "characters" if data.kind == "text" else "time steps"
    kind = f"vocabulary {len(data.vocab)}" if data.vocab else f"{data.num_features} feature(s)"
    params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    begin = f"resuming at step {start} of {options.steps}" if start else f"{options.steps} steps"
    processes = f", {world_size} processes" if world_size > 1 else ""
    where, _, rest = describe_device(device, options.backend, torch.get_num_threads()).partition(";")
    return (
        f"device:  {where}{why}{processes};{rest}\n"
        f"data:    {source}: {len(data.train):,} training / {len(data.valid):,} validation "
        f"{unit}, {kind}\n"
        f"model:   {cfg.cell.upper()} {cfg.hidden_size} x {cfg.num_layers} ({cfg.task}), {params:,} "
        f"parameters; {begin}, batch {options.batch} x {options.seq_len}\n"
        f"files:   {options.out} (checkpoint every {options.eval_every} steps), {log.file}, {log.plot_file}"
    )


class Progress:
    """The loop's figures for a person: tokens per second (a moving average over the steps, validations left
    out), the mean training loss since the last validation, the progress bar's postfix and, given ``echo``
    (no bar), a line per validation."""

    def __init__(
        self,
        bar: tqdm,
        metric: str,
        tokens_per_step: int,
        steps: int,
        out: Path,
        echo: Callable[[str], None] | None,
    ) -> None:
        self.bar, self.metric, self.tokens_per_step = bar, metric, tokens_per_step
        self.steps, self.out, self.echo = steps, out, echo
        self.loss_sum, self.loss_count, self.rate = 0.0, 0, 0.0
        self.restart_clock()

    @property
    def train_loss(self) -> float:
        """The mean training loss of the steps since the last validation."""
        return self.loss_sum / self.loss_count

    def restart_clock(self) -> None:
        """Starts timing the next step here, so that what ran since the last step is not counted."""
        self.t_last = time.perf_counter()

    def stepped(self, loss: float) -> None:
        """Counts a step that ended now with training loss ``loss``."""
        now = time.perf_counter()
        current = self.tokens_per_step / (now - self.t_last)
        self.rate = current if self.rate == 0 else 0.9 * self.rate + 0.1 * current
        self.t_last = now
        self.loss_sum, self.loss_count = self.loss_sum + loss, self.loss_count + 1
        self.bar.update(1)
        self.bar.set_postfix(
            {self.metric: f"{metric_value(self.metric, loss):.3f}", "tok/s": f"{self.rate:,.0f}"},
            refresh=False,
        )

    def validated(self, step: int, record: dict[str, Any] | None) -> None:
        """Shows the validation of ``step`` (its ``record``; ``None`` on the processes that do not validate)
        and starts a new training-loss mean."""
        self.loss_sum, self.loss_count = 0.0, 0
        if record is None:
            return
        m, rate = self.metric, f"{self.rate:,.0f}"
        train, valid = record[f"train_{m}"], record[f"valid_{m}"]
        if self.echo is not None:
            self.echo(
                f"step {step}/{self.steps}: train {m} {train:.3f}, validation {m} {valid:.3f}, "
                f"{rate} tok/s, saved {self.out}"
            )
        self.bar.set_postfix({m: f"{train:.3f}", f"val_{m}": f"{valid:.3f}", "tok/s": rate})
