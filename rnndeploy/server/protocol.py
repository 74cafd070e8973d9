"""What a KServe v2 inference request may carry, decoded strictly, shared by the HTTP and the gRPC front ends.

Every rule raises `RequestError` with the status a client sees (HTTP status; the gRPC front end maps it
to a status code), naming the field, the expected and the actual value. Nothing here touches the model state.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Hashable, Mapping
from dataclasses import dataclass

import numpy as np

from rnndeploy.runtime import StepInputError, StreamingSession

DATATYPES: dict[str, type[np.generic]] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
TO_DATATYPE = {np.dtype(v): k for k, v in DATATYPES.items()}
MAX_DIMS = 16
MAX_DIM = 2**40
MAX_UINT64 = 2**64 - 1
MAX_JSON_DEPTH = 32  # the request's envelope and tensor data nested one level per dim, with room to spare
JSON_BYTES_PER_ELEMENT = 24  # the longest float/int64 text orjson writes, with its comma


class RequestError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status (400, 404, 408, 413, 429, 503)."""

    def __init__(
        self, message: str, status: int = 400, close_connection: bool = False, limit: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.close_connection = close_connection  # HTTP: the body was not read to its end
        self.limit = limit  # the name of the limit (a Limits field) that refused the request


@dataclass(frozen=True)
class Limits:
    """What one request and all live sequences may cost; over a limit is refused before any work is done.

    Args:
        max_rows: batch rows of one request (and so of one sequence); 413 beyond.
        max_steps: time steps of one request summed over its rows (rows x time steps: what the request
            costs); time steps are the product of an input's dynamic dims other than the batch axis (``time``
            for token ids ``[batch, time]``); 413 beyond. The default, 4096, is one row of 4096 steps or 64 rows
            of 64: ~0.2 s for a 2x256 LSTM on one CPU thread, the longest a short step waits behind it.
        max_response_bytes: the response size as estimated from the output shapes before the step
            (binary outputs at their size, JSON at 24 bytes per element); 413 beyond.
        max_state_bytes: state of all live sequences together (rows x the state bytes of one row); a start
            beyond it is refused with 429.
        max_sequences: live sequences; a start beyond it is refused with 429.
        max_body_bytes: a request body (HTTP) or message (gRPC); 413 beyond.
    """

    max_rows: int = 64
    max_steps: int = 4096
    max_response_bytes: int = 64 * 2**20
    max_state_bytes: int = 2**30
    max_sequences: int = 1024
    max_body_bytes: int = 16 * 2**20

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.__dict__.items() if not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"limits must be integers >= 1, got {bad}")


@dataclass
class Decoded:
    """One validated inference request: its inputs, sequence parameters and the outputs to return."""

    arrays: dict[str, np.ndarray]
    sequence_id: Hashable | None
    start: bool
    end: bool
    outputs: list[tuple[str, bool]] | None  # (name, binary); None: all outputs
    binary_outputs: bool  # the default for outputs that do not say
    request_id: str | None


