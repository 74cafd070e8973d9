"""Two CPU processes with gloo under torch.distributed.run: replicas stay identical, a resumed distributed run
continues exactly, and the result matches one process training on the same global batch (DDP averages the
gradients of the ranks' streams, and the ranks' streams are the single process's streams split in two)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rnndeploy.checkpoint import load_checkpoint
from rnndeploy.data import builtin_text
from rnndeploy.train import TrainOptions, train

ARGS = dict(hidden=16, embed=8, seq_len=10, lr=1e-2, eval_every=4, device="cpu")


# NOTE: nothing here may depend on how busy the machine is. Both sides train with one intra-op thread (torchrun
# gives each worker OMP_NUM_THREADS=1; the one-process reference gets the same), so the float reduction order
# cannot follow the thread count a loaded machine's OpenMP/BLAS picks; Adam turns a rounding difference in a
# near-zero gradient into a whole step. The store's 60 s read timeout and a 4 min process bound are raised to
# bounds that only a hang reaches; the rendezvous port is the OS's (localhost:0), never a guessed free port.
TIMEOUT_S = 900
RDZV_CONF = f"read_timeout={TIMEOUT_S},join_timeout={TIMEOUT_S}"


def _torchrun(*args: str) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["--rdzv-conf", RDZV_CONF, "-m", "rnndeploy", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"torchrun hung for {TIMEOUT_S} s: {e.stdout!r} {e.stderr!r}") from None
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_two_gloo_processes_resume_and_match_one_process_with_the_global_batch(tmp_path):
    corpus = tmp_path / "pydoc.txt"
    corpus.write_text(builtin_text()[:6000], encoding="utf-8")
    out = tmp_path / "ddp" / "m.pt"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ARGS.items()]
    first = _torchrun("--data", str(corpus), "--batch", "3", "--steps", "4", "--out", str(out), *flags)
    assert "replicas of 2 processes: identical" in first
    second = _torchrun("--resume", str(out), "--steps", "8", "--no-progress")
    assert "replicas of 2 processes: identical" in second

    records = [json.loads(line) for line in out.with_name("m.log.jsonl").read_text().splitlines()]
    replicas = [r for r in records if r["event"] == "replicas"]
    assert [(r["step"], r["world_size"], r["identical"], r["max_abs_diff"]) for r in replicas] == [
        (4, 2, True, 0.0),
        (8, 2, True, 0.0),
    ]
    assert sum(r["event"] == "start" for r in records) == 2  # rank 0 alone writes, once per launch
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 4, 8]
    assert evals[-1]["valid_bpc"] < evals[0]["valid_bpc"] - 0.5

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(
            TrainOptions(data=str(corpus), batch=6, steps=8, out=tmp_path / "one.pt", progress=False, **ARGS)
        )
    finally:
        torch.set_num_threads(threads)
    expected = load_checkpoint(single.checkpoint).model.state_dict()
    ddp = load_checkpoint(out)
    assert ddp.step == 8 and len(ddp.extra["ranks"]) == 2
    for name, value in ddp.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5, msg=name)


def _worker_of_rank(launcher: subprocess.Popen, rank: int) -> int:
    """The process id of torchrun's worker with ``RANK=rank``."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker with RANK={rank} among {children}")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
@pytest.mark.parametrize(
    ("target", "cause"),
    [("torchrun", "SIGTERM"), ("rank 1", "a signal to another process of the run")],
    ids=["launcher", "one-worker"],
)
def test_sigterm_stops_every_rank_after_the_same_step(tmp_path, target, cause):
    """SIGTERM to torchrun (which passes it to every worker) or to one worker alone: all ranks stop after the
    same step (they agree through the step's all-reduce), and rank 0 alone names the step on disk."""
    corpus = tmp_path / "pydoc.txt"
    corpus.write_text(builtin_text()[:6000], encoding="utf-8")
    out = tmp_path / "m.pt"
    log = out.with_name("m.log.jsonl")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**ARGS, "eval_every": 1}.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["--rdzv-conf", RDZV_CONF, "-m", "rnndeploy", "train", "--data", str(corpus), "--batch", "3"]
    command += ["--steps", "100000", "--out", str(out), "--no-progress", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (log.is_file() and log.read_text().count('"eval"') >= 3):
            assert launcher.poll() is None, launcher.communicate()
            assert time.monotonic() < deadline, "training did not reach step 2"
            time.sleep(0.2)
        pid = launcher.pid if target == "torchrun" else _worker_of_rank(launcher, 1)
        os.kill(pid, signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=TIMEOUT_S)
    finally:
        launcher.kill()
    saved = load_checkpoint(out).step
    message = " ".join(stderr.split())
    expected = (
        f"{out} holds step {saved} (the last validation). "
        f"Resume with: torchrun --nproc_per_node 2 -m rnndeploy train --resume {out}"
    )
    assert message.count(expected) == 1, stderr  # rank 0 alone
    assert f"stopped by {cause} after step " in message
    evals = [json.loads(line) for line in log.read_text().splitlines() if '"eval"' in line]
    assert evals[-1]["step"] == saved and saved >= 2
