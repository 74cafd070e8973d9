"""The run's checkpoint: what each process carries into it (state, RNG), saving and restoring it, and the
checks that a resume continues the same run on the same data."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rnndeploy.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from rnndeploy.data import Dataset
from rnndeploy.models import SequenceModel
from rnndeploy.training.options import RUN_DEFINING, TrainError, TrainOptions
from rnndeploy.training.processes import Processes


def options_for_resume(checkpoint: str | Path, **given: Any) -> TrainOptions:
    """The options of the run saved in ``checkpoint``, updated with ``given`` (e.g. a larger ``steps``)."""
    saved = load_checkpoint(checkpoint).extra.get("options")
    if not saved:
        raise TrainError(f"checkpoint {checkpoint} was not written by rnndeploy train (no saved options)")
    if not isinstance(saved, dict):
        raise TrainError(
            f"checkpoint {checkpoint} is damaged: its saved options should be a dict, found "
            f"{type(saved).__name__}"
        )
    session_only = ("overwrite", "allow_data_change")  # permissions given to one session, not to the run
    saved = {k: v for k, v in saved.items() if k not in session_only}
    merged = {**saved, "out": None, **given, "resume": Path(checkpoint)}
    try:
        return TrainOptions(**merged)
    except TypeError as exc:
        raise TrainError(
            f"checkpoint {checkpoint} is damaged: its saved options do not fit ({exc})"
        ) from None


def check_out_is_free(options: TrainOptions) -> None:
    """Refuses to replace an existing checkpoint that this run neither resumes nor may overwrite."""
    out = options.out
    if options.overwrite or not out.exists():
        return
    if options.resume is not None and out.resolve() == options.resume.resolve():
        return
    try:
        held = f"a checkpoint at step {load_checkpoint(out).step}"
    except CheckpointError:
        held = "a file that is not an rnndeploy checkpoint"
    raise TrainError(
        f"--out {out} already exists ({held}) and this run would replace it. Continue that run with "
        f"`rnndeploy train --resume {out}` (Python: resume={str(out)!r}), write this one elsewhere with --out "
        "(out=...), or pass --overwrite (overwrite=True) to replace it"
    )


def check_resumable(ckpt: Checkpoint, options: TrainOptions) -> None:
    """Refuses to resume from ``ckpt`` with options that define another run, or to a step it has passed."""
    saved = ckpt.extra.get("options")
    if not saved:
        raise TrainError(f"checkpoint {options.resume} was not written by rnndeploy train (no saved options)")
    now = options.to_dict()
    # allow_data_change lets the data be another file as well as the same file changed
    defining = [k for k in RUN_DEFINING if not (k == "data" and options.allow_data_change)]
    changed = [
        f"{k}: {saved.get(k)!r} in the checkpoint, {now[k]!r} now" for k in defining if saved.get(k) != now[k]
    ]
    if changed:
        raise TrainError(
            f"--resume continues the run saved in {options.resume}, but these options differ: "
            + "; ".join(changed)
            + ". Keep them, or start a new run without --resume."
        )
    if ckpt.step >= options.steps:
        raise TrainError(
            f"checkpoint {options.resume} is already at step {ckpt.step}; give --steps larger than that"
        )


def check_same_data(ckpt: Checkpoint, options: TrainOptions, data: Dataset, fingerprint: Any) -> None:
    """Refuses to resume on other training data (unless ``allow_data_change``), naming both fingerprints."""
    saved = ckpt.extra.get("data_fingerprint")
    if options.allow_data_change:
        return
    if saved is not None and saved != fingerprint:
        raise TrainError(
            f"--resume {options.resume}: the training data differs from the data this checkpoint was trained "
            f"on (checkpoint: {_describe(saved)}; {data.source} now: {_describe(fingerprint)}). "
            "Resume on the same data, or allow the change with --allow-data-change "
            "(allow_data_change=True in Python)"
        )
    if data.kind == "series" and not _same_stats(ckpt.data_stats, data.data_stats):
        raise TrainError(f"data {options.data} is not the series checkpoint {options.resume} was trained on")


class Checkpoints:
    """The run's checkpoint: what each process carries into it (state, RNG), saving, and restoring.

    ``saved_step`` is the step the checkpoint on disk holds for this run (``None``: this run has none yet).
    """

    def __init__(self, out: Path, processes: Processes) -> None:
        self.out, self.processes = out, processes
        self.saved_step: int | None = None

    def gather_rank_state(self, state: tuple[Tensor, ...] | None) -> list[dict[str, Any]]:
        """Every process's carried recurrent state and RNG states, in rank order."""
        device = self.processes.device
        mine = {
            "state": None if state is None else [s.detach().cpu() for s in state],
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }
        return self.processes.gather(mine)

    def restore_rank_state(self, extra: dict[str, Any]) -> tuple[Tensor, ...] | None:
        """Sets this process's RNG states from ``extra["ranks"]`` and returns its carried state."""
        rank, world_size, device = self.processes.rank, self.processes.world_size, self.processes.device
        ranks = extra.get("ranks") or []
        if len(ranks) != world_size:
            warnings.warn(
                f"the checkpoint was written by {len(ranks)} process(es), this run has {world_size}: "
                "the carried state restarts from zeros and the data streams are cut differently",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        saved = ranks[rank]
        torch.set_rng_state(saved["rng"])
        if device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
        if saved["state"] is None:
            return None
        return tuple(s.to(device) for s in saved["state"])

    def resume(
        self, ckpt: Checkpoint, optimizer: torch.optim.Optimizer, path: Path
    ) -> tuple[Tensor, ...] | None:
        """Restores ``optimizer`` and this process's RNG states from checkpoint ``ckpt`` (read from ``path``)
        and returns the carried state."""
        try:
            optimizer.load_state_dict(ckpt.optimizer)
            state = self.restore_rank_state(ckpt.extra)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
            raise TrainError(
                f"checkpoint {path} is damaged: its optimizer or per-process state cannot be "
                f"restored ({type(exc).__name__}: {exc})"
            ) from None
        if self.out.resolve() == path.resolve():
            self.saved_step = ckpt.step
        return state

    def save(
        self,
        step: int,
        model: SequenceModel,
        optimizer: torch.optim.Optimizer,
        data: Dataset,
        options: TrainOptions,
        ranks: list[dict[str, Any]],
        position: tuple[int, int],
        fingerprint: Any,
    ) -> None:
        """Writes the checkpoint of ``step`` (rank 0 alone calls this): the model and optimizer, the run's
        options, every process's carried state and RNG (``ranks``, from `gather_rank_state`), the data
        position (epoch, chunk) and the training split's fingerprint."""
        extra = {
            "options": options.to_dict(),
            "ranks": ranks,
            "world_size": self.processes.world_size,
            "data_position": dict(zip(("epoch", "chunk"), position, strict=True)),
            "data_fingerprint": fingerprint,
        }
        save_checkpoint(
            self.out,
            model,
            vocab=data.vocab,
            step=step,
            data_stats=data.data_stats,
            optimizer=optimizer,
            extra=extra,
        )
        self.saved_step = step


def _describe(fingerprint: Any) -> str:
    if isinstance(fingerprint, dict):
        return f"{fingerprint.get('steps')} steps, sha256 {str(fingerprint.get('sha256'))[:16]}"
    return repr(fingerprint)[:80]


def _same_stats(a: dict[str, Any], b: dict[str, Any]) -> bool:
    try:
        return all(
            k in a and k in b and torch.allclose(torch.tensor(a[k]), torch.tensor(b[k]))
            for k in ("mean", "std")
        )
    except (TypeError, ValueError, RuntimeError):
        return False  # statistics of the wrong type or shape are not the same statistics
