"""One StreamingSession shared by threads: steps of one stream serialize, steps of distinct streams do not wait.

The oracle is the counter model (``testing.counter_rnn``): its state is the exact number of time steps a stream
has run, so a lost, repeated or mixed-up step shows as a wrong count.
"""

import threading

import numpy as np
import onnxruntime as ort
import pytest

from rnndeploy.runtime import StreamingSession, testing

THREADS = 8
JOIN_S = 300  # generous: the machine may be loaded


@pytest.fixture(scope="module")
def counter_bytes():
    return testing.counter_rnn().SerializeToString()


def counts(session: StreamingSession) -> dict:
    """Each open stream's step count, read from its state (both elements must agree)."""
    result = {}
    for stream in session.streams:
        h = session.get_state(stream)["h0"]
        assert np.all(h == h.flat[0]), f"stream {stream!r} has a torn state {h}"
        result[stream] = int(h.flat[0])
    return result


def hammer(work, n_threads: int = THREADS) -> None:
    """Run ``work(k)`` in ``n_threads`` threads released together; re-raise the first failure."""
    start = threading.Barrier(n_threads)
    errors = []

    def body(k: int) -> None:
        try:
            start.wait()
            work(k)
        except BaseException as error:  # noqa: BLE001 - reported to the test below
            errors.append(error)

    threads = [threading.Thread(target=body, args=(k,)) for k in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_S)
        assert not thread.is_alive(), "a stepping thread hangs"
    if errors:
        raise errors[0]


STEP = np.zeros((1, 1), np.float32)  # [time, feature], batch axis left out


@pytest.mark.parametrize("io_binding", [False, True], ids=["run", "iobinding"])
def test_threads_stepping_one_stream_lose_no_step(counter_bytes, io_binding):
    session = StreamingSession(counter_bytes, io_binding=io_binding, providers="cpu")
    per_thread = 100
    outputs: list[list[float]] = [[] for _ in range(THREADS)]

    def work(k: int) -> None:
        for _ in range(per_thread):
            outputs[k].append(float(session.step(STEP, stream="user")["y"][-1, 0]))

    hammer(work)
    assert counts(session) == {"user": THREADS * per_thread}
    # Each step saw the count its predecessor left: every count from 1 to 800 was returned exactly once.
    assert sorted(v for out in outputs for v in out) == list(range(1, THREADS * per_thread + 1))


@pytest.mark.parametrize("io_binding", [False, True], ids=["run", "iobinding"])
def test_threads_mixing_step_step_many_and_step_stacked_lose_no_step(counter_bytes, io_binding):
    """Threads step overlapping sets of streams through all three calls; each stream's count is the number of
    steps given to it (a chunk of T time steps counts T)."""
    session = StreamingSession(counter_bytes, io_binding=io_binding, providers="cpu")
    rounds = 30
    streams = ["a", "b", "c", "d"]
    expected = dict.fromkeys(streams, 0)

    def plan(k: int, r: int) -> tuple[str, list[str], int]:
        """Thread k's call in round r: (kind, streams, time steps)."""
        kind = ("step", "many", "stacked")[(k + r) % 3]
        first = (k + r) % 4
        members = [streams[first]] if kind == "step" else [streams[first], streams[(first + 1 + k % 3) % 4]]
        return kind, members, 1 + (k + r) % 2

    for k in range(THREADS):
        for r in range(rounds):
            _, members, time = plan(k, r)
            for s in members:
                expected[s] += time

    def work(k: int) -> None:
        for r in range(rounds):
            kind, members, time = plan(k, r)
            x = np.zeros((time, 1), np.float32)
            if kind == "step":
                session.step(x, stream=members[0])
            elif kind == "many":
                session.step_many({s: x for s in members})
            else:
                session.step_stacked(members, np.zeros((len(members), time, 1), np.float32))

    hammer(work)
    assert counts(session) == expected


@pytest.mark.parametrize("io_binding", [False, True], ids=["run", "iobinding"])
def test_threads_on_distinct_streams_run_at_once(counter_bytes, io_binding, monkeypatch):
    """A step of one stream that is still running in onnxruntime does not hold up a step of another stream."""
    session = StreamingSession(counter_bytes, io_binding=io_binding, providers="cpu")
    inside, release = threading.Event(), threading.Event()

    def holding(method):
        def run(*args, **kwargs):
            if threading.current_thread().name == "held":
                inside.set()
                assert release.wait(JOIN_S), "the other stream's step never finished"
            return method(*args, **kwargs)

        return run

    for name in ("run", "run_with_iobinding"):  # hold the "held" thread inside onnxruntime's run
        monkeypatch.setattr(ort.InferenceSession, name, holding(getattr(ort.InferenceSession, name)))
    held = threading.Thread(target=lambda: session.step(STEP, stream="slow"), name="held")
    held.start()
    try:
        assert inside.wait(JOIN_S)
        other = threading.Thread(target=lambda: [session.step(STEP, stream="fast") for _ in range(3)])
        other.start()
        other.join(JOIN_S)
        assert not other.is_alive(), "a step of another stream waited for the held one"
        many = threading.Thread(target=lambda: session.step_many({"fast": STEP, "new": STEP}))
        many.start()
        many.join(JOIN_S)
        assert not many.is_alive(), "step_many of other streams waited for the held one"
    finally:
        release.set()
        held.join(JOIN_S)
    assert counts(session) == {"slow": 1, "fast": 4, "new": 1}
