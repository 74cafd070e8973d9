"""The kernel tests need triton (Linux); elsewhere they are left out and the report header says why."""

import importlib.util

HAVE_TRITON = importlib.util.find_spec("triton") is not None

if not HAVE_TRITON:
    collect_ignore_glob = ["test_*.py"]


def pytest_report_header(config):
    if not HAVE_TRITON:
        return "rnndeploy: triton is not installed, so tests/kernels is not collected"
    return None
