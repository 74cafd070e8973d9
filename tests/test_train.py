"""train(): learning, exact resume, divergence handling, series data, files written."""

from __future__ import annotations

import ast
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rnndeploy.training as training_package
from rnndeploy.checkpoint import load_checkpoint
from rnndeploy.data import builtin_text
from rnndeploy.models import SequenceModel
from rnndeploy.train import (
    TrainError,
    TrainingDiverged,
    TrainingInterrupted,
    TrainOptions,
    options_for_resume,
    train,
)
from rnndeploy.training import checkpoints as checkpoints_module

TINY = dict(hidden=24, embed=8, seq_len=12, batch=4, lr=1e-2, progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "pydoc.txt"
    path.write_text(builtin_text()[:6000], encoding="utf-8")
    return path


def _params(path):
    return load_checkpoint(path).model.state_dict()


def test_training_lowers_validation_bits_per_char_and_writes_files(corpus, tmp_path):
    out = tmp_path / "run" / "m.pt"
    result = train(TrainOptions(data=str(corpus), steps=60, eval_every=30, out=out, **TINY))
    vocab_size = len(set(corpus.read_text()))
    assert result.history[0]["step"] == 0
    assert result.first_valid == pytest.approx(math.log2(vocab_size), abs=0.5)  # untrained: ~uniform
    assert result.last_valid < result.first_valid - 1.5
    ckpt = load_checkpoint(out)
    assert ckpt.step == 60 and ckpt.vocab == sorted(set(corpus.read_text()))
    assert ckpt.config.task == "lm" and ckpt.config.hidden_size == 24
    records = [json.loads(line) for line in result.log.read_text().splitlines()]
    assert [r["event"] for r in records] == ["start", "eval", "eval", "eval", "end"]
    assert [r["step"] for r in records if r["event"] == "eval"] == [0, 30, 60]
    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_resume_reproduces_the_uninterrupted_run(corpus, tmp_path, cell):
    # dropout between 2 layers draws random numbers, and 12 steps cross an epoch boundary (state reset)
    options = dict(data=str(corpus), cell=cell, layers=2, dropout=0.3, eval_every=5, **TINY)
    train(TrainOptions(steps=12, out=tmp_path / "whole.pt", **options))
    train(TrainOptions(steps=5, out=tmp_path / "part.pt", **options))
    result = train(TrainOptions(steps=12, resume=tmp_path / "part.pt", **options))
    assert result.checkpoint == tmp_path / "part.pt" and result.step == 12
    whole, resumed = _params(tmp_path / "whole.pt"), _params(tmp_path / "part.pt")
    for name, value in whole.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-6, atol=1e-7, msg=name)
    steps = [r["step"] for r in result.history]
    assert steps == [0, 5, 10, 12]


