"""A sequence batcher: per-sequence state on the server, steps of concurrent sequences run as one batch.

Like Triton Inference Server's sequence batcher: a request carries ``sequence_id`` / ``sequence_start`` /
``sequence_end``; the state of a live sequence stays in the :class:`StreamingSession`; steps that are queued
together (up to ``max_batch_size``, waiting at most ``max_queue_delay_s`` for more, but never for more than
there are live sequences) run through one :meth:`StreamingSession.step_many` call, in one worker thread (the
event loop keeps serving meanwhile) or, with ``worker_thread=False``, on the event loop itself. When a batched
run fails, its steps run again one by one, so only the offending request fails; a failed step changes no
sequence's state.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from rnndeploy.runtime import StepInputError, StreamingSession


class SequenceError(ValueError):
    """A request names a sequence that is not live, or cannot start one. ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Live:
    batch: int
    last_used: float
    pending: int = 0


@dataclass
class _Request:
    stream: Hashable
    start: bool
    end: bool
    arrays: dict[str, np.ndarray]
    future: asyncio.Future = field(repr=False)


class SequenceBatcher:
    """Queue of steps of many sequences, executed in dynamic batches by one worker thread.

    Args:
        session: the model; its streams are the sequences.
        max_batch_size: most steps (sequences) per batched call; 1 disables batching.
        max_queue_delay_s: how long the first queued step waits for others to join its batch.
        idle_timeout_s: a sequence with no step for this long is evicted (its state freed).
        max_sequences: most live sequences; starting one more is refused with status 429.
        worker_thread: run batches in a worker thread (default), so the event loop reads and answers requests
            while the model runs. ``False`` runs them on the event loop: no thread hand-off (and wait for the
            GIL) per batch, which raises unbatched throughput of a small CPU model (see
            benchmarks/results/runtime.json), but nothing else is served during a batch: use it for steps of
            about a millisecond or less.
    """

    def __init__(
        self,
        session: StreamingSession,
        *,
        max_batch_size: int = 64,
        max_queue_delay_s: float = 0.0005,
        idle_timeout_s: float = 60.0,
        max_sequences: int = 1024,
        worker_thread: bool = True,
    ) -> None:
        if max_batch_size < 1 or max_sequences < 1 or idle_timeout_s <= 0 or max_queue_delay_s < 0:
            raise ValueError(
                "need max_batch_size >= 1, max_sequences >= 1, idle_timeout_s > 0, max_queue_delay_s >= 0; "
                "got "
                f"{max_batch_size}, {max_sequences}, {idle_timeout_s}, {max_queue_delay_s}"
            )
        self.session = session
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.idle_timeout_s = idle_timeout_s
        self.max_sequences = max_sequences
        self.live: dict[Hashable, _Live] = {}
        self.batches_run = 0
        self.steps_run = 0
        self._pending: deque[_Request] = deque()
        self._stateless = itertools.count()
        self._executor = (
            ThreadPoolExecutor(1, thread_name_prefix="rnndeploy-batcher") if worker_thread else None
        )
        self._tasks: list[asyncio.Task] = []
        self._wakeup: asyncio.Event | None = None
        self._full: asyncio.Event | None = None

    async def start(self) -> None:
        """Start the batching and eviction loops on the running event loop."""
        self._wakeup, self._full = asyncio.Event(), asyncio.Event()
        self._tasks = [asyncio.create_task(self._batch_loop()), asyncio.create_task(self._evict_loop())]

    async def stop(self) -> None:
        """Stop the loops; queued steps fail with status 503."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while self._pending:
            request = self._pending.popleft()
            if not request.future.done():
                request.future.set_exception(SequenceError("the server is shutting down", 503))
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def infer(
        self,
        inputs: dict[str, np.ndarray],
        sequence_id: Hashable | None = None,
        start: bool = False,
        end: bool = False,
    ) -> dict[str, np.ndarray]:
        """Queue one step of ``sequence_id`` (``None``: a one-off run from zero state) and await its outputs.

        Args:
            inputs: ``{input_name: array}`` with the batch axis, e.g. ``input`` ``[1, T]``.
        Returns:
            ``{output_name: array}`` with the batch axis.
        Raises:
            StepInputError: bad inputs (nothing is queued, or the model rejected them: the sequence keeps its
                state). SequenceError: unknown sequence (400), too many live sequences (429), server
                stopping (503).
        """
        arrays, batch, _ = self.session.check_input(inputs)
        now = time.monotonic()
        if sequence_id is None:
            stream: Hashable = ("stateless", next(self._stateless))
            start = end = True
        else:
            stream = sequence_id
            live = self.live.get(stream)
            created = live is None
            if not start:
                if live is None:
                    raise SequenceError(
                        f"sequence {sequence_id!r} is not active: send its first step with "
                        "sequence_start=true "
                        f"(idle sequences are evicted after {self.idle_timeout_s:g} s)"
                    )
                if live.batch != batch:
                    raise SequenceError(
                        f"sequence {sequence_id!r} started with batch size {live.batch}, "
                        f"this step has {batch}"
                    )
            elif live is None and len(self.live) >= self.max_sequences:
                raise SequenceError(
                    f"too many live sequences ({self.max_sequences}); end some (sequence_end=true) "
                    "or retry later",
                    429,
                )
            if live is None:
                live = self.live[stream] = _Live(batch, now)
            live.batch, live.last_used = batch, now
            live.pending += 1
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Request(stream, start, end, arrays, future))
        self._wakeup.set()
        if len(self._pending) >= self._batch_target():
            self._full.set()
        failed = True
        try:
            result = await future
            failed = False
            return result
        finally:
            live = self.live.get(stream)
            if live is not None:
                live.pending -= 1
                live.last_used = time.monotonic()
                # A failed first step starts no sequence (the session opened no stream for it).
                if end or (failed and created and start and live.pending == 0):
                    del self.live[stream]

    def _batch_target(self) -> int:
        """Steps worth waiting for: no more sequences can join than are live (no wait for a lone sequence)."""
        return min(self.max_batch_size, max(len(self.live), 1))

    def _take_batch(self) -> list[_Request]:
        """The oldest queued step of each sequence, oldest first, at most ``max_batch_size``."""
        batch, seen, rest = [], set(), deque()
        while self._pending:
            request = self._pending.popleft()
            if request.stream in seen or len(batch) == self.max_batch_size:
                rest.append(request)
            else:
                seen.add(request.stream)
                batch.append(request)
        self._pending = rest
        return batch

    async def _batch_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            if self.max_queue_delay_s > 0 and len(self._pending) < self._batch_target():
                try:
                    await asyncio.wait_for(self._full.wait(), self.max_queue_delay_s)
                except asyncio.TimeoutError:
                    pass
            batch = self._take_batch()
            if not self._pending:
                self._wakeup.clear()
            if len(self._pending) < self._batch_target():
                self._full.clear()
            if not batch:
                continue
            try:
                results = await self._run(self._execute, batch)
            except Exception as error:  # noqa: BLE001 - reported to every waiting request
                results = [error] * len(batch)
            for request, result in zip(batch, results, strict=True):
                if request.future.done():
                    continue
                if isinstance(result, Exception):
                    request.future.set_exception(result)
                else:
                    request.future.set_result(result)
            if self._executor is None:
                await asyncio.sleep(0)  # let the loop send these replies and read new requests

    async def _run(self, function, *args):
        """``function(*args)`` in the worker thread, or right here on the event loop without one."""
        if self._executor is None:
            return function(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def _execute(self, batch: list[_Request]) -> list[dict[str, np.ndarray] | Exception]:
        """Worker thread: one batched step; when it fails, each step alone (only the bad ones fail).

        Ended sequences are freed whatever happened (the event loop forgets them too).
        """
        try:
            try:
                outputs = self._step(batch)
                results: list = [outputs[r.stream] for r in batch]
            except StepInputError as error:
                results = [error] if len(batch) == 1 else [self._step_alone(r) for r in batch]
        finally:
            for request in batch:
                if request.end:
                    self.session.reset(request.stream)
        self.batches_run += 1
        self.steps_run += sum(not isinstance(r, Exception) for r in results)
        return results

    def _step_alone(self, request: _Request) -> dict[str, np.ndarray] | Exception:
        try:
            return self._step([request])[request.stream]
        except StepInputError as error:
            return error

    def _step(self, batch: list[_Request]) -> dict[Hashable, dict[str, np.ndarray]]:
        """Restart started sequences and run one batched step; on failure every state is as before."""
        restarted = [r.stream for r in batch if r.start]
        kept = {s: self.session.get_state(s) for s in restarted if s in self.session.streams}
        for stream in restarted:
            self.session.reset(stream)
        try:
            return self.session.step_many({r.stream: r.arrays for r in batch})
        except Exception:
            for stream in restarted:
                self.session.reset(stream, kept.get(stream))
            raise

    async def _evict_loop(self) -> None:
        while True:
            await asyncio.sleep(min(self.idle_timeout_s / 4, 1.0))
            deadline = time.monotonic() - self.idle_timeout_s
            idle = [s for s, live in self.live.items() if live.pending == 0 and live.last_used < deadline]
            for stream in idle:
                del self.live[stream]
            if idle:
                await self._run(self._forget, idle)

    def _forget(self, streams: list[Hashable]) -> None:
        for stream in streams:
            self.session.reset(stream)
