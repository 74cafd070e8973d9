"""Stepwise inference of stateful ONNX models on onnxruntime: `StreamingSession`.

A `StreamingSession` keeps the state of each *stream* (one sequence being served), so a caller only
passes the new input of each step. Steps of several streams run as one batched onnxruntime call
(`StreamingSession.step_many`): state rows are gathered along the batch axis and run; each stream then
holds its rows of the batch's state outputs (``Rows``) until it steps alone or is compacted.

How a step runs:
- A step's input signature (names, dtypes, shapes) is validated once and cached; a later step with the same
  signature goes straight to the run.
- Each session picks one state store when it opens (`rnndeploy.runtime.stores`): host arrays and
  ``run()``; on the CPU with states of fixed size (every RNN/LSTM/GRU) two bound buffers per stream, written in
  turn through ``IOBinding`` (ping-pong); on CUDA device buffers, optionally replayed as CUDA graphs. A single
  stream's step is the store's; batched steps run on host arrays here, and the store takes each stream's rows.
"""

from __future__ import annotations

import dataclasses
import operator
import os
import threading
from collections.abc import Callable, Hashable, Iterable, Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rnndeploy.runtime.discovery import state_pairs
from rnndeploy.runtime.errors import ORT_RUN_ERRORS, ModelError, ProviderError, StepInputError, step_error
from rnndeploy.runtime.forms import FORMS, TIME_AXIS, FormChoice, choose_loaded
from rnndeploy.runtime.metadata import ModelMetadata, read_metadata
from rnndeploy.runtime.normalization import Normalization
from rnndeploy.runtime.providers import (
    GPU_PROVIDERS,
    default_session_options,
    load_session,
    provider_problem,
    resolve_providers,
)
from rnndeploy.runtime.specs import (
    StatePair,
    TensorSpec,
    check_dtype,
    check_shape,
    shape_without,
    signature_key,
    spec,
    with_batch_axis,
)
from rnndeploy.runtime.stores import CpuBoundStore, CudaGraphStore, DeviceStore, Graph, HostStore, StateStore
from rnndeploy.runtime.streams import Rows, Stream, join_rows, rows_of, split_rows

_MAX_SIGNATURES = 256  # validated input signatures kept per session


class _Signature:
    """A validated step input: its shapes with the batch axis, the batch size, whether the axis was added."""

    __slots__ = ("shapes", "batch", "added")

    def __init__(self, shapes: dict[str, tuple[int, ...]], batch: int, added: bool) -> None:
        self.shapes, self.batch, self.added = shapes, batch, added


