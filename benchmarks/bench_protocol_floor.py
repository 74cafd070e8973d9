"""What a step costs over each protocol with no model behind it: the floor under the server's latency.

Two echo servers, each in its own process and answering every request with the same canned one-step response
(an output of 1 x 1 x 103 float32, as the demo LM's logits) without looking at the request:

- HTTP: a Starlette app under uvicorn with httptools and uvloop, the stack of ``rnndeploy serve``'s HTTP side,
  answering ``POST /v2/models/m/infer`` with a KServe v2 JSON response.
- gRPC: a ``GRPCInferenceService`` servicer (tritonclient's generated messages) on grpcio's asyncio server, as
  ``rnndeploy serve``'s gRPC side, answering ``ModelInfer`` and each request of ``ModelStreamInfer``.

One client at a time sends ``--steps`` requests back to back, one in flight (a sequence stepping alone):
tritonclient.http ``infer``, tritonclient.grpc ``infer`` (unary), tritonclient.grpc ``start_stream`` /
``async_stream_infer`` (a thread feeds the stream, a callback thread answers), and a bare grpc.aio stream
(write, read on one event loop). The figures are p50 / p99 of each round trip after a warm-up, medians over
``--repeats`` rounds in turn. If the echo's streamed round trip already costs about as much as the real
server's HTTP step, no change inside rnndeploy can bring a streamed step to half of it.

Numbers only: prints a table and writes protocol-floor.json (machine, versions, commit) into ``--out``.

    python benchmarks/bench_protocol_floor.py [--steps 2000] [--repeats 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import queue
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from rnndeploy.bench.serving import free_port

LOGITS = 103


def serve_http(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    body = json.dumps(
        {
            "model_name": "m",
            "model_version": "1",
            "outputs": [
                {"name": "output", "datatype": "FP32", "shape": [1, 1, LOGITS], "data": [0.0] * LOGITS}
            ],
        }
    ).encode()

    async def infer(request):
        await request.body()
        return Response(body, media_type="application/json")

    app = Starlette(routes=[Route("/v2/models/m/infer", infer, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, http="httptools", loop="uvloop", log_level="warning")


def serve_grpc(port: int) -> None:
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    response = pb.ModelInferResponse(model_name="m", model_version="1")
    response.outputs.add(name="output", datatype="FP32", shape=[1, 1, LOGITS])
    response.raw_output_contents.append(np.zeros(LOGITS, np.float32).tobytes())
    streamed = pb.ModelStreamInferResponse(infer_response=response)

    class Echo(pb_grpc.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request, context):
            return response

        async def ModelStreamInfer(self, request_iterator, context):
            async for _ in request_iterator:
                await context.write(streamed)

    async def main() -> None:
        server = grpc.aio.server()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def wait_for(port: int, process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"echo server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"echo server did not listen on {port} within {timeout_s} s")


def timed(step, steps: int) -> list[float]:
    for _ in range(min(200, steps)):
        step()
    samples = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        samples.append(time.perf_counter() - start)
    return samples


def http_client(port: int):
    import tritonclient.http as th

    client = th.InferenceServerClient(f"127.0.0.1:{port}")
    x = th.InferInput("input", [1, 1], "INT64")
    x.set_data_from_numpy(np.array([[5]], np.int64), binary_data=False)
    return lambda: client.infer("m", [x]), client.close


def grpc_unary_client(port: int):
    import tritonclient.grpc as tg

    client = tg.InferenceServerClient(f"127.0.0.1:{port}")
    x = tg.InferInput("input", [1, 1], "INT64")
    x.set_data_from_numpy(np.array([[5]], np.int64))
    return lambda: client.infer("m", [x]), client.close


def grpc_stream_client(port: int):
    import tritonclient.grpc as tg

    client = tg.InferenceServerClient(f"127.0.0.1:{port}")
    x = tg.InferInput("input", [1, 1], "INT64")
    x.set_data_from_numpy(np.array([[5]], np.int64))
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put(error))

    def step() -> None:
        client.async_stream_infer("m", [x], sequence_id=7)
        error = answers.get()
        if error is not None:
            raise error

    def close() -> None:
        client.stop_stream()
        client.close()

    return step, close


def grpc_aio_stream_samples(port: int, steps: int) -> list[float]:
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="input", datatype="INT64", shape=[1, 1])
    request.raw_input_contents.append(np.array([5], np.int64).tobytes())

    async def run() -> list[float]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
            samples = []
            for k in range(steps + min(200, steps)):
                start = time.perf_counter()
                await call.write(request)
                await call.read()
                if k >= min(200, steps):
                    samples.append(time.perf_counter() - start)
            await call.done_writing()
            return samples

    return asyncio.run(run())


CLIENTS = {
    "HTTP: tritonclient.http infer": ("http", http_client),
    "gRPC: tritonclient.grpc infer (unary)": ("grpc", grpc_unary_client),
    "gRPC: tritonclient.grpc stream": ("grpc", grpc_stream_client),
    "gRPC: grpc.aio stream": ("grpc", None),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--serve", choices=["http", "grpc"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        (serve_http if args.serve == "http" else serve_grpc)(args.port)
        return
    ports = {"http": free_port(), "grpc": free_port()}
    servers = {
        kind: subprocess.Popen(
            [sys.executable, __file__, "--serve", kind, "--port", str(port)], stdout=subprocess.DEVNULL
        )
        for kind, port in ports.items()
    }
    samples: dict[str, list[list[float]]] = {name: [] for name in CLIENTS}
    try:
        for kind, port in ports.items():
            wait_for(port, servers[kind])
        for round_ in range(args.repeats):
            for name, (kind, make) in CLIENTS.items():
                if make is None:
                    samples[name].append(grpc_aio_stream_samples(ports[kind], args.steps))
                else:
                    step, close = make(ports[kind])
                    samples[name].append(timed(step, args.steps))
                    close()
            print(f"round {round_ + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    finally:
        for process in servers.values():
            process.terminate()
            process.wait(10)
    rows = []
    for name, runs in samples.items():
        p50 = float(np.median([np.median(run) for run in runs]) * 1e6)
        p99 = float(np.median([np.quantile(run, 0.99) for run in runs]) * 1e6)
        rows.append({"client": name, "p50_us": p50, "p99_us": p99})
    http_p50 = rows[0]["p50_us"]
    print(f"\nEcho servers, one request in flight, {args.steps} steps x {args.repeats} rounds (medians):")
    print(f"{'client':40s} {'p50 us':>8s} {'p99 us':>8s} {'p50 / HTTP':>11s}")
    for row in rows:
        row["vs_http_p50"] = row["p50_us"] / http_p50
        print(f"{row['client']:40s} {row['p50_us']:8.0f} {row['p99_us']:8.0f} {row['vs_http_p50']:10.2f}x")
    fields = {"rows": rows, "steps": args.steps, "repeats": args.repeats}
    print(
        f"wrote {write_result(args.out / 'protocol-floor.json', fields, ('grpcio', 'tritonclient', 'uvicorn'))}"
    )


def write_result(path: Path, fields: dict, packages: tuple[str, ...], versions: dict | None = None) -> Path:
    """``fields`` with the machine, the versions of ``packages`` (and ``versions``), the commit and the date,
    written atomically as JSON to ``path``."""
    from importlib.metadata import version

    from rnndeploy.checkpoint import atomic_write
    from rnndeploy.provenance import git_commit

    with open("/proc/loadavg") as loadavg:
        load = loadavg.read().split()[:3]
    result = {
        **fields,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "load_avg": load},
        "versions": {**{name: version(name) for name in packages}, **(versions or {})},
        "commit": git_commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    return path


if __name__ == "__main__":
    main()
