"""Precision variants of an exported graph: fp16 (GPU runtimes) and dynamic int8 (CPU), plus CPU latency.

- fp16: every float initializer and constant becomes float16 and the graph computes in half precision; graph
  inputs and outputs stay float32 (a ``Cast`` on each side), so runtimes and the state contract are unchanged.
  onnxruntime's CUDA (cuDNN) and TensorRT execution providers run half RNN/LSTM/GRU. The CPU execution
  provider has no float16 kernels for them: it inserts casts and computes in float32 (and onnxruntime 1.31
  crashes loading such a graph at ``ORT_ENABLE_ALL``, see ``verification.session``), so true fp16 arithmetic
  is checked on CPU with ``onnx.reference``.
- int8: ``onnxruntime.quantization.quantize_dynamic``: LSTM -> ``com.microsoft.DynamicQuantizeLSTM``,
  MatMul -> ``MatMulInteger``, embedding ``Gather`` on int8 weights. GRU and RNN have no
  quantized kernel and stay fp32. onnxruntime only (custom ``com.microsoft`` ops), CPU execution provider.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .exporter import check_and_infer, save_onnx, set_metadata


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of an fp32 graph with float32 inputs and outputs (``Cast`` at the boundary).

    Returns:
        The checked, shape-inferred half-precision model; ``metadata_props["rnndeploy.precision"] = "fp16"``.
    """
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = proto.graph
    del graph.value_info[:]
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16)))
            elif node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
    head, tail = [], []
    for value in graph.input:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            half = f"{value.name}.fp16"
            _rename_uses(graph, value.name, half)
            head.append(
                helper.make_node("Cast", [value.name], [half], to=TensorProto.FLOAT16, name=f"cast_{half}")
            )
    for value in graph.output:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            half = f"{value.name}.fp16"
            for node in graph.node:
                node.output[:] = [half if o == value.name else o for o in node.output]
            _rename_uses(graph, value.name, half)
            tail.append(
                helper.make_node(
                    "Cast", [half], [value.name], to=TensorProto.FLOAT, name=f"cast_{value.name}"
                )
            )
    nodes = head + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)
    set_metadata(proto, {"rnndeploy.precision": "fp16"})
    return check_and_infer(proto)


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if i == old else i for i in node.input]


def quantize_int8(fp32_path: str | Path, out_path: str | Path) -> onnx.ModelProto:
    """Dynamic int8 quantization of the graph at ``fp32_path`` (weights int8, activations quantized per call).

    Returns:
        The quantized model (also written atomically to ``out_path``), ``rnndeploy.precision = "int8"``.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        tmp_out = Path(tmp) / "int8.onnx"
        # NOTE: quantize_dynamic logs a root-logger warning suggesting pre-processing meant for conv nets;
        # it does not apply to recurrent graphs, so it is kept off the user's terminal.
        logging.disable(logging.WARNING)
        try:
            quantize_dynamic(str(fp32_path), str(tmp_out), weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
        proto = onnx.load(str(tmp_out))
    set_metadata(proto, {"rnndeploy.precision": "int8"})
    onnx.checker.check_model(proto, full_check=True)
    save_onnx(proto, out_path)
    return proto


def latency_us(path: str | Path, feeds: dict[str, np.ndarray], repeats: int = 200) -> float:
    """Median wall time in microseconds of one ``session.run`` on the CPU execution provider, one thread."""
    import onnxruntime as ort

    from rnndeploy.runtime import default_session_options

    session = ort.InferenceSession(
        str(path), default_session_options(threads=1), providers=["CPUExecutionProvider"]
    )
    for _ in range(10):
        session.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6
