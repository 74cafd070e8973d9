"""``export_onnx``: any ``nn.Module`` with recurrent layers -> a checked, standard ONNX file.

A `SequenceModel` exports per the project's ONNX contract (README, "Export"): inputs
``input`` plus one state input per state tensor (``h0``, ``c0``), outputs ``output`` plus ``hn`` (``cn``),
dynamic ``batch`` and ``time`` axes, and ``metadata_props`` that let a runtime serve the graph without flags.
Any other module exports with the names and dynamic axes its caller gives.

The graph comes from torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``) with every recurrent
layer swapped for its stand-in (`.recurrent`), which puts one standard node per layer into the traced
program. The exporter writes opset 18 or newer; lower opsets (14-17) go through onnx's version converter. Each
graph is then checked: no ``Loop``/``Scan``/``If`` or custom-domain nodes, at least one recurrent node per
layer (a traced Python loop has none), every requested dynamic axis still dynamic, ``onnx.checker`` with
strict shape inference.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.version_converter
import torch
from torch import Tensor, nn

from rnndeploy.checkpoint import atomic_write
from rnndeploy.models import SequenceModel

from .recurrent import (
    ONNX_OP,
    OnnxRecurrent,
    UnsupportedLayerError,
    cell_of,
    check_exportable,
    onnx_recurrent_layers,
)

# NOTE: opset 17 is the newest opset that TensorRT 8.6 (still common in deployed Triton/Jetson images)
# parses completely, onnxruntime has run it since 1.12, and its RNN/LSTM/GRU (version 14) are current.
DEFAULT_OPSET = 17
# LSTM/GRU/RNN-14 is the first definition with the current semantics; 20, the top, is the newest opset the
# tests export and run.
MIN_OPSET, MAX_OPSET = 14, 20
# The dynamo exporter writes opset 18 and newer; onnx's version converter takes its graphs down from there.
EXPORTER_MIN_OPSET = 18
_INT64_MAX = np.iinfo(np.int64).max
FORBIDDEN_OPS = ("Loop", "Scan", "If")
EXAMPLE_BATCH, EXAMPLE_TIME = 3, 5  # odd and distinct so no axis is mistaken for another while tracing


class ExportError(RuntimeError):
    """The model cannot be exported, or the exported graph breaks the export's own guarantees."""


class OpsetConversionError(ExportError):
    """onnx's version converter cannot take the exported graph down to the opset asked for."""


