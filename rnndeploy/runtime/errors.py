"""The runtime's exceptions, and onnxruntime's own errors translated into them."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

# What onnxruntime raises when it cannot load a model or run a step (all derive from Exception only).
ORT_ERRORS = (
    _ort_state.Fail,
    _ort_state.InvalidArgument,
    _ort_state.InvalidGraph,
    _ort_state.InvalidProtobuf,
    _ort_state.NoSuchFile,
    _ort_state.NotImplemented,
    _ort_state.RuntimeException,
    _ort_state.EPFail,
)
# What a run through an IOBinding raises on the same failures (onnxruntime wraps them in RuntimeError).
ORT_RUN_ERRORS = (*ORT_ERRORS, RuntimeError)


class ModelError(ValueError):
    """The model or the state mapping cannot be served (no states, unknown names, mismatched pairs)."""


class StepInputError(ValueError):
    """An input given to a step has the wrong name, shape or dtype."""


class ProviderError(RuntimeError):
    """A requested execution provider is not available.

    ``provider`` is the onnxruntime name asked for (None when the error is not about one provider) and
    ``reason`` what kept it from starting, so a front end (the CLI) can phrase its own advice.
    """

    def __init__(self, message: str, *, provider: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.provider = provider
        self.reason = reason


def step_error(error: Exception, streams: Mapping[Hashable, Mapping[str, np.ndarray]]) -> StepInputError:
    """onnxruntime's failure to run a step (an out-of-range token id, ...) as a `StepInputError`
    that names each stream's inputs: ``raise step_error(error, {stream: arrays}) from error``."""
    given = "; ".join(
        f"stream {stream!r}: " + ", ".join(_summary(n, a) for n, a in arrays.items())
        for stream, arrays in streams.items()
    )
    return StepInputError(f"the model cannot run this step ({given}): {error}")


def _summary(name: str, array: np.ndarray) -> str:
    text = f"{name} {array.dtype.name}{list(array.shape)}"
    if array.size and array.dtype.kind in "iuf":
        text += f" with values in [{array.min()}, {array.max()}]"
    return text
