"""Stepwise inference of stateful ONNX models on onnxruntime: :class:`StreamingSession`.

A stateful model has state inputs and state outputs that pair up (``h0 -> hn``): the output of one call is the
input of the next. A :class:`StreamingSession` keeps that state per *stream* (one sequence being served), so a
caller only passes the new input of each step. Steps of several streams run as one batched onnxruntime call
(:meth:`StreamingSession.step_many`): state rows are gathered along the batch axis, run, and scattered back.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import re
from collections.abc import Hashable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}

# onnxruntime type strings -> numpy dtypes (the tensor types a state or an input can have).
_ORT_DTYPES = {
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

# Naming conventions for state pairs, tried in order: (input pattern, output template).
_NAMING_CONVENTIONS: tuple[tuple[str, str], ...] = (
    (r"(?P<x>.*)0", r"\g<x>n"),  # h0 -> hn, c0 -> cn (torch / rnndeploy)
    (r"(?P<x>.+)_in", r"\g<x>_out"),  # state_in -> state_out
    (r"in_(?P<x>.+)", r"out_\g<x>"),
    (r"past_(?P<x>.+)", r"present_\g<x>"),  # past_key -> present_key (onnxruntime gpt2 helper)
    (r"past_key_values\.(?P<x>.+)", r"present.\g<x>"),  # Hugging Face optimum
    (r"initial_(?P<x>.+)", r"final_\g<x>"),
    (r"(?P<x>.+)_prev", r"\g<x>_next"),
    (r"(?P<x>.+)", r"\g<x>_out"),  # state -> state_out
)
_BATCH_NAMES = ("batch", "batch_size", "N", "B", "n", "b")

# What onnxruntime raises when it cannot load a model or run a step (all derive from Exception only).
_ORT_ERRORS = (
    _ort_state.Fail,
    _ort_state.InvalidArgument,
    _ort_state.InvalidGraph,
    _ort_state.InvalidProtobuf,
    _ort_state.NoSuchFile,
    _ort_state.NotImplemented,
    _ort_state.RuntimeException,
    _ort_state.EPFail,
)
# onnxruntime's documented default severity of its process-wide logger (2: warnings and above).
_ORT_DEFAULT_LOG_SEVERITY = 2


class ModelError(ValueError):
    """The model or the state mapping cannot be served (no states, unknown names, mismatched pairs)."""


class StepInputError(ValueError):
    """An input given to a step has the wrong name, shape or dtype."""


class ProviderError(RuntimeError):
    """A requested execution provider is not available."""


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

    def to_json(self) -> dict:
        return {
            "input": self.input,
            "output": self.output,
            "shape": list(self.shape),
            "batch_axis": self.batch_axis,
            "dtype": self.dtype.name,
        }


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers (a GPU build lists CUDA even without a GPU)."""
    return list(ort.get_available_providers())


def _cuda_driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def resolve_providers(providers: str | Iterable[str] | None) -> list[str]:
    """Turn ``None`` (auto), ``"cuda"``, ``"cpu"``, ``"tensorrt"``, ``"cuda,cpu"`` or full names into a list.

    Auto lists CUDA first when this build has it and a CUDA driver is present, then CPU
    (:class:`StreamingSession` still checks that CUDA starts, and runs on the CPU quietly when it does not).
    TensorRT is never picked automatically: it builds an engine per input shape at first use (seconds to
    minutes); ask for it by name.
    """
    available = available_providers()
    if providers is None:
        auto = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in available and _cuda_driver_present():
            auto.insert(0, "CUDAExecutionProvider")
        return auto
    names = providers.split(",") if isinstance(providers, str) else list(providers)
    resolved = []
    for name in names:
        full = PROVIDER_ALIASES.get(name.strip().lower(), name.strip())
        if full not in available:
            raise ProviderError(
                f"execution provider {name!r} ({full}) is not available in this onnxruntime build; "
                f"available: {', '.join(available)}. For CUDA/TensorRT install onnxruntime-gpu with "
                "matching CUDA libraries."
            )
        resolved.append(full)
    if "CPUExecutionProvider" not in resolved:
        resolved.append("CPUExecutionProvider")
    return resolved


