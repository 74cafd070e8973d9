"""Stepwise inference of stateful ONNX models with onnxruntime (numpy and onnxruntime only, never torch).

:class:`StreamingSession` carries the state of many streams between steps and batches steps of several streams
into one call; :func:`generate` samples text from a character language model.
"""

from rnndeploy.runtime.generate import GenerateError, generate, vocabulary
from rnndeploy.runtime.session import (
    ModelError,
    ProviderError,
    StatePair,
    StepInputError,
    StreamingSession,
    TensorSpec,
    available_providers,
    default_session_options,
    resolve_providers,
)

__all__ = [
    "GenerateError",
    "ModelError",
    "ProviderError",
    "StatePair",
    "StepInputError",
    "StreamingSession",
    "TensorSpec",
    "available_providers",
    "default_session_options",
    "generate",
    "resolve_providers",
    "vocabulary",
]
