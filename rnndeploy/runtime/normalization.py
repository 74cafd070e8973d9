"""Original units in and out of a forecaster: the ``rnndeploy.data_stats`` a series model was trained with.

Training normalises a series with the mean and standard deviation of its training split and stores them in
the checkpoint and the exported graph's ``rnndeploy.data_stats`` metadata (``{"mean": [F], "std": [F]}``).
The graph itself computes on normalised values; :class:`Normalization` maps a caller's values in and the
predictions back out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from rnndeploy.runtime.errors import ModelError
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
        cls, metadata: Mapping[str, str], inputs: dict[str, TensorSpec], outputs: dict[str, TensorSpec]
    ) -> Normalization | None:
        """The normalization the metadata describes, or None (no statistics: a text model, a foreign graph).

        Float step inputs are normalised; float outputs are mapped back for a regression model (task
        ``regression``, or no task recorded). A feature axis that does not fit the statistics is a
        :class:`ModelError`.
        """
        try:
            stats = json.loads(metadata.get("rnndeploy.data_stats", "{}"))
        except json.JSONDecodeError as error:
            raise ModelError(f"metadata rnndeploy.data_stats is not JSON: {error}") from error
        if not isinstance(stats, dict) or "mean" not in stats or "std" not in stats:
            return None
        try:
            mean = np.atleast_1d(np.asarray(stats["mean"], np.float64))
            std = np.atleast_1d(np.asarray(stats["std"], np.float64))
        except (TypeError, ValueError) as error:
            raise ModelError(f"metadata rnndeploy.data_stats mean/std are not numbers: {error}") from error
        if mean.ndim != 1 or mean.shape != std.shape or not np.all(std > 0):
            raise ModelError(
                f"metadata rnndeploy.data_stats needs mean and std of equal length [F] with std > 0; got "
                f"mean {mean.tolist()}, std {std.tolist()}"
            )
        floats = [s for s in inputs.values() if s.dtype.kind == "f"]
        for spec in floats:
            width = spec.shape[-1] if spec.shape else None
            if isinstance(width, int) and width != mean.size and mean.size != 1:
                raise ModelError(
                    f"metadata rnndeploy.data_stats has {mean.size} features but input {spec.describe()} has "
                    f"{width}; open the model with normalize=False (CLI: --raw) to feed the graph raw values"
                )
        if not floats:
            return None
        regression = metadata.get("rnndeploy.task", "regression") == "regression"
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
