"""Test set-up. TRITON_INTERPRET must be set before anything imports rnndeploy (kernels read it at import)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _interpreter_unavailable() -> str | None:
    """Why the Triton kernels cannot run on CPU tensors here (no triton, or an interpreter too old), else None."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    from rnndeploy.kernels import triton_unavailable_reason

    return triton_unavailable_reason(torch.device("cpu"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    interpreter_reason = None
    if any("interpreter" in item.keywords for item in items):
        interpreter_reason = _interpreter_unavailable()
    skip_interpreter = pytest.mark.skip(reason=f"runs kernels in Triton's interpreter: {interpreter_reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        elif interpreter_reason and "interpreter" in item.keywords:
            item.add_marker(skip_interpreter)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
