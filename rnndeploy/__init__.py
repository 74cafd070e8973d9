"""rnndeploy: train RNN/LSTM/GRU with persistent Triton kernels, export to ONNX, serve stepwise.

The public names below are imported lazily, so ``import rnndeploy.runtime`` on a deployment box loads
onnxruntime and numpy only, never torch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rnndeploy")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

_LAZY = {
    "RNN": "rnndeploy.modules",
    "LSTM": "rnndeploy.modules",
    "GRU": "rnndeploy.modules",
    "RNNCell": "rnndeploy.modules",
    "LSTMCell": "rnndeploy.modules",
    "GRUCell": "rnndeploy.modules",
    "convert": "rnndeploy.modules",
    "ModelConfig": "rnndeploy.models",
    "SequenceModel": "rnndeploy.models",
    "Checkpoint": "rnndeploy.checkpoint",
    "CheckpointError": "rnndeploy.checkpoint",
    "load_checkpoint": "rnndeploy.checkpoint",
    "save_checkpoint": "rnndeploy.checkpoint",
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rnndeploy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
