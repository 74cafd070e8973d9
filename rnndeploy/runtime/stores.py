"""Where a session keeps each stream's state between steps: one `StateStore` kind per session.

- `HostStore`: host arrays, one ``InferenceSession.run`` per step (``io_binding=False``; states that
  grow).
- `CpuBoundStore`: two bound buffer sets per stream on the CPU. onnxruntime's ``IOBinding`` binds
  inputs and outputs to buffers once, so a run needs no feed dict, no name lookups and no new output arrays;
  the binding for parity ``p`` reads the state from set ``p`` and writes the next one into set ``1 - p``, so
  the next step uses the other binding and nothing is copied (ping-pong).
- `DeviceStore`: device OrtValues (CUDA), a binding per step, state buffers ping-pong.
- `CudaGraphStore`: fixed device buffers per stream and two captured CUDA graphs (ping-pong).

A store keeps a *cell* per stream (what it holds for that stream) and knows only the `Graph` it
serves, never the session: the session decides which streams step and when, the store how a state is held.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from rnndeploy.runtime.errors import ProviderError, StepInputError
from rnndeploy.runtime.normalization import Normalization
from rnndeploy.runtime.specs import StatePair, TensorSpec, signature_key

_MAX_SLOTS = 4  # input shapes per stream with bound buffers (a prompt chunk and single steps need two)


@dataclass(frozen=True)
class Graph:
    """What a store needs of the model it serves.

    ``outputs``: the non-state outputs (with their batch axes); ``output_names``: those, then the state outputs
    in the order of ``states``; ``constants`` as host arrays and as OrtValues on ``device``.
    """

    session: ort.InferenceSession
    device: str
    states: tuple[StatePair, ...]
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    output_names: list[str]
    constants: dict[str, np.ndarray]
    device_constants: dict[str, ort.OrtValue]
    normalization: Normalization | None
    # one RunOptions for every run of the session, so that terminate() reaches the runs in progress
    run_options: ort.RunOptions

    def to_device(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)

    def normalized(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Step inputs in the graph's units."""
        if self.normalization is None:
            return arrays
        names = self.normalization.inputs
        return {n: self.normalization.normalize(a) if n in names else a for n, a in arrays.items()}

    def denormalized(self, outs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs in the caller's units."""
        if self.normalization is None:
            return outs
        names = self.normalization.outputs
        return {n: self.normalization.denormalize(a) if n in names else a for n, a in outs.items()}

    def finished(self, outs: dict[str, np.ndarray], added: bool) -> dict[str, np.ndarray]:
        """Outputs as a step returns them: de-normalised, without the batch axis when the caller left it out."""
        outs = self.denormalized(outs)
        if not added:
            return outs
        return {n: np.squeeze(a, axis=self.outputs[n].batch_axis) for n, a in outs.items()}


class StateStore:
    """How a session keeps each stream's state: one kind per session, a cell per stream.

    ``host``: a cell's state is host arrays, so after a batched run a stream's rows of the batch's state outputs
    can stand for it until it steps alone (`StreamingSession.step_many`); else the rows are put back.
    ``lone_step_faster``: a single stream steps faster through `step` than through a batched run.
    """

    host = True
    lone_step_faster = False

    def __init__(self, graph: Graph) -> None:
        self.graph = graph

    def put(self, cell: object | None, arrays: dict[str, np.ndarray]) -> object:
        """Make ``arrays`` (``{state_input: array}``) a stream's state; returns its cell (``cell`` or a new one)."""
        raise NotImplementedError

    def get(self, cell: object) -> dict[str, np.ndarray]:
        """The state in ``cell`` as host arrays (the store's own buffers where it keeps host arrays)."""
        raise NotImplementedError

    def step(
        self, cell: object, x: np.ndarray | Mapping, arrays: dict[str, np.ndarray], added: bool
    ) -> dict[str, np.ndarray]:
        """One step of the stream in ``cell`` on the validated ``arrays`` (``x``: the input as given).

        Returns the outputs as `StreamingSession.step` does; the new state is in ``cell``.
        """
        raise NotImplementedError

    def step_again(self, cell: object, x: np.ndarray | Mapping) -> dict[str, np.ndarray] | None:
        """A step whose input signature this stream ran before, without checks; None where the store has no
        such path or has not seen the signature (the caller then checks ``x`` and calls `step`)."""
        return None


class _HostCell:
    __slots__ = ("arrays",)

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays


class HostStore(StateStore):
    """Host arrays and one ``InferenceSession.run`` per step."""

    def put(self, cell: _HostCell | None, arrays: dict[str, np.ndarray]) -> _HostCell:
        if cell is None:
            return _HostCell(arrays)
        cell.arrays = arrays
        return cell

    def get(self, cell: _HostCell) -> dict[str, np.ndarray]:
        return cell.arrays

    def step(
        self, cell: _HostCell, x: np.ndarray | Mapping, arrays: dict[str, np.ndarray], added: bool
    ) -> dict[str, np.ndarray]:
        graph = self.graph
        feed = {**graph.normalized(arrays), **graph.constants, **cell.arrays}
        results = graph.session.run(graph.output_names, feed, graph.run_options)
        n = len(graph.outputs)
        cell.arrays = {p.input: r for p, r in zip(graph.states, results[n:], strict=False)}
        return graph.finished(dict(zip(graph.outputs, results[:n], strict=False)), added)


def output_shapes(graph: Graph, arrays: Mapping[str, np.ndarray]) -> dict[str, tuple] | None:
    """Shapes of the (non-state) outputs for step inputs ``arrays``, from the graph's named dims; None when
    an output has a dim that no input names (its size is known only after the run)."""
    sizes: dict[str, int] = {}
    for name, array in arrays.items():
        sizes.update(
            {d: n for d, n in zip(graph.inputs[name].shape, array.shape, strict=False) if isinstance(d, str)}
        )
    shapes = {}
    for name, tensor in graph.outputs.items():
        if any(d is None or (isinstance(d, str) and d not in sizes) for d in tensor.shape):
            return None
        shapes[name] = tuple(sizes.get(d, d) for d in tensor.shape)
    return shapes


class CpuSlot:
    """Two ``IOBinding`` s over a stream's ping-pong state buffers, for one input signature, on the CPU.

    Step inputs are copied (normalised, when the graph normalises) into bound input buffers; outputs are
    written into bound output buffers (``shapes``) or, when the graph does not tell their shapes (``None``),
    into arrays onnxruntime allocates per run.

    Args:
        graph: the model served.
        buffers: the stream's two state buffer sets ``{state_input: array}``.
        arrays: the step inputs with the batch axis (their shapes and dtypes size the input buffers).
        given: the shape of each input as the caller passes it (without the batch axis when ``added``).
        shapes: output shapes from `output_shapes`, or None.
        added: the caller left out the batch axis: outputs come back without it.
    """

    __slots__ = (
        "_session",
        "_run_options",
        "_bindings",
        "_inputs",
        "_single",
        "_names",
        "_outputs",
        "_normalization",
        "_last",
        "_axes",
    )

    def __init__(
        self,
        graph: Graph,
        buffers: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
        arrays: Mapping[str, np.ndarray],
        given: Mapping[str, tuple],
        shapes: dict[str, tuple] | None,
        added: bool,
    ) -> None:
        self._session = graph.session
        self._run_options = graph.run_options
        norm = graph.normalization
        self._normalization = norm
        inputs = {n: np.empty(a.shape, a.dtype) for n, a in arrays.items()}
        # [(name, buffer view in the caller's shape, normalise?)]
        self._inputs = [
            (n, b.reshape(given[n]), norm is not None and n in norm.inputs) for n, b in inputs.items()
        ]
        self._single = self._inputs[0] if len(self._inputs) == 1 else None
        self._names = list(graph.outputs)
        self._axes = {n: s.batch_axis for n, s in graph.outputs.items()} if added else None
        outputs = (
            {n: np.empty(shape, graph.outputs[n].dtype) for n, shape in shapes.items()} if shapes else None
        )
        # [(name, buffer view as returned, de-normalise?)]
        self._outputs = [
            (n, np.squeeze(b, self._axes[n]) if added else b, norm is not None and n in norm.outputs)
            for n, b in (outputs or {}).items()
        ]
        self._bindings = []
        for parity in (0, 1):
            binding = self._session.io_binding()
            for name, buffer in inputs.items():
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(buffer))
            for name, value in graph.device_constants.items():
                binding.bind_ortvalue_input(name, value)
            for name in graph.outputs:
                if outputs is None:
                    binding.bind_output(name, "cpu")
                else:
                    binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(outputs[name]))
            for pair in graph.states:
                binding.bind_ortvalue_input(
                    pair.input, ort.OrtValue.ortvalue_from_numpy(buffers[parity][pair.input])
                )
                binding.bind_ortvalue_output(
                    pair.output, ort.OrtValue.ortvalue_from_numpy(buffers[1 - parity][pair.input])
                )
            self._bindings.append(binding)
        self._last = self._bindings[0]

    def run(self, x: np.ndarray | Mapping[str, np.ndarray], parity: int) -> None:
        """Copy ``x`` (one array, or ``{name: array}``, in the ``given`` shapes) in and run binding ``parity``."""
        if self._single is not None and type(x) is np.ndarray:
            _, view, normalize = self._single
            if normalize:
                self._normalization.normalize(x, out=view)
            else:
                np.copyto(view, x)
        else:
            for name, view, normalize in self._inputs:
                if normalize:
                    self._normalization.normalize(x[name], out=view)
                else:
                    np.copyto(view, x[name])
        self._last = self._bindings[parity]
        self._session.run_with_iobinding(self._last, self._run_options)

    def outputs(self) -> dict[str, np.ndarray]:
        """The last run's outputs, as new arrays (de-normalised where the graph normalises)."""
        if not self._outputs:  # onnxruntime allocated them; its buffers may be reused by the next run
            norm = self._normalization
            result = {}
            # Outputs are bound before states, so they come first.
            for name, value in zip(self._names, self._last.get_outputs(), strict=False):
                array = value.numpy()
                if self._axes is not None:
                    array = np.squeeze(array, self._axes[name])
                result[name] = (
                    norm.denormalize(array) if norm is not None and name in norm.outputs else array.copy()
                )
            return result
        return {
            name: self._normalization.denormalize(view) if denormalize else view.copy()
            for name, view, denormalize in self._outputs
        }


