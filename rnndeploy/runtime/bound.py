"""State kept in bound buffers between steps: CPU ping-pong bindings, CUDA device state and CUDA graphs.

onnxruntime's ``IOBinding`` binds inputs and outputs to buffers once; a run then needs no feed dict, no name
lookups and no new output arrays. A stream's state lives in two buffer sets: the binding for parity ``p``
reads the state from set ``p`` and writes the next one into set ``1 - p``, so the next step uses the other
binding and nothing is copied.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from rnndeploy.runtime.errors import ProviderError, StepInputError

if TYPE_CHECKING:
    from rnndeploy.runtime.session import StreamingSession, _Stream


def output_shapes(session: StreamingSession, arrays: Mapping[str, np.ndarray]) -> dict[str, tuple] | None:
    """Shapes of the (non-state) outputs for step inputs ``arrays``, from the graph's named dims; None when
    an output has a dim that no input names (its size is known only after the run)."""
    sizes: dict[str, int] = {}
    for name, array in arrays.items():
        sizes.update(
            {
                d: n
                for d, n in zip(session.inputs[name].shape, array.shape, strict=False)
                if isinstance(d, str)
            }
        )
    shapes = {}
    for name, tensor in session.outputs.items():
        if any(d is None or (isinstance(d, str) and d not in sizes) for d in tensor.shape):
            return None
        shapes[name] = tuple(sizes.get(d, d) for d in tensor.shape)
    return shapes


class CpuSlot:
    """Two ``IOBinding`` s over a stream's ping-pong state buffers, for one input signature, on the CPU.

    Step inputs are copied (normalised, when the session normalises) into bound input buffers; outputs are
    written into bound output buffers (``shapes``) or, when the graph does not tell their shapes (``None``),
    into arrays onnxruntime allocates per run.

    Args:
        session: the owning session (its onnxruntime session, states, constants, normalization).
        buffers: the stream's two state buffer sets ``{state_input: array}``.
        arrays: the step inputs with the batch axis (their shapes and dtypes size the input buffers).
        given: the shape of each input as the caller passes it (without the batch axis when ``added``).
        shapes: output shapes from :func:`output_shapes`, or None.
        added: the caller left out the batch axis: outputs come back without it.
    """

    __slots__ = (
        "_session",
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
        session: StreamingSession,
        buffers: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
        arrays: Mapping[str, np.ndarray],
        given: Mapping[str, tuple],
        shapes: dict[str, tuple] | None,
        added: bool,
    ) -> None:
        self._session = session._session
        norm = session.normalization
        self._normalization = norm
        inputs = {n: np.empty(a.shape, a.dtype) for n, a in arrays.items()}
        # [(name, buffer view in the caller's shape, normalise?)]
        self._inputs = [
            (n, b.reshape(given[n]), norm is not None and n in norm.inputs) for n, b in inputs.items()
        ]
        self._single = self._inputs[0] if len(self._inputs) == 1 else None
        self._names = list(session.outputs)
        self._axes = {n: s.batch_axis for n, s in session.outputs.items()} if added else None
        outputs = (
            {n: np.empty(shape, session.outputs[n].dtype) for n, shape in shapes.items()} if shapes else None
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
            for name, value in session._device_constants.items():
                binding.bind_ortvalue_input(name, value)
            for name in session.outputs:
                if outputs is None:
                    binding.bind_output(name, "cpu")
                else:
                    binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(outputs[name]))
            for pair in session.states:
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
        self._session.run_with_iobinding(self._last)

    def outputs(self) -> dict[str, np.ndarray]:
        """The last run's outputs, as new arrays (de-normalised where the session normalises)."""
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


def run_bound(
    session: StreamingSession, entry: _Stream, arrays: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """One step with the state in device OrtValues (CUDA): a binding per step, state buffers ping-pong."""
    binding = session._session.io_binding()
    for name, array in arrays.items():
        binding.bind_cpu_input(name, array)
    for name, value in session._device_constants.items():
        binding.bind_ortvalue_input(name, value)
    spares = {}
    for pair in session.states:
        current = entry.device_state[pair.input]
        binding.bind_ortvalue_input(pair.input, current)
        spare = entry.spare.get(pair.input)
        if spare is None and pair.fixed:
            spare = entry.spare[pair.input] = session._to_device(np.empty(current.shape(), pair.dtype))
        if spare is None:
            binding.bind_output(pair.output, session.device)
        else:
            binding.bind_ortvalue_output(pair.output, spare)
            spares[pair.input] = spare
    for name in session.outputs:
        binding.bind_output(name, "cpu")
    session._session.run_with_iobinding(binding)
    values = binding.get_outputs()
    for pair, value in zip(session.states, values, strict=False):
        # Keep our own OrtValue objects: on the CPU they hold the numpy buffers they wrap.
        new = spares.get(pair.input, value)
        entry.spare[pair.input], entry.device_state[pair.input] = entry.device_state[pair.input], new
    # Outputs bound to "cpu" live in onnxruntime's buffers, which the next run may reuse: copy them.
    return {
        name: value.numpy().copy()
        for name, value in zip(session.outputs, values[len(session.states) :], strict=False)
    }


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
        self, session: ort.InferenceSession, states: tuple, entry: _Stream, arrays: dict[str, np.ndarray]
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
            entry.device_state[pair.input] = self.inputs[f"{pair.input}#{self.parity}"]
        return {name: value.numpy().copy() for name, value in self.outputs.items()}


def capture_cuda_graphs(
    session: StreamingSession, entry: _Stream, arrays: dict[str, np.ndarray], first_id: int
) -> CudaGraphSlot:
    """Device buffers and the two bindings whose runs onnxruntime captures as CUDA graphs ``first_id``, +1."""
    slot = CudaGraphSlot((first_id, first_id + 1))
    for name, array in arrays.items():
        slot.inputs[name] = session._to_device(np.ascontiguousarray(array))
    shapes = output_shapes(session, arrays)
    if shapes is None:
        described = ", ".join(s.describe() for s in session.outputs.values())
        raise ProviderError(f"cuda_graph needs output shapes known from the inputs; outputs: {described}")
    for name, shape in shapes.items():
        slot.outputs[name] = session._to_device(np.zeros(shape, session.outputs[name].dtype))
    for pair in session.states:
        first = entry.device_state[pair.input]
        slot.inputs[f"{pair.input}#0"] = first
        slot.inputs[f"{pair.input}#1"] = session._to_device(np.zeros(first.shape(), pair.dtype))
    for parity in (0, 1):
        binding = session._session.io_binding()
        for name in arrays:
            binding.bind_ortvalue_input(name, slot.inputs[name])
        for name, value in session._device_constants.items():
            binding.bind_ortvalue_input(name, value)
        for pair in session.states:
            binding.bind_ortvalue_input(pair.input, slot.inputs[f"{pair.input}#{parity}"])
            binding.bind_ortvalue_output(pair.output, slot.inputs[f"{pair.input}#{parity ^ 1}"])
        for name in session.outputs:
            binding.bind_ortvalue_output(name, slot.outputs[name])
        slot.bindings.append(binding)
    return slot