def check_nesting(document: object, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse a JSON document nested deeper than ``limit`` before anything walks it recursively (the data's
    flattening, an error message's repr), one level at a time."""
    level, depth = [document], 0
    while containers := [v for v in level if isinstance(v, list | dict)]:
        depth += 1
        if depth > limit:
            raise RequestError(
                f"the request's JSON is nested more than {limit} deep; tensor data nests one level per dim "
                f"(at most {MAX_DIMS}), or send it flat"
            )
        level = [item for v in containers for item in (v.values() if isinstance(v, dict) else v)]


def check_shape(name: str, shape: object) -> list[int]:
    if (
        not isinstance(shape, list | tuple)
        or len(shape) > MAX_DIMS
        or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)
        or math.prod(d for d in shape if d) > MAX_DIM
    ):
        raise RequestError(
            f"input {name!r}: shape must be a list of at most {MAX_DIMS} integers >= 0 whose nonzero ones "
            f"multiply to at most 2**40, got {_short(shape)}"
        )
    return list(shape)


def check_datatype(name: str, datatype: object) -> np.dtype:
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise RequestError(
            f"input {name!r}: datatype must be one of {', '.join(DATATYPES)}, got {_short(datatype)}"
        )
    return np.dtype(DATATYPES[datatype])


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _flatten(name: str, data: list, shape: list[int]) -> list:
    """Flat data as it is; nested data must follow ``shape`` exactly (``[[1, 2], [3, 4]]`` for ``[2, 2]``)."""
    if not any(isinstance(v, list) for v in data):
        return data
    flat: list = []

    def walk(level: object, dims: list[int]) -> None:
        if not dims or not isinstance(level, list) or len(level) != dims[0]:
            raise RequestError(
                f"input {name!r}: nested data must follow shape {shape} (or be one flat list), "
                f"got {_short(data)}"
            )
        if len(dims) > 1:
            for row in level:
                walk(row, dims[1:])
        elif any(isinstance(v, list) for v in level):
            walk(None, [])
        else:
            flat.extend(level)

    walk(data, shape)
    return flat


def decode_data(name: str, datatype: str, shape: list[int], data: object) -> np.ndarray:
    """JSON ``data`` (flat or nested, row-major) as an array of ``datatype`` and ``shape``, strictly.

    Integers must be JSON integers in the type's range, floats JSON numbers in the type's finite range, bools
    JSON true/false: ``1.7``, ``"7"``, ``true`` for an integer, or ``"NaN"`` for a float, are refused.
    """
    dtype = check_datatype(name, datatype)
    if not isinstance(data, list):
        raise RequestError(f"input {name!r}: data must be a JSON array, got {type(data).__name__}")
    flat = _flatten(name, data, shape)
    size = math.prod(shape)
    if len(flat) != size:
        raise RequestError(f"input {name!r}: data has {len(flat)} elements, shape {shape} needs {size}")
    types = set(map(type, flat))
    if dtype.kind in "iu":
        if not types <= {int}:
            bad = next(v for v in flat if type(v) is not int)
            raise RequestError(f"input {name!r}: {datatype} data must be JSON integers, got {_short(bad)}")
        info = np.iinfo(dtype)
        if flat and (min(flat) < info.min or max(flat) > info.max):
            bad = next(v for v in flat if not info.min <= v <= info.max)
            raise RequestError(
                f"input {name!r}: {datatype} data must lie in [{info.min}, {info.max}], got {bad}"
            )
        return np.array(flat, dtype).reshape(shape)
    if dtype.kind == "f":
        if not types <= {int, float}:
            bad = next(v for v in flat if type(v) not in (int, float))
            raise RequestError(f"input {name!r}: {datatype} data must be JSON numbers, got {_short(bad)}")
        try:
            wide = np.array(flat, np.float64)
        except OverflowError as error:
            raise RequestError(f"input {name!r}: {datatype} data out of range: {error}") from None
        limit = float(np.finfo(dtype).max)
        if wide.size and not float(np.abs(wide).max()) <= limit:
            bad = next(float(v) for v in wide if not abs(v) <= limit)
            raise RequestError(
                f"input {name!r}: {datatype} data must lie in [-{limit:g}, {limit:g}], got {bad:g}"
            )
        return wide.astype(dtype).reshape(shape)
    if not types <= {bool}:
        bad = next(v for v in flat if type(v) is not bool)
        raise RequestError(f"input {name!r}: BOOL data must be JSON true/false, got {_short(bad)}")
    return np.array(flat, np.bool_).reshape(shape)


def decode_raw(
    name: str, datatype: str, shape: list[int], raw: bytes | memoryview, offset: int = 0
) -> np.ndarray:
    """Little-endian row-major bytes (``raw[offset:]``, exactly the tensor's size) as an array."""
    dtype = check_datatype(name, datatype)
    size = math.prod(shape)
    if len(raw) - offset != size * dtype.itemsize:
        raise RequestError(
            f"input {name!r}: {datatype}{shape} needs {size * dtype.itemsize} bytes of binary data, "
            f"got {len(raw) - offset}"
        )
    if dtype == np.bool_:
        octets = np.frombuffer(raw, np.uint8, size, offset)
        if octets.size and int(octets.max()) > 1:
            raise RequestError(f"input {name!r}: BOOL binary data must be bytes 0 or 1")
    array = np.frombuffer(raw, dtype.newbyteorder("<"), size, offset).astype(dtype, copy=False)
    if dtype.kind == "f" and array.size and not np.isfinite(array).all():
        raise RequestError(f"input {name!r}: {datatype} binary data must be finite (no NaN or infinity)")
    return array.reshape(shape)


def check_request_id(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise RequestError(f"request 'id' must be a string, got {_short(value)}")


def check_flag(parameters: Mapping, key: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise RequestError(f"parameter {key} must be true or false, got {_short(value)}")
    return value


def sequence_parameters(parameters: Mapping) -> tuple[Hashable | None, bool, bool]:
    """``(sequence_id or None, start, end)``: ids are uint64 or strings (separate spaces, as Triton's)."""
    sequence_id = parameters.get("sequence_id", 0)
    start, end = check_flag(parameters, "sequence_start"), check_flag(parameters, "sequence_end")
    if isinstance(sequence_id, bool) or not isinstance(sequence_id, int | str):
        raise RequestError(f"sequence_id must be an unsigned integer or a string, got {_short(sequence_id)}")
    if isinstance(sequence_id, int) and not 0 <= sequence_id <= MAX_UINT64:
        raise RequestError(f"sequence_id must be an unsigned 64-bit integer or a string, got {sequence_id}")
    if sequence_id in (0, ""):
        if start or end:
            raise RequestError(
                f"sequence_id {sequence_id!r} is not a valid sequence id: sequence_start/sequence_end need a "
                "non-zero integer or a non-empty string (0 or no sequence_id runs a one-off request)"
            )
        return None, False, False
    return sequence_id, start, end


def check_outputs(requested: list[tuple[str, bool]], outputs: list[str]) -> None:
    """Every requested output is one of the model's ``outputs``."""
    for name, _ in requested:
        if name not in outputs:
            raise RequestError(f"unknown output {_short(name)}; outputs: {outputs}")


def check_model_input(
    session: StreamingSession,
    arrays: dict[str, np.ndarray],
    limits: Limits,
    vocab_size: int | None,
    controls: Collection[str] = (),
) -> tuple[dict[str, np.ndarray], int, int]:
    """The session's check plus the limits and token range: ``(arrays with batch axis, rows, steps)``.

    ``controls`` are inputs the server filled itself (sequence controls such as CORRID): not token ids.
    """
    try:
        arrays, rows, _ = session.check_input(arrays)
    except StepInputError as error:
        raise RequestError(str(error)) from None
    steps = 1
    for name, array in arrays.items():
        spec = session.inputs[name]
        dynamic = [
            n
            for axis, (d, n) in enumerate(zip(spec.shape, array.shape))
            if axis != spec.batch_axis and not isinstance(d, int)
        ]
        if dynamic and math.prod(dynamic) == 0:
            raise RequestError(
                f"input {name!r} has shape {list(array.shape)}: a step needs at least one time step"
            )
        steps = max(steps, math.prod(dynamic))
    if rows > limits.max_rows:
        raise RequestError(
            f"{rows} batch rows exceed the limit max_rows={limits.max_rows}", 413, limit="max_rows"
        )
    if rows * steps > limits.max_steps:
        raise RequestError(
            f"{rows} rows x {steps} time steps = {rows * steps} steps exceed the limit "
            f"max_steps={limits.max_steps}",
            413,
            limit="max_steps",
        )
    if vocab_size is not None:
        for name, array in arrays.items():
            if (
                name not in controls
                and array.dtype.kind in "iu"
                and array.size
                and (array.min() < 0 or array.max() >= vocab_size)
            ):
                bad = array[(array < 0) | (array >= vocab_size)].flat[0]
                raise RequestError(
                    f"input {name!r}: token id {bad} is outside the model's vocabulary [0, {vocab_size})"
                )
    return arrays, rows, steps


def response_bytes(
    session: StreamingSession, arrays: dict[str, np.ndarray], rows: int, outputs: list[tuple[str, bool]]
) -> int:
    """The response's size before the step, from the output shapes (dims named like input dims resolved)."""
    sizes: dict[str, int] = {}
    for name, array in arrays.items():
        for d, n in zip(session.inputs[name].shape, array.shape):
            if isinstance(d, str):
                sizes[d] = n
    total = 0
    for name, binary in outputs:
        spec = session.outputs[name]
        count = math.prod(
            rows if axis == spec.batch_axis else d if isinstance(d, int) else sizes.get(d, 1)
            for axis, d in enumerate(spec.shape)
        )
        total += count * (spec.dtype.itemsize if binary else JSON_BYTES_PER_ELEMENT)
    return total
