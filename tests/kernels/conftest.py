"""The kernel tests need triton (Linux); elsewhere they are left out and the report header says why.

The ahead-of-time tooling the compile tests share with the static report (benchmarks/kernels_aot.py) is not
installed: its folder goes on ``sys.path`` here.
"""

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

HAVE_TRITON = importlib.util.find_spec("triton") is not None

if not HAVE_TRITON:
    collect_ignore_glob = ["test_*.py"]


def pytest_report_header(config):
    if not HAVE_TRITON:
        return "rnndeploy: triton is not installed, so tests/kernels is not collected"
    return None
