"""Which graph inputs and outputs are a model's state: explicit mapping, ``rnndeploy.states`` metadata, names.

A stateful model has state inputs and state outputs that pair up (``h0 -> hn``): the output of one call is the
input of the next. `state_pairs` finds the pairs and the batch axis of each state.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from rnndeploy.runtime.errors import ModelError
from rnndeploy.runtime.metadata import StateEntry
from rnndeploy.runtime.specs import StatePair, TensorSpec

# Naming conventions for state pairs, tried in order: (input pattern, output template).
NAMING_CONVENTIONS: tuple[tuple[str, str], ...] = (
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


def state_pairs(
    states: Mapping[str, str] | None,
    described: tuple[StateEntry, ...] | None,
    inputs: dict[str, TensorSpec],
    outputs: dict[str, TensorSpec],
    constants: set[str],
    batch_axes: Mapping[str, int],
) -> tuple[tuple[StatePair, ...], list[str]]:
    """The state pairs of a model and the names of its data inputs (neither states nor constants).

    Args:
        states: an explicit ``{state_input: state_output}`` mapping, or None to use ``metadata`` / names.
        described: the model's checked ``rnndeploy.states`` metadata (`read_metadata`), None if absent.
        inputs, outputs: the graph's inputs and outputs by name.
        constants: names of inputs fixed for the whole session.
        batch_axes: batch axis per state input, where neither metadata nor the graph tells it.
    """
    pairs = _find_pairs(states, described, inputs, outputs, constants)
    data_names = [n for n in inputs if n not in constants and n not in {p[0] for p in pairs}]
    if not data_names:
        raise ModelError("the model has no input left for step data once states and constants are removed")
    entries = {d.input: d for d in described} if states is None and described is not None else {}
    made = tuple(_make_pair(i, o, inputs, outputs, data_names, batch_axes, entries.get(i)) for i, o in pairs)
    return made, data_names


def _find_pairs(
    states: Mapping[str, str] | None,
    described: tuple[StateEntry, ...] | None,
    inputs: dict[str, TensorSpec],
    outputs: dict[str, TensorSpec],
    constants: set[str],
) -> list[tuple[str, str]]:
    if states is not None:
        pairs = list(states.items())
        source = "the states mapping"
    elif described is not None:
        pairs = [(d.input, d.output) for d in described]
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
    name_in: str,
    name_out: str,
    inputs: dict[str, TensorSpec],
    outputs: dict[str, TensorSpec],
    data_names: list[str],
    batch_axes: Mapping[str, int],
    described: StateEntry | None,
) -> StatePair:
    spec_in, spec_out = inputs[name_in], outputs[name_out]
    if spec_in.dtype != spec_out.dtype:
        raise ModelError(
            f"state pair {name_in} -> {name_out}: dtypes differ ({spec_in.dtype.name} vs {spec_out.dtype.name})"
        )
    if len(spec_in.shape) != len(spec_out.shape) or any(
        isinstance(a, int) and isinstance(b, int) and a != b
        for a, b in zip(spec_in.shape, spec_out.shape, strict=False)
    ):
        raise ModelError(
            f"state pair {name_in} -> {name_out}: shapes differ ({spec_in.describe()} vs {spec_out.describe()})"
        )
    shape = spec_in.shape
    if described is not None and described.shape is not None and len(described.shape) == len(shape):
        # Fixed sizes from the graph win; the metadata fills dims the graph leaves dynamic.
        shape = tuple(
            g if isinstance(g, int) or not isinstance(m, int) else m
            for g, m in zip(shape, described.shape, strict=False)
        )
    if name_in in batch_axes:
        axis = batch_axes[name_in]
    elif described is not None and described.batch_axis is not None:
        axis = described.batch_axis
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


def _infer_pairs(
    inputs: dict[str, TensorSpec], outputs: dict[str, TensorSpec], constants: set[str]
) -> list[tuple[str, str]]:
    pairs = []
    taken: set[str] = set()
    for name, spec in inputs.items():
        if name in constants:
            continue
        for pattern, template in NAMING_CONVENTIONS:
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
