"""The models one server serves: a Triton model's ``config.pbtxt`` contract, and routing by name and version.

:class:`ConfiguredModel` is what a model repository's config adds to a graph: the declared inputs and outputs a
request is checked against (names, datatypes, shapes, ``max_batch_size``), the metadata Triton answers with,
and the sequence-batcher control inputs (START, END, READY, CORRID) the server fills in itself.
:class:`ModelSet` routes requests to one :class:`~rnndeploy.server.app.ModelServer` per model version, as
``/v2/models/{name}[/versions/{version}]`` names them (no version: the latest one).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING

import numpy as np

from rnndeploy.runtime import StreamingSession
from rnndeploy.server.metrics import registry_for
from rnndeploy.server.protocol import TO_DATATYPE, Limits, RequestError
from rnndeploy.server.repository import CONFIG_FILE, DATA_TYPES, ModelEntry, RepositoryError

if TYPE_CHECKING:
    from rnndeploy.server.app import ModelServer

# the platform Triton reports for a backend whose config names none
PLATFORMS = {"onnxruntime": "onnxruntime_onnx"}


class ConfiguredModel:
    """The config of ``entry`` over the graph that ``session`` runs (one version of a repository model).

    The graph's inputs must be the config's inputs plus control inputs of its ``sequence_batching`` (the
    exported ``START``); its outputs must include the config's outputs, with the same datatypes. Raises
    :class:`RepositoryError` naming the config and the graph file otherwise.
    """

    def __init__(self, entry: ModelEntry, session: StreamingSession, model_file: str) -> None:
        self.entry = entry
        config = entry.folder / CONFIG_FILE
        seq = entry.sequence_batching
        declared = {t.name: t for t in entry.inputs}
        controls = {c.name: c for c in (seq.controls if seq is not None else ())}
        self.controls = [c for name, c in controls.items() if name in session.inputs]
        for name in session.inputs:
            if name not in declared and name not in controls:
                raise RepositoryError(
                    f"{model_file}: graph input {name!r} is neither an input nor a sequence control input of "
                    f"{config} (inputs: {list(declared)}, controls: {list(controls)})"
                )
        for kind, tensors, graph in (
            ("input", entry.inputs, session.inputs),
            ("output", entry.outputs, session.outputs),
        ):
            for tensor in tensors:
                if tensor.name not in graph:
                    raise RepositoryError(
                        f"{config}: {kind} {tensor.name!r} is not a step {kind} of the graph {model_file} "
                        f"(its step {kind}s: {list(graph)})"
                    )
                if tensor.dtype != graph[tensor.name].dtype:
                    raise RepositoryError(
                        f"{config}: {kind} {tensor.name!r} is {tensor.data_type}, the graph {model_file} has "
                        f"{graph[tensor.name].dtype.name}"
                    )
        for control in self.controls:
            if DATA_TYPES[control.data_type][1] != session.inputs[control.name].dtype:
                raise RepositoryError(
                    f"{config}: control input {control.name!r} is {control.data_type}, the graph {model_file} "
                    f"has {session.inputs[control.name].dtype.name}"
                )
        self.session = session
        self.output_names = [t.name for t in entry.outputs]

    @property
    def platform(self) -> str:
        return self.entry.platform or PLATFORMS.get(self.entry.backend, self.entry.backend)

    def tensor_metadata(self) -> tuple[list[dict], list[dict]]:
        """The config's inputs and outputs as Triton's model metadata lists them (batch axis first: -1)."""
        batch = [-1] if self.entry.max_batch_size > 0 else []

        def describe(t) -> dict:
            return {"name": t.name, "datatype": t.datatype, "shape": [*batch, *t.dims]}

        return [describe(t) for t in self.entry.inputs], [describe(t) for t in self.entry.outputs]

    def check_request(self, arrays: dict[str, np.ndarray]) -> None:
        """The request's inputs against the config: names, datatypes, ranks, fixed dims, ``max_batch_size``."""
        entry = self.entry
        required = [t.name for t in entry.inputs if not t.optional]
        known = {t.name for t in entry.inputs}
        missing, extra = [n for n in required if n not in arrays], sorted(set(arrays) - known)
        if missing or extra:
            raise RequestError(
                f"model {entry.name!r} takes inputs {sorted(known)} (its {CONFIG_FILE})"
                + (f"; missing {missing}" if missing else "")
                + (f"; unexpected {extra}" if extra else "")
            )
        for tensor in entry.inputs:
            if tensor.name not in arrays:
                continue
            array = arrays[tensor.name]
            if array.dtype != tensor.dtype:
                raise RequestError(
                    f"input {tensor.name!r} of model {entry.name!r} must be {tensor.datatype}, "
                    f"got {TO_DATATYPE[array.dtype]}"
                )
            dims = (-1, *tensor.dims) if entry.max_batch_size > 0 else tensor.dims
            if array.ndim != len(dims) or any(d != -1 and d != n for d, n in zip(dims, array.shape)):
                raise RequestError(
                    f"input {tensor.name!r} of model {entry.name!r} must have shape {list(dims)} "
                    f"(-1: any size), got {list(array.shape)}"
                )
            if entry.max_batch_size > 0 and array.shape[0] > entry.max_batch_size:
                raise RequestError(
                    f"input {tensor.name!r} of model {entry.name!r} has {array.shape[0]} batch rows; "
                    f"max_batch_size is {entry.max_batch_size}"
                )

    def control_arrays(
        self, arrays: dict[str, np.ndarray], sequence_id: Hashable | None, end: bool
    ) -> dict[str, np.ndarray]:
        """The control inputs the graph takes, for a (checked) request's ``arrays``.

        START is its false value: the server starts every sequence from a zero state itself, so the graph's
        own reset is not needed. END carries ``end``, READY true, CORRID the sequence id (0 for a one-off
        request), each shaped like the graph input, with the request's batch rows.
        """
        if not self.controls:
            return {}
        name = next(iter(arrays))
        spec = self.session.inputs[name]
        added = arrays[name].ndim == len(spec.shape) - 1
        rows = 1 if added else arrays[name].shape[spec.batch_axis]
        out = {}
        for control in self.controls:
            target = self.session.inputs[control.name]
            shape = [d if isinstance(d, int) else 1 for d in target.shape]
            shape[target.batch_axis] = rows
            if added:
                del shape[target.batch_axis]
            dtype = DATA_TYPES[control.data_type][1]
            if control.kind == "CONTROL_SEQUENCE_CORRID":
                value = 0 if sequence_id is None else sequence_id
                if isinstance(value, str):
                    raise RequestError(
                        f"model {self.entry.name!r} takes the sequence id as {control.data_type} "
                        f"(its CORRID control {control.name!r}): sequence_id must be an integer, got {value!r}"
                    )
                if not np.iinfo(dtype).min <= value <= np.iinfo(dtype).max:
                    raise RequestError(
                        f"sequence_id {value} does not fit the {control.data_type} CORRID control "
                        f"{control.name!r} of model {self.entry.name!r}"
                    )
            else:
                false, true = control.false_true
                value = {
                    "CONTROL_SEQUENCE_START": false,
                    "CONTROL_SEQUENCE_END": true if end else false,
                    "CONTROL_SEQUENCE_READY": true,
                }[control.kind]
            out[control.name] = np.full(shape, value, dtype)
        return out


