"""KServe v2 over gRPC as Triton speaks it (``inference.GRPCInferenceService``), on grpcio's asyncio server.

The messages and the service stub are the generated modules that ship with ``tritonclient[grpc]``
(``tritonclient.grpc.service_pb2`` / ``service_pb2_grpc`` / ``model_config_pb2``): they are what stock
``tritonclient.grpc`` clients are built from, so the wire format is theirs by construction, kept current by
Triton's releases, and no ``.proto`` is copied into this project or compiled at build time.

Implemented: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig,
ModelStatistics, RepositoryIndex, ModelInfer (typed ``contents`` or ``raw_input_contents``; outputs always as
``raw_output_contents``) and the bidirectional ModelStreamInfer, each request carrying the
``sequence_id`` (int64, uint64 or string) / ``sequence_start`` / ``sequence_end`` parameters. Other methods
(loading and unloading models, shared memory, trace, log settings) answer UNIMPLEMENTED. Requests go through the same
`ModelServer` (rules, limits, batcher) as HTTP ones; a refusal is the gRPC status
Triton uses (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, UNAVAILABLE, ...) and, inside a stream, an
``error_message`` response that leaves the stream open. A step in flight when its stream is cancelled
still runs; the sequence stays live (a new stream may continue it) until it ends or idles out. Requests of
a stream are admitted in the order they arrive and answered as they are ready, so one stream may carry many
sequences (their steps batch together) and each sequence's answers keep its order.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from rnndeploy import __version__
from rnndeploy.server.core import ModelServer, ModelSet
from rnndeploy.server.protocol import (
    TO_DATATYPE,
    Decoded,
    RequestError,
    check_datatype,
    check_shape,
    decode_data,
    decode_raw,
    sequence_parameters,
)

logger = logging.getLogger("rnndeploy.server")

STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}
STREAM_IN_FLIGHT = (
    64  # requests of one stream being answered at once; the stream is read no further meanwhile
)
# InferTensorContents field of each datatype; FP16 has none (raw_input_contents only)
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def _parameter(value: pb.InferParameter) -> object:
    choice = value.WhichOneof("parameter_choice")
    return None if choice is None else getattr(value, choice)


def decode_request(request: pb.ModelInferRequest) -> Decoded:
    """A ``ModelInferRequest`` as a `Decoded` request, by the same rules as the HTTP side."""
    parameters = {key: _parameter(value) for key, value in request.parameters.items()}
    sequence_id, start, end = sequence_parameters(parameters)
    if not request.inputs:
        raise RequestError("the request needs at least one input")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise RequestError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: give one per input "
            "(in order) or none"
        )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in arrays:
            raise RequestError(f"input {name!r} is given twice")
        check_datatype(name, tensor.datatype)
        shape = check_shape(name, list(tensor.shape))
        field = CONTENTS.get(tensor.datatype)
        typed = tensor.HasField("contents") and field is not None and len(getattr(tensor.contents, field)) > 0
        if raw:
            if typed:
                raise RequestError(f"input {name!r} has both contents and raw_input_contents")
            arrays[name] = decode_raw(name, tensor.datatype, shape, raw[index])
        elif field is None:
            raise RequestError(f"input {name!r}: {tensor.datatype} data must come in raw_input_contents")
        else:
            data = list(getattr(tensor.contents, field))
            arrays[name] = decode_data(name, tensor.datatype, shape, data)
    outputs = [(output.name, True) for output in request.outputs] or None
    return Decoded(arrays, sequence_id, start, end, outputs, True, request.id or None)


def encode_response(core: ModelServer, decoded: Decoded, outputs: dict) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(
        model_name=core.model_name, model_version=core.model_version, id=decoded.request_id or ""
    )
    for name, _ in decoded.outputs:
        array = np.ascontiguousarray(outputs[name])
        response.outputs.add(name=name, datatype=TO_DATATYPE[array.dtype], shape=list(array.shape))
        response.raw_output_contents.append(array.tobytes())
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The KServe v2 / Triton gRPC service around one `ModelServer` or a `ModelSet`."""

    def __init__(self, models: ModelServer | ModelSet) -> None:
        self.models = models if isinstance(models, ModelSet) else ModelSet([models])

    async def _abort(self, context: grpc.aio.ServicerContext, error: RequestError):
        await context.abort(STATUS_CODES.get(error.status, grpc.StatusCode.INVALID_ARGUMENT), str(error))

    async def _model(self, request, context) -> ModelServer:
        try:
            return self.models.get(request.name, request.version or None)
        except RequestError as error:
            await self._abort(context, error)

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.models.running)

    async def ModelReady(self, request, context):
        try:
            core = self.models.get(request.name, request.version or None)
        except RequestError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=core.batcher.running)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(
            name="rnndeploy", version=__version__, extensions=["binary_tensor_data", "sequence"]
        )

    async def ModelMetadata(self, request, context):
        core = await self._model(request, context)
        inputs, outputs = core.tensor_metadata()
        return pb.ModelMetadataResponse(
            name=core.model_name,
            versions=self.models.versions(core.model_name, request.version or None),
            platform=core.platform,
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in inputs],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in outputs],
        )

    async def ModelConfig(self, request, context):
        core = await self._model(request, context)
        return pb.ModelConfigResponse(config=core.model_config())

    async def ModelStatistics(self, request, context):
        if request.name:
            core = await self._model(request, context)
            if request.version:
                servers = [core]
            else:
                servers = [s for s in self.models.servers if s.model_name == core.model_name]
        else:
            servers = self.models.servers
        return pb.ModelStatisticsResponse(model_stats=[_statistics(core) for core in servers])

    async def RepositoryIndex(self, request, context):
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(**m) for m in self.models.index()]
        )

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        core = self.models.get(request.model_name, request.model_version or None)
        with core.stats.request() as timing:
            decoded = decode_request(request)
            timing.decoded()
            outputs = await core.infer(decoded)
            timing.inferred()
            return encode_response(core, decoded, outputs)

    async def ModelInfer(self, request, context):
        try:
            return await self._infer(request)
        except RequestError as error:
            await self._abort(context, error)

    async def _stream_response(self, request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
        try:
            return pb.ModelStreamInferResponse(infer_response=await self._infer(request))
        except RequestError as error:
            message = str(error)
        except Exception as error:  # noqa: BLE001 - a server bug must not end the client's stream
            logger.exception("internal error in ModelStreamInfer")
            message = f"internal server error: {type(error).__name__}"
        return pb.ModelStreamInferResponse(
            error_message=message, infer_response=pb.ModelInferResponse(id=request.id)
        )

    async def ModelStreamInfer(self, request_iterator, context):
        """Each request is admitted as it is read, so the requests of a stream keep their order per sequence,
        and those of different sequences carried by one stream batch together; responses are written as
        they are ready (a refused request answers ``error_message``; the stream stays open)."""
        lock, tasks, in_flight = asyncio.Lock(), set(), asyncio.Semaphore(STREAM_IN_FLIGHT)

        async def answer(request: pb.ModelInferRequest) -> None:
            try:
                response = await self._stream_response(request)
                async with lock:
                    await context.write(response)
            finally:
                in_flight.release()

        try:
            async for request in request_iterator:
                await in_flight.acquire()  # a client that never waits for answers is slowed, not buffered
                task = asyncio.create_task(answer(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(0)  # the task runs up to its first wait: admitted in stream order
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()


def _statistics(core: ModelServer) -> pb.ModelStatistics:
    batcher, stats = core.batcher, core.stats

    def duration(count: int, seconds: float) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=count, ns=int(seconds * 1e9))

    inference = pb.InferStatistics(
        success=duration(stats.success, stats.request_s),
        fail=duration(stats.failure, 0.0),
        queue=duration(batcher.steps_run, batcher.queue_s),
        compute_input=duration(stats.success, stats.input_s),
        compute_infer=duration(batcher.steps_run, batcher.compute_s),
        compute_output=duration(stats.success, stats.output_s),
    )
    return pb.ModelStatistics(
        name=core.model_name,
        version=core.model_version,
        inference_count=batcher.rows_run,
        execution_count=batcher.batches_run,
        inference_stats=inference,
        batch_stats=[
            pb.InferBatchStatistics(batch_size=size, compute_infer=pb.StatisticDuration(count=n))
            for size, n in sorted(batcher.batch_sizes.items())
        ],
    )


async def start_grpc_server(
    models: ModelServer | ModelSet, host: str, port: int, max_calls: int | None = 1024
) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC service on the running event loop; returns ``(server, bound port)``.

    ``max_calls`` caps the calls in progress at once, over all connections (a stream is one call for as long
    as it is open; ``None``: no cap): one more is refused at once with RESOURCE_EXHAUSTED by grpcio, so
    clients that open streams and never close them cannot take the server's memory, while the calls already
    open go on."""
    servicer = InferenceServicer(models)
    limits = servicer.models.limits
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limits.max_body_bytes),
            ("grpc.max_send_message_length", limits.max_response_bytes + 2**20),
        ],
        maximum_concurrent_rpcs=max_calls,
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    try:
        bound = server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    except RuntimeError:  # grpcio's "Failed to bind to address"
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port} (in use?)")
    await server.start()
    return server, bound
