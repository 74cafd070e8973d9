"""Two CPU processes with gloo under torch.distributed.run: replicas stay identical and match one process
training on the same global batch (DDP averages the gradients of the ranks' streams)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from rnndeploy.checkpoint import load_checkpoint
from rnndeploy.data import builtin_text
from rnndeploy.train import TrainOptions, train

ARGS = dict(hidden=16, embed=8, seq_len=10, lr=1e-2, steps=8, eval_every=4, device="cpu")


def test_two_gloo_processes_match_one_process_with_the_global_batch(tmp_path):
    corpus = tmp_path / "pydoc.txt"
    corpus.write_text(builtin_text()[:6000], encoding="utf-8")
    out = tmp_path / "ddp" / "m.pt"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ARGS.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "rnndeploy", "train", "--data", str(corpus), "--batch", "3", "--out", str(out), *flags]
    run = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "replicas of 2 processes: identical" in run.stdout

    records = [json.loads(line) for line in out.with_name("m.log.jsonl").read_text().splitlines()]
    replicas = next(r for r in records if r["event"] == "replicas")
    assert replicas == {**replicas, "world_size": 2, "identical": True, "max_abs_diff": 0.0}
    assert sum(r["event"] == "start" for r in records) == 1  # rank 0 alone writes
    evals = [r for r in records if r["event"] == "eval"]
    assert evals[-1]["valid_bpc"] < evals[0]["valid_bpc"] - 0.5

    single = train(TrainOptions(data=str(corpus), batch=6, out=tmp_path / "one.pt", progress=False, **ARGS))
    expected = load_checkpoint(single.checkpoint).model.state_dict()
    ddp = load_checkpoint(out)
    assert len(ddp.extra["ranks"]) == 2 and ddp.extra["world_size"] == 2
    for name, value in ddp.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5, msg=name)
