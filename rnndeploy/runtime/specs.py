"""Graph inputs, outputs and state pairs as the runtime sees them, and the checks of arrays against them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from rnndeploy.runtime.errors import ModelError, StepInputError

# onnxruntime type strings -> numpy dtypes (the tensor types a state or an input can have).
ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}

Dim = int | str | None


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: ``shape`` holds ints (fixed), strings (named dynamic axes) or None."""

    name: str
    shape: tuple[Dim, ...]
    dtype: np.dtype
    batch_axis: int | None = None

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype.name}[{dims}]"


@dataclass(frozen=True)
class StatePair:
    """One state carried between steps: ``output`` of step t feeds ``input`` of step t+1.

    ``shape`` is the graph's shape of the state input; the dim at ``batch_axis`` is the stream's batch size,
    other dynamic dims start at size 0 (a cache that grows, like ``past_*``).
    """

    input: str
    output: str
    shape: tuple[Dim, ...]
    batch_axis: int
    dtype: np.dtype

    def initial(self, batch: int) -> np.ndarray:
        """Zeros of shape ``shape`` with ``batch`` rows on ``batch_axis`` (unknown dims: 0)."""
        dims = [d if isinstance(d, int) else 0 for d in self.shape]
        dims[self.batch_axis] = batch
        return np.zeros(dims, self.dtype)

    @property
    def fixed(self) -> bool:
        """Every dim but the batch axis has a fixed size (the state does not grow from step to step)."""
        return all(isinstance(d, int) for d in shape_without(self.shape, self.batch_axis))

    def to_json(self) -> dict:
        return {
            "input": self.input,
            "output": self.output,
            "shape": list(self.shape),
            "batch_axis": self.batch_axis,
            "dtype": self.dtype.name,
        }


def spec(arg: ort.NodeArg) -> TensorSpec:
    """The `TensorSpec` of an onnxruntime graph input or output (no batch axis yet)."""
    if arg.type not in ORT_DTYPES:
        raise ModelError(f"{arg.name} has type {arg.type}; supported tensor types: {', '.join(ORT_DTYPES)}")
    return TensorSpec(arg.name, tuple(arg.shape), np.dtype(ORT_DTYPES[arg.type]))


def with_batch_axis(spec: TensorSpec, batch_dim: Dim) -> TensorSpec:
    """``spec`` with its batch axis: where the dim named ``batch_dim`` is, else axis 0."""
    axis = spec.shape.index(batch_dim) if isinstance(batch_dim, str) and batch_dim in spec.shape else 0
    return TensorSpec(spec.name, spec.shape, spec.dtype, axis)


def shape_without(shape: tuple, axis: int) -> tuple:
    return shape[:axis] + shape[axis + 1 :]


def check_dtype(spec: TensorSpec, array: np.ndarray) -> None:
    if array.dtype != spec.dtype:
        raise StepInputError(
            f"{spec.name} must have dtype {spec.dtype.name}, got {array.dtype.name} "
            f"(expected {spec.describe()})"
        )


def check_shape(spec: TensorSpec, array: np.ndarray, what: str) -> None:
    if array.ndim != len(spec.shape) or any(
        isinstance(d, int) and d != n for d, n in zip(spec.shape, array.shape, strict=False)
    ):
        raise StepInputError(
            f"{what} {spec.name} must have shape {spec.describe()}"
            + (" (the batch axis may be left out)" if what == "step input" else "")
            + f", got {list(array.shape)}"
        )


def signature_key(x: object) -> tuple | None:
    """What identifies a step input's signature: dtype and shape of each array (None: not all numpy)."""
    if type(x) is np.ndarray:
        return (x.dtype, x.shape)
    if isinstance(x, Mapping) and all(type(v) is np.ndarray for v in x.values()):
        return tuple((n, v.dtype, v.shape) for n, v in x.items())
    return None
