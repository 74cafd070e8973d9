"""What a person at the terminal is told: what runs where before the first step, and a line per validation
when there is no progress bar."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rnndeploy.data import Dataset
from rnndeploy.models import SequenceModel
from rnndeploy.training.options import TrainOptions
from rnndeploy.training.runlog import RunLog


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


def eval_line(step: int, steps: int, metric: str, record: dict[str, Any], rate: float, out: Path) -> str:
    """The line printed per validation when there is no progress bar."""
    train, valid = record[f"train_{metric}"], record[f"valid_{metric}"]
    return (
        f"step {step}/{steps}: train {metric} {train:.3f}, validation {metric} {valid:.3f}, "
        f"{rate:,.0f} tok/s, saved {out}"
    )