class _BoundCell:
    """Two state buffer sets, which one holds the state (``current``), and a `CpuSlot` per signature."""

    __slots__ = ("buffers", "current", "slots")

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.buffers = (
            {k: np.empty_like(a) for k, a in arrays.items()},
            {k: np.empty_like(a) for k, a in arrays.items()},
        )
        self.current = 0
        self.slots: dict[tuple, CpuSlot] = {}


class CpuBoundStore(StateStore):
    """The state in two bound buffer sets per stream on the CPU (fixed-size states only)."""

    lone_step_faster = True

    def put(self, cell: _BoundCell | None, arrays: dict[str, np.ndarray]) -> _BoundCell:
        if cell is None or any(cell.buffers[0][k].shape != a.shape for k, a in arrays.items()):
            cell = _BoundCell(arrays)
        state = cell.buffers[cell.current]
        for name, array in arrays.items():
            np.copyto(state[name], array)
        return cell

    def get(self, cell: _BoundCell) -> dict[str, np.ndarray]:
        return cell.buffers[cell.current]

    def step_again(self, cell: _BoundCell, x: np.ndarray | Mapping) -> dict[str, np.ndarray] | None:
        slot = cell.slots.get(signature_key(x))
        if slot is None:
            return None
        slot.run(x, cell.current)
        cell.current ^= 1
        return slot.outputs()

    def step(
        self, cell: _BoundCell, x: np.ndarray | Mapping, arrays: dict[str, np.ndarray], added: bool
    ) -> dict[str, np.ndarray]:
        """A step that creates the stream's slot for this signature (kept when the output shapes are known)."""
        key = signature_key(x)
        if key is None:  # not numpy arrays (lists, scalars): the slot takes the converted arrays
            x, key = arrays, ("converted", added, signature_key(arrays))
        slot = cell.slots.get(key)
        if slot is None:
            shapes = output_shapes(self.graph, arrays)
            given = {
                n: a.shape for n, a in (x.items() if isinstance(x, Mapping) else [(next(iter(arrays)), x)])
            }
            slot = CpuSlot(self.graph, cell.buffers, arrays, given, shapes, added)
            if (
                shapes is not None
            ):  # outputs of unknown shape: onnxruntime allocates them, the slot is one-off
                if len(cell.slots) >= _MAX_SLOTS:
                    cell.slots.clear()
                cell.slots[key] = slot
        slot.run(x, cell.current)
        cell.current ^= 1
        return slot.outputs()


