"""A Triton Inference Server model repository for a ``SequenceModel``: sequence batcher with implicit state.

Triton keeps each sequence's state on the server (``sequence_batching.state``) and feeds it back as an input
on the sequence's next request, batch axis first. The exported contract graph (``h0 [L*D, batch, H]``) is
wrapped:

    START [batch, 1] int32 ──► Where(START, 0, state_h_in) ──► Transpose ──► h0 ─┐
    state_h_in [batch, L*D, H] ─────────────────────────────────────────────────┘   contract graph
    hn ──► Transpose ──► state_h_out [batch, L*D, H]                    (and c for LSTM)

so the state resets inside the graph on the request that starts a sequence (Triton also starts it from the
zero ``initial_state``), and a slot Triton reuses for a new sequence never inherits an old state.

Two backends run that graph: ``onnxruntime`` (Triton's ONNX Runtime backend, in NGC's GPU images; Triton
keeps the state) and ``python`` (``model.py``, from ``triton_python_model.py``, runs the same graph through
onnxruntime in Triton's Python backend, for CPU-only images). The Python backend cannot write implicit state
back, so its config declares no ``state``: ``model.py`` keeps each sequence's state by correlation ID, resets
it on ``START``, drops it on ``END`` or after the idle timeout, and runs as one instance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from rnndeploy.checkpoint import atomic_write
from rnndeploy.models import SequenceModel

from .exporter import DEFAULT_OPSET, OutputExistsError, check_and_infer, export_onnx, save_onnx, set_metadata

START = "START"
END = "END"
BACKENDS = ("onnxruntime", "python")
PYTHON_MODEL = Path(__file__).with_name("triton_python_model.py")
_TRITON_TYPE = {
    TensorProto.FLOAT: mc.TYPE_FP32,
    TensorProto.INT64: mc.TYPE_INT64,
    TensorProto.INT32: mc.TYPE_INT32,
}


def state_names(model: SequenceModel) -> list[tuple[str, str, str, str]]:
    """``(contract input, contract output, triton input, triton output)`` per state tensor."""
    return [(f"{s}0", f"{s}n", f"state_{s}_in", f"state_{s}_out") for s in model.config.state_names]


def triton_graph(
    model: SequenceModel,
    opset: int = DEFAULT_OPSET,
    vocab: list[str] | None = None,
    data_stats: dict[str, Any] | None = None,
) -> onnx.ModelProto:
    """The contract graph wrapped for Triton's implicit state (see the module docstring).

    Inputs: ``input`` (``[batch, time]`` or ``[batch, time, F]``), ``START`` ``[batch, 1]`` int32 (1 on a
    sequence's first request), ``state_{h,c}_in`` ``[batch, L*D, H]``. Outputs: ``output``,
    ``state_{h,c}_out`` ``[batch, L*D, H]``.
    """
    c = model.config
    proto = export_onnx(model, opset=opset, vocab=vocab, data_stats=data_stats)
    graph = proto.graph
    rows = c.num_layers * c.num_directions
    names = state_names(model)
    contract_inputs = {n[0] for n in names}
    contract_outputs = {n[1] for n in names}
    kept_inputs = [v for v in graph.input if v.name not in contract_inputs]
    kept_outputs = [v for v in graph.output if v.name not in contract_outputs]
    head = [
        helper.make_node("Cast", [START], ["start_bool"], to=TensorProto.BOOL, name="start_cast"),
        helper.make_node(
            "Constant", [], ["start_shape"], value=helper.make_tensor("", TensorProto.INT64, [3], [-1, 1, 1])
        ),
        helper.make_node("Reshape", ["start_bool", "start_shape"], ["start_mask"], name="start_reshape"),
        helper.make_node(
            "Constant", [], ["zero"], value=helper.make_tensor("", TensorProto.FLOAT, [], [0.0])
        ),
    ]
    tail = []
    new_inputs = [*kept_inputs, helper.make_tensor_value_info(START, TensorProto.INT32, ["batch", 1])]
    new_outputs = list(kept_outputs)
    for contract_in, contract_out, state_in, state_out in names:
        reset = f"{state_in}_reset"
        head += [
            helper.make_node("Where", ["start_mask", "zero", state_in], [reset], name=f"{state_in}_where"),
            helper.make_node(
                "Transpose", [reset], [contract_in], perm=[1, 0, 2], name=f"{state_in}_transpose"
            ),
        ]
        tail.append(
            helper.make_node("Transpose", [contract_out], [state_out], perm=[1, 0, 2], name=f"{state_out}_t")
        )
        shape = ["batch", rows, c.hidden_size]
        new_inputs.append(helper.make_tensor_value_info(state_in, TensorProto.FLOAT, shape))
        new_outputs.append(helper.make_tensor_value_info(state_out, TensorProto.FLOAT, shape))
    nodes = head + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.extend(new_inputs)
    del graph.output[:]
    graph.output.extend(new_outputs)
    del graph.value_info[:]
    states = [
        {
            "input": s_in,
            "output": s_out,
            "shape": ["batch", rows, c.hidden_size],
            "batch_axis": 0,
            "dtype": "float32",
        }
        for _, _, s_in, s_out in names
    ]
    set_metadata(proto, {"rnndeploy.states": json.dumps(states), "rnndeploy.triton.start_input": START})
    return check_and_infer(proto)


def _dims(value: onnx.ValueInfoProto) -> list[int]:
    """Triton dims of a graph value: without the batch axis, ``-1`` for every symbolic axis."""
    dims = value.type.tensor_type.shape.dim[1:]
    return [d.dim_value if d.HasField("dim_value") else -1 for d in dims]


def triton_config(
    proto: onnx.ModelProto,
    name: str,
    max_batch_size: int = 64,
    max_queue_delay_us: int = 100,
    idle_timeout_us: int = 60_000_000,
    backend: str = "onnxruntime",
) -> mc.ModelConfig:
    """Triton's ``ModelConfig`` (the message ``config.pbtxt`` holds) for the wrapped graph ``proto``.

    ``backend="python"`` gives the same config for ``model.py`` (see the module docstring): an ``END`` control
    instead of the ``state`` declarations, one CPU instance.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    states = json.loads(next(p.value for p in proto.metadata_props if p.key == "rnndeploy.states"))
    state_inputs = {s["input"] for s in states}
    state_outputs = {s["output"] for s in states}
    by_name = {v.name: v for v in [*proto.graph.input, *proto.graph.output]}

    def tensor(kind, v: onnx.ValueInfoProto):
        return kind(name=v.name, data_type=_TRITON_TYPE[v.type.tensor_type.elem_type], dims=_dims(v))

    controls = [(START, "CONTROL_SEQUENCE_START")] + (
        [(END, "CONTROL_SEQUENCE_END")] if backend == "python" else []
    )
    Control = mc.ModelSequenceBatching.Control
    config = mc.ModelConfig(
        name=name,
        backend=backend,
        max_batch_size=max_batch_size,
        input=[
            tensor(mc.ModelInput, v)
            for v in proto.graph.input
            if v.name not in state_inputs and v.name != START
        ],
        output=[tensor(mc.ModelOutput, v) for v in proto.graph.output if v.name not in state_outputs],
        sequence_batching=mc.ModelSequenceBatching(
            max_sequence_idle_microseconds=idle_timeout_us,
            control_input=[
                mc.ModelSequenceBatching.ControlInput(
                    name=n, control=[Control(kind=Control.Kind.Value(kind), int32_false_true=[0, 1])]
                )
                for n, kind in controls
            ],
            oldest=mc.ModelSequenceBatching.StrategyOldest(
                max_candidate_sequences=max_batch_size,
                preferred_batch_size=sorted({b for b in (1, 4, 16, max_batch_size) if b <= max_batch_size}),
                max_queue_delay_microseconds=max_queue_delay_us,
            ),
        ),
    )
    if backend == "python":
        # model.py keeps the states itself (the Python backend cannot update implicit state): one instance
        # holds every sequence's state.
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
        return config
    for s in states:
        dims = _dims(by_name[s["input"]])
        config.sequence_batching.state.add(
            input_name=s["input"],
            output_name=s["output"],
            data_type=mc.TYPE_FP32,
            dims=dims,
            initial_state=[
                mc.ModelSequenceBatching.InitialState(
                    name="zeros", data_type=mc.TYPE_FP32, dims=dims, zero_data=True
                )
            ],
        )
    return config


def write_triton_repository(
    model: SequenceModel,
    repo: str | Path,
    name: str,
    *,
    opset: int = DEFAULT_OPSET,
    max_batch_size: int = 64,
    max_queue_delay_us: int = 100,
    idle_timeout_us: int = 60_000_000,
    backend: str = "onnxruntime",
    vocab: list[str] | None = None,
    data_stats: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes ``repo/<name>/config.pbtxt`` and ``repo/<name>/1/model.onnx`` atomically; returns the folder.

    ``backend="python"`` also writes ``repo/<name>/1/model.py`` (Triton's Python backend running the graph
    through onnxruntime; numpy and onnxruntime must be importable by the backend's Python).

    Args:
        model: the ``SequenceModel``.
        repo: the model repository folder (``tritonserver --model-repository=repo``).
        name: the model's name in Triton.
        max_batch_size: the largest batch of sequences Triton runs together (``oldest`` strategy).
        max_queue_delay_us: how long the batcher waits to fill a batch.
        idle_timeout_us: a sequence with no request for this long is released (its state dropped).
        backend: ``"onnxruntime"`` (NGC images) or ``"python"`` (``model.py``; CPU-only images).
        vocab: stored in the graph's metadata, as in `rnndeploy.export.export_onnx`.
        data_stats: stored in the graph's metadata, as in `rnndeploy.export.export_onnx`.
        overwrite: replace the files of a model folder that exists; without it an existing ``repo/<name>``
            (another model's, or an earlier export's) is an `OutputExistsError`.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1 for the sequence batcher, got {max_batch_size}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    folder = Path(repo) / name
    if folder.exists() and not overwrite:
        raise OutputExistsError(folder)
    proto = triton_graph(model, opset, vocab=vocab, data_stats=data_stats)
    save_onnx(proto, folder / "1" / "model.onnx")
    if backend == "python":
        code = PYTHON_MODEL.read_text()
        atomic_write(folder / "1" / "model.py", lambda tmp: Path(tmp).write_text(code))
    config = triton_config(proto, name, max_batch_size, max_queue_delay_us, idle_timeout_us, backend)
    text = text_format.MessageToString(config)
    atomic_write(folder / "config.pbtxt", lambda tmp: Path(tmp).write_text(text))
    return folder
