"""The data plane: models, sequences, batching, limits and statistics, with no knowledge of HTTP or gRPC.

`ModelServer` is one model version: its session, its `Limits`, its
`SequenceBatcher` and its statistics; `ModelServer.infer` takes a
`Decoded` request and returns the outputs, refusing with a
`RequestError` before any state changes. `ModelSet` routes to one
ModelServer per model version; `open_repository` builds one from a Triton-style model repository, each
model checked against its ``config.pbtxt`` (Triton's ``ModelConfig``, which `ModelServer.model_config`
answers with). The front ends (`rest`, `grpc_service`) only
translate requests, answers and errors.
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from rnndeploy.runtime import ModelError, StepInputError, StreamingSession
from rnndeploy.server.batcher import SequenceBatcher
from rnndeploy.server.metrics import RequestStats, registry_for
from rnndeploy.server.protocol import (
    TO_DATATYPE,
    Decoded,
    Limits,
    RequestError,
    check_model_input,
    check_outputs,
    response_bytes,
)
from rnndeploy.server.repository import (
    CONFIG_FILE,
    DATA_TYPES,
    ModelEntry,
    RepositoryError,
    data_type,
    read_repository,
)

# the platform Triton reports for a backend whose config names none
STEP_GRAPH_FILE = "model.step.onnx"  # a version's step graph, beside its sequence graph
PLATFORMS = {"onnxruntime": "onnxruntime_onnx"}


class ModelServer:
    """One model version as every front end serves it: the model, its limits, the batcher, the statistics.

    `infer` takes a `Decoded` request, checks it against the model and the limits, runs it
    through the batcher and returns the outputs; every refusal is a `RequestError` raised before the
    step, so a refused request changes no state. ``config`` is the model's ``config.pbtxt`` when it comes from
    a model repository: requests are then checked against its config's inputs, the metadata lists its inputs
    and outputs, and the server fills the graph's sequence control inputs (`ConfiguredModel`).
    """

    def __init__(
        self,
        session: StreamingSession,
        model_name: str = "model",
        model_version: str = "1",
        *,
        limits: Limits | None = None,
        max_batch_size: int = 64,
        max_queue_delay_us: float = 500.0,
        idle_timeout_s: float = 60.0,
        worker_thread: bool = True,
        config: ConfiguredModel | None = None,
    ) -> None:
        self.session = session
        self.model_name, self.model_version = model_name, model_version
        self.config = config
        self.output_names = (
            list(session.outputs) if config is None else [t.name for t in config.entry.config.output]
        )
        self.limits = limits or Limits()
        self.vocab_size = session.vocab_size  # checked when the session opened: never silently absent
        self.stats = RequestStats()
        self.registry = registry_for(self)
        self.batcher = SequenceBatcher(
            session,
            max_batch_size=max_batch_size,
            max_queue_delay_s=max_queue_delay_us * 1e-6,
            idle_timeout_s=idle_timeout_s,
            max_sequences=self.limits.max_sequences,
            max_state_bytes=self.limits.max_state_bytes,
            worker_thread=worker_thread,
        )

    @property
    def platform(self) -> str:
        return "onnxruntime_onnx" if self.config is None else self.config.platform

    def model_config(self) -> mc.ModelConfig:
        """Triton's ``ModelConfig`` of the model: its whole ``config.pbtxt``, else one built from the graph."""
        if self.config is not None:
            return self.config.entry.config
        inputs, outputs = self.tensor_metadata()

        def tensor(kind, t: dict):
            return kind(name=t["name"], data_type=f"TYPE_{t['datatype']}", dims=t["shape"])

        return mc.ModelConfig(
            name=self.model_name,
            platform="onnxruntime_onnx",
            backend="onnxruntime",
            max_batch_size=0,  # the batch axis is part of each tensor's dims (-1)
            input=[tensor(mc.ModelInput, t) for t in inputs],
            output=[tensor(mc.ModelOutput, t) for t in outputs],
            sequence_batching=mc.ModelSequenceBatching(
                max_sequence_idle_microseconds=int(self.batcher.idle_timeout_s * 1e6)
            ),
        )

    def tensor_metadata(self) -> tuple[list[dict], list[dict]]:
        """The inputs and outputs as KServe v2 model metadata lists them (``-1``: any size)."""
        if self.config is not None:
            return self.config.tensor_metadata()

        def describe(spec) -> dict:
            shape = [d if isinstance(d, int) else -1 for d in spec.shape]
            return {"name": spec.name, "datatype": TO_DATATYPE[spec.dtype], "shape": shape}

        return (
            [describe(s) for s in self.session.inputs.values()],
            [describe(s) for s in self.session.outputs.values()],
        )

    async def infer(self, request: Decoded) -> dict:
        """Check ``request`` against the model and the limits, run it, return ``{output_name: array}``."""
        if request.outputs is None:
            request.outputs = [(name, request.binary_outputs) for name in self.output_names]
        check_outputs(request.outputs, self.output_names)
        arrays, controls = request.arrays, {}
        if self.config is not None:
            self.config.check_request(arrays)
            controls = self.config.control_arrays(arrays, request.sequence_id, request.end)
        else:
            for tensor in self.tensor_metadata()[0]:
                array = arrays.get(tensor["name"])
                if array is not None and array.ndim == len(tensor["shape"]) - 1:
                    raise RequestError(
                        f"input {tensor['name']!r} of model {self.model_name!r} must have shape "
                        f"{tensor['shape']} (-1: any size), batch axis first as the model metadata says; "
                        f"got {list(array.shape)}"
                    )
        arrays, rows, steps = check_model_input(
            self.session, {**arrays, **controls}, self.limits, self.vocab_size, controls
        )
        size = response_bytes(self.session, arrays, rows, request.outputs)
        if size > self.limits.max_response_bytes:
            raise RequestError(
                f"the response would take about {size} bytes, over the limit "
                f"max_response_bytes={self.limits.max_response_bytes}: send fewer rows or time steps",
                413,
                limit="max_response_bytes",
            )
        try:
            return await self.batcher.infer(
                arrays, request.sequence_id, request.start, request.end, cost=rows * steps
            )
        except StepInputError as error:
            raise RequestError(str(error)) from None