class OutputExistsError(ExportError):
    """An output file exists and the caller did not ask to replace it (``overwrite=True``)."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} exists; pass overwrite=True to replace it")
        self.path = path


def export_onnx(
    model: nn.Module,
    path: str | Path | None = None,
    example_inputs: Sequence[Tensor] | Tensor | None = None,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    opset: int | None = None,
    vocab: list[str] | None = None,
    data_stats: dict[str, Any] | None = None,
) -> onnx.ModelProto:
    """Exports ``model`` to ONNX with every recurrent layer as a standard ``RNN``/``LSTM``/``GRU`` node.

    Args:
        model: a `SequenceModel`, or any module whose recurrent layers are ``torch.nn.RNN/LSTM/GRU``
            (rnndeploy's included) among ordinary layers. The model itself is not modified.
        path: where to write the ``.onnx`` file (atomically); ``None`` to only return the model.
        example_inputs: positional inputs for tracing. ``SequenceModel``: ignored (built from the config).
            Other modules: required; recurrent layers must get batched 3-D tensors.
        input_names: for modules other than ``SequenceModel``; by default ``input_0, ...``.
        output_names: for modules other than ``SequenceModel``; by default ``output_0, ...``.
        dynamic_axes: for modules other than ``SequenceModel``; by default axes 0 and 1 of every input are
            dynamic (``axis0``, ``axis1``).
        opset: ONNX opset, ``MIN_OPSET..MAX_OPSET``; default `DEFAULT_OPSET`, or for a module whose
            ops onnx's version converter cannot take below the exporter's opset 18 (``chunk`` -> Split-18),
            opset 18 with a warning. An opset given explicitly is kept, or refused with the op named.
        vocab: ``SequenceModel`` only: stored in ``metadata_props`` (``rnndeploy.vocab``).
        data_stats: ``SequenceModel`` only: stored in ``metadata_props`` (``rnndeploy.data_stats``).

    Returns:
        The checked, shape-inferred ``onnx.ModelProto`` (also written to ``path``).
    """
    given, opset = opset is not None, DEFAULT_OPSET if opset is None else opset
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset must be in [{MIN_OPSET}, {MAX_OPSET}], got {opset}")
    model = copy.deepcopy(model).cpu().float().eval()
    if isinstance(model, SequenceModel):
        proto = _export_sequence_model(model, opset, vocab, data_stats)
    else:
        if example_inputs is None:
            raise ExportError(
                f"example_inputs is required to export a {type(model).__name__} "
                "(only SequenceModel builds its own); pass a tuple of input tensors"
            )
        args = (example_inputs, input_names, output_names, dynamic_axes)
        try:
            proto = _export_module(model, *args, opset)
        except OpsetConversionError as exc:
            if given:
                raise
            warnings.warn(
                f"{exc}: exported at opset {EXPORTER_MIN_OPSET} instead of the default {DEFAULT_OPSET}",
                stacklevel=2,
            )
            proto = _export_module(model, *args, EXPORTER_MIN_OPSET)
    if path is not None:
        save_onnx(proto, path)
    return proto


def save_onnx(proto: onnx.ModelProto, path: str | Path) -> Path:
    """Writes ``proto`` to ``path`` atomically (temporary file, then rename) and returns the path."""
    path = Path(path)
    atomic_write(path, lambda tmp: onnx.save(proto, tmp))
    return path


def check_and_infer(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Runs ``onnx.checker.check_model(full_check=True)`` and strict shape inference; returns the result."""
    try:
        onnx.checker.check_model(proto, full_check=True)
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported graph fails ONNX's checker: {exc}") from exc


def state_spec(model: SequenceModel) -> list[dict[str, Any]]:
    """The ``rnndeploy.states`` entries of a ``SequenceModel``: one dict per state tensor (``h``, ``c``)."""
    c = model.config
    rows = c.num_layers * c.num_directions
    return [
        {
            "input": f"{s}0",
            "output": f"{s}n",
            "shape": [rows, "batch", c.hidden_size],
            "batch_axis": 1,
            "dtype": "float32",
        }
        for s in c.state_names
    ]


def contract_metadata(
    model: SequenceModel, vocab: list[str] | None, data_stats: dict[str, Any] | None, precision: str = "fp32"
) -> dict[str, str]:
    """``metadata_props`` of an exported ``SequenceModel`` (all values strings, JSON where structured)."""
    from rnndeploy import __version__

    c = model.config
    meta = {
        "rnndeploy.version": __version__,
        "rnndeploy.states": json.dumps(state_spec(model)),
        "rnndeploy.config": c.to_json(),
        "rnndeploy.task": c.task,
        "rnndeploy.data_stats": json.dumps(data_stats or {}),
        "rnndeploy.cell": c.cell,
        "rnndeploy.sizes": json.dumps(
            {
                "vocab_size": c.vocab_size,
                "input_size": c.input_size,
                "embed_dim": c.embed_dim,
                "hidden_size": c.hidden_size,
                "num_layers": c.num_layers,
                "num_directions": c.num_directions,
                "output_size": c.output_size,
            }
        ),
        "rnndeploy.precision": precision,
    }
    if c.task == "lm" and vocab is not None:
        if len(vocab) != c.vocab_size:
            raise ExportError(f"vocab has {len(vocab)} entries but the model's vocab_size is {c.vocab_size}")
        meta["rnndeploy.vocab"] = json.dumps(list(vocab))
    return meta


def set_metadata(proto: onnx.ModelProto, meta: dict[str, str]) -> None:
    """Replaces ``proto``'s ``metadata_props`` entries named in ``meta`` (others are kept)."""
    kept = [p for p in proto.metadata_props if p.key not in meta]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)


def recurrent_node_counts(proto: onnx.ModelProto) -> dict[str, int]:
    """How many ``RNN``, ``LSTM`` and ``GRU`` nodes (any domain) the main graph holds."""
    counts = {op: 0 for op in ONNX_OP.values()}
    for node in proto.graph.node:
        if node.op_type in counts:
            counts[node.op_type] += 1
    return counts


class _ContractGraph(nn.Module):
    """``SequenceModel`` with flat I/O: ``(input, h0[, c0]) -> (output, hn[, cn])``."""

    def __init__(self, model: SequenceModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input: Tensor, *state: Tensor) -> tuple[Tensor, ...]:  # noqa: A002
        y, new_state = self.model(input, tuple(state))
        return (y, *new_state)


def example_input(
    model: SequenceModel, batch: int, time: int, generator: torch.Generator | None = None
) -> Tensor:
    """A random model input: ``[batch, time]`` int64 token ids or ``[batch, time, F]`` float32 features."""
    c = model.config
    if c.vocab_size is not None:
        return torch.randint(0, c.vocab_size, (batch, time), generator=generator)
    return torch.randn(batch, time, c.input_size, generator=generator)


