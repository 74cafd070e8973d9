"""StreamingSession.terminate() ends a run in progress and refuses later steps (a server's shutdown deadline)."""

import threading
import time

import numpy as np
import onnx
import pytest

from rnndeploy.runtime import ModelError, StreamingSession, testing


@pytest.mark.parametrize("io_binding", [True, False], ids=["bound", "host"])
def test_terminate_ends_a_run_in_progress_and_refuses_later_steps(tmp_path, io_binding):
    path = tmp_path / "slow.onnx"
    onnx.save(testing.slow_rnn(1_000_000_000), path)  # hours per step: it ends only if terminated
    session = StreamingSession(path, io_binding=io_binding)
    started, outcome = threading.Event(), []

    def step() -> None:
        started.set()
        try:
            session.step(np.ones((1, 1, 1), np.float32), stream="a")
            outcome.append("finished")
        except ModelError as error:
            outcome.append(str(error))

    thread = threading.Thread(target=step, daemon=True)
    thread.start()
    started.wait(60)
    time.sleep(0.5)  # most likely inside the run by now; a terminate before it starts ends it at once too
    session.terminate()
    thread.join(300)
    assert not thread.is_alive(), "the run was not terminated"
    assert outcome and "terminated" in outcome[0], outcome
    with pytest.raises(ModelError, match="terminated"):
        session.step(np.ones((1, 1, 1), np.float32), stream="b")