def test_resume_options_come_from_the_checkpoint(corpus, tmp_path):
    train(TrainOptions(data=str(corpus), steps=4, eval_every=4, out=tmp_path / "m.pt", **TINY))
    options = options_for_resume(tmp_path / "m.pt", steps=8)
    assert (options.hidden, options.seq_len, options.steps, options.out) == (24, 12, 8, tmp_path / "m.pt")
    with pytest.raises(TrainError, match=r"options differ: hidden: 24 in the checkpoint, 32 now"):
        train(options_for_resume(tmp_path / "m.pt", steps=8, hidden=32))
    with pytest.raises(TrainError, match="already at step 4; give --steps larger"):
        train(options_for_resume(tmp_path / "m.pt", steps=4))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    calls = {"train": 0}
    real_loss = SequenceModel.loss

    def poisoned(self, y, target):
        loss = real_loss(self, y, target)
        if self.training:
            calls["train"] += 1
            if calls["train"] == 7:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(SequenceModel, "loss", poisoned)
    out = tmp_path / "m.pt"
    with pytest.raises(
        TrainingDiverged, match=r"diverged at step 7: loss nan.*checkpoint .*m\.pt \(step 6\) was kept"
    ):
        train(TrainOptions(data=str(corpus), steps=20, eval_every=3, out=out, **TINY))
    ckpt = load_checkpoint(out)
    assert ckpt.step == 6
    assert all(torch.isfinite(p).all() for p in ckpt.model.parameters())
    last = json.loads(out.with_name("m.log.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "diverged" and last["step"] == 7


def test_series_regression_learns_a_sine_and_stores_stats(tmp_path):
    t = np.arange(1200, dtype=np.float32)
    series = np.stack([10 + 3 * np.sin(t / 8), np.cos(t / 8)], axis=1)
    np.save(tmp_path / "s.npy", series)
    result = train(
        TrainOptions(
            data=str(tmp_path / "s.npy"), cell="gru", steps=80, eval_every=40, out=tmp_path / "s.pt", **TINY
        )
    )
    assert result.metric == "mse"
    assert result.last_valid < 0.2 * result.first_valid
    ckpt = load_checkpoint(tmp_path / "s.pt")
    assert ckpt.config.task == "regression" and ckpt.config.input_size == 2 and ckpt.config.output_size == 2
    np.testing.assert_allclose(ckpt.data_stats["mean"], series[: 1200 - 60].mean(0), rtol=1e-5)


def test_amp_on_cpu_is_a_clear_error(corpus, tmp_path):
    with pytest.raises(TrainError, match="--amp bf16 needs a CUDA device, but training runs on cpu"):
        train(TrainOptions(data=str(corpus), amp="bf16", device="cpu", out=tmp_path / "m.pt", **TINY))


@pytest.mark.gpu
def test_bf16_training_on_gpu(corpus, tmp_path):
    result = train(
        TrainOptions(
            data=str(corpus),
            amp="bf16",
            device="cuda",
            steps=40,
            eval_every=20,
            out=tmp_path / "m.pt",
            **TINY,
        )
    )
    assert result.last_valid < result.first_valid - 1.0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_a_signal_during_a_checkpoint_write_lets_it_finish_then_stops(corpus, tmp_path, monkeypatch, signum):
    """The signal arrives inside the step-2 write: the write completes, training stops, the message is exact."""
    real_save = checkpoints_module.save_checkpoint
    before = signal.getsignal(signum)

    def save_then_signal(path, model, **kwargs):
        if kwargs["step"] == 2:
            os.kill(os.getpid(), signum)  # delivered to this (main) thread before the write below
        return real_save(path, model, **kwargs)

    monkeypatch.setattr(checkpoints_module, "save_checkpoint", save_then_signal)
    out = tmp_path / "m.pt"
    with pytest.raises(TrainingInterrupted) as caught:
        train(TrainOptions(data=str(corpus), steps=50, eval_every=1, out=out, **TINY))
    assert caught.value.saved_step == 2 and caught.value.signal == signum
    assert load_checkpoint(out).step == 2
    assert f"after step 2 of 50; {out} holds step 2 (the last validation)" in str(caught.value)
    records = [json.loads(line) for line in out.with_name("m.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "eval"] == [0, 1, 2]
    assert signal.getsignal(signum) == before  # handlers restored


def test_resume_refuses_other_data_unless_allowed(corpus, tmp_path):
    data = tmp_path / "text.txt"  # the same path, its text edited between sessions
    text = corpus.read_text()
    data.write_text(text)
    train(TrainOptions(data=str(data), steps=2, eval_every=2, out=tmp_path / "m.pt", **TINY))
    before = load_checkpoint(tmp_path / "m.pt").extra["data_fingerprint"]
    edited = text[:100] + text[100:200][::-1] + text[200:]  # same characters and length, in another order
    assert edited != text
    data.write_text(edited)
    with pytest.raises(TrainError, match=r"differs from the data this checkpoint was trained on") as caught:
        train(options_for_resume(tmp_path / "m.pt", steps=4))
    assert before["sha256"][:16] in str(caught.value) and "allow_data_change=True" in str(caught.value)
    assert load_checkpoint(tmp_path / "m.pt").step == 2
    result = train(options_for_resume(tmp_path / "m.pt", steps=4, allow_data_change=True))
    assert result.step == 4
    assert load_checkpoint(tmp_path / "m.pt").extra["data_fingerprint"] != before
    # the permission was for that session: the edited text now resumes, the original text is refused
    train(options_for_resume(tmp_path / "m.pt", steps=5))
    data.write_text(text)
    with pytest.raises(TrainError, match="differs from the data"):
        train(options_for_resume(tmp_path / "m.pt", steps=6))


def test_resume_tolerates_a_torn_last_log_line(corpus, tmp_path):
    out = tmp_path / "m.pt"
    train(TrainOptions(data=str(corpus), steps=2, eval_every=1, out=out, **TINY))
    log = out.with_name("m.log.jsonl")
    log.write_text(log.read_text() + '{"event": "eval", "step": 3, "valid_lo')
    result = train(options_for_resume(out, steps=3))
    assert [r["step"] for r in result.history] == [0, 1, 2, 3]
    for line in log.read_text().splitlines():
        json.loads(line)
    log.write_text('{"event": "start"\n' + log.read_text())
    with pytest.raises(TrainError, match=r"m\.log\.jsonl line 1 is not JSON; move the log aside"):
        train(options_for_resume(out, steps=4))


def test_replacing_another_run_is_refused_naming_the_python_options(corpus, tmp_path):
    out = tmp_path / "m.pt"
    train(TrainOptions(data=str(corpus), steps=1, out=out, **TINY))
    with pytest.raises(TrainError, match=r"pass --overwrite \(overwrite=True\) to replace it") as caught:
        train(TrainOptions(data=str(corpus), steps=2, out=out, **TINY))
    assert f"resume={str(out)!r}" in str(caught.value)
    assert train(TrainOptions(data=str(corpus), steps=2, out=out, overwrite=True, **TINY)).step == 2


def test_resume_refuses_series_statistics_of_the_wrong_type(tmp_path):
    np.save(tmp_path / "s.npy", np.sin(np.arange(400, dtype=np.float32) / 8))
    out = tmp_path / "s.pt"
    train(TrainOptions(data=str(tmp_path / "s.npy"), cell="gru", steps=1, out=out, **TINY))
    payload = torch.load(out, weights_only=True)
    payload["data_stats"] = {"mean": "x", "std": [1.0]}
    torch.save(payload, out)
    with pytest.raises(TrainError, match=r"is not the series checkpoint .*s\.pt was trained on"):
        train(options_for_resume(out, steps=2))


TRAINING = Path(training_package.__file__).parent
PIECES = sorted(p.stem for p in TRAINING.glob("*.py") if p.stem != "__init__")


def _imported_pieces(module: str) -> set[str]:
    """The modules of rnndeploy.training (and rnndeploy.train) that ``module`` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse((TRAINING / f"{module}.py").read_text(encoding="utf-8"))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module == "rnndeploy.training":
            names = [f"rnndeploy.training.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names = [node.module]
        found |= {n.removeprefix("rnndeploy.training.") for n in names if n.startswith("rnndeploy.train")}
    return found


def test_the_training_pieces_import_without_a_circle_and_never_the_entry_module():
    graph = {m: _imported_pieces(m) for m in PIECES}
    assert all("rnndeploy.train" not in imported for imported in graph.values()), graph
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import circle: {' -> '.join((*path, module))}"
        if module not in done:
            for imported in graph[module]:
                visit(imported, (*path, module))
            done.add(module)

    for module in PIECES:
        visit(module, ())


@pytest.mark.parametrize("module", PIECES)
def test_each_training_piece_imports_on_its_own(module):
    code = f"import rnndeploy.training.{module}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
