"""The ``rnndeploy.*`` metadata of an exported graph, checked against its schema in one place.

The exporter writes these ``metadata_props`` (every value a string, JSON where structured):
``rnndeploy.states`` (a list of ``{input, output, shape, batch_axis, dtype}``), ``rnndeploy.config`` (the
model configuration), ``rnndeploy.task``, ``rnndeploy.vocab`` (a list of distinct strings; token id = index),
``rnndeploy.data_stats`` (``{}`` or ``{"mean": [F], "std": [F]}``) and ``rnndeploy.sizes``. A graph comes from
anywhere, so `read_metadata` checks every key the runtime reads before anything uses it: a value of the
wrong shape is a `ModelError` that names the key and what was expected, quoting at most
`QUOTE_CHARS` characters of what came. Keys it does not know are left alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from rnndeploy.runtime.errors import ModelError

QUOTE_CHARS = 120  # how much of a bad value an error message quotes
HEADS = ("identity", "softmax", "log_softmax")
_SIZE_KEYS = ("vocab_size", "input_size", "output_size", "embed_dim", "hidden_size", "num_layers")


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, with the full length said."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<{type(value).__name__} nested too deep to show>"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


@dataclass(frozen=True)
class StateEntry:
    """One checked ``rnndeploy.states`` entry; ``shape`` and ``batch_axis`` are None where not given."""

    input: str
    output: str
    shape: tuple[int | str | None, ...] | None = None
    batch_axis: int | None = None


@dataclass(frozen=True)
class ModelMetadata:
    """The checked ``rnndeploy.*`` metadata of a graph (None / empty where a key is absent)."""

    states: tuple[StateEntry, ...] | None = None
    task: str | None = None
    config: dict = field(default_factory=dict)
    vocab: tuple[str, ...] | None = None
    mean: np.ndarray | None = None  # [F] float64, with ``std``, from rnndeploy.data_stats
    std: np.ndarray | None = None
    sizes: dict = field(default_factory=dict)

    @property
    def head(self) -> str | None:
        """The output head (``identity``, ``softmax``, ``log_softmax``), None when not recorded."""
        return self.config.get("head")

    @property
    def vocab_size(self) -> int | None:
        """How many token ids the model's input takes (the config's, the sizes', else the vocabulary's)."""
        for source in (self.config, self.sizes):
            if source.get("vocab_size") is not None:
                return source["vocab_size"]
        return None if self.vocab is None else len(self.vocab)


def read_metadata(metadata: Mapping[str, str]) -> ModelMetadata:
    """Check a graph's ``custom_metadata_map`` against the schema; raises `ModelError` naming the key."""
    config = _json_object(metadata, "rnndeploy.config")
    sizes = _json_object(metadata, "rnndeploy.sizes")
    for key, source in (("rnndeploy.config", config), ("rnndeploy.sizes", sizes)):
        for name in _SIZE_KEYS:
            value = source.get(name)
            if value is not None and not _positive_int(value):
                raise ModelError(
                    f"metadata {key}: {name} must be a positive integer or null; got {quote(value)}"
                )
    head = config.get("head")
    if head is not None and head not in HEADS:
        raise ModelError(f"metadata rnndeploy.config: head must be one of {list(HEADS)}; got {quote(head)}")
    task = metadata.get("rnndeploy.task")
    if task is not None and task != config.get("task", task):
        raise ModelError(
            f"metadata rnndeploy.task is {quote(task)} but rnndeploy.config says task {quote(config['task'])}"
        )
    config_size, sizes_size = config.get("vocab_size"), sizes.get("vocab_size")
    if None not in (config_size, sizes_size) and config_size != sizes_size:
        raise ModelError(
            f"metadata rnndeploy.config has vocab_size {config_size} but rnndeploy.sizes {sizes_size}"
        )
    vocab = _vocab(metadata)
    declared = config_size if config_size is not None else sizes_size
    if vocab is not None and declared is not None and len(vocab) != declared:
        raise ModelError(
            f"metadata rnndeploy.vocab has {len(vocab)} entries but the model's vocab_size is {declared}"
        )
    mean, std = _data_stats(metadata)
    return ModelMetadata(_states(metadata), task, config, vocab, mean, std, sizes)