class _DeviceCell:
    """Device OrtValues: the state (``values``), the buffers the next step writes (``spare``), and the stream's
    captured graphs (``graph``, with `CudaGraphStore`)."""

    __slots__ = ("values", "spare", "graph")

    def __init__(self, values: dict[str, ort.OrtValue]) -> None:
        self.values = values
        self.spare: dict[str, ort.OrtValue] = {}
        self.graph: CudaGraphSlot | None = None


class DeviceStore(StateStore):
    """The state in device OrtValues (CUDA): a binding per step, state buffers ping-pong."""

    host = False

    def put(self, cell: _DeviceCell | None, arrays: dict[str, np.ndarray]) -> _DeviceCell:
        return _DeviceCell({k: self.graph.to_device(np.ascontiguousarray(a)) for k, a in arrays.items()})

    def get(self, cell: _DeviceCell) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in cell.values.items()}

    def step(
        self, cell: _DeviceCell, x: np.ndarray | Mapping, arrays: dict[str, np.ndarray], added: bool
    ) -> dict[str, np.ndarray]:
        graph = self.graph
        binding = graph.session.io_binding()
        for name, array in graph.normalized(arrays).items():
            binding.bind_cpu_input(name, array)
        for name, value in graph.device_constants.items():
            binding.bind_ortvalue_input(name, value)
        spares = {}
        for pair in graph.states:
            current = cell.values[pair.input]
            binding.bind_ortvalue_input(pair.input, current)
            spare = cell.spare.get(pair.input)
            if spare is None and pair.fixed:
                spare = cell.spare[pair.input] = graph.to_device(np.empty(current.shape(), pair.dtype))
            if spare is None:
                binding.bind_output(pair.output, graph.device)
            else:
                binding.bind_ortvalue_output(pair.output, spare)
                spares[pair.input] = spare
        for name in graph.outputs:
            binding.bind_output(name, "cpu")
        graph.session.run_with_iobinding(binding, graph.run_options)
        values = binding.get_outputs()
        for pair, value in zip(graph.states, values, strict=False):
            # Keep our own OrtValue objects: on the CPU they hold the numpy buffers they wrap.
            new = spares.get(pair.input, value)
            cell.spare[pair.input], cell.values[pair.input] = cell.values[pair.input], new
        # Outputs bound to "cpu" live in onnxruntime's buffers, which the next run may reuse: copy them.
        outs = {
            name: value.numpy().copy()
            for name, value in zip(graph.outputs, values[len(graph.states) :], strict=False)
        }
        return graph.finished(outs, added)


