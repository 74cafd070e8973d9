"""KServe v2 load generator: N concurrent sequences of single-token steps, in a process of its own.

Each sequence sends ``steps`` steps (``sequence_id`` / ``sequence_start`` / ``sequence_end``, input and output
as binary tensor data) and waits for each reply before its next step. Two clients:

- ``aiohttp`` (light): all sequences as asyncio tasks on one event loop; every connection is opened and
  warmed up before the clock starts.
- ``tritonclient``: the stock ``tritonclient.http`` client, one thread and one client per sequence.
- ``grpc-unary`` / ``grpc-stream``: the stock ``tritonclient.grpc`` client, one thread and one client per
  sequence, unary ``infer`` or a stream per sequence (``async_stream_infer``, waiting for each reply).
- ``grpc-aio-stream`` (light): a stream per sequence, all on one ``grpc.aio`` channel and event loop, with
  the generated messages tritonclient ships; the gRPC counterpart of ``aiohttp``.

Prints one JSON object: ``steps_per_s`` and ``latencies_us`` (one per step).

    python -m rnndeploy.bench.load --port 8000 --model lm --sequences 64 --steps 50 [--client tritonclient]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import aiohttp

HEADER_LENGTH = "Inference-Header-Content-Length"


def request_body(sequence_id: int, token: int, start: bool, end: bool) -> tuple[bytes, dict[str, str]]:
    """One step's body (JSON header + 8 bytes of int64 ``input`` ``[1, 1]``) and its HTTP headers."""
    data = np.array([[token]], np.int64).tobytes()
    header = {
        "inputs": [
            {"name": "input", "shape": [1, 1], "datatype": "INT64", "parameters": {"binary_data_size": 8}}
        ],
        "parameters": {
            "sequence_id": sequence_id,
            "sequence_start": start,
            "sequence_end": end,
            "binary_data_output": True,
        },
    }
    text = json.dumps(header).encode()
    return text + data, {HEADER_LENGTH: str(len(text)), "Content-Type": "application/octet-stream"}


async def sequence(
    session: aiohttp.ClientSession, url: str, sequence_id: int, steps: int, vocab: int, latencies: list[float]
) -> None:
    for t in range(steps):
        body, headers = request_body(sequence_id, (sequence_id + t) % vocab, t == 0, t == steps - 1)
        start = time.perf_counter()
        async with session.post(url, data=body, headers=headers) as response:
            reply = await response.read()
            if response.status != 200:
                raise RuntimeError(
                    f"step {t} of sequence {sequence_id}: HTTP {response.status} {reply[:200]!r}"
                )
            json.loads(reply[: int(response.headers[HEADER_LENGTH])])
        latencies.append(time.perf_counter() - start)


async def run(port: int, model: str, sequences: int, steps: int, vocab: int) -> dict:
    import aiohttp

    url = f"http://127.0.0.1:{port}/v2/models/{model}/infer"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=sequences)) as session:
        warm: list[float] = []
        await asyncio.gather(*(sequence(session, url, 10**6 + s, 3, vocab, warm) for s in range(sequences)))
        latencies: list[float] = []
        start = time.perf_counter()
        await asyncio.gather(
            *(sequence(session, url, s + 1, steps, vocab, latencies) for s in range(sequences))
        )
        elapsed = time.perf_counter() - start
    return {"steps_per_s": sequences * steps / elapsed, "latencies_us": [x * 1e6 for x in latencies]}


