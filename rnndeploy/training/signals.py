"""Stop signals: SIGINT and SIGTERM ask a run to stop at its next safe point, and the stop becomes a
`TrainingInterrupted` that says which step the checkpoint on disk holds and how to resume."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from rnndeploy.training.options import TrainingInterrupted, TrainOptions, TrainResult
from rnndeploy.training.processes import Processes


class StopRequested(Exception):
    """Raised at a safe point after SIGINT or SIGTERM arrived."""


class StopSignals:
    """SIGINT and SIGTERM handlers that ask training to stop at the next safe point.

    NOTE: a KeyboardInterrupt raised wherever the signal lands can hit a finalizer (where Python only prints
    "Exception ignored" and goes on) or a checkpoint write. The handler therefore only records the signal; the
    loop checks it between steps and after each validation, and a checkpoint write always finishes. A second
    signal outside a write stops at once (a long validation), still leaving every file whole.
    Handlers can only be installed from the main thread; elsewhere Ctrl-C stays a KeyboardInterrupt.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.writing = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None and not self.writing:
            raise KeyboardInterrupt
        self.signum = signum

    @contextlib.contextmanager
    def protect_write(self) -> Iterator[None]:
        """A block (a checkpoint write) that no signal interrupts; a stop request waits for its end."""
        self.writing = True
        try:
            yield
        finally:
            self.writing = False

    def check(self, world_size: int, agreed: bool | None = None) -> None:
        """Raises `StopRequested` once a signal arrived. With several processes it stops only right after a
        step, where ``agreed`` (some rank was signalled, all-reduced with the step) is the same on every rank;
        elsewhere ``agreed`` is ``None``."""
        if world_size > 1:
            if agreed:
                raise StopRequested
        elif self.signum is not None:
            raise StopRequested


class Stoppable(Protocol):
    """A training session as `run_interruptibly` sees it."""

    opts: TrainOptions
    out: Path
    rank: int
    done: int | None  # steps completed, ``None`` before the first
    processes: Processes

    @property
    def saved_step(self) -> int | None: ...

    def run(self) -> TrainResult: ...


def signal_name(signum: int) -> str:
    return "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name


def run_interruptibly(make_run: Callable[[StopSignals], Stoppable]) -> TrainResult:
    """Runs a session; a stop signal becomes a `TrainingInterrupted` that says what is on disk."""
    with StopSignals() as stop:
        run = make_run(stop)
        try:
            return run.run()
        except KeyboardInterrupt:
            signum, cause = stop.signum or signal.SIGINT, signal_name(stop.signum or signal.SIGINT)
        except StopRequested:
            if stop.signum is not None:
                signum, cause = stop.signum, signal_name(stop.signum)
            else:  # the ranks agreed to stop on another process's signal
                signum, cause = signal.SIGTERM, "a signal to another process of the run"
    out, saved, total = run.out, run.saved_step, run.opts.steps
    at = f"stopped by {cause} "
    at += f"after step {run.done} of {total}" if run.done is not None else "before the first step"
    if saved is None:
        message = f"{at}; this run has not written {out} yet, so there is nothing to resume"
    else:
        message = (
            f"{at}; {out} holds step {saved} (the last validation). "
            f"Resume with: {run.processes.launcher} train --resume {out}"
        )
    raise TrainingInterrupted(message, out, saved, signum, run.rank) from None