def _loads(metadata: Mapping[str, str], key: str) -> object:
    text = metadata[key]
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        reason = "it nests too deep" if isinstance(error, RecursionError) else str(error)
        raise ModelError(f"metadata {key} is not JSON ({reason}): {quote(text)}") from None


def _json_object(metadata: Mapping[str, str], key: str) -> dict:
    if key not in metadata:
        return {}
    value = _loads(metadata, key)
    if not isinstance(value, dict):
        raise ModelError(f"metadata {key} must be a JSON object; got {quote(value)}")
    return value


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _states(metadata: Mapping[str, str]) -> tuple[StateEntry, ...] | None:
    key = "rnndeploy.states"
    if key not in metadata:
        return None
    described = _loads(metadata, key)
    if not isinstance(described, list) or not described:
        raise ModelError(
            f"metadata {key} must be a non-empty JSON list of {{input, output, shape, batch_axis}} objects; "
            f"got {quote(described)}"
        )
    entries = []
    for k, entry in enumerate(described):
        where = f"metadata {key} entry {k}"
        if not isinstance(entry, dict):
            raise ModelError(f"{where} must be an object {{input, output, ...}}; got {quote(entry)}")
        for name in ("input", "output"):
            if not isinstance(entry.get(name), str):
                raise ModelError(
                    f"{where}: {name} must be a tensor name (a string); got {quote(entry.get(name))}"
                )
        shape = entry.get("shape")
        if shape is not None and (
            not isinstance(shape, list)
            or not all(
                d is None or isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
                for d in shape
            )
        ):
            raise ModelError(
                f"{where}: shape must be a list of sizes (ints >= 0, dim names or null); got {quote(shape)}"
            )
        axis = entry.get("batch_axis")
        if axis is not None and (not isinstance(axis, int) or isinstance(axis, bool)):
            raise ModelError(f"{where}: batch_axis must be an integer; got {quote(axis)}")
        entries.append(
            StateEntry(entry["input"], entry["output"], None if shape is None else tuple(shape), axis)
        )
    return tuple(entries)


def _vocab(metadata: Mapping[str, str]) -> tuple[str, ...] | None:
    key = "rnndeploy.vocab"
    if key not in metadata:
        return None
    vocab = _loads(metadata, key)
    if not isinstance(vocab, list) or not vocab or not all(isinstance(v, str) and v for v in vocab):
        raise ModelError(
            f"metadata {key} must be a non-empty JSON list of non-empty strings; got {quote(vocab)}"
        )
    if len(set(vocab)) != len(vocab):
        seen: set[str] = set()
        twice = next(v for v in vocab if v in seen or seen.add(v))
        raise ModelError(f"metadata {key} lists {quote(twice)} more than once; token ids must be distinct")
    return tuple(vocab)


def _data_stats(metadata: Mapping[str, str]) -> tuple[np.ndarray | None, np.ndarray | None]:
    key = "rnndeploy.data_stats"
    stats = _json_object(metadata, key)
    if not stats:
        return None, None
    if "mean" not in stats or "std" not in stats:
        raise ModelError(f"metadata {key} must be {{}} or hold both mean and std; got {quote(stats)}")
    arrays = []
    for name in ("mean", "std"):
        value = stats[name]
        values = value if isinstance(value, list) else [value]
        if not values or not all(_finite_number(v) for v in values):
            raise ModelError(
                f"metadata {key}: {name} must be a finite number or a non-empty list of them; got {quote(value)}"
            )
        arrays.append(np.asarray(values, np.float64))
    mean, std = arrays
    if mean.shape != std.shape:
        raise ModelError(
            f"metadata {key}: mean has {mean.size} features, std {std.size}; they must have the same length"
        )
    if not np.all(std > 0):
        raise ModelError(
            f"metadata {key}: every std must be > 0 (values are divided by it); got {quote(std.tolist())}"
        )
    return mean, std


def _finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
