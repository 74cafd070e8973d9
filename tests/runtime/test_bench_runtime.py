"""`rnndeploy bench runtime` as a user runs it: a smoke run writes its results under the current directory, never
into the source tree's benchmarks/results."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from rnndeploy.cli import main

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@pytest.mark.slow
def test_bench_runtime_writes_under_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    committed = {p.name: p.stat().st_mtime_ns for p in RESULTS.glob("runtime.*")}
    result = CliRunner().invoke(main, ["bench", "runtime", "--quick", "--no-server"])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "bench-results" / "runtime.json").read_text())
    assert {"lstm-2x256", "gru-1x64", "lstm-2x512"} == {r["model"] for r in written["latency"]}
    assert (tmp_path / "bench-results" / "runtime.png").stat().st_size > 0
    assert {p.name: p.stat().st_mtime_ns for p in RESULTS.glob("runtime.*")} == committed