class ModelSet:
    """ModelServers by model name and version: what a server routes ``/v2/models/...`` requests to."""

    def __init__(self, servers: list[ModelServer]) -> None:
        if not servers:
            raise ValueError("a ModelSet needs at least one ModelServer")
        self.by_name: dict[str, dict[str, ModelServer]] = {}
        for server in servers:
            versions = self.by_name.setdefault(server.model_name, {})
            if server.model_version in versions:
                raise ValueError(f"model {server.model_name!r} version {server.model_version} is given twice")
            versions[server.model_version] = server
        for name, versions in self.by_name.items():
            self.by_name[name] = dict(sorted(versions.items(), key=lambda kv: _version_key(kv[0])))
        self.servers = [s for versions in self.by_name.values() for s in versions.values()]
        self.registry = servers[0].registry if len(servers) == 1 else registry_for(*self.servers)

    @property
    def limits(self) -> Limits:
        """The limits of the first model (a repository's models share one :class:`Limits`)."""
        return self.servers[0].limits

    @property
    def running(self) -> bool:
        return all(s.batcher.running for s in self.servers)

    def get(self, name: str, version: str | None = None) -> ModelServer:
        """The server of model ``name`` at ``version`` (``None`` or ``""``: the latest); 404 when unknown."""
        versions = self.by_name.get(name)
        if versions is None:
            served = ", ".join(repr(n) for n in self.by_name)
            raise RequestError(f"unknown model {name!r}; this server serves {served}", 404)
        if not version:
            return next(reversed(versions.values()))
        if version not in versions:
            raise RequestError(
                f"unknown version {version!r} of model {name!r}; available: {', '.join(versions)}", 404
            )
        return versions[version]

    def versions(self, name: str, version: str | None = None) -> list[str]:
        """The versions model metadata lists: all ready ones, or the one asked for."""
        self.get(name, version)
        return [version] if version else list(self.by_name[name])

    def index(self) -> list[dict]:
        """``/v2/repository/index``: every version of every model, as Triton lists loaded models."""
        return [{"name": s.model_name, "version": s.model_version, "state": "READY"} for s in self.servers]

    async def start(self) -> None:
        for server in self.servers:
            await server.batcher.start()

    async def stop(self) -> None:
        for server in self.servers:
            await server.batcher.stop()


def _version_key(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if version.isdigit() else (1, version)
