"""Training data: a character corpus or a numeric time series, split and batched for truncated BPTT.

Three sources, picked by `load_data`'s ``source`` argument:

- ``"builtin"``: the English text of CPython's ``pydoc_data.topics`` (about 465 kB, no download);
- a text file (any other suffix): character-level, the vocabulary is the sorted set of its characters;
- a ``.npy`` or ``.csv`` time series, ``[T]`` or ``[T, F]``, normalised per feature with the mean and standard
  deviation of the training split (kept as ``data_stats`` so predictions can be mapped back).

The last ``valid_fraction`` of the stream is the validation split. `StreamBatcher` cuts a split into
parallel contiguous streams and serves consecutive chunks, so a model can carry its state from one chunk to
the next (truncated backpropagation through time).
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

BUILTIN = "builtin"
SERIES_SUFFIXES = (".npy", ".csv")


class DataError(ValueError):
    """Training data that cannot be used: missing, empty, too short or malformed."""


@dataclass
class Dataset:
    """A loaded data source, split into training and validation streams.

    Attributes:
        kind: ``"text"`` (token ids ``[N]`` int64) or ``"series"`` (features ``[N, F]`` float32, normalised).
        train, valid: the two splits, contiguous in the source's order (validation is the end).
        source: what was loaded (``"builtin"`` or the file path), for logs and errors.
        vocab: the characters of the vocabulary (text only); token id ``i`` is ``vocab[i]``.
        data_stats: ``{"mean": [F], "std": [F]}`` used to normalise a series; ``{}`` for text.
    """

    kind: str
    train: Tensor
    valid: Tensor
    source: str
    vocab: list[str] | None = None
    data_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def num_features(self) -> int:
        """Features per step of a series (``F``); 0 for text."""
        return int(self.train.shape[1]) if self.kind == "series" else 0

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the training split: its length in steps and the SHA-256 of its values.

        Text is hashed as token ids, a series as its normalised float32 values, so the same file gives the
        same fingerprint on every machine, and any change to the training split gives another.
        """
        values = self.train.detach().cpu().contiguous()
        digest = hashlib.sha256(values.numpy().tobytes()).hexdigest()
        return {"steps": len(self.train), "sha256": digest}


def builtin_text() -> str:
    """The built-in corpus: every ``pydoc_data.topics`` entry of this Python, joined in sorted-key order."""
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


def build_vocab(text: str) -> list[str]:
    """The sorted distinct characters of ``text``."""
    return sorted(set(text))


def encode(text: str, vocab: list[str]) -> Tensor:
    """Maps ``text`` to token ids ``[len(text)]`` int64; every character must be in ``vocab``."""
    index = {ch: i for i, ch in enumerate(vocab)}
    missing = sorted(set(text) - index.keys())
    if missing:
        raise DataError(f"characters {missing[:10]!r} are not in the vocabulary of {len(vocab)} characters")
    return torch.tensor([index[ch] for ch in text], dtype=torch.int64)


def decode(ids: Tensor | list[int], vocab: list[str]) -> str:
    """Maps token ids back to text."""
    return "".join(vocab[int(i)] for i in ids)


def check_data_file(path: Path) -> None:
    """Raises a `DataError` that says what ``path`` is when it is not a readable data file."""
    if path.is_dir():
        raise DataError(
            f"data file {path} is a folder, not a file: give a UTF-8 text file, a .npy or .csv series, or "
            "'builtin'"
        )
    if not path.is_file():
        raise DataError(f"data file {path} does not exist (give a text, .npy or .csv file, or 'builtin')")


def read_text(path: Path) -> str:
    """Reads a UTF-8 text file for character-level training, with errors that name the file."""
    path = Path(path)
    check_data_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"data file {path} is not UTF-8 text ({exc}); convert it or give a .npy/.csv series"
        ) from exc
    if not text:
        raise DataError(f"data file {path} is empty; a character model needs text to learn from")
    return text


def read_series(path: Path) -> np.ndarray:
    """Reads a ``.npy`` or ``.csv`` time series as float32 ``[T, F]`` (a 1-D series becomes ``[T, 1]``).

    A CSV may start with one header row (a row in which no cell is a number); every other cell must be a
    finite number.
    """
    path = Path(path)
    check_data_file(path)
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"data file {path} is not a readable .npy array: {exc}") from exc
        if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
            raise DataError(f"data file {path} holds dtype {array.dtype}; expected real numbers")
    else:
        array = _read_csv(path)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.size == 0:
        raise DataError(
            f"data file {path} holds an array of shape {array.shape}; expected a non-empty [T] or [T, F]"
        )
    array = array.astype(np.float32)
    bad = np.argwhere(~np.isfinite(array))
    if len(bad):
        t, f = bad[0]
        raise DataError(f"data file {path} has a non-finite value {array[t, f]} at step {t}, feature {f}")
    return array


def _read_csv(path: Path) -> np.ndarray:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = [
            (n, row) for n, row in enumerate(csv.reader(fh), start=1) if any(cell.strip() for cell in row)
        ]
    if rows and not any(_is_number(cell) for cell in rows[0][1]):
        rows = rows[1:]  # a header
    if not rows:
        raise DataError(f"data file {path} has no data rows")
    width = len(rows[0][1])
    values = []
    for line, row in rows:
        if len(row) != width:
            raise DataError(
                f"{path}, line {line}: expected {width} cells like the first data row, got {len(row)}"
            )
        for column, cell in enumerate(row, start=1):
            if not _is_number(cell):
                raise DataError(
                    f"{path}, line {line}, column {column}: expected a number, got {cell!r} "
                    "(keep only numeric columns, one optional header row)"
                )
        values.append([float(cell) for cell in row])
    return np.asarray(values, dtype=np.float64)


