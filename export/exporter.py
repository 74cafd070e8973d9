"""``export_onnx``: any ``nn.Module`` with recurrent layers -> a checked, standard ONNX file.

A :class:`~rnndeploy.models.SequenceModel` exports per the project's ONNX contract (README, "Export"): inputs
``input`` plus one state input per state tensor (``h0``, ``c0``), outputs ``output`` plus ``hn`` (``cn``),
dynamic ``batch`` and ``time`` axes, and ``metadata_props`` that let a runtime serve the graph without flags.
Any other module exports with the names and dynamic axes its caller gives.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
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
# LSTM/GRU/RNN-14 is the first definition with the current semantics; 20 is the newest opset the TorchScript
# exporter writes.
MIN_OPSET, MAX_OPSET = 14, 20
FORBIDDEN_OPS = ("Loop", "Scan", "If")
EXAMPLE_BATCH, EXAMPLE_TIME = 3, 5  # odd and distinct so no axis is mistaken for another while tracing


class ExportError(RuntimeError):
    """The model cannot be exported, or the exported graph breaks the export's own guarantees."""


def export_onnx(
    model: nn.Module,
    path: str | Path | None = None,
    example_inputs: Sequence[Tensor] | Tensor | None = None,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    opset: int = DEFAULT_OPSET,
    vocab: list[str] | None = None,
    data_stats: dict[str, Any] | None = None,
) -> onnx.ModelProto:
    """Exports ``model`` to ONNX with every recurrent layer as a standard ``RNN``/``LSTM``/``GRU`` node.

    Args:
        model: a :class:`SequenceModel`, or any module whose recurrent layers are ``torch.nn.RNN/LSTM/GRU``
            (rnndeploy's included) among ordinary layers. The model itself is not modified.
        path: where to write the ``.onnx`` file (atomically); ``None`` to only return the model.
        example_inputs: positional inputs for tracing. ``SequenceModel``: ignored (built from the config).
            Other modules: required; recurrent layers must get batched 3-D tensors.
        input_names, output_names, dynamic_axes: for modules other than ``SequenceModel``; by default inputs
            are ``input_0, ...`` with axes 0 and 1 dynamic (``axis0``, ``axis1``), outputs ``output_0, ...``.
        opset: ONNX opset, ``MIN_OPSET..MAX_OPSET``; default :data:`DEFAULT_OPSET`.
        vocab, data_stats: ``SequenceModel`` only: stored in ``metadata_props`` (``rnndeploy.vocab``,
            ``rnndeploy.data_stats``).

    Returns:
        The checked, shape-inferred ``onnx.ModelProto`` (also written to ``path``).
    """
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
        proto = _export_module(model, example_inputs, input_names, output_names, dynamic_axes, opset)
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
    graph = _ContractGraph(model)
    with onnx_recurrent_layers(graph):
        proto = _trace(graph, (x, *state), ["input", *states], outputs, dynamic_axes, opset)
    _check_recurrent_nodes(proto, {ONNX_OP[c.cell]: c.num_layers})
    set_metadata(proto, contract_metadata(model, vocab, data_stats))
    return check_and_infer(proto)


def check_layer(module: nn.Module, name: str) -> None:
    """Raises :class:`ExportError` naming ``name`` and the option if a recurrent layer cannot be exported."""
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
        try:
            proto = _trace(model, args, input_names, output_names, dynamic_axes, opset)
        except UnsupportedLayerError as exc:
            raise ExportError(str(exc)) from exc
    _check_recurrent_nodes(proto, expected)
    return check_and_infer(proto)


def _trace(
    module: nn.Module,
    args: tuple,
    input_names: Sequence[str],
    output_names: Sequence[str] | None,
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # NOTE: the TorchScript exporter is the one that honours autograd.Function.symbolic(); torch marks it
        # deprecated, and the node-type check after export catches any exporter that ignores symbolic().
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            args,
            buffer,
            dynamo=False,
            export_params=True,
            do_constant_folding=True,
            opset_version=opset,
            input_names=list(input_names),
            output_names=list(output_names) if output_names is not None else None,
            dynamic_axes=dynamic_axes,
        )
    return onnx.load_from_string(buffer.getvalue())


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
