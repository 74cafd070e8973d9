"""Checkpoints: model config (JSON), weights, vocabulary, data statistics, optimizer state and step.

Files are written atomically (temporary file in the same folder, then ``os.replace``), so a crash mid-write
never leaves a truncated checkpoint where a good one was.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rnndeploy.models import ModelConfig, SequenceModel

FORMAT = "rnndeploy-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not an rnndeploy checkpoint."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model plus everything saved beside it."""

    model: SequenceModel
    config: ModelConfig
    vocab: list[str] | None = None
    step: int = 0
    data_stats: dict[str, Any] = field(default_factory=dict)
    optimizer: dict | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def atomic_write(path: Path, write) -> None:
    """Calls ``write(tmp_path)`` and then renames the temporary file over ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        error = OSError(f"cannot write {path}: {exc.strerror} (creating a file in {path.parent} failed)")
        error.errno = exc.errno
        raise error from exc
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates the file 0600; give it the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    path: str | Path,
    model: SequenceModel,
    *,
    vocab: list[str] | None = None,
    step: int = 0,
    data_stats: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Writes ``model`` and its context to ``path`` atomically and returns the path."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "config": model.config.to_json(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "vocab": vocab,
        "step": step,
        "data_stats": data_stats or {},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "extra": extra or {},
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path


def _check_checkpoint_file(path: Path) -> None:
    """Names what ``path`` is when it cannot be a torch checkpoint (torch writes zip archives)."""
    with path.open("rb") as fh:
        head = fh.read(4)
    if head == b"PK\x03\x04":
        return
    if path.suffix == ".onnx" or head[:1] == b"\x08":  # an ONNX ModelProto starts with field 1 (ir_version)
        raise CheckpointError(
            f"{path} looks like an ONNX model, not a training checkpoint: `rnndeploy export` reads the .pt "
            f"checkpoint `rnndeploy train` writes (`rnndeploy info {path}` describes an ONNX model)"
        )
    raise CheckpointError(
        f"{path} is not a checkpoint: expected the .pt file (a zip archive) `rnndeploy train` writes, but it "
        f"starts with {head!r}"
    )


def load_checkpoint(path: str | Path, backend: str = "auto", map_location: str = "cpu") -> Checkpoint:
    """Loads a checkpoint written by :func:`save_checkpoint` and rebuilds its model (in eval mode)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give the .pt file `rnndeploy train` wrote")
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist (train one with `rnndeploy train --out {path}`)"
        )
    _check_checkpoint_file(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise CheckpointError(
            f"checkpoint {path} is a torch file rnndeploy cannot load safely: it holds Python objects other "
            "than tensors and plain data (rnndeploy never unpickles those: that would run code from the "
            f"file), or it is damaged. Expected a checkpoint written by `rnndeploy train`. ({type(exc).__name__})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path} is not an rnndeploy checkpoint (expected format {FORMAT!r}, found {found!r})"
        )
    try:
        config = ModelConfig.from_json(payload["config"])
        model = SequenceModel(config, backend=backend)
        model.load_state_dict(payload["model"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged: {exc}") from exc
    model.eval()
    return Checkpoint(
        model=model,
        config=config,
        vocab=payload.get("vocab"),
        step=int(payload.get("step", 0)),
        data_stats=payload.get("data_stats") or {},
        optimizer=payload.get("optimizer"),
        extra=payload.get("extra") or {},
    )