def _export_sequence_model(
    model: SequenceModel, opset: int, vocab: list[str] | None, data_stats: dict[str, Any] | None
) -> onnx.ModelProto:
    c = model.config
    check_layer(model.rnn, "rnn")
    states = [f"{s}0" for s in c.state_names]
    outputs = ["output"] + [f"{s}n" for s in c.state_names]
    seq_axes = {0: "batch"} if c.task == "classification" else {0: "batch", 1: "time"}
    dynamic_axes = {"input": {0: "batch", 1: "time"}, "output": seq_axes}
    dynamic_axes.update({name: {1: "batch"} for name in states + outputs[1:]})
    x = example_input(model, EXAMPLE_BATCH, EXAMPLE_TIME)
    state = tuple(torch.randn_like(s) for s in model.init_state(EXAMPLE_BATCH))
    graph = _ContractGraph(model).eval()
    with onnx_recurrent_layers(graph):
        proto = _trace(graph, (x, *state), ["input", *states], outputs, dynamic_axes, opset)
    _check_recurrent_nodes(proto, {ONNX_OP[c.cell]: c.num_layers})
    set_metadata(proto, contract_metadata(model, vocab, data_stats))
    return check_and_infer(proto)


def check_layer(module: nn.Module, name: str) -> None:
    """Raises `ExportError` naming ``name`` and the option if a recurrent layer cannot be exported."""
    try:
        check_exportable(module, name)
    except UnsupportedLayerError as exc:
        raise ExportError(str(exc)) from exc


def _export_module(
    model: nn.Module,
    example_inputs: Sequence[Tensor] | Tensor,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
    dynamic_axes: dict[str, dict[int, str]] | None,
    opset: int,
) -> onnx.ModelProto:
    args = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    input_names = list(input_names or [f"input_{i}" for i in range(len(args))])
    required = dynamic_axes is not None
    if dynamic_axes is None:
        dynamic_axes = {
            name: {axis: f"axis{axis}" for axis in range(min(2, a.dim()))}
            for name, a in zip(input_names, args, strict=True)
            if isinstance(a, Tensor)
        }
    expected: dict[str, int] = {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.RNNBase)]
    for name, module in layers:
        check_layer(module, name or type(module).__name__)
        op = ONNX_OP[cell_of(module)]
        expected[op] = expected.get(op, 0) + module.num_layers
    if isinstance(model, nn.RNNBase):  # a bare recurrent layer: export its stand-in directly
        model = OnnxRecurrent(model, type(model).__name__)
    with onnx_recurrent_layers(model):
        proto = _trace(model, args, input_names, output_names, dynamic_axes, opset, required=required)
    _check_recurrent_nodes(proto, expected)
    return check_and_infer(proto)


def _trace(
    module: nn.Module,
    args: tuple,
    input_names: Sequence[str],
    output_names: Sequence[str] | None,
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
    *,
    required: bool = True,
) -> onnx.ModelProto:
    """``torch.onnx.export(..., dynamo=True)`` with ``dynamic_axes`` named as given, at ``opset``.

    ``required``: every axis in ``dynamic_axes`` must come out dynamic (else `ExportError`); when
    False (default axes the caller did not ask for), the ones the module fixes stay fixed.
    """
    # Dim.DYNAMIC: torch.export refuses (rather than silently fixes) an axis the module makes static; the
    # exporter's own names for the axes are replaced by the caller's below, which may be any string.
    dim = torch.export.Dim.DYNAMIC if required else torch.export.Dim.AUTO
    specs = [
        {axis: dim for axis in dynamic_axes.get(name, {})} if isinstance(a, Tensor) else None
        for name, a in zip(input_names, args, strict=False)
    ]
    with _quiet_exporter():
        try:
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=max(opset, EXPORTER_MIN_OPSET),
                input_names=list(input_names),
                output_names=list(output_names) if output_names is not None else None,
                dynamic_shapes=_by_signature(module, specs),
                external_data=False,
                optimize=True,
                verbose=False,
            )
        except Exception as exc:
            cause = _cause(exc, UnsupportedLayerError)
            if cause is not None:
                raise ExportError(str(cause)) from cause
            raise ExportError(f"torch.onnx.export failed: {_root_message(exc)}") from exc
    if output_names is None:
        for i, value in enumerate(program.model.graph.outputs):
            value.name = f"output_{i}"
    proto = _convert_opset(program.model_proto, opset)
    _name_dynamic_axes(proto, dynamic_axes, required=required)
    # the lowest IR version that holds the opset, so that older runtimes (Triton, TensorRT) load the file
    proto.ir_version = onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    return proto