class ConfiguredModel:
    """The config of ``entry`` over the graph that ``session`` runs (one version of a repository model).

    The graph's inputs must be the config's inputs plus control inputs of its ``sequence_batching`` (the
    exported ``START``); its outputs must include the config's outputs, with the same datatypes. Raises
    `RepositoryError` naming the config and the graph file otherwise.
    """

    def __init__(self, entry: ModelEntry, session: StreamingSession, model_file: str) -> None:
        self.entry, self.session = entry, session
        config = entry.folder / CONFIG_FILE
        declared = {t.name for t in entry.config.input}
        controls = {c.name: c for c in entry.controls}
        self.controls = [c for c in entry.controls if c.name in session.inputs]
        for name in session.inputs:
            if name not in declared and name not in controls:
                raise RepositoryError(
                    f"{model_file}: graph input {name!r} is neither an input nor a sequence control input of "
                    f"{config} (inputs: {sorted(declared)}, controls: {list(controls)})"
                )
        for kind, tensors, graph in (
            ("input", entry.config.input, session.inputs),
            ("output", entry.config.output, session.outputs),
        ):
            for tensor in tensors:
                if tensor.name not in graph:
                    raise RepositoryError(
                        f"{config}: {kind} {tensor.name!r} is not a step {kind} of the graph {model_file} "
                        f"(its step {kind}s: {list(graph)})"
                    )
                if DATA_TYPES[data_type(tensor.data_type)][1] != graph[tensor.name].dtype:
                    raise RepositoryError(
                        f"{config}: {kind} {tensor.name!r} is {data_type(tensor.data_type)}, the graph "
                        f"{model_file} has {graph[tensor.name].dtype.name}"
                    )
        for control in self.controls:
            if DATA_TYPES[control.data_type][1] != session.inputs[control.name].dtype:
                raise RepositoryError(
                    f"{config}: control input {control.name!r} is {control.data_type}, the graph {model_file} "
                    f"has {session.inputs[control.name].dtype.name}"
                )

    @property
    def platform(self) -> str:
        config = self.entry.config
        return config.platform or PLATFORMS.get(config.backend, config.backend)

    def tensor_metadata(self) -> tuple[list[dict], list[dict]]:
        """The config's inputs and outputs as Triton's model metadata lists them (batch axis first: -1)."""
        batch = [-1] if self.entry.config.max_batch_size > 0 else []

        def describe(t) -> dict:
            datatype = DATA_TYPES[data_type(t.data_type)][0]
            return {"name": t.name, "datatype": datatype, "shape": [*batch, *t.dims]}

        return [describe(t) for t in self.entry.config.input], [describe(t) for t in self.entry.config.output]

    def check_request(self, arrays: dict[str, np.ndarray]) -> None:
        """The request's inputs against the config: names, datatypes, ranks, fixed dims, ``max_batch_size``."""
        name, config = self.entry.name, self.entry.config
        required = [t.name for t in config.input if not t.optional]
        known = {t.name for t in config.input}
        missing, extra = [n for n in required if n not in arrays], sorted(set(arrays) - known)
        if missing or extra:
            raise RequestError(
                f"model {name!r} takes inputs {sorted(known)} (its {CONFIG_FILE})"
                + (f"; missing {missing}" if missing else "")
                + (f"; unexpected {extra}" if extra else "")
            )
        declared = self.tensor_metadata()[0]
        for tensor in declared:
            array = arrays.get(tensor["name"])
            if array is not None and TO_DATATYPE.get(array.dtype) != tensor["datatype"]:
                raise RequestError(
                    f"input {tensor['name']!r} of model {name!r} must be {tensor['datatype']}, "
                    f"got {TO_DATATYPE[array.dtype]}"
                )
        for tensor in declared:
            array, dims = arrays.get(tensor["name"]), tensor["shape"]
            if array is not None and (
                array.ndim != len(dims) or any(d != -1 and d != n for d, n in zip(dims, array.shape))
            ):
                raise RequestError(
                    f"input {tensor['name']!r} of model {name!r} must have shape {dims} (-1: any size), "
                    f"got {list(array.shape)}"
                )
        for array_name, array in arrays.items():
            if config.max_batch_size > 0 and array.shape[0] > config.max_batch_size:
                raise RequestError(
                    f"input {array_name!r} of model {name!r} has {array.shape[0]} batch rows; "
                    f"max_batch_size is {config.max_batch_size}"
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
        """The limits of the first model (a repository's models share one `Limits`)."""
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

    def abort(self) -> None:
        """Answer every step still queued or running with 503 (see `SequenceBatcher.abort`)."""
        for server in self.servers:
            server.batcher.abort()


def open_repository(
    root: str | Path,
    *,
    limits: Limits | None = None,
    providers: str | None = None,
    threads: int = 1,
    worker_thread: bool = True,
    step_form: str | None = None,
) -> ModelSet:
    """Every ready version of every model of a Triton-style model repository, each a `ModelServer`.

    Each model's ``config.pbtxt`` gives its name, inputs and outputs, ``max_batch_size`` (the most sequences
    per batched step), and from ``sequence_batching`` the idle timeout, the queue delay and the state pairs
    (else the graph's ``rnndeploy.states`` metadata). ``onnxruntime`` models run their model file, ``python``
    models (``rnndeploy export --triton-backend python``) the ``model.onnx`` next to their ``model.py``.
    ``limits`` apply to each model. ``step_form`` (``"auto"``, ``"step"`` or ``"sequence"``; None: none):
    a version folder holding a step graph ``STEP_GRAPH_FILE`` beside its sequence graph serves them as one
    `StreamingSession` pair (``step_graph``, ``step_form``), one-step requests through the form it picks.
    Raises `RepositoryError` naming the file and the problem.
    """
    servers = []
    for entry in read_repository(root).values():
        for version in entry.ready_versions:
            servers.append(
                _repository_model(entry, version, limits, providers, threads, worker_thread, step_form)
            )
    return ModelSet(servers)


def _repository_model(
    entry: ModelEntry,
    version: int,
    limits: Limits | None,
    providers: str | None,
    threads: int,
    worker_thread: bool,
    step_form: str | None = None,
) -> ModelServer:
    if entry.kind in ("onnxruntime", "onnxruntime_onnx"):
        path = entry.model_file(version)
    elif entry.kind == "python":
        path = entry.model_file(version).with_name("model.onnx")
    else:
        raise RepositoryError(
            f"{entry.folder / CONFIG_FILE}: rnndeploy serve runs onnxruntime and python models (those "
            f"rnndeploy export writes), not {entry.kind!r}"
        )
    if not path.is_file():
        hint = " (rnndeploy serve runs the model.onnx next to model.py)" if entry.kind == "python" else ""
        raise RepositoryError(f"{path}: missing; model {entry.name!r} version {version} needs it{hint}")
    step_graph = path.with_name(STEP_GRAPH_FILE) if step_form is not None else None
    pair = (
        {}
        if step_graph is None or not step_graph.is_file()
        else {"step_graph": step_graph, "step_form": step_form}
    )
    seq = entry.sequence_batching
    states = {s.input_name: s.output_name for s in seq.state} if seq is not None and seq.state else None
    try:
        session = StreamingSession(
            path,
            states,
            batch_axes=dict.fromkeys(states or (), 0),  # Triton's implicit state is batch-first
            providers=providers,
            threads=threads,
            **pair,
        )
    except ModelError as error:
        raise RepositoryError(f"{path}: {error}") from None
    try:
        return ModelServer(
            session,
            entry.name,
            str(version),
            limits=limits,
            max_batch_size=max(entry.config.max_batch_size, 1),
            max_queue_delay_us=entry.max_queue_delay_us,
            idle_timeout_s=entry.idle_timeout_us * 1e-6,
            worker_thread=worker_thread,
            config=ConfiguredModel(entry, session, str(path)),
        )
    except ModelError as error:
        raise RepositoryError(f"{path}: {error}") from None


def _version_key(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if version.isdigit() else (1, version)
