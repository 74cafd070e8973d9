"""The git commit benchmarks record with their numbers (rnndeploy.provenance.git_commit)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

from rnndeploy.provenance import git_commit

ROOT = Path(__file__).resolve().parents[1]


def test_commit_of_this_checkout_from_anywhere(monkeypatch, tmp_path):
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    if head.returncode != 0:
        pytest.skip("this copy of the project is not a git checkout")
    monkeypatch.delenv("RNNDEPLOY_COMMIT", raising=False)
    monkeypatch.chdir(tmp_path)  # the caller's folder does not matter
    assert git_commit() == head.stdout.strip()
    assert git_commit(tmp_path) == "unknown"
    monkeypatch.setenv("RNNDEPLOY_COMMIT", "abc123")
    assert git_commit(tmp_path) == "abc123"


def test_bench_runtime_records_unknown_outside_a_checkout(monkeypatch, tmp_path):
    """A copy of rnndeploy/bench/runtime.py outside any git checkout records commit "unknown", not ""."""
    monkeypatch.delenv("RNNDEPLOY_COMMIT", raising=False)
    copy = tmp_path / "bench_runtime.py"
    shutil.copy(ROOT / "rnndeploy" / "bench" / "runtime.py", copy)
    spec = importlib.util.spec_from_file_location("bench_runtime_copy", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.machine()["commit"] == "unknown"