def _by_signature(module: nn.Module, specs: list) -> tuple:
    """Per-input ``specs`` grouped as ``module.forward``'s parameters take them (``*args`` as one tuple)."""
    grouped: list = []
    for i, param in enumerate(inspect.signature(module.forward).parameters.values()):
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            grouped.append(tuple(specs[i:]))
            break
        if i >= len(specs):
            break
        grouped.append(specs[i])
    return tuple(grouped)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    # NOTE: the exporter logs its progress, its opset conversion and missing optional packages (torchvision)
    # as warnings; none is about the user's model, and a failed export still raises. torch 2.11's own
    # torch.export calls a pytree API that torch itself deprecates (a FutureWarning no caller can act on).
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
            )
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _convert_opset(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``proto`` (exported at ``EXPORTER_MIN_OPSET`` or newer) at ``opset``, or `ExportError`."""
    if opset >= EXPORTER_MIN_OPSET:
        return proto
    try:
        proto = onnx.version_converter.convert_version(proto, max(opset, 15))
    except (RuntimeError, onnx.checker.ValidationError) as exc:
        missing = re.search(r"Version \$\d+ for (\w+)", str(exc))
        what = f"it has no adapter for {missing.group(1)}" if missing else str(exc)
        raise OpsetConversionError(
            f"onnx's version converter cannot take the exported graph to opset {opset} ({what}); "
            f"export at opset {EXPORTER_MIN_OPSET} or newer"
        ) from exc
    if opset == 14:
        _shape_15_to_14(proto)
    return proto


def _shape_15_to_14(proto: onnx.ModelProto) -> None:
    # NOTE: onnx's version converter has no Shape adapter from 15 (which added start/end) down to 14; the
    # exporter uses start/end for single dimensions. Shape-13 followed by Slice-13 computes the same thing.
    graph = proto.graph
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        bounds = {a.name: a.i for a in node.attribute}
        if node.op_type != "Shape" or node.domain not in ("", "ai.onnx") or not bounds:
            nodes.append(node)
            continue
        full = f"{node.output[0]}.full"
        params = [f"{node.output[0]}.{p}" for p in ("starts", "ends", "axes")]
        values = [bounds.get("start", 0), bounds.get("end", _INT64_MAX), 0]
        graph.initializer.extend(
            onnx.numpy_helper.from_array(np.array([v], np.int64), name)
            for name, v in zip(params, values, strict=True)
        )
        nodes.append(onnx.helper.make_node("Shape", [node.input[0]], [full], name=f"{node.name}.shape"))
        nodes.append(
            onnx.helper.make_node("Slice", [full, *params], [node.output[0]], name=f"{node.name}.slice")
        )
    del graph.node[:]
    graph.node.extend(nodes)
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 14


def _cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _root_message(exc: BaseException, lines: int = 4) -> str:
    """The first ``lines`` lines of the innermost cause: the exporter wraps torch.export's own error."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return " ".join((str(exc).strip().splitlines() or [type(exc).__name__])[:lines])


def _name_dynamic_axes(
    proto: onnx.ModelProto, dynamic_axes: dict[str, dict[int, str]], *, required: bool
) -> None:
    """Renames the exporter's symbolic dimensions to the names in ``dynamic_axes``, throughout the graph.

    Raises `ExportError` naming the tensor and axis if a ``required`` dynamic axis came out fixed.
    """
    graph = proto.graph
    values = {v.name: v for v in [*graph.input, *graph.output]}
    renames: dict[str, str] = {}
    for name, axes in dynamic_axes.items():
        if name not in values:
            continue
        dims = values[name].type.tensor_type.shape.dim
        for axis, axis_name in axes.items():
            fixed = axis >= len(dims) or not dims[axis].dim_param
            if fixed and not required:
                continue
            if fixed:
                found = dims[axis].dim_value if axis < len(dims) else "no such axis"
                raise ExportError(
                    f"axis {axis} of {name!r} should be dynamic ({axis_name!r}) but the exported graph has "
                    f"{found}: the model fixes its size (a Python int taken from a shape, or a loop over it)"
                )
            renames.setdefault(dims[axis].dim_param, axis_name)
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in renames:
                dim.dim_param = renames[dim.dim_param]
    # an output may name an axis differently from the input it follows
    for name, axes in dynamic_axes.items():
        if name in values:
            dims = values[name].type.tensor_type.shape.dim
            for axis, axis_name in axes.items():
                if axis < len(dims) and dims[axis].dim_param:
                    dims[axis].dim_param = axis_name


def _check_recurrent_nodes(proto: onnx.ModelProto, expected: dict[str, int]) -> None:
    bad = sorted({n.op_type for n in proto.graph.node if n.op_type in FORBIDDEN_OPS})
    custom = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if bad or custom:
        raise ExportError(
            f"the exported graph holds control-flow or custom nodes {bad + custom}; expected none"
        )
    counts = recurrent_node_counts(proto)
    for op, n in expected.items():
        if counts[op] < n:
            raise ExportError(
                f"expected at least {n} ONNX {op} node(s) (one per layer), "
                f"the exported graph has {counts[op]}"
            )
