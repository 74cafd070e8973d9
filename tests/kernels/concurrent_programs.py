"""Every program of a launch in its own thread of triton's interpreter, so cross-program hand-offs execute.

The interpreter runs the programs of a grid one after another: a grid barrier or a tagged word that another
program has yet to write would wait forever, so the split strategies never run there. Inside
:func:`concurrent_programs` each launch starts one thread per program instead. Exactly one thread runs at a
time; the others wait for their turn, handed over at scheduling points: every atomic and every volatile load
(and, in random schedules, some plain loads and stores). Which program runs next is decided by a
:class:`Schedule` alone, so a run is deterministic and a failure reproduces from the schedule's name.

Each thread converts its own arguments and reads its own program id (thread-local); the arguments' host copies
are shared (they are the memory the programs talk through) and copied back once every thread has joined.

When every live program has polled ``idle_polls`` times in a row with the same result and nobody wrote
anything in between, no program can make progress: the launch is aborted with :class:`Deadlock`, which names
each program's kernel line (file:line and function) where it waits. A launch that runs past ``timeout_s`` of
wall-clock time is aborted with :class:`LaunchTimeout` (a guard against hangs, not a timing check).

This patches private internals of ``triton.runtime.interpreter`` (``GridExecutor.__call__``,
``InterpreterBuilder``'s loads, stores and atomics, and its program id): :data:`SUPPORTED` lists the triton
versions it was written against, and :func:`unsupported_reason` says why it cannot run elsewhere.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import random
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

# (major, minor) of the triton releases whose interpreter internals this module patches
SUPPORTED = ((3, 8), (3, 9))

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def unsupported_reason() -> str | None:
    """Why concurrent launches cannot run here, or ``None`` when they can."""
    try:
        import triton
    except ImportError:
        return "triton is not installed"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "concurrent programs run in triton's interpreter only (TRITON_INTERPRET=1)"
    version = tuple(int(v) for v in triton.__version__.split(".")[:2])
    if version not in SUPPORTED:
        wanted = ", ".join(f"{a}.{b}" for a, b in SUPPORTED)
        return (
            f"tests/kernels/concurrent_programs.py patches triton's private interpreter internals, written against "
            f"triton {wanted}; found {triton.__version__}"
        )
    from triton.runtime import interpreter

    for name in ("GridExecutor", "InterpreterBuilder", "interpreter_builder", "_patch_lang", "_implicit_cvt"):
        if not hasattr(interpreter, name):
            return f"triton {triton.__version__}'s interpreter has no {name}"
    return None


@dataclass(frozen=True)
class Schedule:
    """Which program runs after a scheduling point.

    - ``round-robin``: the next live program, at every point.
    - ``greedy``: the same program until a poll returns what its previous poll of the same words returned
      (it can go no further until someone else writes), then the next live program.
    - ``random``: a program drawn from the live ones (itself included) at every point, and at a plain load or
      store with probability ``plain``; ``seed`` fixes the draws.
    """

    kind: str
    seed: int = 0
    plain: float = 0.05

    def __post_init__(self):
        if self.kind not in ("round-robin", "greedy", "random"):
            raise ValueError(f"schedule must be round-robin, greedy or random, got {self.kind!r}")

    def __str__(self) -> str:
        return f"random{self.seed}" if self.kind == "random" else self.kind


class Deadlock(AssertionError):
    """Every live program kept polling unchanged words and nobody wrote: the message says where each waits."""


class LaunchTimeout(AssertionError):
    """A launch ran past its wall-clock limit: the message says where each program last was."""


class _Aborted(BaseException):
    """Unwinds a program's thread when its launch is aborted (not an Exception: kernels' handlers pass it)."""


@dataclass
class Stats:
    """What the launches inside one :func:`concurrent_programs` did: programs per launch and hand-overs."""

    programs: list[int] = field(default_factory=list)
    switches: int = 0
    polls: int = 0


_local = threading.local()


def _kernel_line() -> str:
    """The calling thread's kernel frames, innermost first: ``file:line in function`` joined by ``<-``."""
    import triton

    skip = (os.path.dirname(triton.__file__), os.path.abspath(__file__), os.path.dirname(threading.__file__))
    frames = []
    f = sys._getframe(1)
    while f is not None and f.f_code is not _run_program.__code__:
        name = f.f_code.co_filename
        if not name.startswith(skip):
            path = os.path.relpath(name, _ROOT) if name.startswith(_ROOT) else name
            frames.append(f"{path}:{f.f_lineno} in {f.f_code.co_name}")
        f = f.f_back
    return " <- ".join(frames) or "(outside the kernel)"