class CudaGraphSlot:
    """Fixed device buffers and two captured CUDA graphs (state ping-pong) for one stream."""

    __slots__ = ("ids", "inputs", "outputs", "parity", "bindings")

    def __init__(self, ids: tuple[int, int]) -> None:
        self.ids = ids
        self.inputs: dict[str, ort.OrtValue] = {}
        self.outputs: dict[str, ort.OrtValue] = {}
        self.parity = 0
        self.bindings: list[ort.IOBinding] = []

    def replay(
        self, session: ort.InferenceSession, states: tuple, cell: _DeviceCell, arrays: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Copy ``arrays`` into the captured input buffers, replay this parity's graph, flip the parity."""
        for name, array in arrays.items():
            if tuple(self.inputs[name].shape()) != array.shape:
                raise StepInputError(
                    f"cuda_graph streams keep one input shape: {name} was {tuple(self.inputs[name].shape())}, "
                    f"now {array.shape}; use a session without cuda_graph for variable chunks"
                )
            self.inputs[name].update_inplace(np.ascontiguousarray(array))
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("gpu_graph_id", str(self.ids[self.parity]))
        session.run_with_iobinding(self.bindings[self.parity], run_options)
        self.parity ^= 1
        for pair in states:
            cell.values[pair.input] = self.inputs[f"{pair.input}#{self.parity}"]
        return {name: value.numpy().copy() for name, value in self.outputs.items()}


class CudaGraphStore(DeviceStore):
    """Each stream's step replayed as CUDA graphs on fixed device buffers (one input shape per stream)."""

    def __init__(self, graph: Graph) -> None:
        super().__init__(graph)
        self._graph_ids = itertools.count(1, 2)  # two graph ids per stream; next() is atomic across threads

    def step(
        self, cell: _DeviceCell, x: np.ndarray | Mapping, arrays: dict[str, np.ndarray], added: bool
    ) -> dict[str, np.ndarray]:
        graph = self.graph
        if cell.graph is None:
            cell.graph = self._capture(cell, arrays, next(self._graph_ids))
        outs = cell.graph.replay(graph.session, graph.states, cell, graph.normalized(arrays))
        return graph.finished(outs, added)

    def _capture(self, cell: _DeviceCell, arrays: dict[str, np.ndarray], first_id: int) -> CudaGraphSlot:
        """Device buffers and the two bindings whose runs onnxruntime captures as CUDA graphs ``first_id``, +1."""
        graph = self.graph
        slot = CudaGraphSlot((first_id, first_id + 1))
        for name, array in arrays.items():
            slot.inputs[name] = graph.to_device(np.ascontiguousarray(array))
        shapes = output_shapes(graph, arrays)
        if shapes is None:
            described = ", ".join(s.describe() for s in graph.outputs.values())
            raise ProviderError(f"cuda_graph needs output shapes known from the inputs; outputs: {described}")
        for name, shape in shapes.items():
            slot.outputs[name] = graph.to_device(np.zeros(shape, graph.outputs[name].dtype))
        for pair in graph.states:
            first = cell.values[pair.input]
            slot.inputs[f"{pair.input}#0"] = first
            slot.inputs[f"{pair.input}#1"] = graph.to_device(np.zeros(first.shape(), pair.dtype))
        for parity in (0, 1):
            binding = graph.session.io_binding()
            for name in arrays:
                binding.bind_ortvalue_input(name, slot.inputs[name])
            for name, value in graph.device_constants.items():
                binding.bind_ortvalue_input(name, value)
            for pair in graph.states:
                binding.bind_ortvalue_input(pair.input, slot.inputs[f"{pair.input}#{parity}"])
                binding.bind_ortvalue_output(pair.output, slot.inputs[f"{pair.input}#{parity ^ 1}"])
            for name in graph.outputs:
                binding.bind_ortvalue_output(name, slot.outputs[name])
            slot.bindings.append(binding)
        return slot
