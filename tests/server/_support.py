"""Helpers for the server tests: the offline reference and servers on free loopback ports."""

import asyncio
import contextlib
import functools
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import uvicorn
from starlette.applications import Starlette

from rnndeploy.runtime import StreamingSession
from rnndeploy.server import ModelServer, create_app
from rnndeploy.server.serving import guarded_protocol

TOL = {"rtol": 1e-5, "atol": 1e-6}


@functools.lru_cache(maxsize=8)
def _reference_session(model: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def offline(model: bytes, tokens) -> np.ndarray:
    """Whole sequences ``[B, T]`` of token ids in one plain InferenceSession run from zero state (the LM's
    ``h0``/``c0`` states ``[layers, B, hidden]``) -> ``output`` ``[B, T, V]``."""
    session = _reference_session(model)
    tokens = np.asarray(tokens, np.int64)
    shapes = {i.name: i.shape for i in session.get_inputs()}
    zeros = {n: np.zeros((shapes[n][0], tokens.shape[0], shapes[n][2]), np.float32) for n in ("h0", "c0")}
    return session.run(["output"], {"input": tokens, **zeros})[0]


@dataclass
class Served:
    http: str  # "127.0.0.1:port"
    grpc: str | None  # "127.0.0.1:port" when started with grpc=True
    app: Starlette
    core: ModelServer


@contextlib.contextmanager
def running(
    session: StreamingSession,
    *,
    grpc: bool = False,
    header_timeout_s: float | None = None,
    max_connections: int = 64,
    body_timeout_s: float = 30.0,
    max_grpc_calls: int | None = 1024,
    **options,
) -> Iterator[Served]:
    """``session`` as model ``lm`` behind uvicorn (and gRPC) on one event loop in a thread, on free ports.

    HTTP runs on the protocol :func:`rnndeploy.server.serve` uses (its slow-client guards, ``header_timeout_s``
    default 10 s as there); ``options`` go to :class:`ModelServer`.
    """
    from rnndeploy.server.grpc_service import start_grpc_server

    core = ModelServer(session, "lm", **options)
    app = create_app(session, model_server=core, body_timeout_s=body_timeout_s)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    protocol = guarded_protocol(10.0 if header_timeout_s is None else header_timeout_s, max_connections)
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on", http=protocol))
    ready, box = threading.Event(), {"port": None}

    async def main():
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        grpc_server = None
        if grpc:
            grpc_server, box["port"] = await start_grpc_server(core, "127.0.0.1", 0, max_grpc_calls)
        ready.set()
        await task
        if grpc_server is not None:
            await grpc_server.stop(1)

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    assert ready.wait(30), "server did not start"
    try:
        grpc_address = None if box["port"] is None else f"127.0.0.1:{box['port']}"
        yield Served(f"127.0.0.1:{sock.getsockname()[1]}", grpc_address, app, core)
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()