_SHAPE, _DTYPE = operator.attrgetter("shape"), operator.attrgetter("dtype")


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
        io_binding: keep state in bound buffers (ping-pong, no feed dict per step; on the GPU on the device).
            Default: on for CUDA; on for the CPU when every state has a fixed size (measured faster than
            ``run()`` there, see benchmarks/bench_runtime.py), else off. The CPU needs fixed-size states.
        cuda_graph: capture each stream's step as CUDA graphs (CUDA only; every step of a stream must
            then have the same input shape).
        normalize: when the metadata has ``rnndeploy.data_stats`` (a series forecaster), take inputs and
            return outputs in the original units: inputs are normalised with the training statistics and
            outputs mapped back (`normalization`). False feeds the graph raw values.
        session_options: replaces `default_session_options`.
        step_graph: the same model's one-step graph (``rnndeploy export --step-graph``), path or bytes: steps of
            one time step (``T = 1``) then run through whichever graph ``step_form`` picks, longer chunks through
            ``model`` (the sequence graph); each stream keeps one state across both. The two files must describe
            one model (same metadata, inputs, outputs and states; the step graph's time axis 1), else
            `ModelError`. Not with ``cuda_graph``.
        step_form: with ``step_graph``: ``"auto"`` times one step of both graphs at batch 1 when the session opens
            and keeps the faster (`rnndeploy.runtime.forms.choose_step_form`); ``"step"`` or ``"sequence"``
            forces one. ``step_form_choice`` and `describe` tell which serves one-step calls.

    The main (data) inputs are the graph inputs that are neither states nor constants. ``step`` takes them
    with or without the batch axis (then outputs come without it too); a stream's batch size is fixed by its
    first step. Outputs are the graph outputs that are not states.

    Attributes beyond the arguments: ``metadata`` (the graph's ``custom_metadata_map`` as it is), ``head`` and
    ``vocab`` / ``vocab_size`` (from ``rnndeploy.config`` / ``rnndeploy.vocab``, checked at load: bad
    ``rnndeploy.*`` metadata is a `ModelError`, never a silently missing vocabulary), ``inputs``,
    ``outputs``, ``states``, ``normalization``.

    Threads: a session may be shared. Calls that step the same stream (`step`, `step_many`,
    `step_stacked`, and `reset`, `close`, `get_state`) run one after another: a call
    waits until no other call holds any of its streams, then holds all of them until it returns. Calls on
    distinct streams run onnxruntime at the same time; only the short bookkeeping around each run (which
    stream holds which rows of a batch's state) takes a session-wide lock.
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
        normalize: bool = True,
        session_options: ort.SessionOptions | None = None,
        step_graph: str | os.PathLike | bytes | None = None,
        step_form: str = "auto",
    ) -> None:
        if step_form not in ("auto", *FORMS):
            raise ValueError(f"step_form must be 'auto', 'sequence' or 'step', got {step_form!r}")
        if step_graph is not None and cuda_graph:
            raise ModelError(
                "cuda_graph=True replays one captured graph per stream; it cannot serve a step graph beside the "
                "sequence graph: drop step_graph or cuda_graph"
            )
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
        try:
            self._session = load_session(source, options, provider_list)
        except ModelError:
            if requested == ["CPUExecutionProvider"]:
                raise
            # CUDA failed loudly, or the model is bad: the CPU load tells which
            self._session = load_session(source, options, ["CPUExecutionProvider"])
        self.providers: list[str] = self._session.get_providers()
        gpu = [p for p in requested if p in GPU_PROVIDERS]
        if providers is not None and gpu and gpu[0] not in self.providers:
            reason = provider_problem(gpu[0]) or "it failed to start (is a GPU visible to this process?)"
            raise ProviderError(
                f"asked for {gpu[0]} but onnxruntime could not start it: {reason}. See onnxruntime's CUDA "
                "requirements, or run on the CPU with providers='cpu'",
                provider=gpu[0],
                reason=reason,
            )
        self.device = "cuda" if self.providers[0] in GPU_PROVIDERS else "cpu"
        self.metadata: dict[str, str] = dict(self._session.get_modelmeta().custom_metadata_map)
        checked = read_metadata(self.metadata)
        graph_inputs = {a.name: spec(a) for a in self._session.get_inputs()}
        graph_outputs = {a.name: spec(a) for a in self._session.get_outputs()}

        constants = dict(constants or {})
        unknown = sorted(set(constants) - set(graph_inputs))
        if unknown:
            raise ModelError(
                f"constants {unknown} are not inputs of the model; inputs: {sorted(graph_inputs)}"
            )
        self.constants: dict[str, np.ndarray] = {}
        for name, value in constants.items():
            tensor = graph_inputs[name]
            array = np.asarray(value, dtype=tensor.dtype)
            if array.ndim == 0 and len(tensor.shape) == 1:
                array = array.reshape(1)
            check_shape(tensor, array, what="constant")
            self.constants[name] = array

        self.states: tuple[StatePair, ...]
        self.states, data_names = state_pairs(
            states, checked.states, graph_inputs, graph_outputs, set(constants), batch_axes or {}
        )
        batch_dim = self.states[0].shape[self.states[0].batch_axis]
        self.inputs: dict[str, TensorSpec] = {
            n: with_batch_axis(graph_inputs[n], batch_dim) for n in data_names
        }
        state_outputs = {p.output for p in self.states}
        self.outputs: dict[str, TensorSpec] = {
            n: with_batch_axis(s, batch_dim) for n, s in graph_outputs.items() if n not in state_outputs
        }
        self._streams: dict[Hashable, Stream] = {}
        # ``_lock`` guards the streams' bookkeeping (``_streams``, the rows blocks, ``_busy``): ``_open``,
        # ``_store``, ``_load``, ``_adopt``, ``_gather`` and ``_forget`` run with it held, since a rows block is
        # shared by streams that other calls may hold. ``_busy`` holds the streams a call is stepping, which other
        # calls wait for (``_idle``); onnxruntime runs outside the lock.
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._busy: set[Hashable] = set()
        self._waiting = 0
        self._signatures: dict[tuple, _Signature] = {}
        self.normalization: Normalization | None = (
            Normalization.from_metadata(checked, self.inputs, self.outputs) if normalize else None
        )
        self.head: str | None = checked.head
        self.vocab: list[str] | None = None if checked.vocab is None else list(checked.vocab)
        self.vocab_size: int | None = checked.vocab_size
        self._check_vocab(checked)

        fixed = self._fixed_states = all(p.fixed for p in self.states)
        if self.device == "cpu" and io_binding and not fixed:
            raise ModelError(
                "io_binding=True on the CPU needs states of fixed size; "
                f"{[p.input for p in self.states if not p.fixed]} grow: use io_binding=False"
            )
        self.io_binding = (self.device == "cuda" or fixed) if io_binding is None else io_binding
        self.cuda_graph = cuda_graph
        if cuda_graph and self.device != "cuda":
            raise ProviderError(
                "cuda_graph=True needs the session to run on CUDA; it runs on " + self.providers[0]
            )
        self._graph = Graph(
            session=self._session,
            device=self.device,
            states=self.states,
            inputs=self.inputs,
            outputs=self.outputs,
            output_names=list(self.outputs) + [p.output for p in self.states],
            constants=self.constants,
            device_constants={
                n: ort.OrtValue.ortvalue_from_numpy(a, self.device, 0) for n, a in self.constants.items()
            },
            normalization=self.normalization,
            run_options=ort.RunOptions(),
        )
        kind: type[StateStore]
        if not self.io_binding:
            kind = HostStore
        elif self.device == "cpu":
            kind = CpuBoundStore
        else:
            kind = CudaGraphStore if cuda_graph else DeviceStore
        self._state_store: StateStore = kind(self._graph)
        # one-step calls go to ``_step_store`` when the step graph serves them; it shares the cells (state
        # buffers) of ``_state_store``, so a stream carries one state across both graphs
        self._step_store: StateStore | None = None
        self.step_form_choice: FormChoice | None = None
        if step_graph is not None:
            self._open_step_graph(model, step_graph, step_form, options, kind)

    def _open_step_graph(
        self,
        model: str | os.PathLike | bytes,
        step_graph: str | os.PathLike | bytes,
        step_form: str,
        options: ort.SessionOptions,
        kind: type[StateStore],
    ) -> None:
        """Load ``step_graph`` on this session's providers, check it is ``model``'s step graph, pick the form
        for one-step calls and, when it is the step graph, the store that runs them."""
        source = os.fspath(step_graph) if isinstance(step_graph, str | os.PathLike) else step_graph
        if isinstance(source, str) and not Path(source).is_file():
            raise FileNotFoundError(f"step graph file {source} does not exist")
        paths = {
            "sequence": os.fspath(model)
            if isinstance(model, str | os.PathLike)
            else "the sequence graph bytes",
            "step": source if isinstance(source, str) else "the step graph bytes",
        }
        session = load_session(source, options, self.providers)
        choice = choose_loaded({"sequence": self._session, "step": session}, paths, prefer=step_form)
        self.step_form_choice = choice
        missing = [n for n in self.inputs if TIME_AXIS not in self.inputs[n].shape]
        if missing:
            raise ModelError(
                f"{paths['sequence']}: inputs {missing} have no {TIME_AXIS!r} axis, so one-step calls cannot be "
                "told from chunks; serve it without a step graph"
            )
        self._time_axes = {n: t.shape.index(TIME_AXIS) for n, t in self.inputs.items()}
        if choice.form == "step":
            self._step_store = kind(dataclasses.replace(self._graph, session=session))

    def _store_for(self, arrays: Mapping[str, np.ndarray]) -> StateStore:
        """The store that runs a step on ``arrays`` (with the batch axis): the step graph's for one time step."""
        step_store = self._step_store
        if step_store is not None and all(arrays[n].shape[t] == 1 for n, t in self._time_axes.items()):
            return step_store
        return self._state_store

    def _check_vocab(self, checked: ModelMetadata) -> None:
        """A language model's vocabulary must match its output: one score per token id."""
        if checked.task != "lm" or self.vocab_size is None or not self.outputs:
            return
        output = self.outputs.get("output") or next(iter(self.outputs.values()))
        scores = output.shape[-1] if output.shape else None
        if isinstance(scores, int) and scores != self.vocab_size:
            source = "rnndeploy.vocab" if self.vocab is not None else "rnndeploy.config"
            raise ModelError(
                f"metadata {source} gives {self.vocab_size} token ids but the language model's output "
                f"{output.describe()} scores {scores}"
            )

    def check_tokens(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Refuse token ids outside ``[0, vocab_size)`` in the integer inputs of ``arrays`` (``{input: array}``).

        The graph's Gather would read a negative id from the end of the embedding table without a word, so a
        caller that takes ids from users checks them here first. No check when the model's metadata gives no
        vocabulary size.

        Raises:
            StepInputError: naming the input, the first id out of range and the range.
        """
        size = self.vocab_size
        if size is None:
            return
        for name, array in arrays.items():
            array = np.asarray(array)
            if array.dtype.kind not in "iu" or not array.size or name not in self.inputs:
                continue
            if array.min() < 0 or array.max() >= size:
                bad = array[(array < 0) | (array >= size)].flat[0]
                raise StepInputError(
                    f"input {name}: token id {bad} is outside the model's vocabulary [0, {size})"
                )

    # ------------------------------------------------------------------ streams
    @property
    def streams(self) -> list[Hashable]:
        """Ids of the open streams."""
        with self._lock:
            return list(self._streams)

    def reset(self, stream: Hashable = 0, state: Mapping[str, np.ndarray] | None = None) -> None:
        """Start ``stream`` again from zero state, or from ``state`` (``{state_input: array}``, all pairs).

        A bad ``state`` (`StepInputError`) leaves the stream as it was."""
        arrays = self._checked_state(stream, state) if state is not None else None
        self._claim((stream,))
        try:
            with self._lock:
                self._forget(stream)
                if arrays is not None:
                    batch = arrays[self.states[0].input].shape[self.states[0].batch_axis]
                    self._store(self._open(stream, batch), arrays)
        finally:
            self._release((stream,))

    def _checked_state(self, stream: Hashable, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``state`` for `reset`, checked against the state pairs, as contiguous arrays."""
        missing = sorted({p.input for p in self.states} - set(state))
        if missing:
            raise StepInputError(f"reset({stream!r}, state=...) misses state inputs {missing}")
        arrays = {}
        batch = None
        for pair in self.states:
            array = np.asarray(state[pair.input])
            tensor = TensorSpec(pair.input, pair.shape, pair.dtype)
            check_dtype(tensor, array)
            check_shape(tensor, array, what="state")
            if batch is not None and array.shape[pair.batch_axis] != batch:
                raise StepInputError(
                    f"state {pair.input} has {array.shape[pair.batch_axis]} rows, others {batch}"
                )
            batch = array.shape[pair.batch_axis]
            arrays[pair.input] = np.ascontiguousarray(array)
        return arrays

    def close(self, stream: Hashable = 0) -> None:
        """Forget ``stream`` and free its state."""
        self._claim((stream,))
        try:
            with self._lock:
                if self._forget(stream) is None:
                    open_ = list(self._streams)[:10]
                    raise KeyError(f"stream {stream!r} is not open; open streams: {open_}")
        finally:
            self._release((stream,))

    def get_state(self, stream: Hashable = 0) -> dict[str, np.ndarray]:
        """A copy of ``stream``'s state, ``{state_input: array}`` (zeros for a stream not stepped yet)."""
        self._claim((stream,))
        try:
            with self._lock:
                entry = self._streams.get(stream)
                if entry is None or entry.batch is None:
                    return {p.input: p.initial(1) for p in self.states}
                return {k: v.copy() for k, v in self._load(entry).items()}
        finally:
            self._release((stream,))

    def terminate(self) -> None:
        """Stop every run in progress now and refuse every later step (a shutdown deadline).

        onnxruntime ends a run at its next node once told to (``RunOptions.terminate``); the step that was
        running, and any step after it, raises `ModelError`. The streams' states are left as they were
        before the interrupted step.
        """
        self._graph.run_options.terminate = True

    def _run_error(self, error: Exception, streams: Mapping[Hashable, Mapping[str, np.ndarray]]) -> Exception:
        """What a failed run raises: `ModelError` once terminated, else the step's input error."""
        if self._graph.run_options.terminate:
            return ModelError(
                "this session was terminated (StreamingSession.terminate): it runs no more steps"
            )
        return step_error(error, streams)

    def _claim(self, streams: Iterable[Hashable]) -> None:
        """Wait until no other call holds any of ``streams``, then hold them until `_release`."""
        with self._lock:
            self._wait_for(streams)
            self._busy.update(streams)

    def _wait_for(self, streams: Iterable[Hashable]) -> None:
        """With ``_lock`` held: wait until no other call holds any of ``streams``."""
        while not self._busy.isdisjoint(streams):
            self._waiting += 1
            try:
                self._idle.wait()
            finally:
                self._waiting -= 1

    def _release(self, streams: Iterable[Hashable]) -> None:
        with self._lock:
            self._busy.difference_update(streams)
            if self._waiting:
                self._idle.notify_all()

    def _forget(self, stream: Hashable) -> Stream | None:
        entry = self._streams.pop(stream, None)
        if entry is not None:
            self._drop_rows(entry)
        return entry

    def _open(self, stream: Hashable, batch: int) -> Stream:
        entry = self._streams.get(stream)
        if entry is None:
            entry = self._streams[stream] = Stream()
        if entry.batch is None:
            entry.batch = batch
            self._store(entry, {p.input: p.initial(batch) for p in self.states})
        elif entry.batch != batch:
            raise StepInputError(
                f"stream {stream!r} has batch size {entry.batch}, this step has {batch}; "
                "reset the stream first"
            )
        return entry

    def _store(self, entry: Stream, arrays: dict[str, np.ndarray]) -> None:
        self._drop_rows(entry)
        entry.cell = self._state_store.put(entry.cell, arrays)

    def _adopt(self, rows: Rows, entries: list[Stream]) -> None:
        """Point ``entries`` (the streams of ``rows.members``, in order) at their rows of ``rows``."""
        previous: list[Rows] = []
        for k, entry in enumerate(entries):
            block = entry.rows
            if block is not None:
                block.live -= 1
                if not previous or block is not previous[-1]:
                    previous.append(block)
            entry.rows, entry.row = rows, k
        rows.entries, rows.live = entries, len(entries)
        for block in dict.fromkeys(previous):
            self._compact(block)

    def _drop_rows(self, entry: Stream) -> None:
        block, entry.rows = entry.rows, None
        if block is not None:
            block.live -= 1
            self._compact(block)

    def _compact(self, block: Rows) -> None:
        """Once fewer than a quarter of ``block``'s streams hold their state there, give those their own copies:
        streams that went idle must not keep a whole batch's state alive."""
        if not block.live or block.live * 4 >= len(block.entries):
            return
        block.live = 0
        for k, entry in enumerate(block.entries):
            if entry.rows is block:
                entry.rows = None
                self._store(entry, block.materialize(k, self.states))

    def _load(self, entry: Stream) -> dict[str, np.ndarray]:
        if entry.rows is not None:  # its state is still rows of a batched run's outputs: take them over
            self._store(entry, entry.rows.materialize(entry.row, self.states))
        return self._state_store.get(entry.cell)

    # ------------------------------------------------------------------ inputs
    def check_input(self, x: np.ndarray | Mapping[str, object]) -> tuple[dict[str, np.ndarray], int, bool]:
        """Validate one step's input; returns ``(arrays with batch axis, batch size, batch axis was added)``.

        A signature (names, dtypes, shapes of numpy arrays) seen before is not checked again. Raises
        `StepInputError` naming the input, the expected and the given shape or dtype.
        """
        key = signature_key(x)
        signature = self._signatures.get(key) if key is not None else None
        if signature is None:
            arrays, batch, added = self._check_input(x)
            if key is not None:
                self._remember(key, arrays, batch, added)
            return arrays, batch, added
        return self._with_batch_axis(x, signature), signature.batch, signature.added

    def _remember(self, key: tuple, arrays: dict[str, np.ndarray], batch: int, added: bool) -> _Signature:
        signature = _Signature({n: a.shape for n, a in arrays.items()}, batch, added)
        if len(self._signatures) >= _MAX_SIGNATURES:
            self._signatures.clear()
        self._signatures[key] = signature
        return signature

    def _with_batch_axis(self, x: np.ndarray | Mapping[str, np.ndarray], signature: _Signature) -> dict:
        if not isinstance(x, Mapping):
            name, shape = next(iter(signature.shapes.items()))
            return {name: x.reshape(shape) if signature.added else x}
        if not signature.added:
            return dict(x)
        return {n: a.reshape(signature.shapes[n]) for n, a in x.items()}

    def _check_input(self, x: np.ndarray | Mapping[str, object]) -> tuple[dict[str, np.ndarray], int, bool]:
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
            tensor = self.inputs[name]
            array = value
            if not isinstance(value, np.ndarray):
                array = np.asarray(value)
                if np.can_cast(array.dtype, tensor.dtype, "same_kind"):
                    array = array.astype(tensor.dtype)
            check_dtype(tensor, array)
            if array.ndim == len(tensor.shape) - 1:
                array = np.expand_dims(array, tensor.batch_axis)
                this_added = True
            else:
                this_added = False
            check_shape(tensor, array, what="step input")
            rows = array.shape[tensor.batch_axis]
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

        Steps of one stream from several threads run one after another (see the class docstring).
        """
        # _claim and _release for one stream, spelled out: this is the per-step hot path.
        with self._lock:
            if stream in self._busy:
                self._wait_for((stream,))
            self._busy.add(stream)
        try:
            return self._step(x, stream)
        finally:
            with self._lock:
                self._busy.discard(stream)
                if self._waiting:
                    self._idle.notify_all()

    def _step(self, x: np.ndarray | Mapping[str, object], stream: Hashable) -> dict[str, np.ndarray]:
        """`step` of a stream this call holds."""
        entry = self._streams.get(stream)
        store = self._state_store
        if entry is not None:
            if entry.rows is not None:
                with self._lock:
                    self._load(entry)
            try:  # a signature this stream ran before: no checks, no allocations (where the store can)
                outs = store.step_again(entry.cell, x)
            except ORT_RUN_ERRORS as error:
                raise self._run_error(error, {stream: self.check_input(x)[0]}) from error
            if outs is not None:
                return outs
        arrays, batch, added = self.check_input(x)
        new = entry is None
        with self._lock:
            entry = self._open(stream, batch)
            if entry.rows is not None:
                self._load(entry)
        try:
            return self._store_for(arrays).step(entry.cell, x, arrays, added)
        except ORT_RUN_ERRORS as error:
            if new:  # a failed first step leaves no stream behind
                with self._lock:
                    self._streams.pop(stream, None)
            raise self._run_error(error, {stream: arrays}) from error
        except BaseException:
            if new:  # a failed first step leaves no stream behind
                with self._lock:
                    self._streams.pop(stream, None)
            raise

    def step_many(
        self, xs: Mapping[Hashable, np.ndarray | Mapping[str, object]]
    ) -> dict[Hashable, dict[str, np.ndarray]]:
        """Run one step of each of several streams as one batched onnxruntime call per input shape.

        State rows of the streams are gathered along each state's batch axis, run together, and each stream
        keeps its rows of the batch's state outputs (on CUDA the states go back to the device; with
        ``cuda_graph`` each stream replays its own graphs instead). When the same streams step together
        again, their state is already stacked and nothing is gathered. The result equals calling
        `step` for each stream. Streams whose inputs (or grown states) differ in shape run in separate
        calls. All inputs are validated before anything runs, and states are stored (new streams opened) only
        after every call succeeded, so a failed step (a bad input, or one onnxruntime rejects:
        `StepInputError`) changes no stream's state and opens no stream.

        A call holds all of its streams while it runs: calls from other threads that step any of them wait
        (see the class docstring).

        Args:
            xs: ``{stream: x}`` with ``x`` as for `step`.
        Returns:
            ``{stream: {output_name: array}}``.
        """
        members = list(xs)
        self._claim(members)
        try:
            return self._step_many(xs)
        finally:
            self._release(members)

    def _step_many(
        self, xs: Mapping[Hashable, np.ndarray | Mapping[str, object]]
    ) -> dict[Hashable, dict[str, np.ndarray]]:
        """`step_many` of streams this call holds."""
        if self._state_store.lone_step_faster and len(xs) == 1:  # nothing to batch
            ((stream, x),) = xs.items()
            return {stream: self._step(x, stream)}
        results = self._step_many_uniform(xs)
        if results is not None:
            return results
        checked = {s: self.check_input(x) for s, x in xs.items()}
        streams = self._streams
        for stream, (_, batch, _) in checked.items():
            entry = streams.get(stream)
            if entry is not None and entry.batch is not None and entry.batch != batch:
                raise StepInputError(f"stream {stream!r} has batch size {entry.batch}, this step has {batch}")
        if self.cuda_graph:  # each stream replays its own captured graphs on fixed device buffers
            return {s: self._step(x, s) for s, x in xs.items()}
        fixed = self._fixed_states
        groups: dict[tuple, list[Hashable]] = {}
        for stream, (arrays, _, _) in checked.items():
            key = tuple(shape_without(a.shape, self.inputs[n].batch_axis) for n, a in arrays.items())
            if not fixed:
                with self._lock:
                    state = self._current_state(stream, checked[stream][1])
                key += tuple(shape_without(state[p.input].shape, p.batch_axis) for p in self.states)
            groups.setdefault(key, []).append(stream)

        results: dict[Hashable, dict[str, np.ndarray]] = {}
        stored: list[tuple[list[Hashable], Rows]] = []
        n_out = len(self.outputs)
        for members in groups.values():
            batches = [checked[s][1] for s in members]
            if len(members) == 1:
                feed = dict(checked[members[0]][0])
            else:
                feed = {
                    n: np.concatenate([checked[s][0][n] for s in members], axis=tensor.batch_axis)
                    for n, tensor in self.inputs.items()
                }
            graph = self._store_for(feed).graph
            feed = graph.normalized(feed)
            with self._lock:
                feed.update(self._gather(members, [self._streams.get(s) for s in members], batches))
            try:
                outs = graph.session.run(graph.output_names, {**feed, **self.constants}, graph.run_options)
            except ORT_RUN_ERRORS as error:
                raise self._run_error(error, {s: checked[s][0] for s in members}) from error
            outputs = graph.denormalized(dict(zip(self.outputs, outs[:n_out], strict=True)))
            rows = Rows(
                {p.input: o for p, o in zip(self.states, outs[n_out:], strict=True)}, members, batches
            )
            start = 0
            for stream, batch in zip(members, batches, strict=True):
                strip = checked[stream][2]
                results[stream] = {
                    name: rows_of(out, self.outputs[name].batch_axis, start, batch, strip)
                    for name, out in outputs.items()
                }
                start += batch
            stored.append((members, rows))
        with self._lock:
            for members, rows in stored:
                entries = [self._open(s, batch) for s, batch in zip(members, rows.batches, strict=True)]
                if not self._state_store.host:  # device state: copied back per stream
                    for k, entry in enumerate(entries):
                        self._store(entry, rows.materialize(k, self.states))
                else:
                    self._adopt(rows, entries)
        return {s: results[s] for s in xs}

    def _step_many_uniform(
        self, xs: Mapping[Hashable, object]
    ) -> dict[Hashable, dict[str, np.ndarray]] | None:
        """`step_many` when every step is one numpy array of one signature, given as the array or as
        ``{input: array}`` (a server's batch of single steps): validated once, one call, no per-stream copies.
        None (nothing done) for other steps."""
        if len(self.inputs) != 1 or not self._fixed_states or self.cuda_graph or not xs:
            return None
        name = next(iter(self.inputs))
        values, n = list(xs.values()), len(xs)
        # The checks run as C loops (map), not Python ones: at 64 streams of a small model they are a tenth of
        # the step otherwise.
        if list(map(type, values)) != [np.ndarray] * n:
            values = [x if type(x) is np.ndarray else _only(x, name) for x in values]
            if list(map(type, values)) != [np.ndarray] * n:
                return None
        first = values[0]
        shape, dtype = first.shape, first.dtype
        if list(map(_SHAPE, values)) != [shape] * n or list(map(_DTYPE, values)) != [dtype] * n:
            return None
        key = signature_key(first)
        signature = self._signatures.get(key)
        if signature is None:  # validated once (a server's event loop may validate others meanwhile)
            signature = self._remember(key, *self._check_input(first))
        batch, members, axis = signature.batch, list(xs), self.inputs[name].batch_axis
        # Steps without their batch axis are stacked along it; steps with it are concatenated.
        stacked = join_rows(values, shape, dtype, signature.added) if axis == 0 else None
        if stacked is None:
            stacked = np.concatenate(values, axis) if not signature.added else np.stack(values, axis)

        def given() -> dict[Hashable, dict[str, np.ndarray]]:
            return {
                s: {name: x.reshape(signature.shapes[name])} for s, x in zip(members, values, strict=True)
            }

        outputs = self._step_rows(members, {name: stacked}, batch, given)
        per_output = [
            (out_name, split_rows(out, self.outputs[out_name].batch_axis, n, batch, signature.added))
            for out_name, out in outputs.items()
        ]
        if len(per_output) == 1:
            ((out_name, parts),) = per_output
            return {stream: {out_name: part} for stream, part in zip(members, parts, strict=True)}
        return {
            stream: {out_name: parts[k] for out_name, parts in per_output} for k, stream in enumerate(members)
        }

    def step_stacked(
        self, streams: Iterable[Hashable], x: np.ndarray | Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """One step of each of ``streams`` from inputs already stacked along their batch axis, as one call.

        With ``n`` streams and ``N`` rows, stream ``k``'s step is rows ``k * N / n`` to ``(k + 1) * N / n``.
        The result equals `step_many` with each stream's rows, stacked again; it skips the per-stream
        arrays and dicts, which at many streams of a small model cost as much as the model (for a caller whose
        steps arrive as one array: many sensors sampled together, a simulation's agents). When the same
        streams step together again their state is already stacked.

        Args:
            streams: the streams, in the order of their rows (each at most once).
            x: the stacked step inputs (with the batch axis), as for `step`.
        Returns:
            ``{output_name: array}``, the streams' rows in the same order.
        Raises:
            StepInputError: a bad input (as `step`), rows not a multiple of the streams, a stream whose
                batch size differs, or a step onnxruntime rejects; nothing changes then.
            ModelError: states that grow (use `step_many`), or ``cuda_graph`` (one graph per stream).

        A call holds all of its streams while it runs, as `step_many` does.
        """
        members = list(streams)
        if not members:
            raise StepInputError("step_stacked needs at least one stream; got none")
        if not self._fixed_states or self.cuda_graph:
            why = "its states grow" if not self._fixed_states else "cuda_graph replays one graph per stream"
            raise ModelError(f"step_stacked cannot batch this session ({why}); use step_many")
        arrays, rows, added = self.check_input(x)
        if added:
            shapes = {n: list(a.shape) for n, a in arrays.items()}
            raise StepInputError(
                f"step_stacked needs the inputs with their batch axis (the streams' rows); got shapes "
                f"{shapes} without it"
            )
        n = len(members)
        if rows % n:
            raise StepInputError(
                f"the stacked inputs have {rows} rows along the batch axis, not a multiple of the {n} streams"
            )
        stacked = {f"{n} streams, stacked": arrays}
        self._claim(members)
        try:
            return self._step_rows(members, arrays, rows // n, lambda: stacked, distinct=False)
        finally:
            self._release(members)

    def _step_rows(
        self,
        members: list[Hashable],
        feed: dict[str, np.ndarray],
        batch: int,
        given: Callable[[], Mapping[Hashable, Mapping[str, np.ndarray]]],
        distinct: bool = True,
    ) -> dict[str, np.ndarray]:
        """One run of ``members`` (in order, ``batch`` rows each) on the validated stacked inputs ``feed``;
        returns the stacked outputs (de-normalised) and keeps the state outputs as the members' rows (fixed-size
        states). ``given()``: the inputs per stream, for the message of a step onnxruntime rejects.
        ``distinct=False``: ``members`` may repeat a stream (refused), unless they are the last batch's."""
        streams = self._streams
        with self._lock:
            first = streams.get(members[0])
            again = first.rows if first is not None and self._state_store.host else None
            if again is not None and not (
                again.uniform == batch and again.live == len(again.entries) and again.members == members
            ):
                again = None
            # ``again``: the same streams stepped together last time, each still holding its rows of that
            # batch's state outputs (so each has this batch size): their state is already stacked, and after
            # the run the block takes the new state outputs in place, with nothing to do per stream.
            if again is None:
                if not distinct and len(set(members)) != len(members):
                    twice = sorted({repr(s) for s in members if members.count(s) > 1})
                    raise StepInputError(
                        f"each stream steps at most once per call; {', '.join(twice)} appear twice"
                    )
                entries = [streams.get(stream) for stream in members]
                for stream, entry in zip(members, entries, strict=True):
                    if entry is not None and entry.batch != batch and entry.batch is not None:
                        raise StepInputError(
                            f"stream {stream!r} has batch size {entry.batch}, this step has {batch}"
                        )
                states = self._gather(members, entries, [batch] * len(members))
            else:
                states = again.states
        graph = self._store_for(feed).graph
        try:
            outs = graph.session.run(
                graph.output_names, {**graph.normalized(feed), **states, **self.constants}, graph.run_options
            )
        except ORT_RUN_ERRORS as error:
            raise self._run_error(error, given()) from error
        n_out = len(self.outputs)
        outputs = graph.denormalized(dict(zip(self.outputs, outs[:n_out], strict=True)))
        new_states = {p.input: o for p, o in zip(self.states, outs[n_out:], strict=True)}
        if again is not None:  # the block belongs to this call's streams alone: no other call touches it
            again.states = new_states
            return outputs
        rows = Rows(new_states, members, [batch] * len(members), uniform=batch)
        with self._lock:
            for k, entry in enumerate(entries):
                if entry is None or entry.batch is None:
                    entries[k] = self._open(members[k], batch)
            if self._state_store.host:
                self._adopt(rows, entries)
            else:  # device state: copied back per stream
                for k, entry in enumerate(entries):
                    self._store(entry, rows.materialize(k, self.states))
        return outputs

    def _gather(
        self, members: list[Hashable], entries: list[Stream | None], batches: list[int]
    ) -> dict[str, np.ndarray]:
        """The stacked state of ``members`` (in order; ``entries`` their streams, None if new): the last batch's
        state outputs when the same streams stepped together then, else their rows concatenated along each
        state's batch axis."""
        first = entries[0].rows if entries[0] is not None else None
        # Every stream of that batch still holds its rows there (a stream leaving them lowers ``live``).
        if first is not None and first.live == len(first.entries) and first.members == members:
            return dict(first.states)
        parts = [
            self._current_state(s, batch) if e is None or e.rows is None else e.rows.view(e.row, self.states)
            for s, e, batch in zip(members, entries, batches, strict=True)
        ]
        if len(parts) == 1:
            return parts[0]
        return {
            p.input: np.concatenate([part[p.input] for part in parts], axis=p.batch_axis) for p in self.states
        }

    def _current_state(self, stream: Hashable, batch: int) -> dict[str, np.ndarray]:
        """``stream``'s state as host arrays, zeros with ``batch`` rows for a stream not stepped yet."""
        entry = self._streams.get(stream)
        if entry is None or entry.batch is None:
            return {p.input: p.initial(batch) for p in self.states}
        return self._load(entry)

    def describe(self) -> dict:
        """Inputs, outputs, state pairs, constants, providers, normalization, metadata and, with a step graph,
        ``step_form``: which graph serves one-step calls (``form``, ``path``) and the timings that chose it
        (``sequence_us``, ``step_us``, microseconds per step; None when forced) as a JSON-able dict."""
        return {
            "inputs": [s.describe() for s in self.inputs.values()],
            "outputs": [s.describe() for s in self.outputs.values()],
            "states": [p.to_json() for p in self.states],
            "constants": {n: a.tolist() for n, a in self.constants.items()},
            "providers": self.providers,
            "io_binding": self.io_binding,
            "normalization": None if self.normalization is None else self.normalization.to_json(),
            "metadata": self.metadata,
            "step_form": None if self.step_form_choice is None else dataclasses.asdict(self.step_form_choice),
        }


def _only(x: object, name: str) -> np.ndarray | None:
    """The array of ``{name: array}``, None for anything else."""
    if type(x) is dict and len(x) == 1:
        return x.get(name)
    return None