class _Launch:
    """The turn-taking of one launch's program threads."""

    def __init__(self, names: list[tuple[int, int, int]], schedule: Schedule, idle_polls: int, stats: Stats):
        n = len(names)
        self.names = names
        self.schedule = schedule
        self.idle_polls = idle_polls
        self.stats = stats
        self.rng = random.Random(schedule.seed)
        self.cond = threading.Condition()
        self.current = 0
        self.live = list(range(n))
        self.abort: BaseException | None = None
        self.last_poll: list[dict[bytes, bytes]] = [{} for _ in range(n)]
        self.idle = [0] * n
        self.where = ["(not started)"] * n

    # turn-taking

    def wait_turn(self, me: int) -> None:
        with self.cond:
            while self.current != me and self.abort is None:
                self.cond.wait()
            if self.abort is not None:
                raise _Aborted

    def _hand_to(self, me: int, nxt: int) -> None:
        if nxt == me:
            return
        self.stats.switches += 1
        with self.cond:
            self.current = nxt
            self.cond.notify_all()
        self.wait_turn(me)

    def _after(self, me: int) -> int:
        i = self.live.index(me)
        return self.live[(i + 1) % len(self.live)]

    def finish(self, me: int) -> None:
        with self.cond:
            nxt = self._after(me)
            self.live.remove(me)
            if self.live:
                self.current = nxt
            self.cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self.cond:
            if self.abort is None:
                self.abort = error
            self.cond.notify_all()

    def report(self, title: str) -> str:
        lines = [title]
        for p in self.live:
            lines.append(f"  program {self.names[p]}: {self.where[p]}")
        return "\n".join(lines)

    # scheduling points

    def point(self, me: int, kind: str, key: bytes = b"", seen: bytes = b"") -> None:
        """After an operation of ``kind``: ``poll`` (a volatile load, or an atomic that changed nothing: ``key``
        names its words, ``seen`` is what came back), ``atomic`` (one that changed memory), ``store`` or
        ``load`` (plain)."""
        if self.abort is not None:
            raise _Aborted
        stalled = False
        if kind in ("poll", "atomic"):
            self.where[me] = _kernel_line()
        if kind == "poll":
            self.stats.polls += 1
            stalled = self.last_poll[me].get(key) == seen
            self.last_poll[me][key] = seen
            self.idle[me] = self.idle[me] + 1 if stalled else 0
            if all(self.idle[p] >= self.idle_polls for p in self.live):
                self.fail(Deadlock(self.report(
                    f"deadlock: each of {len(self.live)} live programs polled {self.idle_polls} times in a row "
                    f"with nothing written (schedule {self.schedule}); where each waits:"
                )))  # fmt: skip
                raise _Aborted
        elif kind in ("atomic", "store"):
            self.idle = [0] * len(self.idle)
        s = self.schedule
        if s.kind == "random":
            if kind in ("poll", "atomic") or self.rng.random() < s.plain:
                self._hand_to(me, self.rng.choice(self.live))
        elif kind in ("poll", "atomic") and (s.kind == "round-robin" or stalled):
            self._hand_to(me, self._after(me))


def _current() -> tuple[_Launch, int] | None:
    launch = getattr(_local, "launch", None)
    return None if launch is None else (launch, _local.pid)


def _masked_bytes(data: np.ndarray, mask: np.ndarray) -> bytes:
    return np.where(mask, data, np.zeros_like(data)).tobytes()


