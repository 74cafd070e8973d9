"""Original units in and out of a forecaster: the ``rnndeploy.data_stats`` a series model was trained with.

Training normalises a series with the mean and standard deviation of its training split and stores them in
the checkpoint and the exported graph's ``rnndeploy.data_stats`` metadata (``{"mean": [F], "std": [F]}``).
The graph itself computes on normalised values; `Normalization` maps a caller's values in and the
predictions back out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from rnndeploy.runtime.errors import ModelError
from rnndeploy.runtime.metadata import ModelMetadata, quote, read_metadata
from rnndeploy.runtime.specs import TensorSpec


@dataclass(frozen=True)
class Normalization:
    """``x -> (x - mean) / std`` on ``inputs``, ``y -> y * std + mean`` on ``outputs``; ``mean``, ``std`` ``[F]``."""

    mean: np.ndarray
    std: np.ndarray
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    _cast: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_metadata(
        cls,
        metadata: Mapping[str, str] | ModelMetadata,
        inputs: dict[str, TensorSpec],
        outputs: dict[str, TensorSpec],
    ) -> Normalization | None:
        """The normalization the metadata describes, or None (no statistics: a text model, a foreign graph).

        ``metadata``: the graph's ``custom_metadata_map``, or it already checked (`read_metadata`).
        Float step inputs are normalised; float outputs are mapped back for a regression model (task
        ``regression``, or no task recorded). A feature axis that does not fit the statistics, or statistics
        that are not finite or whose std is 0 in an input's dtype, is a `ModelError`.
        """
        checked = metadata if isinstance(metadata, ModelMetadata) else read_metadata(metadata)
        mean, std = checked.mean, checked.std
        if mean is None or std is None:
            return None
        floats = [s for s in inputs.values() if s.dtype.kind == "f"]
        for spec in floats:
            width = spec.shape[-1] if spec.shape else None
            if isinstance(width, int) and width != mean.size and mean.size != 1:
                raise ModelError(
                    f"metadata rnndeploy.data_stats has {mean.size} features but input {spec.describe()} has "
                    f"{width}; open the model with normalize=False (CLI: --raw) to feed the graph raw values"
                )
        for dtype in {spec.dtype for spec in floats}:
            # Inputs are normalised in their own dtype: a std that rounds to 0 there divides by zero.
            with np.errstate(over="ignore", under="ignore"):
                cast_mean, cast_std = mean.astype(dtype), std.astype(dtype)
            if not (
                np.all(np.isfinite(cast_mean)) and np.all(np.isfinite(cast_std)) and np.all(cast_std > 0)
            ):
                raise ModelError(
                    f"metadata rnndeploy.data_stats does not fit the model's {dtype.name} inputs: in "
                    f"{dtype.name} every mean must be finite and every std finite and > 0; got mean "
                    f"{quote(mean.tolist())}, std {quote(std.tolist())}"
                )
        if not floats:
            return None
        regression = (checked.task or "regression") == "regression"
        mapped_out = tuple(
            s.name
            for s in outputs.values()
            if regression and s.dtype.kind == "f" and s.shape and s.shape[-1] in (mean.size, None)
        )
        return cls(mean, std, tuple(s.name for s in floats), mapped_out)

    def normalize(self, array: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``(array - mean) / std`` in ``array``'s dtype, written to ``out`` when given."""
        mean, std = self._stats(array.dtype)
        out = np.subtract(array, mean, out=out)
        return np.divide(out, std, out=out)

    def denormalize(self, array: np.ndarray) -> np.ndarray:
        """``array * std + mean`` as a new array of ``array``'s dtype."""
        mean, std = self._stats(array.dtype)
        out = np.multiply(array, std)
        return np.add(out, mean, out=out)

    def _stats(self, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        cast = self._cast.get(dtype)
        if cast is None:
            cast = self._cast[dtype] = (self.mean.astype(dtype), self.std.astype(dtype))
        return cast

    def to_json(self) -> dict:
        return {
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
        }
