"""KServe v2 / Open Inference Protocol over HTTP, as Triton Inference Server speaks it, on Starlette.

Endpoints: ``/v2/health/live``, ``/v2/health/ready``, ``/v2``, ``/v2/models/{name}[/versions/{v}]``,
``.../ready``, ``.../stats`` (step and batch counts) and ``.../infer``. Tensors travel as JSON or with the
binary tensor data extension (``Inference-Header-Content-Length``); stateful models are served per
sequence (``sequence_id``, ``sequence_start``, ``sequence_end`` request parameters) through a
:class:`SequenceBatcher`, so a stock ``tritonclient.http.InferenceServerClient`` works unchanged.
"""

from __future__ import annotations

import math
from contextlib import asynccontextmanager

import numpy as np
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rnndeploy import __version__
from rnndeploy.runtime import StepInputError, StreamingSession
from rnndeploy.server.batcher import SequenceBatcher, SequenceError

DATATYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
_TO_DATATYPE = {np.dtype(v): k for k, v in DATATYPES.items()}
HEADER_LENGTH = "Inference-Header-Content-Length"


def create_app(
    session: StreamingSession,
    model_name: str = "model",
    model_version: str = "1",
    *,
    max_batch_size: int = 64,
    max_queue_delay_us: float = 500.0,
    idle_timeout_s: float = 60.0,
    max_sequences: int = 1024,
    max_body_bytes: int = 16 * 2**20,
    worker_thread: bool = True,
) -> Starlette:
    """A Starlette (ASGI) app serving ``session`` as model ``model_name`` (version ``model_version``).

    ``max_batch_size`` / ``max_queue_delay_us`` configure dynamic batching of concurrent sequences (1 / 0:
    no batching), ``idle_timeout_s`` evicts idle sequences, ``max_sequences`` caps live sequences (HTTP 429
    beyond), ``max_body_bytes`` caps a request body (HTTP 413 beyond), ``worker_thread`` runs batches in a
    worker thread (``False``: on the event loop, see :class:`SequenceBatcher`). Run it with uvicorn
    (:func:`serve`).
    """
    batcher = SequenceBatcher(
        session,
        max_batch_size=max_batch_size,
        max_queue_delay_s=max_queue_delay_us * 1e-6,
        idle_timeout_s=idle_timeout_s,
        max_sequences=max_sequences,
        worker_thread=worker_thread,
    )

    @asynccontextmanager
    async def lifespan(_: Starlette):
        await batcher.start()
        yield
        await batcher.stop()

    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code)

    def check_model(request: Request) -> None:
        name, version = request.path_params["name"], request.path_params.get("version")
        if name != model_name:
            raise HTTPException(404, f"unknown model {name!r}; this server serves {model_name!r}")
        if version not in (None, "", model_version):
            raise HTTPException(
                404, f"unknown version {version!r} of model {name!r}; available: {model_version}"
            )

    def tensor_metadata(spec) -> dict:
        shape = [d if isinstance(d, int) else -1 for d in spec.shape]
        return {"name": spec.name, "datatype": _TO_DATATYPE[spec.dtype], "shape": shape}

    async def live(_: Request) -> JSONResponse:
        return JSONResponse({"live": True})

    async def ready(_: Request) -> JSONResponse:
        return JSONResponse({"ready": True})

    async def server_metadata(_: Request) -> JSONResponse:
        extensions = ["binary_tensor_data", "sequence"]
        return JSONResponse({"name": "rnndeploy", "version": __version__, "extensions": extensions})

    async def model_metadata(request: Request) -> JSONResponse:
        check_model(request)
        return JSONResponse(
            {
                "name": model_name,
                "versions": [model_version],
                "platform": "onnxruntime_onnx",
                "inputs": [tensor_metadata(s) for s in session.inputs.values()],
                "outputs": [tensor_metadata(s) for s in session.outputs.values()],
            }
        )

    async def model_ready(request: Request) -> JSONResponse:
        check_model(request)
        return JSONResponse({"name": model_name, "ready": True})

    async def model_stats(request: Request) -> JSONResponse:
        check_model(request)
        stats = {
            "name": model_name,
            "version": model_version,
            "inference_count": batcher.steps_run,
            "execution_count": batcher.batches_run,
            "live_sequences": len(batcher.live),
        }
        return JSONResponse({"model_stats": [stats]})

    async def infer(request: Request) -> Response:
        check_model(request)
        body = await _read_body(request, max_body_bytes)
        header, binary = _split_body(body, request.headers.get(HEADER_LENGTH))
        inputs = _decode_inputs(header, binary)
        parameters = _dict(header.get("parameters", {}), "parameters")
        sequence_id = parameters.get("sequence_id", 0)
        if not isinstance(sequence_id, int | str) or isinstance(sequence_id, bool):
            raise HTTPException(400, f"sequence_id must be an integer or a string, got {sequence_id!r}")
        wanted = _wanted_outputs(
            header, parameters, list(session.outputs)
        )  # before the step: a 400 runs nothing
        try:
            outputs = await batcher.infer(
                inputs,
                sequence_id if sequence_id not in (0, "") else None,
                start=_flag(parameters, "sequence_start"),
                end=_flag(parameters, "sequence_end"),
            )
        except StepInputError as error:
            raise HTTPException(400, str(error)) from error
        except SequenceError as error:
            raise HTTPException(error.status, str(error)) from error
        return _encode_outputs(header, wanted, outputs, model_name, model_version)

    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    routes = [Route(f"{prefix}/infer", infer, methods=["POST"]) for prefix in (model, versioned)]
    for suffix, endpoint in (("", model_metadata), ("/ready", model_ready), ("/stats", model_stats)):
        routes += [Route(prefix + suffix, endpoint, methods=["GET"]) for prefix in (model, versioned)]
    routes += [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.batcher = batcher
    return app


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _split_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    if header_length is None:
        json_part, binary = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise HTTPException(
                400, f"{HEADER_LENGTH} must be an integer <= the body size {len(body)}, got {header_length!r}"
            )
        json_part, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        header = orjson.loads(json_part)
    except orjson.JSONDecodeError as error:
        raise HTTPException(400, f"the request is not valid JSON: {error}") from error
    return _dict(header, "the request"), binary


def _dict(value: object, what: str) -> dict:
    if not isinstance(value, dict):
        raise HTTPException(400, f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _flag(parameters: dict, key: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise HTTPException(400, f"parameter {key} must be true or false, got {value!r}")
    return value


def _decode_inputs(header: dict, binary: bytes) -> dict[str, np.ndarray]:
    tensors = header.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise HTTPException(400, "the request needs a non-empty 'inputs' list")
    arrays, offset = {}, 0
    for tensor in tensors:
        tensor = _dict(tensor, "each input")
        name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        if not isinstance(name, str):
            raise HTTPException(400, f"an input has no string 'name': {tensor!r:.200}")
        if name in arrays:
            raise HTTPException(400, f"input {name!r} is given twice")
        if datatype not in DATATYPES:
            raise HTTPException(
                400, f"input {name!r} has datatype {datatype!r}; supported: {', '.join(DATATYPES)}"
            )
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise HTTPException(400, f"input {name!r} needs 'shape' as a list of sizes >= 0, got {shape!r}")
        dtype = np.dtype(DATATYPES[datatype])
        size = math.prod(shape)
        binary_size = _dict(tensor.get("parameters", {}), f"parameters of input {name!r}").get(
            "binary_data_size"
        )
        if binary_size is not None:
            if binary_size != size * dtype.itemsize or offset + binary_size > len(binary):
                raise HTTPException(
                    400,
                    f"input {name!r}: binary_data_size {binary_size} does not match shape {shape} of "
                    f"{datatype} "
                    f"({size * dtype.itemsize} bytes) or the {len(binary) - offset} bytes left in the body",
                )
            array = np.frombuffer(binary, dtype, size, offset).reshape(shape)
            offset += binary_size
        elif "data" in tensor:
            try:
                array = np.asarray(tensor["data"], dtype=dtype)
                array = array.reshape(shape)
            except (ValueError, TypeError) as error:
                raise HTTPException(
                    400, f"input {name!r}: data does not fit shape {shape} of {datatype}: {error}"
                ) from error
        else:
            raise HTTPException(400, f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        arrays[name] = array
    if offset != len(binary):
        raise HTTPException(400, f"the body has {len(binary) - offset} bytes of binary data no input claims")
    return arrays


def _wanted_outputs(header: dict, parameters: dict, outputs: list[str]) -> list[tuple[str, bool]]:
    """The requested outputs as ``(name, binary)``, all of ``outputs`` when the request names none."""
    requested = header.get("outputs")
    binary_default = _flag(parameters, "binary_data_output")
    if requested is None:
        wanted = [(name, binary_default) for name in outputs]
    else:
        if not isinstance(requested, list):
            raise HTTPException(400, "'outputs' must be a list")
        wanted = []
        for item in requested:
            item = _dict(item, "each requested output")
            if item.get("name") not in outputs:
                raise HTTPException(400, f"unknown output {item.get('name')!r}; outputs: {list(outputs)}")
            item_parameters = _dict(item.get("parameters", {}), "parameters of a requested output")
            binary = (
                _flag(item_parameters, "binary_data") if "binary_data" in item_parameters else binary_default
            )
            wanted.append((item["name"], binary))
    return wanted


def _encode_outputs(
    header: dict,
    wanted: list[tuple[str, bool]],
    outputs: dict[str, np.ndarray],
    model_name: str,
    model_version: str,
) -> Response:
    response: dict = {"model_name": model_name, "model_version": model_version, "outputs": []}
    if "id" in header:
        response["id"] = header["id"]
    blobs = []
    for name, binary in wanted:
        array = np.ascontiguousarray(outputs[name])
        tensor = {"name": name, "datatype": _TO_DATATYPE[array.dtype], "shape": list(array.shape)}
        if binary:
            blob = array.tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = array.reshape(-1).tolist()
        response["outputs"].append(tensor)
    text = orjson.dumps(response)
    if not blobs:
        return Response(text, media_type="application/json")
    return Response(
        b"".join([text, *blobs]),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(text))},
    )


def serve(
    session: StreamingSession,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str = "model",
    log_level: str = "info",
    access_log: bool = False,
    **app_options,
) -> None:
    """Serve ``session`` over HTTP until SIGINT/SIGTERM (uvicorn's graceful shutdown finishes open requests).

    ``access_log`` logs every request (off by default: a log record per step costs CPU on every step).
    uvicorn uses httptools and uvloop (dependencies of rnndeploy). ``app_options`` go to :func:`create_app`
    (batching, eviction, capacity, body limit, worker thread).
    """
    uvicorn.run(
        create_app(session, model_name, **app_options),
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
    )