def tritonclient_sequence(
    port: int, model: str, steps: int, vocab: int, latencies: list[float], sequence_id: int
) -> None:
    """One sequence through its own ``tritonclient.http`` client; appends its step latencies."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    mine = []
    try:
        for t in range(steps):
            tensor = httpclient.InferInput("input", [1, 1], "INT64")
            tensor.set_data_from_numpy(np.array([[(sequence_id + t) % vocab]], np.int64))
            start = time.perf_counter()
            client.infer(
                model, [tensor], sequence_id=sequence_id, sequence_start=t == 0, sequence_end=t == steps - 1
            )
            mine.append(time.perf_counter() - start)
    finally:
        client.close()
    latencies.extend(mine)  # list.extend is atomic under the GIL


def run_tritonclient(port: int, model: str, sequences: int, steps: int, vocab: int) -> dict:
    tritonclient_sequence(port, model, 3, vocab, [], 10**6)  # import, first connection
    latencies: list[float] = []
    start = time.perf_counter()
    with ThreadPoolExecutor(sequences) as pool:
        sequence = partial(tritonclient_sequence, port, model, steps, vocab, latencies)
        list(pool.map(sequence, range(1, sequences + 1)))  # re-raises a failed step
    elapsed = time.perf_counter() - start
    return {"steps_per_s": sequences * steps / elapsed, "latencies_us": [x * 1e6 for x in latencies]}


def grpc_sequence(
    port: int, model: str, steps: int, vocab: int, latencies: list[float], sequence_id: int, stream: bool
) -> None:
    """One sequence through its own ``tritonclient.grpc`` client: unary ``infer`` or a stream of its own."""
    import queue

    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    replies: queue.Queue = queue.Queue()
    if stream:
        client.start_stream(callback=lambda result, error: replies.put(error))
    mine = []
    try:
        for t in range(steps):
            tensor = grpcclient.InferInput("input", [1, 1], "INT64")
            tensor.set_data_from_numpy(np.array([[(sequence_id + t) % vocab]], np.int64))
            flags = {"sequence_id": sequence_id, "sequence_start": t == 0, "sequence_end": t == steps - 1}
            start = time.perf_counter()
            if stream:
                client.async_stream_infer(model, [tensor], **flags)
                error = replies.get(timeout=60)
                if error is not None:
                    raise RuntimeError(f"step {t} of sequence {sequence_id}: {error}")
            else:
                client.infer(model, [tensor], **flags)
            mine.append(time.perf_counter() - start)
    finally:
        if stream:
            client.stop_stream()
        client.close()
    latencies.extend(mine)


def run_grpc(port: int, model: str, sequences: int, steps: int, vocab: int, stream: bool) -> dict:
    grpc_sequence(port, model, 3, vocab, [], 10**6, stream)  # import, first connection
    latencies: list[float] = []
    start = time.perf_counter()
    with ThreadPoolExecutor(sequences) as pool:
        sequence = partial(grpc_sequence, port, model, steps, vocab, latencies, stream=stream)
        list(pool.map(sequence, range(1, sequences + 1)))
    elapsed = time.perf_counter() - start
    return {"steps_per_s": sequences * steps / elapsed, "latencies_us": [x * 1e6 for x in latencies]}


async def run_grpc_aio(port: int, model: str, sequences: int, steps: int, vocab: int) -> dict:
    """A stream per sequence on one grpc.aio channel (no tritonclient): the server's share of a streamed step."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def sequence(sequence_id: int, n: int, latencies: list[float]) -> None:
            call = stub.ModelStreamInfer()
            for t in range(n):
                request = pb.ModelInferRequest(model_name=model)
                request.inputs.add(name="input", datatype="INT64", shape=[1, 1])
                request.raw_input_contents.append(np.array([[(sequence_id + t) % vocab]], np.int64).tobytes())
                request.parameters["sequence_id"].int64_param = sequence_id
                request.parameters["sequence_start"].bool_param = t == 0
                request.parameters["sequence_end"].bool_param = t == n - 1
                start = time.perf_counter()
                await call.write(request)
                reply = await call.read()
                if reply.error_message:
                    raise RuntimeError(f"step {t} of sequence {sequence_id}: {reply.error_message}")
                latencies.append(time.perf_counter() - start)
            await call.done_writing()

        await asyncio.gather(*(sequence(10**6 + s, 3, []) for s in range(sequences)))
        latencies: list[float] = []
        start = time.perf_counter()
        await asyncio.gather(*(sequence(s + 1, steps, latencies) for s in range(sequences)))
        elapsed = time.perf_counter() - start
    return {"steps_per_s": sequences * steps / elapsed, "latencies_us": [x * 1e6 for x in latencies]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="lm")
    parser.add_argument("--sequences", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--vocab", type=int, default=64, help="token ids cycle through 0..vocab-1")
    parser.add_argument(
        "--client",
        choices=["aiohttp", "tritonclient", "grpc-unary", "grpc-stream", "grpc-aio-stream"],
        default="aiohttp",
        help="grpc-unary/-stream: tritonclient.grpc on --port (a gRPC port), unary infer or a stream per "
        "sequence; grpc-aio-stream: a stream per sequence on one grpc.aio channel",
    )
    args = parser.parse_args(argv)
    load = (args.port, args.model, args.sequences, args.steps, args.vocab)
    if args.client == "grpc-aio-stream":
        result = asyncio.run(run_grpc_aio(*load))
    elif args.client.startswith("grpc-"):
        result = run_grpc(*load, stream=args.client == "grpc-stream")
    elif args.client == "tritonclient":
        result = run_tritonclient(*load)
    else:
        result = asyncio.run(run(*load))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
