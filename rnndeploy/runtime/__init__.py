"""Stepwise inference of stateful ONNX models with onnxruntime (numpy and onnxruntime only, never torch).

`StreamingSession` carries the state of many streams between steps and batches steps of several streams
into one call; `generate` samples text from a character language model, `read_text` reads text
through one.

Modules: ``session`` (the session), ``stores`` (where a stream's state lives between steps: host arrays,
IOBinding buffers, CUDA device buffers, CUDA graphs), ``streams`` (each stream's batch size and where its
state is, the rows a batched step leaves to its streams), ``discovery`` (which inputs and outputs are states),
``metadata`` (the ``rnndeploy.*`` metadata, checked), ``specs`` (tensor and state descriptions, input checks),
``normalization`` (a forecaster's original units), ``providers`` (execution providers, loading a model),
``forms`` (whether a model's sequence or step graph serves one-step calls), ``errors``, ``generate``,
``testing`` (small ONNX models for tests).
"""

from rnndeploy.runtime.errors import ModelError, ProviderError, StepInputError
from rnndeploy.runtime.generate import GenerateError, generate, read_text, vocabulary
from rnndeploy.runtime.normalization import Normalization
from rnndeploy.runtime.providers import (
    available_providers,
    default_session_options,
    resolve_providers,
    usable_providers,
)
from rnndeploy.runtime.session import StreamingSession
from rnndeploy.runtime.specs import StatePair, TensorSpec

__all__ = [
    "GenerateError",
    "ModelError",
    "Normalization",
    "ProviderError",
    "StatePair",
    "StepInputError",
    "StreamingSession",
    "TensorSpec",
    "available_providers",
    "default_session_options",
    "generate",
    "read_text",
    "resolve_providers",
    "usable_providers",
    "vocabulary",
]
