"""`rnndeploy train` and `rnndeploy demo` through click's CliRunner."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from rnndeploy.checkpoint import load_checkpoint
from rnndeploy.cli import main
from rnndeploy.data import builtin_text

TINY = ["--hidden", "16", "--embed", "8", "--seq-len", "10", "--batch", "4", "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "pydoc.txt"
    path.write_text(builtin_text()[:4000], encoding="utf-8")
    return path


def test_train_help_lists_the_options():
    result = CliRunner().invoke(main, ["train", "-h"])
    assert result.exit_code == 0
    for option in (
        "--data",
        "--cell",
        "--seq-len",
        "--clip",
        "--amp",
        "--resume",
        "--eval-every",
        "--backend",
    ):
        assert option in result.output


def test_train_then_resume(corpus, tmp_path):
    out = tmp_path / "m.pt"
    runner = CliRunner()
    first = runner.invoke(
        main, ["train", "--data", str(corpus), "--steps", "6", "--eval-every", "3", "--out", str(out), *TINY]
    )
    assert first.exit_code == 0, first.output
    assert "validation bpc:" in first.output and f"checkpoint: {out}" in first.output
    assert out.with_name("m.log.jsonl").is_file() and out.with_name("m.loss.png").is_file()
    second = runner.invoke(main, ["train", "--resume", str(out), "--steps", "9", "--no-progress"])
    assert second.exit_code == 0, second.output
    ckpt = load_checkpoint(out)
    assert ckpt.step == 9 and ckpt.config.hidden_size == 16  # options not given came from the checkpoint
    events = [json.loads(line)["event"] for line in out.with_name("m.log.jsonl").read_text().splitlines()]
    assert events.count("start") == 2 and events[-1] == "end"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--cell", "transformer"], 2, "'transformer' is not one of 'rnn', 'lstm', 'gru'"),
        (["--hidden", "0"], 2, "0 is not in the range x>=1"),
        (["--lr", "0"], 2, "0.0 is not in the range x>0"),
        (["--data", "no/such/file.txt"], 1, "data file no/such/file.txt does not exist"),
        (["--amp", "bf16", "--device", "cpu"], 1, "--amp bf16 needs a CUDA device"),
        (["--resume", "no/such.pt"], 1, "checkpoint no/such.pt does not exist"),
        (["--seq-len", "5000", "--data", "SMALL"], 1, "the training split of SMALL has"),
    ],
    ids=["cell", "hidden", "lr", "data", "amp", "resume", "too-short"],
)
def test_train_bad_arguments(args, code, message, tmp_path, corpus):
    args = [str(corpus) if a == "SMALL" else a for a in args]
    message = message.replace("SMALL", str(corpus))
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "m.pt"), *args])
    assert result.exit_code == code, result.output
    assert message in " ".join(result.output.split())


def test_train_triton_backend_where_it_cannot_run(tmp_path, corpus, monkeypatch):
    from rnndeploy import kernels

    # the tests run the kernels in Triton's interpreter on CPU; a machine without it gets this reason
    monkeypatch.setattr(kernels, "triton_unavailable_reason", lambda device: "no Triton here")
    args = ["train", "--out", str(tmp_path / "m.pt"), "--data", str(corpus), "--backend", "triton"]
    result = CliRunner().invoke(main, [*args, "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "--backend triton cannot run on cpu: no Triton here" in " ".join(result.output.split())


def test_train_csv_with_text_cell_reports_the_line(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("1\n2\nx\n")
    result = CliRunner().invoke(main, ["train", "--data", str(path), "--out", str(tmp_path / "m.pt")])
    assert result.exit_code == 1
    assert "line 3, column 1: expected a number, got 'x'" in result.output


def test_demo_quick_writes_the_files(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--quick", "--out-dir", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    for name in ("model.pt", "model.log.jsonl", "model.loss.png"):
        assert (tmp_path / "demo" / name).is_file()
        assert str(tmp_path / "demo" / name) in result.output
    assert "validation bits/char:" in result.output
    assert "[3/4] export + verify" in result.output and "verified fp32 graph" in result.output
    assert "[4/4] stream" in result.output and "onnxruntime (CPUExecutionProvider" in result.output
    assert (tmp_path / "demo" / "model.onnx").is_file()
    assert (
        "device: cpu; recurrent backend auto: torch (the Triton kernels are for CUDA GPUs); 1 CPU thread"
        in (result.output)
    )
    # the total is the sum of the stages, each named: not a second copy of the training time
    done = re.search(
        r"done in ([\d.]+) s \(data ([\d.]+) s, train ([\d.]+) s, export \+ verify ([\d.]+) s, stream ([\d.]+) s\)",
        result.output,
    )
    assert done is not None, result.output
    total, *parts = map(float, done.groups())
    assert total == pytest.approx(sum(parts), abs=0.25)


def test_train_stops_on_nan_loss_with_a_message(corpus, tmp_path, monkeypatch):
    from rnndeploy.models import SequenceModel

    monkeypatch.setattr(SequenceModel, "loss", lambda self, y, target: (y * float("nan")).mean())
    out = tmp_path / "m.pt"
    result = CliRunner().invoke(main, ["train", "--data", str(corpus), "--out", str(out), *TINY])
    assert result.exit_code == 1
    assert "training diverged at step 1: loss nan" in result.output
    assert f"last good checkpoint {out} (step 0) was kept" in " ".join(result.output.split())


def test_train_refuses_to_replace_another_runs_checkpoint(corpus, tmp_path):
    out = tmp_path / "m.pt"
    runner = CliRunner()
    base = ["train", "--data", str(corpus), "--eval-every", "2", "--out", str(out), *TINY]
    assert runner.invoke(main, [*base, "--steps", "4"]).exit_code == 0
    again = runner.invoke(main, [*base, "--steps", "2"])
    assert again.exit_code == 1, again.output
    assert f"--out {out} already exists (a checkpoint at step 4)" in " ".join(again.output.split())
    assert f"rnndeploy train --resume {out}" in again.output and "--overwrite" in again.output
    assert load_checkpoint(out).step == 4  # untouched
    replaced = runner.invoke(main, [*base, "--steps", "2", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert load_checkpoint(out).step == 2
    resumed = runner.invoke(main, ["train", "--resume", str(out), "--steps", "4", "--no-progress"])
    assert resumed.exit_code == 0, resumed.output  # resuming a checkpoint is not replacing it
    assert load_checkpoint(out).step == 4


def test_train_says_what_runs_where_and_a_line_per_validation(corpus, tmp_path):
    out = tmp_path / "m.pt"
    args = ["train", "--data", str(corpus), "--steps", "4", "--eval-every", "2", "--out", str(out), *TINY]
    result = CliRunner().invoke(main, [*args, "--device", "auto"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("device:  cpu (auto: torch sees no CUDA GPU)") or "cuda" in lines[0]
    assert lines[1].startswith(f"data:    {corpus}: ") and "validation characters, vocabulary" in lines[1]
    params = sum(p.numel() for p in load_checkpoint(out).model.parameters())
    assert lines[2].startswith("model:   LSTM 16 x 1 (lm), ") and f"{params:,} parameters" in lines[2]
    assert lines[3].startswith(f"files:   {out} (checkpoint every 2 steps)")
    assert [line.split(":")[0] for line in lines if line.startswith("step ")] == ["step 2/4", "step 4/4"]


@pytest.mark.parametrize(
    ("signum", "name"), [(signal.SIGINT, "Ctrl-C (SIGINT)"), (signal.SIGTERM, "SIGTERM")], ids=["INT", "TERM"]
)
def test_ctrl_c_says_which_step_is_on_disk_and_how_to_resume(corpus, tmp_path, signum, name):
    """A real signal to a real process: exit code 128 + signal, the saved step named, the resume command exact.

    The signal is sent only once the log proves two validations were written, and the process then gets
    minutes to stop: nothing depends on how fast a loaded machine runs.
    """
    out = tmp_path / "m.pt"
    log = out.with_name("m.log.jsonl")
    args = ["--data", str(corpus), "--steps", "100000", "--eval-every", "1", "--out", str(out), *TINY]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rnndeploy", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 600
        while not (log.is_file() and log.read_text().count('"eval"') >= 3):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training did not reach step 2 in 10 minutes"
            time.sleep(0.2)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, (proc.returncode, stdout, stderr)
    assert "Traceback" not in stderr and "Aborted!" not in stderr and "Exception ignored" not in stderr, (
        stderr
    )
    saved = load_checkpoint(out).step
    assert saved >= 2
    message = " ".join(stderr.split())
    assert f"stopped by {name} after step " in message
    assert f"{out} holds step {saved} (the last validation)" in message
    assert f"Resume with: rnndeploy train --resume {out}" in message
    evals = [json.loads(line) for line in log.read_text().splitlines() if '"eval"' in line]
    assert evals[-1]["step"] == saved  # nothing was logged past the checkpoint, nothing written after


def test_threads_are_used_announced_and_restored(corpus, tmp_path, monkeypatch):
    import torch

    from rnndeploy.models import SequenceModel

    seen = set()
    real_loss = SequenceModel.loss

    def loss(self, y, target):
        seen.add(torch.get_num_threads())
        return real_loss(self, y, target)

    monkeypatch.setattr(SequenceModel, "loss", loss)
    before = torch.get_num_threads()
    wanted = 2 if before != 2 else 3
    args = ["train", "--data", str(corpus), "--steps", "2", "--out", str(tmp_path / "m.pt"), *TINY]
    result = CliRunner().invoke(main, [*args, "--device", "cpu", "--threads", str(wanted)])
    assert result.exit_code == 0, result.output
    assert seen == {wanted}
    assert torch.get_num_threads() == before
    first = result.output.splitlines()[0]
    assert (
        first.startswith("device:  cpu; recurrent backend auto: torch") and f"; {wanted} CPU threads" in first
    )
    default = CliRunner().invoke(main, [*args, "--device", "cpu", "--overwrite"])
    assert default.exit_code == 0, default.output
    assert default.output.splitlines()[0].endswith("; 1 CPU thread") and seen == {wanted, 1}


def test_the_progress_bar_starts_its_clock_after_the_step_0_validation(corpus, tmp_path, monkeypatch):
    from rnndeploy import train as train_module

    events = []
    real_evaluate, real_tqdm = train_module.evaluate, train_module.tqdm
    monkeypatch.setattr(
        train_module, "evaluate", lambda *a, **k: events.append("validate") or real_evaluate(*a, **k)
    )
    monkeypatch.setattr(train_module, "tqdm", lambda *a, **k: events.append("bar") or real_tqdm(*a, **k))
    args = [
        "train",
        "--data",
        str(corpus),
        "--steps",
        "2",
        "--eval-every",
        "2",
        "--out",
        str(tmp_path / "m.pt"),
    ]
    result = CliRunner().invoke(main, [*args, *TINY])
    assert result.exit_code == 0, result.output
    assert events == ["validate", "bar", "validate"]


def test_a_model_too_large_for_memory_is_refused_in_one_line(corpus, tmp_path):
    out = tmp_path / "m.pt"
    args = ["train", "--data", str(corpus), "--out", str(out), "--hidden", "100000", "--device", "cpu"]
    result = CliRunner().invoke(main, [*args, "--no-progress"])
    assert result.exit_code == 1, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and error[0].startswith(
        "Error: --hidden 100000 --layers 1 --batch 32 --seq-len 64: "
    )
    vocab = len(set(corpus.read_text(encoding="utf-8")))
    parameters = 4 * 100000 * (64 + 100000 + 2) + vocab * 64 + 100000 * vocab + vocab  # LSTM, embedding, head
    assert re.search(rf"training needs about [\d.]+ GB \({parameters:,} parameters: ", error[0]), error[0]
    assert "available on cpu" in error[0]
    assert not out.exists() and "Traceback" not in result.output


def test_a_slow_model_is_warned_about(corpus, tmp_path, monkeypatch):
    from rnndeploy import train as train_module

    monkeypatch.setattr(train_module, "SLOW_CPU_FLOPS_PER_STEP", 1e3)
    args = [
        "train",
        "--data",
        str(corpus),
        "--steps",
        "1",
        "--out",
        str(tmp_path / "m.pt"),
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(main, [*args, *TINY])
    assert result.exit_code == 0, result.output
    assert "warning: --hidden 16 --layers 1 --batch 4 --seq-len 10: " in result.output
    assert "TFLOP per training step; on a CPU each step will take long" in result.output