def default_session_options(threads: int = 1) -> ort.SessionOptions:
    """Low-latency defaults: ``threads`` intra-op threads, one inter-op thread, all graph optimizations.

    One thread is fastest for one small recurrent step (no thread hand-off) and lets a server run one session
    per core; raise it for large batches.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def _load_session(source: str | bytes, options: ort.SessionOptions, providers: list) -> ort.InferenceSession:
    """``ort.InferenceSession``, with a file or bytes onnxruntime cannot load reported as :class:`ModelError`."""
    try:
        return ort.InferenceSession(source, options, providers=providers)
    except _ORT_ERRORS as error:
        what = f"{source} is" if isinstance(source, str) else f"the given {len(source)} bytes are"
        raise ModelError(f"{what} not an ONNX model onnxruntime can load: {error}") from error


def _load_auto(source: str | bytes, options: ort.SessionOptions, providers: list) -> ort.InferenceSession:
    """Try ``providers`` (CUDA first) without onnxruntime's error log; on the CPU when CUDA does not start.

    onnxruntime logs an error and falls back to the next provider when the CUDA provider library or its
    CUDA/cuDNN libraries cannot be loaded; a user who did not ask for CUDA should not see that.
    """
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(source, options, providers=providers)
    except _ORT_ERRORS:
        session = None
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT_LOG_SEVERITY)
    if session is None:  # CUDA failed loudly, or the model is bad: the CPU run tells which, clearly
        return _load_session(source, options, ["CPUExecutionProvider"])
    return session


@contextmanager
def _step_errors(streams: Mapping[Hashable, dict[str, np.ndarray]]) -> Iterator[None]:
    """Report onnxruntime's failure to run a step (an out-of-range token id, ...) as :class:`StepInputError`."""
    try:
        yield
    except _ORT_ERRORS as error:
        given = "; ".join(
            f"stream {stream!r}: " + ", ".join(_summary(n, a) for n, a in arrays.items())
            for stream, arrays in streams.items()
        )
        raise StepInputError(f"the model cannot run this step ({given}): {error}") from error


def _summary(name: str, array: np.ndarray) -> str:
    text = f"{name} {array.dtype.name}{list(array.shape)}"
    if array.size and array.dtype.kind in "iuf":
        text += f" with values in [{array.min()}, {array.max()}]"
    return text


def _spec(arg: ort.NodeArg) -> TensorSpec:
    if arg.type not in _ORT_DTYPES:
        raise ModelError(f"{arg.name} has type {arg.type}; supported tensor types: {', '.join(_ORT_DTYPES)}")
    return TensorSpec(arg.name, tuple(arg.shape), np.dtype(_ORT_DTYPES[arg.type]))


class _Stream:
    """One stream's state: host arrays (``state``) or device OrtValues (``device_state``)."""

    __slots__ = ("batch", "state", "device_state", "spare", "graph")

    def __init__(self) -> None:
        self.batch: int | None = None
        self.state: dict[str, np.ndarray] = {}
        self.device_state: dict[str, ort.OrtValue] = {}
        self.spare: dict[str, ort.OrtValue] = {}
        self.graph: _CudaGraphSlot | None = None


class _CudaGraphSlot:
    """Fixed device buffers and two captured CUDA graphs (state ping-pong) for one stream."""

    __slots__ = ("ids", "inputs", "outputs", "parity", "bindings")

    def __init__(self, ids: tuple[int, int]) -> None:
        self.ids = ids
        self.inputs: dict[str, ort.OrtValue] = {}
        self.outputs: dict[str, ort.OrtValue] = {}
        self.parity = 0
        self.bindings: list[ort.IOBinding] = []