def _is_number(cell: str) -> bool:
    try:
        return math.isfinite(float(cell))
    except ValueError:
        return False


def load_data(
    source: str | Path = BUILTIN,
    *,
    valid_fraction: float = 0.05,
    vocab: list[str] | None = None,
) -> Dataset:
    """Loads ``source`` and splits off the last ``valid_fraction`` as the validation stream.

    Args:
        source: ``"builtin"``, a text file, or a ``.npy`` / ``.csv`` series.
        valid_fraction: share of the stream kept for validation, in ``(0, 0.5]``.
        vocab: for text, the vocabulary to encode with (a resumed run passes its checkpoint's); by default the
            vocabulary is built from the whole text.

    Returns:
        A `Dataset`; text as ``[N]`` int64 ids, a series as normalised ``[N, F]`` float32.
    """
    if not 0.0 < valid_fraction <= 0.5:
        raise DataError(f"valid_fraction must be in (0, 0.5], got {valid_fraction}")
    source_name = str(source)
    if source_name == BUILTIN:
        text = builtin_text()
    elif Path(source).suffix.lower() in SERIES_SUFFIXES:
        return _series_dataset(read_series(Path(source)), source_name, valid_fraction)
    else:
        text = read_text(Path(source))
    if len(set(text)) < 2:
        raise DataError(
            f"data {source_name} has {len(set(text))} distinct character(s); a language model needs 2 or more"
        )
    vocab = vocab if vocab is not None else build_vocab(text)
    ids = encode(text, vocab)
    n_valid = _split_size(len(ids), valid_fraction, source_name)
    return Dataset("text", ids[:-n_valid], ids[-n_valid:], source_name, vocab=list(vocab))


def _series_dataset(array: np.ndarray, source: str, valid_fraction: float) -> Dataset:
    n_valid = _split_size(len(array), valid_fraction, source)
    train = array[:-n_valid]
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 0, std, 1.0).astype(np.float32)  # a constant feature stays constant (0)
    normalised = torch.from_numpy((array - mean) / std).float()
    stats = {"mean": mean.tolist(), "std": std.tolist()}
    return Dataset("series", normalised[:-n_valid], normalised[-n_valid:], source, data_stats=stats)


def _split_size(n: int, valid_fraction: float, source: str) -> int:
    n_valid = max(2, round(n * valid_fraction))
    if n - n_valid < 2:
        raise DataError(
            f"data {source} has only {n} steps; it needs enough for a training and a validation split"
        )
    return n_valid


def streams(data: Tensor, num_streams: int, seq_len: int, what: str = "data") -> Tensor:
    """Cuts ``data`` (``[N]`` or ``[N, F]``) into ``num_streams`` contiguous streams ``[S, N // S, ...]``.

    The tail that does not fill a stream is dropped. Raises `DataError` when a stream would be
    shorter than ``seq_len + 1`` (one input chunk and its next-step targets).
    """
    length = len(data) // num_streams
    if length < seq_len + 1:
        raise DataError(
            f"{what} has {len(data)} steps; {num_streams} stream(s) of seq_len {seq_len} need at least "
            f"{num_streams * (seq_len + 1)}; use a smaller --seq-len or --batch, or more data"
        )
    return data[: length * num_streams].reshape(num_streams, length, *data.shape[1:])


class StreamBatcher:
    """Consecutive ``seq_len`` chunks of parallel streams, for truncated BPTT with carried state.

    The split is cut into ``batch_size * world_size`` contiguous streams; this rank (``rank``) owns streams
    ``rank * batch_size ... (rank + 1) * batch_size - 1``. Chunk ``k`` of an epoch covers positions
    ``k * seq_len ... (k + 1) * seq_len`` of every stream, with targets one step ahead, so the state at the
    end of chunk ``k`` is the right initial state for chunk ``k + 1``. The chunk for a global step is a pure
    function of the step, which makes a resumed run read exactly what an uninterrupted one would.
    """

    def __init__(
        self,
        data: Tensor,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        what: str = "the training split",
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"batch size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        all_streams = streams(data, batch_size * world_size, seq_len, what=what)
        self.streams = all_streams[rank * batch_size : (rank + 1) * batch_size]  # [B, L, ...]
        self.seq_len = seq_len
        self.chunks_per_epoch = (self.streams.shape[1] - 1) // seq_len

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, chunk)`` read at 0-based ``step``."""
        return divmod(step, self.chunks_per_epoch)

    def batch(self, step: int) -> tuple[Tensor, Tensor, bool]:
        """The chunk for 0-based ``step``: inputs ``[B, seq_len, ...]``, targets (one step ahead, same shape)
        and whether it starts an epoch (the carried state must be reset)."""
        _, chunk = self.position(step)
        start = chunk * self.seq_len
        x = self.streams[:, start : start + self.seq_len]
        y = self.streams[:, start + 1 : start + self.seq_len + 1]
        return x, y, chunk == 0
