"""The HTTP front end: KServe v2 / Open Inference Protocol as Triton Inference Server speaks it, on Starlette.

Endpoints: ``/v2/health/live``, ``/v2/health/ready``, ``/v2``, ``/v2/models/{name}[/versions/{v}]``,
``.../ready``, ``.../stats`` (step and batch counts), ``.../config`` (Triton's ModelConfig as JSON),
``.../infer``, ``POST /v2/repository/index`` and ``/metrics`` (Prometheus, Triton's names:
`rnndeploy.server.metrics`); several models and versions through a `ModelSet` (a model
repository: `open_repository`). Tensors travel as JSON or with the
binary tensor data extension (``Inference-Header-Content-Length``); stateful models are served per
sequence (``sequence_id``, ``sequence_start``, ``sequence_end`` request parameters) through a
`SequenceBatcher`, so a stock ``tritonclient.http.InferenceServerClient`` works unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import re
from contextlib import asynccontextmanager

import orjson
from google.protobuf.json_format import MessageToDict
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rnndeploy import __version__
from rnndeploy.runtime import StreamingSession
from rnndeploy.server.core import ModelServer, ModelSet
from rnndeploy.server.metrics import CONTENT_TYPE, render
from rnndeploy.server.protocol import (
    TO_DATATYPE,
    Decoded,
    Limits,
    RequestError,
    check_datatype,
    check_flag,
    check_nesting,
    check_request_id,
    check_shape,
    decode_data,
    decode_raw,
    sequence_parameters,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
_DIGITS = re.compile(r"[0-9]{1,19}")
logger = logging.getLogger("rnndeploy.server")


def create_app(
    session: StreamingSession | None,
    model_name: str = "model",
    model_version: str = "1",
    *,
    max_batch_size: int = 64,
    max_queue_delay_us: float = 500.0,
    idle_timeout_s: float = 60.0,
    limits: Limits | None = None,
    body_timeout_s: float = 30.0,
    worker_thread: bool = True,
    model_server: ModelServer | None = None,
    models: ModelSet | None = None,
) -> Starlette:
    """A Starlette (ASGI) app serving ``session`` as model ``model_name`` (version ``model_version``).

    ``max_batch_size`` / ``max_queue_delay_us`` configure dynamic batching of concurrent sequences (1 / 0:
    no batching), ``idle_timeout_s`` evicts idle sequences, ``limits`` bounds what a request and all live
    sequences may cost (`Limits`; 413 / 429 beyond), ``body_timeout_s`` answers 408 to a body not
    received in time, ``worker_thread`` runs batches in a worker thread (``False``: on the event loop, see
    `SequenceBatcher`). ``model_server`` shares an existing `ModelServer` (with a gRPC front
    end); then the other model options are its own. ``models`` serves several models and versions instead
    (`open_repository`; ``session`` is then ``None``), with ``POST /v2/repository/index``. The app
    starts and stops the batchers in its lifespan. Run it with uvicorn (`serve`).
    """
    if models is None:
        models = ModelSet(
            [
                model_server
                or ModelServer(
                    session,
                    model_name,
                    model_version,
                    limits=limits,
                    max_batch_size=max_batch_size,
                    max_queue_delay_us=max_queue_delay_us,
                    idle_timeout_s=idle_timeout_s,
                    worker_thread=worker_thread,
                )
            ]
        )

    @asynccontextmanager
    async def lifespan(_: Starlette):
        await models.start()
        yield
        await models.stop()

    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, error.status_code, headers=error.headers)

    async def request_error(_: Request, error: RequestError) -> JSONResponse:
        headers = {"connection": "close"} if error.close_connection else None
        return JSONResponse({"error": str(error)}, error.status, headers=headers)

    async def server_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("internal error answering %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"internal server error: {type(error).__name__}"}, 500)

    def model_of(request: Request) -> ModelServer:
        return models.get(request.path_params["name"], request.path_params.get("version"))

    async def live(_: Request) -> JSONResponse:
        return JSONResponse({"live": True})

    async def ready(_: Request) -> JSONResponse:
        return JSONResponse({"ready": models.running}, 200 if models.running else 503)

    async def server_metadata(_: Request) -> JSONResponse:
        extensions = ["binary_tensor_data", "sequence"]
        return JSONResponse({"name": "rnndeploy", "version": __version__, "extensions": extensions})

    async def model_metadata(request: Request) -> JSONResponse:
        core = model_of(request)
        inputs, outputs = core.tensor_metadata()
        return JSONResponse(
            {
                "name": core.model_name,
                "versions": models.versions(core.model_name, request.path_params.get("version")),
                "platform": core.platform,
                "inputs": inputs,
                "outputs": outputs,
            }
        )

    async def model_config(request: Request) -> JSONResponse:
        config = MessageToDict(model_of(request).model_config(), preserving_proto_field_name=True)
        config.setdefault("max_batch_size", 0)  # protobuf's JSON leaves zeros out; Triton writes this one
        return JSONResponse(config)

    async def model_ready(request: Request) -> JSONResponse:
        core = model_of(request)
        running = core.batcher.running
        return JSONResponse({"name": core.model_name, "ready": running}, 200 if running else 503)

    async def model_stats(request: Request) -> JSONResponse:
        core = model_of(request)
        batcher = core.batcher
        stats = {
            "name": core.model_name,
            "version": core.model_version,
            "inference_count": batcher.steps_run,
            "execution_count": batcher.batches_run,
            "live_sequences": len(batcher.live),
        }
        return JSONResponse({"model_stats": [stats]})

    async def repository_index(request: Request) -> JSONResponse:
        body = await _read_body(request, 2**16, body_timeout_s)
        if body.strip():
            try:
                _dict(orjson.loads(body), "the repository index request")
            except orjson.JSONDecodeError as error:
                raise RequestError(f"the repository index request is not valid JSON: {error}") from None
        return JSONResponse(models.index())

    async def infer(request: Request) -> Response:
        core = model_of(request)
        with core.stats.request() as timing:
            body = await _read_body(request, core.limits.max_body_bytes, body_timeout_s)
            timing.input()  # the body's arrival is not decoding
            header, binary = _split_body(body, request.headers.get(HEADER_LENGTH))
            decoded = _decode_request(header, binary)
            timing.decoded()
            outputs = await core.infer(decoded)
            timing.inferred()
            response = _encode_outputs(decoded, outputs, core)
        return response

    async def metrics(_: Request) -> Response:
        return Response(render(models.registry), media_type=CONTENT_TYPE)

    model, versioned = "/v2/models/{name}", "/v2/models/{name}/versions/{version}"
    routes = [Route(f"{prefix}/infer", infer, methods=["POST"]) for prefix in (model, versioned)]
    for suffix, endpoint in (
        ("", model_metadata),
        ("/ready", model_ready),
        ("/stats", model_stats),
        ("/config", model_config),
    ):
        routes += [Route(prefix + suffix, endpoint, methods=["GET"]) for prefix in (model, versioned)]
    routes += [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, RequestError: request_error, Exception: server_error},
    )
    app.state.models = models
    app.state.model_server = models.servers[0]
    app.state.batcher = models.servers[0].batcher
    return app


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and _DIGITS.fullmatch(declared) and int(declared) > limit:
        raise RequestError(
            f"request body of {declared} bytes exceeds the limit max_body_bytes={limit}",
            413,
            True,
            "max_body_bytes",
        )
    chunks: list[bytes] = []

    async def read() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(
                    f"request body exceeds the limit max_body_bytes={limit}", 413, True, "max_body_bytes"
                )
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout_s)
    except TimeoutError:
        raise RequestError(f"request body not received within {timeout_s:g} s", 408, True) from None
    except ClientDisconnect:
        raise RequestError("the client disconnected before sending the whole body", 400, True) from None
    return b"".join(chunks)


def _split_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    if header_length is None:
        json_part, binary = body, b""
    else:
        if not _DIGITS.fullmatch(header_length) or int(header_length) > len(body):
            raise RequestError(
                f"header {HEADER_LENGTH} must be a decimal integer <= the body size {len(body)}, "
                f"got {header_length[:40]!r}"
            )
        json_part, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        header = orjson.loads(json_part)
    except orjson.JSONDecodeError as error:
        raise RequestError(f"the request is not valid JSON: {error}") from None
    check_nesting(header)
    return _dict(header, "the request"), binary


def _dict(value: object, what: str) -> dict:
    if not isinstance(value, dict):
        raise RequestError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _decode_request(header: dict, binary: bytes) -> Decoded:
    request_id = check_request_id(header.get("id"))
    parameters = _dict(header.get("parameters", {}), "parameters")
    sequence_id, start, end = sequence_parameters(parameters)
    tensors = header.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise RequestError("the request needs a non-empty 'inputs' list")
    arrays, offset = {}, 0
    for tensor in tensors:
        tensor = _dict(tensor, "each input")
        name = tensor.get("name")
        if not isinstance(name, str):
            raise RequestError(f"an input has no string 'name': {str(tensor)[:200]}")
        if name in arrays:
            raise RequestError(f"input {name!r} is given twice")
        datatype = tensor.get("datatype")
        check_datatype(name, datatype)
        shape = check_shape(name, tensor.get("shape"))
        binary_size = _dict(tensor.get("parameters", {}), f"parameters of input {name!r}").get(
            "binary_data_size"
        )
        if binary_size is not None:
            if type(binary_size) is not int or not 0 <= binary_size <= len(binary) - offset:
                raise RequestError(
                    f"input {name!r}: binary_data_size must be an integer in [0, {len(binary) - offset}] "
                    f"(the binary bytes left in the body), got {str(binary_size)[:40]}"
                )
            if "data" in tensor:
                raise RequestError(f"input {name!r} has both 'data' and parameters.binary_data_size")
            arrays[name] = decode_raw(name, datatype, shape, binary[offset : offset + binary_size])
            offset += binary_size
        elif "data" in tensor:
            arrays[name] = decode_data(name, datatype, shape, tensor["data"])
        else:
            raise RequestError(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    if offset != len(binary):
        raise RequestError(f"the body has {len(binary) - offset} bytes of binary data no input claims")
    binary_default = check_flag(parameters, "binary_data_output")
    outputs = _wanted_outputs(header, binary_default)
    return Decoded(arrays, sequence_id, start, end, outputs, binary_default, request_id)


def _wanted_outputs(header: dict, binary_default: bool) -> list[tuple[str, bool]] | None:
    """The requested outputs as ``(name, binary)``; ``None`` when the request names none (all outputs)."""
    requested = header.get("outputs")
    if requested is None:
        return None
    if not isinstance(requested, list):
        raise RequestError(f"'outputs' must be a list, got {type(requested).__name__}")
    wanted = []
    for item in requested:
        item = _dict(item, "each requested output")
        name = item.get("name")
        if not isinstance(name, str):
            raise RequestError(f"a requested output has no string 'name': {str(item)[:200]}")
        item_parameters = _dict(item.get("parameters", {}), f"parameters of requested output {name!r}")
        binary = (
            check_flag(item_parameters, "binary_data") if "binary_data" in item_parameters else binary_default
        )
        wanted.append((name, binary))
    return wanted


def _encode_outputs(request: Decoded, outputs: dict, core: ModelServer) -> Response:
    response: dict = {"model_name": core.model_name, "model_version": core.model_version, "outputs": []}
    if request.request_id is not None:
        response["id"] = request.request_id
    blobs = []
    for name, binary in request.outputs:
        array = outputs[name]
        tensor = {"name": name, "datatype": TO_DATATYPE[array.dtype], "shape": list(array.shape)}
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
