"""Execution providers and session creation: which providers can start, session options, loading a model.

Loading never lets onnxruntime print its own log lines: a provider that does not start or a file that is not a
model becomes a `ProviderError` / `ModelError` that says why and what to do.
"""

from __future__ import annotations

import ctypes
import io
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

import onnxruntime as ort

from rnndeploy.runtime.errors import ORT_ERRORS, ModelError, ProviderError

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_PROVIDER_LIBRARIES = {
    "CUDAExecutionProvider": "libonnxruntime_providers_cuda.so",
    "TensorrtExecutionProvider": "libonnxruntime_providers_tensorrt.so",
}
# onnxruntime's documented default severity of its process-wide logger (2: warnings and above).
_ORT_DEFAULT_LOG_SEVERITY = 2
_ORT_QUIET = 4  # fatal only: every error reaches the caller as an exception instead


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers (a GPU build lists CUDA even without a GPU)."""
    return list(ort.get_available_providers())


def usable_providers(model: str | os.PathLike | bytes | None = None) -> list[str]:
    """Providers of `available_providers` that can start here, fastest first; CPU always.

    A GPU provider needs a CUDA driver and its onnxruntime provider library with all of its CUDA libraries;
    with ``model`` it must also start a session on that model (onnxruntime falls back to the CPU when it
    cannot, which is how a missing GPU shows).
    """
    usable = []
    for name in available_providers():
        if name in GPU_PROVIDERS:
            if provider_problem(name) is not None:
                continue
            if model is not None and not _starts(model, name):
                continue
        usable.append(name)
    return usable


def provider_problem(name: str) -> str | None:
    """Why GPU provider ``name`` cannot start here (no driver, a CUDA library missing), or None if it may."""
    if not _cuda_driver_present():
        return "no NVIDIA driver on this machine (libcuda.so.1 not found)"
    library = _PROVIDER_LIBRARIES.get(name)
    if library is None:
        return None
    try:
        ctypes.CDLL(str(Path(ort.__file__).parent / "capi" / library))
    except OSError as error:
        return f"its onnxruntime library cannot load: {error}"
    return None


def _cuda_driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def _starts(model: str | os.PathLike | bytes, name: str) -> bool:
    source = str(model) if isinstance(model, str | os.PathLike) else model
    try:
        session = load_session(source, default_session_options(), [name, "CPUExecutionProvider"])
    except (ModelError, ProviderError):
        return False
    return name in session.get_providers()


def resolve_providers(providers: str | Iterable[str] | None) -> list[str]:
    """Turn ``None`` (auto), ``"cuda"``, ``"cpu"``, ``"tensorrt"``, ``"cuda,cpu"`` or full names into a list.

    Auto lists CUDA first when this build has it and a CUDA driver is present, then CPU
    (`StreamingSession` still checks that CUDA starts, and runs on the CPU quietly when it does not).
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
    per core; raise it for large batches. onnxruntime logs nothing but fatal errors: every error reaches the
    caller as an exception (`StepInputError`, `ModelError`) that names the input.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = _ORT_QUIET
    return options


def load_session(source: str | bytes, options: ort.SessionOptions, providers: list) -> ort.InferenceSession:
    """``ort.InferenceSession`` without onnxruntime's log lines; a model it cannot load is a `ModelError`.

    When a GPU provider in ``providers`` does not start, onnxruntime falls back to the next one (the caller
    checks ``get_providers()``); its error log about that is not shown.
    """
    disabled = []
    if uses_float16(source):
        # NOTE: onnxruntime 1.31's CPU provider runs float16 RNN/LSTM/GRU through inserted casts to float32,
        # and its NCHWc layout transformer (ORT_ENABLE_ALL) dereferences a null pointer on such a graph:
        # the process dies with SIGSEGV. The transformer only rewrites convolutions; nothing else changes.
        disabled = ["NchwcTransformer"]
    ort.set_default_logger_severity(_ORT_QUIET)
    try:
        return ort.InferenceSession(source, options, providers=providers, disabled_optimizers=disabled)
    except ORT_ERRORS as error:
        what = f"{source} is" if isinstance(source, str) else f"the given {len(source)} bytes are"
        if is_torch_checkpoint(source):
            named = source if isinstance(source, str) else "CHECKPOINT.pt"
            raise ModelError(
                f"{what} a PyTorch training checkpoint, not an ONNX model: export it first with "
                f"`rnndeploy export {named} -o model.onnx` and give the .onnx file"
            ) from None
        raise ModelError(f"{what} not an ONNX model onnxruntime can load: {error}") from error
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT_LOG_SEVERITY)


