"""A sequence batcher: per-sequence state on the server, steps of concurrent sequences run as one batch.

Like Triton Inference Server's sequence batcher: a request carries ``sequence_id`` / ``sequence_start`` /
``sequence_end``; the state of a live sequence stays in the `StreamingSession`; steps that are queued
together (up to ``max_batch_size``, waiting at most ``max_queue_delay_s`` for more, but never for more than
there are live sequences) run through one `StreamingSession.step_many` call, in one worker thread (the
event loop keeps serving meanwhile) or, with ``worker_thread=False``, on the event loop itself; a lone short step
that such steps have shown to take under ``INLINE_MAX_S`` runs on the event loop even with the worker thread
(when it is idle), which saves the thread hand-off at one sequence. When a batched run fails, its steps run
again one by one, so only the offending request fails; a failed step changes no sequence's state.

The batcher's live table and the session's streams are one truth: a sequence is admitted (and a
``sequence_end`` marks it ending) when its request arrives, on the event loop, so a step that arrives behind the
end of its sequence is refused at once; once a sequence has no queued step, it stays in the table exactly
when the session holds its state. A request that costs more than a full batch of single steps (rows x time
steps > ``max_batch_size``) runs in batches of its own, alternating with batches of short steps, and in pieces
along the time axis of at most ``long_chunk_cost`` rows x steps each (its state carried from piece to piece,
restored when a piece fails), so it delays short steps of other sequences by at most one piece.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from rnndeploy.runtime import StepInputError, StreamingSession
from rnndeploy.server.protocol import RequestError

INLINE_MAX_S = 0.0005  # a lone step expected to run longer than this goes to the worker thread


class SequenceError(RequestError):
    """A request names a sequence that is not live, or cannot start one. ``status`` is the HTTP status."""


@dataclass
class _Live:
    batch: int
    last_used: float
    pending: int = 0
    ending: bool = False


@dataclass
class _Request:
    stream: Hashable
    start: bool
    end: bool
    arrays: dict[str, np.ndarray]
    rows: int
    cost: int
    sequence: bool  # False: a one-off request (its own stream, started and ended)
    queued: float  # time.perf_counter() when it was queued
    future: asyncio.Future = field(repr=False)
    done_steps: int = 0  # a long request run in pieces: time steps done, their outputs, the state before
    parts: list = field(default_factory=list, repr=False)
    kept: dict | None = field(default=None, repr=False)
    kept_rows: int | None = None


class SequenceBatcher:
    """Queue of steps of many sequences, executed in dynamic batches by one worker thread.

    Args:
        session: the model; its streams are the sequences.
        max_batch_size: most steps (sequences) per batched call; 1 disables batching.
        max_queue_delay_s: how long the first queued step waits for others to join its batch.
        idle_timeout_s: a sequence with no step for this long is evicted (its state freed).
        max_sequences: most live sequences; starting one more is refused with status 429.
        max_state_bytes: most state bytes of all live sequences (rows x `row_state_bytes`); a start
            beyond it is refused with status 429.
        long_chunk_cost: rows x time steps of each piece a long request runs in (models whose inputs and
            outputs share one named time axis; others run a long request whole).
        worker_thread: run batches in a worker thread (default), so the event loop reads and answers requests
            while the model runs. ``False`` runs them on the event loop: no thread hand-off (and wait for the
            GIL) per batch, which raises unbatched throughput of a small CPU model (see
            benchmarks/results/runtime.json), but nothing else is served during a batch: use it for steps of
            about a millisecond or less. With the thread, a batch of one short step still runs on the event
            loop when the thread is idle and its time, estimated from the latest such batch's time per unit
            of cost (rows x steps), is at most ``INLINE_MAX_S`` (the first one goes to the thread): a lone
            sequence leaves the loop nothing to serve meanwhile, and the hand-off costs tens of microseconds.
    """

    def __init__(
        self,
        session: StreamingSession,
        *,
        max_batch_size: int = 64,
        max_queue_delay_s: float = 0.0005,
        idle_timeout_s: float = 60.0,
        max_sequences: int = 1024,
        max_state_bytes: int = 2**30,
        long_chunk_cost: int = 256,
        worker_thread: bool = True,
    ) -> None:
        if (
            max_batch_size < 1
            or max_sequences < 1
            or max_state_bytes < 1
            or idle_timeout_s <= 0
            or max_queue_delay_s < 0
        ):
            raise ValueError(
                "need max_batch_size >= 1, max_sequences >= 1, max_state_bytes >= 1, idle_timeout_s > 0, "
                f"max_queue_delay_s >= 0; got {max_batch_size}, {max_sequences}, {max_state_bytes}, "
                f"{idle_timeout_s}, {max_queue_delay_s}"
            )
        self.session = session
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.idle_timeout_s = idle_timeout_s
        self.max_sequences = max_sequences
        self.max_state_bytes = max_state_bytes
        self.long_chunk_cost = max(long_chunk_cost, 1)
        self._time_axes = _time_axes(session)
        self.row_state_bytes = sum(
            p.dtype.itemsize
            * math.prod(d for axis, d in enumerate(p.shape) if axis != p.batch_axis and isinstance(d, int))
            for p in session.states
        )
        self.live: dict[Hashable, _Live] = {}
        self.state_bytes = 0
        self.batches_run = 0
        self.steps_run = 0
        self.rows_run = 0
        self.started = self.ended = self.evicted = 0
        self.queue_s = 0.0  # summed over requests: queued -> their batch began
        self.compute_s = 0.0  # summed over requests: the run of the batch each was in
        self.batch_sizes: dict[int, int] = {}
        self._pending: deque[_Request] = deque()
        self._running: list[_Request] = []  # the batch being run
        # Rows of each stream the session holds: written where batches run, read on the loop between batches.
        self._open: dict[Hashable, int] = {}
        self._last_batch_short = False
        self._stateless = itertools.count()
        self._executor = (
            ThreadPoolExecutor(1, thread_name_prefix="rnndeploy-batcher") if worker_thread else None
        )
        self._thread_jobs = 0  # submitted to the worker thread and not finished
        self._lone_cost_s = math.inf  # seconds per unit of cost of the latest batch of one short step
        self._tasks: list[asyncio.Task] = []
        self._wakeup: asyncio.Event | None = None
        self._full: asyncio.Event | None = None

    @property
    def running(self) -> bool:
        """Between `start` and `stop`: requests are served."""
        return bool(self._tasks)

    async def start(self) -> None:
        """Start the batching and eviction loops on the running event loop."""
        self._wakeup, self._full = asyncio.Event(), asyncio.Event()
        self._tasks = [asyncio.create_task(self._batch_loop()), asyncio.create_task(self._evict_loop())]

    async def stop(self) -> None:
        """Stop the loops; queued steps fail with status 503."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        while self._pending:
            request = self._pending.popleft()
            if not request.future.done():
                request.future.set_exception(SequenceError("the server is shutting down", 503))
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def abort(self) -> None:
        """Fail every queued and running step with status 503 now (a shutdown deadline): their clients are
        answered, and a run still going is terminated at its next node, so the process need not wait for it."""
        for request in [*self._pending, *self._running]:
            if not request.future.done():
                request.future.set_exception(SequenceError("the server is shutting down", 503))
        self._pending.clear()
        self.session.terminate()

    def unknown(self, sequence_id: Hashable) -> SequenceError:
        return SequenceError(
            f"unknown sequence {sequence_id!r} (evicted after {self.idle_timeout_s:g} s idle, ended, or started "
            "before this server's restart): requests must specify the START flag on the first request of the "
            "sequence (sequence_start=true)"
        )

    def _admit(self, sequence_id: Hashable, batch: int, start: bool, end: bool) -> None:
        """Check and record a step of ``sequence_id`` as it arrives (on the event loop, before any await)."""
        live = self.live.get(sequence_id)
        if not start:
            if live is None or live.ending:
                raise self.unknown(sequence_id)
            if live.batch != batch:
                raise SequenceError(
                    f"sequence {sequence_id!r} started with batch size {live.batch}, this step has {batch}"
                )
        else:
            grow = batch * self.row_state_bytes - (0 if live is None else live.batch * self.row_state_bytes)
            if live is None and len(self.live) >= self.max_sequences:
                raise SequenceError(
                    f"too many live sequences (limit max_sequences={self.max_sequences}); end some "
                    "(sequence_end=true) or retry later",
                    429,
                    limit="max_sequences",
                )
            if grow > 0 and self.state_bytes + grow > self.max_state_bytes:
                raise SequenceError(
                    f"starting sequence {sequence_id!r} with {batch} rows needs {batch * self.row_state_bytes} "
                    f"state bytes; live sequences hold {self.state_bytes} of the limit "
                    f"max_state_bytes={self.max_state_bytes}: end some or retry later",
                    429,
                    limit="max_state_bytes",
                )
            if live is None:
                live = self.live[sequence_id] = _Live(batch, time.monotonic())
                self.state_bytes += batch * self.row_state_bytes
            else:
                self._resize(live, batch)
            self.started += 1
        live.ending = end
        live.pending += 1
        live.last_used = time.monotonic()

    async def infer(
        self,
        inputs: dict[str, np.ndarray],
        sequence_id: Hashable | None = None,
        start: bool = False,
        end: bool = False,
        cost: int = 1,
    ) -> dict[str, np.ndarray]:
        """Queue one step of ``sequence_id`` (``None``: a one-off run from zero state) and await its outputs.

        Args:
            inputs: ``{input_name: array}`` with the batch axis, e.g. ``input`` ``[1, T]``.
            cost: rows x time steps of the request; one above ``max_batch_size`` runs in a batch of its own.
        Returns:
            ``{output_name: array}`` with the batch axis.
        Raises:
            StepInputError: bad inputs (nothing is queued, or the model rejected them: the sequence keeps its
                state). SequenceError: unknown sequence (400), too many live sequences or state bytes (429),
                server stopping (503).
        """
        if not self.running:
            raise SequenceError("the server is not running (starting or shutting down)", 503)
        arrays, batch, _ = self.session.check_input(inputs)
        if sequence_id is None:
            stream: Hashable = ("stateless", next(self._stateless))
            start = end = True
        else:
            stream = sequence_id
            self._admit(stream, batch, start, end)
        future = asyncio.get_running_loop().create_future()
        queued = _Request(
            stream, start, end, arrays, batch, cost, sequence_id is not None, time.perf_counter(), future
        )
        self._pending.append(queued)
        self._wakeup.set()
        if len(self._pending) >= self._batch_target():
            self._full.set()
        # A cancelled caller (a gRPC stream closed) leaves its step queued: it runs, and is settled, as usual.
        return await future

    @property
    def pending(self) -> int:
        """Steps queued and not running yet."""
        return len(self._pending)

    def _settle(self, stream: Hashable) -> None:
        """A step of ``stream`` is done: with none queued, the sequence is live exactly when its state is held."""
        live = self.live.get(stream)
        if live is None:
            return
        live.pending -= 1
        live.last_used = time.monotonic()
        if live.pending:
            return
        rows = self._open.get(stream)
        if rows is None:
            self._drop(stream, ended=live.ending)
        else:
            self._resize(live, rows)

    def _resize(self, live: _Live, rows: int) -> None:
        self.state_bytes += (rows - live.batch) * self.row_state_bytes
        live.batch = rows

    def _drop(self, stream: Hashable, ended: bool = False, evicted: bool = False) -> None:
        live = self.live.pop(stream)
        self.state_bytes -= live.batch * self.row_state_bytes
        self.ended += ended
        self.evicted += evicted

    def _batch_target(self) -> int:
        """Steps worth waiting for: no more sequences can join than are live (no wait for a lone sequence)."""
        return min(self.max_batch_size, max(len(self.live), 1))

    def _take_batch(self) -> list[_Request]:
        """The oldest queued step of each sequence: short ones together (at most ``max_batch_size``, oldest
        first), or one long one alone; a waiting long one goes next after each batch of short ones."""
        heads, seen = [], set()
        for request in self._pending:
            if request.stream not in seen:
                seen.add(request.stream)
                heads.append(request)
        short = [r for r in heads if r.cost <= self.max_batch_size][: self.max_batch_size]
        long = next((r for r in heads if r.cost > self.max_batch_size), None)
        if long is not None and (not short or self._last_batch_short):
            batch = [long]
        else:
            batch = short
        self._last_batch_short = batch is short
        taken = {id(r) for r in batch}
        self._pending = deque(r for r in self._pending if id(r) not in taken)
        return batch

    async def _batch_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            if self.max_queue_delay_s > 0 and len(self._pending) < self._batch_target():
                try:
                    await asyncio.wait_for(self._full.wait(), self.max_queue_delay_s)
                except TimeoutError:
                    pass
            batch = self._take_batch()
            if not self._pending:
                self._wakeup.clear()
            if len(self._pending) < self._batch_target():
                self._full.clear()
            if not batch:
                continue
            lone = len(batch) == 1 and batch[0].cost <= self.max_batch_size
            inline = lone and self._thread_jobs == 0 and batch[0].cost * self._lone_cost_s <= INLINE_MAX_S
            began = time.perf_counter()
            self._running = batch
            try:
                results = self._execute(batch) if inline else await self._run(self._execute, batch)
            except Exception as error:  # noqa: BLE001 - reported to every waiting request
                results = [error] * len(batch)
            finally:
                self._running = []
            elapsed = time.perf_counter() - began
            if lone:
                self._lone_cost_s = elapsed / batch[0].cost
            self.queue_s += sum(began - r.queued for r in batch)
            self.compute_s += elapsed * len(batch)
            self.batch_sizes[len(batch)] = self.batch_sizes.get(len(batch), 0) + 1
            for request, result in zip(batch, results, strict=True):
                if result is None:  # pieces left: first in its sequence's line again
                    request.queued = time.perf_counter()
                    self._pending.appendleft(request)
                    self._wakeup.set()
                    continue
                if request.sequence:
                    self._settle(request.stream)
                if request.future.done():
                    continue
                if isinstance(result, Exception):
                    request.future.set_exception(result)
                else:
                    self.rows_run += request.rows
                    request.future.set_result(result)
            if self._executor is None or inline:
                await asyncio.sleep(0)  # let the loop send these replies and read new requests

    async def _run(self, function, *args):
        """``function(*args)`` in the worker thread, or right here on the event loop without one."""
        if self._executor is None:
            return function(*args)
        self._thread_jobs += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
        finally:
            self._thread_jobs -= 1

    def _execute(self, batch: list[_Request]) -> list[dict[str, np.ndarray] | Exception]:
        """Worker thread: one batched step; when it fails, each step alone (only the bad ones fail).

        A step of a sequence whose state is gone (its start failed) fails without running; ended sequences
        are freed whatever happened.
        """
        if len(batch) == 1 and batch[0].cost > self.max_batch_size and self._time_axes is not None:
            return [self._piece(batch[0])]
        lost = {id(r) for r in batch if not r.start and r.stream not in self._open}
        runnable = [r for r in batch if id(r) not in lost]
        done: dict[int, dict[str, np.ndarray] | Exception] = {
            id(r): self.unknown(r.stream) for r in batch if id(r) in lost
        }
        try:
            if runnable:
                try:
                    outputs = self._step(runnable)
                    done.update({id(r): outputs[r.stream] for r in runnable})
                except StepInputError as error:
                    if len(runnable) == 1:
                        done[id(runnable[0])] = error
                    else:
                        done.update({id(r): self._step_alone(r) for r in runnable})
        finally:
            for request in batch:
                if request.end:
                    self.session.reset(request.stream)
                    self._open.pop(request.stream, None)
        results = [done[id(r)] for r in batch]
        self.batches_run += 1
        self.steps_run += sum(not isinstance(r, Exception) for r in results)
        return results

    def _piece(self, request: _Request) -> dict[str, np.ndarray] | Exception | None:
        """Worker thread: the next piece of a long request; ``None`` while pieces are left."""
        stream, inputs_axes, outputs_axes = request.stream, *self._time_axes
        first = request.done_steps == 0
        if first:
            if not request.start and stream not in self._open:
                return self.unknown(stream)
            request.kept_rows = self._open.get(stream)
            request.kept = None if request.kept_rows is None else self.session.get_state(stream)
        name = next(iter(request.arrays))
        length = request.arrays[name].shape[inputs_axes[name]]
        stop = min(request.done_steps + max(1, self.long_chunk_cost // request.rows), length)
        arrays = {
            n: np.take(a, range(request.done_steps, stop), axis=inputs_axes[n])
            for n, a in request.arrays.items()
        }
        piece = replace(request, arrays=arrays, start=request.start and first, end=False)
        try:
            request.parts.append(self._step([piece])[stream])
        except StepInputError as error:
            self.session.reset(stream, request.kept)  # the state before the request (none: no stream)
            if request.kept_rows is None:
                self._open.pop(stream, None)
            else:
                self._open[stream] = request.kept_rows
            result: dict[str, np.ndarray] | Exception = error
        else:
            request.done_steps = stop
            if stop < length:
                self.batches_run += 1
                return None
            result = {
                n: np.concatenate([part[n] for part in request.parts], axis=outputs_axes[n])
                for n in request.parts[0]
            }
        if request.end:
            self.session.reset(stream)
            self._open.pop(stream, None)
        self.batches_run += 1
        self.steps_run += not isinstance(result, Exception)
        return result

    def _step_alone(self, request: _Request) -> dict[str, np.ndarray] | Exception:
        try:
            return self._step([request])[request.stream]
        except StepInputError as error:
            return error

    def _step(self, batch: list[_Request]) -> dict[Hashable, dict[str, np.ndarray]]:
        """Restart started sequences and run one batched step; on failure every state is as before."""
        restarted = [r.stream for r in batch if r.start]
        kept = {s: self.session.get_state(s) for s in restarted if s in self._open}
        for stream in restarted:
            self.session.reset(stream)
        try:
            outputs = self.session.step_many({r.stream: r.arrays for r in batch})
        except Exception:
            for stream in restarted:
                self.session.reset(stream, kept.get(stream))
            raise
        for request in batch:
            self._open[request.stream] = request.rows
        return outputs

    async def _evict_loop(self) -> None:
        while True:
            await asyncio.sleep(min(self.idle_timeout_s / 4, 1.0))
            deadline = time.monotonic() - self.idle_timeout_s
            idle = [s for s, live in self.live.items() if live.pending == 0 and live.last_used < deadline]
            for stream in idle:
                self._drop(stream, evicted=True)
            if idle:
                await self._run(self._forget, idle)

    def _forget(self, streams: list[Hashable]) -> None:
        for stream in streams:
            self.session.reset(stream)
            self._open.pop(stream, None)


def _time_axes(session: StreamingSession) -> tuple[dict[str, int], dict[str, int]] | None:
    """The time axis of each step input and output: the one dynamic non-batch dim, named alike in all."""
    inputs, names = {}, set()
    for name, spec in session.inputs.items():
        dynamic = [a for a, d in enumerate(spec.shape) if a != spec.batch_axis and not isinstance(d, int)]
        if len(dynamic) != 1:
            return None
        inputs[name] = dynamic[0]
        names.add(spec.shape[dynamic[0]])
    if len(names) != 1:
        return None
    outputs = {}
    for name, spec in session.outputs.items():
        axes = [a for a, d in enumerate(spec.shape) if d in names]
        if len(axes) != 1:
            return None
        outputs[name] = axes[0]
    return inputs, outputs