class StreamingSession:
    """An onnxruntime session that carries the state of many streams between steps.

    Args:
        model: path to an ``.onnx`` file, or the serialized model bytes.
        states: explicit state pairs ``{"state_input": "state_output", ...}``. Without it the pairs come from
            the ``rnndeploy.states`` metadata, else from naming conventions (``h0 -> hn``, ``x_in -> x_out``,
            ``in_x -> out_x``, ``past_x -> present_x``, ``x -> x_out``, ...).
        batch_axes: batch axis per state input, where neither metadata nor a dynamic dim shared with the main
            input tells it.
        constants: values for inputs that stay fixed for the whole session (a sample rate, a temperature).
        providers: ``None`` (auto: CUDA when usable, else CPU), ``"cpu"``, ``"cuda"``, ``"tensorrt"``, or a
            list of onnxruntime provider names.
        threads: intra-op threads (default 1: lowest latency per step on small models).
        io_binding: keep state in bound OrtValues (on the GPU: on the device, no host round trip per step).
            Default: on for CUDA, off for CPU (measured no faster there; see benchmarks/bench_runtime.py).
        cuda_graph: capture each stream's step as CUDA graphs (CUDA only; every step of a stream must
            then have the same input shape).
        session_options: replaces :func:`default_session_options`.

    The main (data) inputs are the graph inputs that are neither states nor constants. ``step`` takes them
    with or without the batch axis (then outputs come without it too); a stream's batch size is fixed by its
    first step. Outputs are the graph outputs that are not states.
    """

    def __init__(
        self,
        model: str | os.PathLike | bytes,
        states: Mapping[str, str] | None = None,
        *,
        batch_axes: Mapping[str, int] | None = None,
        constants: Mapping[str, object] | None = None,
        providers: str | Iterable[str] | None = None,
        threads: int = 1,
        io_binding: bool | None = None,
        cuda_graph: bool = False,
        session_options: ort.SessionOptions | None = None,
    ) -> None:
        requested = resolve_providers(providers)
        options = session_options or default_session_options(threads)
        provider_list: list = list(requested)
        if cuda_graph:
            if "CUDAExecutionProvider" not in requested:
                raise ProviderError("cuda_graph=True needs the CUDA execution provider (providers='cuda')")
            provider_list = [
                ("CUDAExecutionProvider", {"enable_cuda_graph": "1"}) if p == "CUDAExecutionProvider" else p
                for p in requested
            ]
        source = str(model) if isinstance(model, str | os.PathLike) else model
        if isinstance(source, str) and not Path(source).is_file():
            raise FileNotFoundError(f"model file {source} does not exist")
        if providers is None and requested[0] != "CPUExecutionProvider":
            self._session = _load_auto(source, options, provider_list)
        else:
            self._session = _load_session(source, options, provider_list)
        self.providers: list[str] = self._session.get_providers()
        explicit_gpu = providers is not None and any(p != "CPUExecutionProvider" for p in requested)
        if explicit_gpu and self.providers == ["CPUExecutionProvider"]:
            raise ProviderError(
                f"asked for {requested[0]} but onnxruntime could not start it (no GPU, or CUDA/cuDNN "
                "libraries missing: see onnxruntime's CUDA requirements); use providers='cpu'"
            )
        self.device = (
            "cuda" if self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        )
        self.metadata: dict[str, str] = dict(self._session.get_modelmeta().custom_metadata_map)
        graph_inputs = {a.name: _spec(a) for a in self._session.get_inputs()}
        graph_outputs = {a.name: _spec(a) for a in self._session.get_outputs()}

        constants = dict(constants or {})
        unknown = sorted(set(constants) - set(graph_inputs))
        if unknown:
            raise ModelError(
                f"constants {unknown} are not inputs of the model; inputs: {sorted(graph_inputs)}"
            )
        self.constants: dict[str, np.ndarray] = {}
        for name, value in constants.items():
            spec = graph_inputs[name]
            array = np.asarray(value, dtype=spec.dtype)
            if array.ndim == 0 and len(spec.shape) == 1:
                array = array.reshape(1)
            _check_shape(spec, array, what="constant")
            self.constants[name] = array

        pairs = self._find_state_pairs(states, graph_inputs, graph_outputs, set(constants))
        data_names = [n for n in graph_inputs if n not in constants and n not in {p[0] for p in pairs}]
        if not data_names:
            raise ModelError(
                "the model has no input left for step data once states and constants are removed"
            )
        self.states: tuple[StatePair, ...] = tuple(
            self._make_pair(
                i, o, graph_inputs, graph_outputs, data_names, batch_axes or {}, states is not None
            )
            for i, o in pairs
        )
        self.inputs: dict[str, TensorSpec] = {
            n: _with_batch_axis(graph_inputs[n], self.states[0].shape[self.states[0].batch_axis])
            for n in data_names
        }
        state_outputs = {p.output for p in self.states}
        batch_dim = self.states[0].shape[self.states[0].batch_axis]
        self.outputs: dict[str, TensorSpec] = {
            n: _with_batch_axis(s, batch_dim) for n, s in graph_outputs.items() if n not in state_outputs
        }
        self._output_names = list(self.outputs) + [p.output for p in self.states]
        self._streams: dict[Hashable, _Stream] = {}

        self.io_binding = self.device == "cuda" if io_binding is None else io_binding
        self.cuda_graph = cuda_graph
        if cuda_graph and self.device != "cuda":
            raise ProviderError(
                "cuda_graph=True needs the session to run on CUDA; it runs on " + self.providers[0]
            )
        self._device_constants = {n: self._to_device(a) for n, a in self.constants.items()}
        self._next_graph_id = 1

    # ------------------------------------------------------------------ discovery
    def _find_state_pairs(
        self,
        states: Mapping[str, str] | None,
        inputs: dict[str, TensorSpec],
        outputs: dict[str, TensorSpec],
        constants: set[str],
    ) -> list[tuple[str, str]]:
        if states is not None:
            pairs = list(states.items())
            source = "the states mapping"
        elif "rnndeploy.states" in self.metadata:
            try:
                described = json.loads(self.metadata["rnndeploy.states"])
                pairs = [(d["input"], d["output"]) for d in described]
            except (json.JSONDecodeError, TypeError, KeyError) as err:
                raise ModelError(
                    f"metadata rnndeploy.states is not a JSON list of {{input, output}}: {err}"
                ) from err
            source = "metadata rnndeploy.states"
        else:
            pairs = _infer_pairs(inputs, outputs, constants)
            source = "naming conventions"
        if not pairs:
            raise ModelError(
                "no state pairs found: the model has no rnndeploy.states metadata and no input/output names "
                f"follow a known convention (h0->hn, x_in->x_out, past_x->present_x, x->x_out). Inputs: "
                f"{sorted(inputs)}, outputs: {sorted(outputs)}. Pass states={{'input_name': 'output_name'}}."
            )
        for i, o in pairs:
            if i not in inputs:
                raise ModelError(
                    f"state input {i!r} from {source} is not a model input; inputs: {sorted(inputs)}"
                )
            if o not in outputs:
                raise ModelError(
                    f"state output {o!r} from {source} is not a model output; outputs: {sorted(outputs)}"
                )
            if i in constants:
                raise ModelError(f"{i!r} is given both as a constant and as a state input")
        for names, kind in (([i for i, _ in pairs], "input"), ([o for _, o in pairs], "output")):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ModelError(f"state {kind}s {dupes} appear in more than one pair ({source})")
        return pairs

    def _make_pair(
        self,
        name_in: str,
        name_out: str,
        inputs: dict[str, TensorSpec],
        outputs: dict[str, TensorSpec],
        data_names: list[str],
        batch_axes: Mapping[str, int],
        explicit: bool,
    ) -> StatePair:
        spec_in, spec_out = inputs[name_in], outputs[name_out]
        if spec_in.dtype != spec_out.dtype:
            raise ModelError(
                f"state pair {name_in} -> {name_out}: dtypes differ "
                f"({spec_in.dtype.name} vs {spec_out.dtype.name})"
            )
        if len(spec_in.shape) != len(spec_out.shape) or any(
            isinstance(a, int) and isinstance(b, int) and a != b
            for a, b in zip(spec_in.shape, spec_out.shape, strict=False)
        ):
            raise ModelError(
                f"state pair {name_in} -> {name_out}: shapes differ "
                f"({spec_in.describe()} vs {spec_out.describe()})"
            )
        described = {}
        if not explicit and "rnndeploy.states" in self.metadata:
            described = next(
                d for d in json.loads(self.metadata["rnndeploy.states"]) if d["input"] == name_in
            )
        shape = spec_in.shape
        if len(described.get("shape", ())) == len(shape):
            # Fixed sizes from the graph win; the metadata fills dims the graph leaves dynamic.
            shape = tuple(
                g if isinstance(g, int) or not isinstance(m, int) else m
                for g, m in zip(shape, described["shape"], strict=False)
            )
        if name_in in batch_axes:
            axis = batch_axes[name_in]
        elif "batch_axis" in described:
            axis = described["batch_axis"]
        else:
            axis = _infer_batch_axis(spec_in, [inputs[n] for n in data_names])
        if not isinstance(axis, int) or not -len(shape) <= axis < len(shape):
            raise ModelError(f"batch axis {axis} is out of range for state {spec_in.describe()}")
        axis %= len(shape)
        if isinstance(shape[axis], int) and shape[axis] != 1:
            raise ModelError(
                f"state {spec_in.describe()} has a fixed size {shape[axis]} on its batch axis {axis}; "
                "export it with a dynamic batch axis or pass batch_axes"
            )
        return StatePair(name_in, name_out, shape, axis, spec_in.dtype)

    # ------------------------------------------------------------------ streams
    @property
    def streams(self) -> list[Hashable]:
        """Ids of the open streams."""
        return list(self._streams)

    def reset(self, stream: Hashable = 0, state: Mapping[str, np.ndarray] | None = None) -> None:
        """Start ``stream`` again from zero state, or from ``state`` (``{state_input: array}``, all pairs)."""
        self._streams.pop(stream, None)
        if state is None:
            return
        missing = sorted({p.input for p in self.states} - set(state))
        if missing:
            raise StepInputError(f"reset({stream!r}, state=...) misses state inputs {missing}")
        arrays = {}
        batch = None
        for pair in self.states:
            array = np.asarray(state[pair.input])
            spec = TensorSpec(pair.input, pair.shape, pair.dtype)
            _check_dtype(spec, array)
            _check_shape(spec, array, what="state")
            if batch is not None and array.shape[pair.batch_axis] != batch:
                raise StepInputError(
                    f"state {pair.input} has {array.shape[pair.batch_axis]} rows, others {batch}"
                )
            batch = array.shape[pair.batch_axis]
            arrays[pair.input] = np.ascontiguousarray(array)
        entry = self._open(stream, batch)
        self._store(entry, arrays)

    def close(self, stream: Hashable = 0) -> None:
        """Forget ``stream`` and free its state."""
        if self._streams.pop(stream, None) is None:
            raise KeyError(f"stream {stream!r} is not open; open streams: {self.streams[:10]}")

    def get_state(self, stream: Hashable = 0) -> dict[str, np.ndarray]:
        """A copy of ``stream``'s state, ``{state_input: array}`` (zeros for a stream not stepped yet)."""
        entry = self._streams.get(stream)
        if entry is None or entry.batch is None:
            return {p.input: p.initial(1) for p in self.states}
        return {k: v.copy() for k, v in self._load(entry).items()}

    def _open(self, stream: Hashable, batch: int) -> _Stream:
        entry = self._streams.get(stream)
        if entry is None:
            entry = self._streams[stream] = _Stream()
        if entry.batch is None:
            entry.batch = batch
            self._store(entry, {p.input: p.initial(batch) for p in self.states})
        elif entry.batch != batch:
            raise StepInputError(
                f"stream {stream!r} has batch size {entry.batch}, this step has {batch}; "
                "reset the stream first"
            )
        return entry

    def _store(self, entry: _Stream, arrays: dict[str, np.ndarray]) -> None:
        if self.io_binding:
            entry.device_state = {k: self._to_device(np.ascontiguousarray(a)) for k, a in arrays.items()}
            entry.spare = {}
            entry.graph = None
        else:
            entry.state = arrays

    def _load(self, entry: _Stream) -> dict[str, np.ndarray]:
        if self.io_binding:
            return {k: v.numpy() for k, v in entry.device_state.items()}
        return entry.state

    def _to_device(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)

    # ------------------------------------------------------------------ inputs
    def check_input(self, x: np.ndarray | Mapping[str, object]) -> tuple[dict[str, np.ndarray], int, bool]:
        """Validate one step's input; returns ``(arrays with batch axis, batch size, batch axis was added)``.

        Raises :class:`StepInputError` naming the input, the expected and the given shape or dtype.
        """
        if not isinstance(x, Mapping):
            if len(self.inputs) != 1:
                raise StepInputError(
                    f"the model has several step inputs {list(self.inputs)}; pass a dict of them"
                )
            x = {next(iter(self.inputs)): x}
        missing, extra = sorted(set(self.inputs) - set(x)), sorted(set(x) - set(self.inputs))
        if missing or extra:
            raise StepInputError(
                f"step inputs must be {sorted(self.inputs)}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unexpected {extra}" if extra else "")
            )
        arrays, added, batch = {}, None, None
        for name, value in x.items():
            spec = self.inputs[name]
            array = value
            if not isinstance(value, np.ndarray):
                array = np.asarray(value)
                if np.can_cast(array.dtype, spec.dtype, "same_kind"):
                    array = array.astype(spec.dtype)
            _check_dtype(spec, array)
            if array.ndim == len(spec.shape) - 1:
                array = np.expand_dims(array, spec.batch_axis)
                this_added = True
            else:
                this_added = False
            _check_shape(spec, array, what="step input")
            rows = array.shape[spec.batch_axis]
            if batch is not None and (rows != batch or this_added != added):
                raise StepInputError(
                    f"step inputs disagree on the batch size ({name} has {rows}, others {batch})"
                )
            arrays[name], added, batch = array, this_added, rows
        if batch == 0:
            raise StepInputError("a step needs at least one batch row; got 0")
        return arrays, batch, bool(added)

    # ------------------------------------------------------------------ stepping
    def step(self, x: np.ndarray | Mapping[str, object], stream: Hashable = 0) -> dict[str, np.ndarray]:
        """Run one step (or a chunk of steps along the time axis) of ``stream`` and carry its state.

        Args:
            x: the step input, e.g. token ids ``[B, T]`` or ``[T]`` (batch axis left out), features
                ``[B, T, F]``; a dict ``{input_name: array}`` when the model has several step inputs.
            stream: any hashable id; a new id starts from zero state.
        Returns:
            ``{output_name: array}`` for the non-state outputs, e.g. ``output`` ``[B, T, V]`` (``[T, V]`` when
            the batch axis was left out of ``x``).
        """
        arrays, batch, added = self.check_input(x)
        new = stream not in self._streams
        entry = self._open(stream, batch)
        try:
            with _step_errors({stream: arrays}):
                if self.cuda_graph:
                    outs = self._run_cuda_graph(entry, arrays)
                elif self.io_binding:
                    outs = self._run_bound(entry, arrays)
                else:
                    feed = {**arrays, **self.constants, **entry.state}
                    results = self._session.run(self._output_names, feed)
                    n = len(self.outputs)
                    outs = dict(zip(self.outputs, results[:n], strict=False))
                    entry.state = {p.input: r for p, r in zip(self.states, results[n:], strict=False)}
        except BaseException:
            if new:  # a failed first step leaves no stream behind
                self._streams.pop(stream, None)
            raise
        return self._strip(outs) if added else outs

    def step_many(
        self, xs: Mapping[Hashable, np.ndarray | Mapping[str, object]]
    ) -> dict[Hashable, dict[str, np.ndarray]]:
        """Run one step of each of several streams as one batched onnxruntime call per input shape.

        State rows of the streams are gathered along each state's batch axis, run together and scattered
        back (on CUDA through host memory; with ``cuda_graph`` each stream replays its own graphs instead);
        the result equals calling :meth:`step` for each stream. Streams whose inputs (or grown states)
        differ in shape run in separate calls. All inputs are validated before anything runs, and states are
        stored (new streams opened) only after every call succeeded, so a failed step (a bad input, or one
        onnxruntime rejects: :class:`StepInputError`) changes no stream's state and opens no stream.

        Args:
            xs: ``{stream: x}`` with ``x`` as for :meth:`step`.
        Returns:
            ``{stream: {output_name: array}}``.
        """
        checked = {s: self.check_input(x) for s, x in xs.items()}
        for stream, (_, batch, _) in checked.items():
            entry = self._streams.get(stream)
            if entry is not None and entry.batch is not None and entry.batch != batch:
                raise StepInputError(f"stream {stream!r} has batch size {entry.batch}, this step has {batch}")
        if self.cuda_graph:  # each stream replays its own captured graphs on fixed device buffers
            return {s: self.step(x, stream=s) for s, x in xs.items()}
        states = {s: self._current_state(s, batch) for s, (_, batch, _) in checked.items()}
        groups: dict[tuple, list[Hashable]] = {}
        for stream, (arrays, _, _) in checked.items():
            key = tuple(
                _shape_without(a.shape, self.inputs[n].batch_axis) for n, a in arrays.items()
            ) + tuple(_shape_without(states[stream][p.input].shape, p.batch_axis) for p in self.states)
            groups.setdefault(key, []).append(stream)

        results: dict[Hashable, dict[str, np.ndarray]] = {}
        new_states: dict[Hashable, dict[str, np.ndarray]] = {}
        for members in groups.values():
            if len(members) == 1:  # nothing to gather or scatter
                feed = {**checked[members[0]][0], **states[members[0]]}
            else:
                feed = {
                    n: np.concatenate([checked[s][0][n] for s in members], axis=spec.batch_axis)
                    for n, spec in self.inputs.items()
                }
                feed.update(
                    {
                        p.input: np.concatenate([states[s][p.input] for s in members], axis=p.batch_axis)
                        for p in self.states
                    }
                )
            with _step_errors({s: checked[s][0] for s in members}):
                outs = self._session.run(self._output_names, {**feed, **self.constants})
            axes = [spec.batch_axis for spec in self.outputs.values()] + [p.batch_axis for p in self.states]
            if len(members) == 1:
                parts = [[o] for o in outs]
            else:
                bounds = list(itertools.accumulate(checked[s][1] for s in members))[:-1]
                parts = [np.split(o, bounds, axis=axis) for o, axis in zip(outs, axes, strict=True)]
            split_outs, split_states = parts[: len(self.outputs)], parts[len(self.outputs) :]
            for k, stream in enumerate(members):
                result = {name: parts[k] for name, parts in zip(self.outputs, split_outs, strict=False)}
                results[stream] = self._strip(result) if checked[stream][2] else result
                new_states[stream] = {
                    p.input: np.ascontiguousarray(parts[k])
                    for p, parts in zip(self.states, split_states, strict=False)
                }
        for stream, state in new_states.items():
            self._store(self._open(stream, checked[stream][1]), state)
        return {s: results[s] for s in xs}

    def _current_state(self, stream: Hashable, batch: int) -> dict[str, np.ndarray]:
        """``stream``'s state as host arrays, zeros with ``batch`` rows for a stream not stepped yet."""
        entry = self._streams.get(stream)
        if entry is None or entry.batch is None:
            return {p.input: p.initial(batch) for p in self.states}
        return self._load(entry)

    def _strip(self, outs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {n: np.squeeze(a, axis=self.outputs[n].batch_axis) for n, a in outs.items()}

    def _run_bound(self, entry: _Stream, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        binding = self._session.io_binding()
        for name, array in arrays.items():
            binding.bind_cpu_input(name, array)
        for name, value in self._device_constants.items():
            binding.bind_ortvalue_input(name, value)
        spares = {}
        for pair in self.states:
            current = entry.device_state[pair.input]
            binding.bind_ortvalue_input(pair.input, current)
            spare = entry.spare.get(pair.input)
            if spare is None and all(isinstance(d, int) for d in _shape_without(pair.shape, pair.batch_axis)):
                spare = entry.spare[pair.input] = self._to_device(np.empty(current.shape(), pair.dtype))
            if spare is None:
                binding.bind_output(pair.output, self.device)
            else:
                binding.bind_ortvalue_output(pair.output, spare)
                spares[pair.input] = spare
        for name in self.outputs:
            binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(binding)
        values = binding.get_outputs()
        for pair, value in zip(self.states, values, strict=False):
            # Keep our own OrtValue objects: on the CPU they hold the numpy buffers they wrap.
            new = spares.get(pair.input, value)
            entry.spare[pair.input], entry.device_state[pair.input] = entry.device_state[pair.input], new
        # Outputs bound to "cpu" live in onnxruntime's buffers, which the next run may reuse: copy them.
        return {
            name: value.numpy().copy()
            for name, value in zip(self.outputs, values[len(self.states) :], strict=False)
        }

    def _run_cuda_graph(self, entry: _Stream, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        slot = entry.graph
        if slot is None:
            slot = entry.graph = self._capture_slot(entry, arrays)
        for name, array in arrays.items():
            if tuple(slot.inputs[name].shape()) != array.shape:
                raise StepInputError(
                    f"cuda_graph streams keep one input shape: {name} was "
                    f"{tuple(slot.inputs[name].shape())}, "
                    f"now {array.shape}; use a session without cuda_graph for variable chunks"
                )
            slot.inputs[name].update_inplace(np.ascontiguousarray(array))
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("gpu_graph_id", str(slot.ids[slot.parity]))
        self._session.run_with_iobinding(slot.bindings[slot.parity], run_options)
        slot.parity ^= 1
        current = slot.parity
        for pair in self.states:
            entry.device_state[pair.input] = slot.inputs[f"{pair.input}#{current}"]
        return {name: slot.outputs[name].numpy().copy() for name in self.outputs}

    def _capture_slot(self, entry: _Stream, arrays: dict[str, np.ndarray]) -> _CudaGraphSlot:
        ids = (self._next_graph_id, self._next_graph_id + 1)
        self._next_graph_id += 2
        slot = _CudaGraphSlot(ids)
        sizes = {}
        for name, array in arrays.items():
            slot.inputs[name] = self._to_device(np.ascontiguousarray(array))
            sizes.update(
                {
                    d: n
                    for d, n in zip(self.inputs[name].shape, array.shape, strict=False)
                    if isinstance(d, str)
                }
            )
        for name, spec in self.outputs.items():
            if any(isinstance(d, str) and d not in sizes or d is None for d in spec.shape):
                raise ProviderError(
                    f"cuda_graph needs output shapes known from the inputs; {spec.describe()}"
                )
            shape = [sizes.get(d, d) for d in spec.shape]
            slot.outputs[name] = self._to_device(np.zeros(shape, spec.dtype))
        for pair in self.states:
            first = entry.device_state[pair.input]
            slot.inputs[f"{pair.input}#0"] = first
            slot.inputs[f"{pair.input}#1"] = self._to_device(np.zeros(first.shape(), pair.dtype))
        for parity in (0, 1):
            binding = self._session.io_binding()
            for name in arrays:
                binding.bind_ortvalue_input(name, slot.inputs[name])
            for name, value in self._device_constants.items():
                binding.bind_ortvalue_input(name, value)
            for pair in self.states:
                binding.bind_ortvalue_input(pair.input, slot.inputs[f"{pair.input}#{parity}"])
                binding.bind_ortvalue_output(pair.output, slot.inputs[f"{pair.input}#{parity ^ 1}"])
            for name in self.outputs:
                binding.bind_ortvalue_output(name, slot.outputs[name])
            slot.bindings.append(binding)
        return slot

    def describe(self) -> dict:
        """Inputs, outputs, state pairs, constants, providers and metadata as a JSON-able dict."""
        return {
            "inputs": [s.describe() for s in self.inputs.values()],
            "outputs": [s.describe() for s in self.outputs.values()],
            "states": [p.to_json() for p in self.states],
            "constants": {n: a.tolist() for n, a in self.constants.items()},
            "providers": self.providers,
            "metadata": self.metadata,
        }


def _infer_pairs(
    inputs: dict[str, TensorSpec], outputs: dict[str, TensorSpec], constants: set[str]
) -> list[tuple[str, str]]:
    pairs = []
    taken: set[str] = set()
    for name, spec in inputs.items():
        if name in constants:
            continue
        for pattern, template in _NAMING_CONVENTIONS:
            match = re.fullmatch(pattern, name)
            if not match:
                continue
            out = match.expand(template)
            if out in outputs and out not in taken and _compatible(spec, outputs[out]):
                pairs.append((name, out))
                taken.add(out)
                break
    return pairs


def _compatible(a: TensorSpec, b: TensorSpec) -> bool:
    return a.dtype == b.dtype and len(a.shape) == len(b.shape)


def _infer_batch_axis(state: TensorSpec, data: list[TensorSpec]) -> int:
    data_dims = {d for spec in data for d in spec.shape if isinstance(d, str)}
    shared = [i for i, d in enumerate(state.shape) if isinstance(d, str) and d in data_dims]
    if len(shared) == 1:
        return shared[0]
    named = [i for i, d in enumerate(state.shape) if d in _BATCH_NAMES]
    if len(named) == 1:
        return named[0]
    dynamic = [i for i, d in enumerate(state.shape) if not isinstance(d, int)]
    if len(dynamic) == 1:
        return dynamic[0]
    raise ModelError(
        f"cannot tell the batch axis of state {state.describe()}: no single dynamic dim is shared with "
        "the step inputs; pass batch_axes={name: axis}"
    )


def _with_batch_axis(spec: TensorSpec, batch_dim: Dim) -> TensorSpec:
    axis = spec.shape.index(batch_dim) if isinstance(batch_dim, str) and batch_dim in spec.shape else 0
    return TensorSpec(spec.name, spec.shape, spec.dtype, axis)


def _shape_without(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    return shape[:axis] + shape[axis + 1 :]


def _check_dtype(spec: TensorSpec, array: np.ndarray) -> None:
    if array.dtype != spec.dtype:
        raise StepInputError(
            f"{spec.name} must have dtype {spec.dtype.name}, got {array.dtype.name} "
            f"(expected {spec.describe()})"
        )


def _check_shape(spec: TensorSpec, array: np.ndarray, what: str) -> None:
    if array.ndim != len(spec.shape) or any(
        isinstance(d, int) and d != n for d, n in zip(spec.shape, array.shape, strict=False)
    ):
        raise StepInputError(
            f"{what} {spec.name} must have shape {spec.describe()}"
            + (" (the batch axis may be left out)" if what == "step input" else "")
            + f", got {list(array.shape)}"
        )
