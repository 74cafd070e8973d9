"""The dispatcher's picks compiled for sm_90 (H100/H200) without a GPU: launchable, and as modelled.

Each pick must fit one block (shared memory <= 232,448 B, registers <= 255), spill nothing inside the time
loop of a split grid, whose programs wait on each other every step (a few bytes spilled once before the loop
cost nothing per step; the table lists them as ``stack``), and stay within make_config's shared-memory model
(an upper bound). The picks, and so the check, follow the installed triton: make_config refuses what a
release's code generation spills (rnndeploy.kernels.rules); run it under each release the product meets (3.6,
3.8, 3.9). The default run compiles a representative subset (tests/kernels/compile_sm90.py); the whole grid of
the issue (every cell, fp32 TF32/IEEE, bf16, fp16, seven batches, ten hidden sizes, both passes) is opt-in:
``RNNDEPLOY_COMPILE_GRID=1 python -m pytest tests/kernels/test_compile_sm90.py`` (about 30 minutes on 2
cores; its tables are benchmarks/results/kernels-sm90-grid-triton<version>.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED_LIMIT = 232_448  # bytes per block, H100/H200
REG_LIMIT = 255


def _compile(tmp_path, *args: str) -> list[dict]:
    pytest.importorskip("triton.backends.nvidia")
    import triton

    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 6):
        pytest.skip(
            f"the ahead-of-time compile API is checked on triton 3.6 to 3.9, found {triton.__version__}"
        )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    script = Path(__file__).with_name("compile_sm90.py")
    done = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                          timeout=3600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def _check(rows: list[dict]) -> list[str]:
    problems = []
    for r in rows:
        name = f"{r['cell']} {r.get('pass', r.get('direction'))} {r['dtype']}/{r['precision']} B={r['B']} H={r['H']}"
        if "error" in r:
            problems.append(f"{name}: no configuration ({r['error'][:200]})")
            continue
        name += f" {r['strategy']} BB={r['BB']} BH={r['BH']} warps={r['warps']}"
        if r["shared"] > SHARED_LIMIT:
            problems.append(f"{name}: {r['shared']} B shared memory > {SHARED_LIMIT}")
        if r["shared"] > r["shared_model"]:
            problems.append(f"{name}: compiler {r['shared']} B shared > model {r['shared_model']} B")
        if r["regs"] > REG_LIMIT:
            problems.append(f"{name}: {r['regs']} registers > {REG_LIMIT}")
        if r["NSPLIT"] > 1 and r["loop_spills"] > 0:
            problems.append(f"{name}: {r['loop_spills']} spill loads/stores per step in a split grid")
    return problems


def test_representative_picks_compile_and_fit(tmp_path):
    rows = _compile(tmp_path)
    assert len(rows) == 16, f"expected 8 shapes x 2 passes, got {len(rows)} lines"
    problems = _check(rows)
    assert not problems, "\n".join(problems)
    strategies = {r["strategy"] for r in rows}
    assert {"resident", "split", "split-stream", "stream"} <= strategies, f"strategies covered: {strategies}"
    handoffs = {r["tagged"] for r in rows if r["NSPLIT"] > 1}
    assert handoffs == {False, True}, f"split grids' hand-offs covered (tagged?): {handoffs}"
    headline = [r for r in rows if (r["B"], r["H"], r["dtype"]) == (16, 768, "bf16")]
    assert len(headline) == 6
    for r in headline:
        assert r["strategy"] == "split" and r["BK"] in ("512+256", "2048+1024", "2048+256"), r


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("RNNDEPLOY_COMPILE_GRID") != "1", reason="opt-in: RNNDEPLOY_COMPILE_GRID=1"
)
def test_whole_grid_compiles_and_fits(tmp_path):
    rows = _compile(tmp_path, "--grid")
    assert len(rows) == 3 * 4 * 7 * 10 * 2
    problems = _check(rows)
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:60])