def is_torch_checkpoint(source: str | bytes) -> bool:
    """Whether ``source`` (a path or the file's bytes) is a file ``torch.save`` wrote: a zip archive with a
    ``data.pkl`` record, or a bare pickle (torch's legacy format). Read without torch and without unpickling."""
    try:
        if isinstance(source, str):
            with open(source, "rb") as fh:
                head = fh.read(4)
            archive = source
        else:
            head, archive = bytes(source[:4]), io.BytesIO(source)
        if head[:1] == b"\x80":  # pickle protocol 2+ opcode
            return True
        if head != b"PK\x03\x04":
            return False
        with zipfile.ZipFile(archive) as zf:
            return any(name == "data.pkl" or name.endswith("/data.pkl") for name in zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


# ---------------------------------------------------------------------------------------------- float16 scan
# The ONNX protobuf fields that lead to a tensor's element type (onnx/onnx.proto3), read without the onnx
# package: ModelProto.graph = 7, .functions = 25; GraphProto.node = 1, .initializer = 5; FunctionProto.node = 7;
# NodeProto.op_type = 4, .attribute = 5; AttributeProto.i = 3, .t = 5, .g = 6, .tensors = 10, .graphs = 11;
# TensorProto.data_type = 2.
_FLOAT16 = 10  # TensorProto.FLOAT16


def uses_float16(source: str | bytes) -> bool:
    """Whether an ONNX model holds float16 tensors or casts to float16 (in any graph or function)."""
    data = Path(source).read_bytes() if isinstance(source, str) else source
    try:
        model = _fields(memoryview(data))
        return any(_graph_has_float16(v) for f, v in model if f in (7, 25))
    except (IndexError, ValueError):  # not a protobuf: onnxruntime reports that when it loads the file
        return False


def _graph_has_float16(graph: memoryview) -> bool:
    for field, value in _fields(graph):
        if field == 5 and isinstance(value, memoryview):  # an initializer
            if any(f == 2 and v == _FLOAT16 for f, v in _fields(value)):
                return True
        elif field in (1, 7) and isinstance(value, memoryview) and _node_has_float16(value):
            return True
    return False


def _node_has_float16(node: memoryview) -> bool:
    fields = _fields(node)
    cast = any(f == 4 and bytes(v) == b"Cast" for f, v in fields if isinstance(v, memoryview))
    for field, value in fields:
        if field != 5 or not isinstance(value, memoryview):
            continue
        for f, v in _fields(value):
            if f == 3 and cast and v == _FLOAT16:
                return True
            if not isinstance(v, memoryview):
                continue
            if f in (6, 11) and _graph_has_float16(v):
                return True
            if f in (5, 10) and any(ff == 2 and vv == _FLOAT16 for ff, vv in _fields(v)):
                return True
    return False


def _fields(message: memoryview) -> list[tuple[int, int | memoryview]]:
    """Top-level ``(field number, value)`` pairs of a protobuf message: varints as int, others as bytes."""
    fields, i, n = [], 0, len(message)
    while i < n:
        key, i = _varint(message, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(message, i)
        elif wire == 2:
            size, i = _varint(message, i)
            if i + size > n:
                raise ValueError("truncated field")
            value, i = message[i : i + size], i + size
        elif wire in (1, 5):
            value, i = message[i : i + (8 if wire == 1 else 4)], i + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unsupported wire type {wire}")
        fields.append((field, value))
    return fields


def _varint(data: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return value, i
        shift += 7
