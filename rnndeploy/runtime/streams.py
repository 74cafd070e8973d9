"""A session's per-stream bookkeeping: each stream's batch size and where its state lives, and the stacked
state rows one batched run leaves to its streams (`rnndeploy.runtime.session.StreamingSession.step_many`)."""

from __future__ import annotations

import itertools
from collections.abc import Hashable

import numpy as np

from rnndeploy.runtime.specs import StatePair


class Stream:
    """One stream: its batch size, and its state: its rows of a batch's outputs (``rows``, after
    `StreamingSession.step_many`), else what the session's state store keeps for it (``cell``)."""

    __slots__ = ("batch", "cell", "rows", "row")

    def __init__(self) -> None:
        self.batch: int | None = None
        self.cell: object | None = None
        self.rows: Rows | None = None  # after step_many: the state is row ``row`` of these (host) arrays
        self.row = 0


class Rows:
    """The stacked state outputs of one batched run and which streams' rows they hold, in order."""

    __slots__ = ("states", "members", "batches", "starts", "entries", "live", "uniform")

    def __init__(
        self,
        states: dict[str, np.ndarray],
        members: list[Hashable],
        batches: list[int],
        uniform: int | None = None,
    ) -> None:
        self.states, self.members, self.batches = states, members, batches
        self.starts = [0, *itertools.accumulate(batches)][:-1]
        self.entries: list[Stream] = []  # the members' streams, in order
        self.live = 0  # how many of them still hold their state here
        self.uniform = uniform  # every member's batch size, when one uniform step_many made these rows

    def view(self, k: int, pairs: tuple[StatePair, ...]) -> dict[str, np.ndarray]:
        """Member ``k``'s state rows as views."""
        start, batch = self.starts[k], self.batches[k]
        return {p.input: rows_of(self.states[p.input], p.batch_axis, start, batch, False) for p in pairs}

    def materialize(self, k: int, pairs: tuple[StatePair, ...]) -> dict[str, np.ndarray]:
        """Member ``k``'s state rows as contiguous arrays of their own."""
        return {n: np.ascontiguousarray(v) for n, v in self.view(k, pairs).items()}


def rows_of(array: np.ndarray, axis: int, start: int, batch: int, strip: bool) -> np.ndarray:
    """Rows ``start:start + batch`` of ``array`` along ``axis`` (a view); ``strip``: batch 1, axis dropped."""
    index = (slice(None),) * axis + ((start if strip else slice(start, start + batch)),)
    return array[index]


def split_rows(array: np.ndarray, axis: int, n: int, batch: int, strip: bool) -> list[np.ndarray]:
    """``n`` consecutive blocks of ``batch`` rows of ``array`` along ``axis``, as views (``strip``: batch 1,
    axis dropped)."""
    if axis == 0:  # views without one indexing call per block
        return list(array if strip else array.reshape((n, batch, *array.shape[1:])))
    return [rows_of(array, axis, k * batch, batch, strip) for k in range(n)]


def join_rows(values: list[np.ndarray], shape: tuple, dtype: np.dtype, added: bool) -> np.ndarray | None:
    """Arrays of one ``shape`` and ``dtype`` stacked along axis 0 (``added``: as new rows, else concatenated)
    by joining their bytes: one copy in a C loop, where ``np.concatenate`` pays per array for many small ones.
    None when one of them is not C-contiguous (it exports no plain buffer)."""
    try:
        joined = b"".join(values)
    except TypeError:
        return None
    rows = (len(values), *shape) if added else (len(values) * shape[0], *shape[1:])
    return np.frombuffer(joined, dtype).reshape(rows)
