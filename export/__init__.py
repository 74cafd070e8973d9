"""ONNX export for rnndeploy models: standard RNN/LSTM/GRU nodes, state as graph I/O, verification,
fp16 / int8 variants and Triton Inference Server repositories.

Entry points:
- `export_onnx`: any ``nn.Module`` (``SequenceModel`` per the ONNX contract) -> checked ``.onnx``;
- `verify`: onnxruntime and ``onnx.reference`` against PyTorch, as a printable table;
- `export_checkpoint`: checkpoint -> ONNX (+ variants, Triton repository) with a printable report;
- `write_triton_repository`: a model repository for Triton's sequence batcher with implicit state.
"""

from .exporter import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, ExportError, export_onnx, save_onnx
from .pipeline import ExportReport, OutputExistsError, export_checkpoint  # noqa: F401 (defined in exporter)
from .recurrent import OnnxRecurrent, UnsupportedLayerError, onnx_recurrent_layers
from .step_graph import export_step_graph, quantize_step_graph, verify_step_graph
from .triton import write_triton_repository
from .variants import quantize_int8, to_fp16
from .verification import TOLERANCES, VerifyReport, verify

__all__ = [
    "DEFAULT_OPSET",
    "MAX_OPSET",
    "MIN_OPSET",
    "TOLERANCES",
    "ExportError",
    "ExportReport",
    "OnnxRecurrent",
    "OutputExistsError",
    "UnsupportedLayerError",
    "VerifyReport",
    "export_checkpoint",
    "export_onnx",
    "export_step_graph",
    "onnx_recurrent_layers",
    "quantize_int8",
    "quantize_step_graph",
    "save_onnx",
    "to_fp16",
    "verify",
    "verify_step_graph",
    "write_triton_repository",
]
