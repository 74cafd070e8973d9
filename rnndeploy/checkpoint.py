"""Checkpoints: model config (JSON), weights, vocabulary, data statistics, optimizer state and step.

Files are written atomically: a hidden temporary file in the same folder, flushed to disk (``fsync``), renamed
over the target, then the folder's entry flushed too, so neither a crash nor a power loss mid-write leaves a
truncated file where a good one was. Temporary files of a writer that was killed are removed by the next write
to the same target. A checkpoint is a zip archive with a CRC per entry; loading checks them, so a damaged file
is refused instead of silently loading wrong weights.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
import zipfile
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


def write_error(path: Path, exc: OSError, doing: str, kept: bool = True) -> OSError:
    """An OSError whose message names ``path`` and the cause in words (keeping ``errno``); ``kept``: the
    previous content of ``path`` is unchanged (an atomic write), and the message says so."""
    reason = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    unchanged = f"; the previous {path.name}, if any, is unchanged" if kept else ""
    error = OSError(f"cannot write {path}: {reason} ({doing}){unchanged}")
    error.errno = exc.errno
    return error


def _remove_orphaned_temporaries(path: Path) -> None:
    """Deletes temporary files of ``path`` left by writers on this machine that no longer run."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[^.]+\.tmp")
    for candidate in path.parent.glob(f".{path.name}.*.tmp"):
        match = pattern.fullmatch(candidate.name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            candidate.unlink(missing_ok=True)
        except OSError:
            continue  # the process exists (owned by another user)


def _fsync_path(path: Path | str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write, destination=None) -> Path:
    """Calls ``write(tmp_path)``, flushes the file to disk and renames it over ``path``; returns where it went.

    ``destination(tmp_path)``, when given, runs after the file is on disk and returns where to rename it:
    ``path``, or another name for a candidate that must not replace ``path`` (a graph that failed its
    verification, say).

    Raises:
        OSError: the folder cannot be written or the disk is full; the message names ``path`` and the cause,
            and whatever ``path`` held before is unchanged.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_orphaned_temporaries(path)
        # the writer's process id in the name lets a later write tell an orphan from a running writer
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc, f"creating a file in {path.parent} failed") from None
    os.close(fd)
    try:
        try:
            write(tmp)
            _fsync_path(tmp)
        except OSError as exc:
            raise write_error(path, exc, f"writing {tmp} failed") from None
        # mkstemp creates the file 0600; give it the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        target = path if destination is None else Path(destination(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        _fsync_path(path.parent, directory=True)
    except OSError:
        pass  # some file systems cannot open or flush a folder; the rename itself has happened
    return target


class _FileSink:
    """The file ``torch.save`` writes to: keeps the ``OSError`` (e.g. ENOSPC) that torch would replace by an
    iostream ``RuntimeError`` of its own."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            self.error = exc
            raise
        return len(data)

    def flush(self) -> None:
        pass


def _torch_save(payload: dict[str, Any], path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    sink = _FileSink(fd)
    try:
        torch.save(payload, sink)
    except RuntimeError:
        if sink.error is not None:
            raise sink.error from None
        raise
    finally:
        os.close(fd)


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
    """Writes ``model`` and its context to ``path`` atomically and returns the path.

    Raises:
        CheckpointError: ``vocab`` is not a list of strings as long as the model's ``vocab_size``, or
            ``step`` is not a non-negative int. OSError: see `atomic_write`.
    """
    path = Path(path)
    if vocab is not None:
        vocab = list(vocab) if isinstance(vocab, tuple) else vocab
        if not isinstance(vocab, list) or not all(isinstance(v, str) for v in vocab):
            raise CheckpointError(f"vocab must be a list of str (one entry per token id), got {_kind(vocab)}")
        if len(vocab) != (model.config.vocab_size or 0):
            raise CheckpointError(
                f"vocab has {len(vocab)} entries but the model's vocab_size is {model.config.vocab_size}: a "
                "checkpoint holds one vocabulary entry per token id"
            )
    if not _is_int(step) or step < 0:
        raise CheckpointError(f"step must be an int >= 0, got {step!r}")
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
    atomic_write(path, lambda tmp: _torch_save(payload, tmp))
    return path


def _kind(value: Any) -> str:
    """The type and (the start of) the value, for error messages."""
    bad = [v for v in value[:1000] if not isinstance(v, str)][:1] if isinstance(value, list) else []
    if bad:
        return f"a list holding {type(bad[0]).__name__} {bad[0]!r}"[:120]
    return f"{type(value).__name__} {value!r}"[:120]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_archive(path: Path) -> None:
    """Checks every entry of the zip archive against its CRC: a flipped bit anywhere is found here."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is damaged: its zip structure cannot be read ({exc}); use an intact copy"
        ) from None
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {path} is damaged: entry {bad!r} fails its CRC check (the file changed after it was "
            "written: a disk, copy or transfer error). Refusing to load it; use an intact copy"
        )


def _check_fields(path: Path, payload: dict[str, Any]) -> None:
    """Refuses fields of the wrong type, naming the field, the expected and the found type."""
    expected: dict[str, tuple[str, Any]] = {
        "config": ("a JSON string", lambda v: isinstance(v, str)),
        "model": ("a dict of tensors", lambda v: isinstance(v, dict)),
        "vocab": (
            "a list of str or None",
            lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
        ),
        "step": ("an int >= 0", lambda v: _is_int(v) and v >= 0),
        "data_stats": ("a dict", lambda v: isinstance(v, dict)),
        "optimizer": ("a dict or None", lambda v: v is None or isinstance(v, dict)),
        "extra": ("a dict", lambda v: isinstance(v, dict)),
    }
    for name, (what, ok) in expected.items():
        if name in payload and not ok(payload[name]):
            raise CheckpointError(
                f"checkpoint {path} is damaged: field {name!r} should be {what}, found {_kind(payload[name])}"
            )


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
    """Loads a checkpoint written by `save_checkpoint` and rebuilds its model (in eval mode)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give the .pt file `rnndeploy train` wrote")
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist (train one with `rnndeploy train --out {path}`)"
        )
    _check_checkpoint_file(path)
    _check_archive(path)
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
    _check_fields(path, payload)
    try:
        config = ModelConfig.from_json(payload["config"])
        model = SequenceModel(config, backend=backend)
        model.load_state_dict(payload["model"])
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged: {exc}") from None
    vocab = payload.get("vocab")
    if vocab is not None and len(vocab) != (config.vocab_size or 0):
        raise CheckpointError(
            f"checkpoint {path} is damaged: its vocab has {len(vocab)} entries, its model {config.vocab_size}"
        )
    model.eval()
    return Checkpoint(
        model=model,
        config=config,
        vocab=vocab,
        step=payload.get("step", 0),
        data_stats=payload.get("data_stats") or {},
        optimizer=payload.get("optimizer"),
        extra=payload.get("extra") or {},
    )