def _install(interp, schedule: Schedule, idle_polls: int, timeout_s: float, stats: Stats):
    """Patches the interpreter; returns the function that undoes it."""
    builder_cls = interp.InterpreterBuilder
    saved = {
        name: builder_cls.__dict__.get(name)
        for name in ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas",
                     "grid_idx")
    }  # fmt: skip
    saved_call = interp.GridExecutor.__call__
    load, store = saved["create_masked_load"], saved["create_masked_store"]
    rmw, cas = saved["create_atomic_rmw"], saved["create_atomic_cas"]

    def create_masked_load(self, ptrs, mask, other, *rest, **kwargs):
        ret = load(self, ptrs, mask, other, *rest, **kwargs)
        cur = _current()
        if cur is not None:
            volatile = kwargs.get("is_volatile", rest[-1] if rest else False)
            if volatile:
                key = ptrs.data.tobytes() + mask.data.tobytes()
                cur[0].point(cur[1], "poll", key, _masked_bytes(ret.data, mask.data))
            else:
                cur[0].point(cur[1], "load")
        return ret

    def create_masked_store(self, ptrs, value, mask, *rest, **kwargs):
        ret = store(self, ptrs, value, mask, *rest, **kwargs)
        cur = _current()
        if cur is not None:
            cur[0].point(cur[1], "store")
        return ret

    def _atomic(ptr, mask, old):
        """A scheduling point after an atomic: a write where it changed a word, else a poll of its words."""
        cur = _current()
        if cur is None:
            return
        new = interp._interpreter.load(ptr.data, mask, np.zeros_like(old.data), old.data.dtype)
        before, after = _masked_bytes(old.data, mask), _masked_bytes(new, mask)
        if before != after:
            cur[0].point(cur[1], "atomic")
        else:
            cur[0].point(cur[1], "poll", b"atomic" + ptr.data.tobytes() + mask.tobytes(), before)

    def create_atomic_rmw(self, rmwOp, ptr, val, mask, sem, scope):  # noqa: N803 (triton's name)
        ret = rmw(self, rmwOp, ptr, val, mask, sem, scope)
        _atomic(ptr, mask.data, ret)
        return ret

    def create_atomic_cas(self, ptr, cmp, val, sem, scope):
        ret = cas(self, ptr, cmp, val, sem, scope)
        _atomic(ptr, np.ones(ptr.data.shape, dtype=bool), ret)
        return ret

    def grid_idx_get(self):
        return getattr(_local, "grid_idx", None)

    def grid_idx_set(self, value):
        _local.grid_idx = value

    def call(self, *args_dev, **kwargs):
        _launch_concurrently(interp, self, schedule, idle_polls, timeout_s, stats, args_dev, kwargs)

    builder_cls.create_masked_load = create_masked_load
    builder_cls.create_masked_store = create_masked_store
    builder_cls.create_atomic_rmw = create_atomic_rmw
    builder_cls.create_atomic_cas = create_atomic_cas
    builder_cls.grid_idx = property(grid_idx_get, grid_idx_set)
    interp.GridExecutor.__call__ = call

    def undo():
        interp.GridExecutor.__call__ = saved_call
        for name, value in saved.items():
            if value is None:
                delattr(builder_cls, name)
            else:
                setattr(builder_cls, name, value)

    return undo


def _run_program(executor, interp, launch: _Launch, me: int, idx, args_hst, kwargs_hst) -> None:
    _local.launch, _local.pid, _local.grid_idx = launch, me, idx
    try:
        launch.wait_turn(me)
        args = inspect.getcallargs(executor.fn, *args_hst, **kwargs_hst)
        args = {n: a if n in executor.constexprs else interp._implicit_cvt(a) for n, a in args.items()}
        executor.fn(**args)
    except _Aborted:
        pass
    except BaseException as e:  # noqa: BLE001 (handed to the launching thread, which raises it)
        launch.fail(e)
    finally:
        launch.finish(me)
        _local.launch = None


def _launch_concurrently(interp, executor, schedule, idle_polls, timeout_s, stats, args_dev, kwargs) -> None:
    """``GridExecutor.__call__`` with one thread per program (the same steps around the grid loop)."""
    spec = inspect.getfullargspec(executor.fn)
    kwargs = {k: v for k, v in kwargs.items() if k in spec.args or k in spec.kwonlyargs}
    args_hst, kwargs_hst = executor._init_args_hst(args_dev, kwargs)
    for hook in executor.pre_run_hooks:
        hook(*args_hst, **kwargs_hst)
    scope = interp._patch_lang(executor.fn)
    try:
        grid = executor.grid
        if callable(grid):
            args = inspect.getcallargs(executor.fn, *args_hst, **kwargs_hst)
            grid = grid(
                {n: a if n in executor.constexprs else interp._implicit_cvt(a) for n, a in args.items()}
            )
        grid = tuple(grid) + (1,) * (3 - len(grid))
        interp.interpreter_builder.set_grid_dim(*grid)
        names = [(x, y, z) for x in range(grid[0]) for y in range(grid[1]) for z in range(grid[2])]
        stats.programs.append(len(names))
        launch = _Launch(names, schedule, idle_polls, stats)
        threads = [
            threading.Thread(target=_run_program, args=(executor, interp, launch, i, idx, args_hst, kwargs_hst),
                             name=f"program{idx}", daemon=True)
            for i, idx in enumerate(names)
        ]  # fmt: skip
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout_s
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            launch.fail(LaunchTimeout(launch.report(
                f"launch of {executor.fn.__name__} ran past {timeout_s} s (schedule {schedule}); where each "
                "program last was at an atomic or a volatile load:"
            )))  # fmt: skip
            for t in threads:
                t.join(10.0)
        if launch.abort is not None:
            raise launch.abort
    finally:
        scope.restore()
    executor._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)


@contextlib.contextmanager
def concurrent_programs(
    schedule: Schedule, idle_polls: int = 50, timeout_s: float = 600.0
) -> Iterator[Stats]:
    """Inside, every interpreter launch runs its programs concurrently under ``schedule`` (see the module)."""
    reason = unsupported_reason()
    if reason is not None:
        raise RuntimeError(reason)
    from triton.runtime import interpreter

    stats = Stats()
    undo = _install(interpreter, schedule, idle_polls, timeout_s, stats)
    try:
        yield stats
    finally:
        undo()
