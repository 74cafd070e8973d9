"""`rnndeploy bench memory` as a user runs it: a smoke run writes its results under the current folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rnndeploy.cli import main


@pytest.fixture
def one_thread():
    """The command sets torch's threads: restored after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_memory_command(tmp_path, monkeypatch, one_thread):
    """Without --out a user's run writes under the current folder, never into the source tree."""
    committed = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "memory.json"
    before = committed.stat().st_mtime_ns if committed.exists() else None
    monkeypatch.chdir(tmp_path)
    args = ["bench", "memory", "--quick", "--budget", "256", "--cells", "rnn,lstm", "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (committed.stat().st_mtime_ns if committed.exists() else None) == before
    tmp_path = tmp_path / "bench-results"
    assert "adding   20 lstm" in result.output and "copy     20 rnn" in result.output
    doc = json.loads((tmp_path / "memory.json").read_text())
    assert doc["machine"]["commit"] and doc["machine"]["torch"] == torch.__version__
    rows = {(r["task"], r["cell"]) for r in doc["results"]}
    assert rows == {("adding", "rnn"), ("adding", "lstm"), ("copy", "rnn"), ("copy", "lstm")}
    assert all(r["sequences"] == 256 and r["solved_at"] is None for r in doc["results"])
    flows = json.loads((tmp_path / "memory-gradflow.json").read_text())
    assert flows["initial"] == ["RNN", "LSTM", "LSTM, torch default init"] and flows["after_training"] == [
        "RNN",
        "LSTM",
    ]
    for name in ("memory.csv", "memory.png", "memory-gradflow.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_bench_memory_refuses_short_adding_lengths():
    result = CliRunner().invoke(main, ["bench", "memory", "--tasks", "adding", "--lengths", "8,50"])
    assert result.exit_code == 2 and "lengths >= 12 for the adding problem" in result.output
