"""Run the server: uvicorn for HTTP, with the slow-client guards and the shutdown a deployment expects.

- A connection must send its request headers within ``header_timeout_s`` (from connecting, or from the first
  byte of a later request on a kept-alive connection): else 408 and the connection is closed.
- Bodies must arrive within the app's ``body_timeout_s`` (408).
- A connection closed while its request body is still arriving (a 413 for a body over ``max_body_bytes``,
  refused before it is read) is half-closed: the response goes out, the rest of the body is read and dropped
  for up to ``LINGER_S`` (or ``LINGER_BYTES``), then the socket closes, so the kernel does not reset the
  connection under the unread response.
- At most ``max_connections`` connections at once; one more is answered 503 and closed, so stalled clients
  cannot take the process's file descriptors and the health endpoints keep answering the others.
- SIGTERM / SIGINT: stop accepting, finish open requests for up to ``shutdown_timeout_s`` (gRPC first, then
  HTTP, one deadline for both), then cancel what is left and return normally (exit status 0). A second SIGINT
  forces the exit.

gRPC (`rnndeploy.server.grpc_service`) runs on the same event loop, around the same
`ModelServer`: one state table, one batcher, HTTP and gRPC steps batched together.
Its guard: at most ``max_grpc_calls`` calls open at once (a stream counts while it is open); one more is refused
with RESOURCE_EXHAUSTED (grpcio's ``maximum_concurrent_rpcs``) and the open ones go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Callable

import uvicorn

try:
    import uvloop
except ImportError:  # Windows: no uvloop
    uvloop = None
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from rnndeploy.runtime import ModelError, StreamingSession
from rnndeploy.server.core import ModelServer, ModelSet
from rnndeploy.server.metrics import start_metrics_server
from rnndeploy.server.protocol import Limits
from rnndeploy.server.rest import create_app


class ServeError(RuntimeError):
    """The server cannot start (a port in use, an address that cannot be bound)."""


def _response(status: bytes, message: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: " + str(len(message)).encode() + b"\r\n\r\n" + message
    )


LINGER_S = 2.0  # a refused body is read and dropped for at most this long before the connection closes
LINGER_BYTES = 64 * 2**20  # ... and at most this much of it


class _LingeringTransport:
    """A transport whose ``close()``, while the request body is still arriving, half-closes instead: what is
    buffered (the response) is sent, the write side shut, and the rest of the body read and dropped until the
    client closes, ``LINGER_S`` pass or ``LINGER_BYTES`` arrive. Closing a socket with unread input makes the
    kernel reset the connection, and the reset can discard the response the client has not read yet: a
    client sending a body the server refused (413 before reading it) would get a reset instead of the 413."""

    def __init__(self, transport: asyncio.Transport, body_unread: Callable[[], bool]) -> None:
        self._transport, self._body_unread = transport, body_unread
        self.lingering = False
        self.dropped = 0
        self._deadline: asyncio.TimerHandle | None = None

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        transport = self._transport
        if self.lingering or transport.is_closing():
            return
        if not (self._body_unread() and transport.can_write_eof()):
            transport.close()
            return
        self.lingering = True
        transport.write_eof()  # after the buffered response
        transport.resume_reading()
        self._deadline = asyncio.get_running_loop().call_later(LINGER_S, transport.close)

    def drop(self, data: bytes) -> None:
        """Input that arrives while lingering."""
        self.dropped += len(data)
        if self.dropped > LINGER_BYTES:
            self._transport.close()

    def closed(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a header deadline, a cap on concurrent connections and a lingering
    close (`_LingeringTransport`) for connections closed while their request body is still arriving."""
    timeout = _response(b"408 Request Timeout", b'{"error": "request headers not received in time"}')
    busy = _response(b"503 Service Unavailable", b'{"error": "too many connections; retry later"}')

    class GuardedHttpProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(_LingeringTransport(transport, self._body_unread))
            if len(self.connections) > max_connections:
                transport.write(busy)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.write(timeout)
                self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def _body_unread(self) -> bool:
            return self.cycle is not None and self.cycle.more_body

        def data_received(self, data: bytes) -> None:
            if self.transport.lingering:
                self.transport.drop(data)
            else:
                super().data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            self.transport.closed()
            super().connection_lost(exc)

    return GuardedHttpProtocol


class _Server(uvicorn.Server):
    """uvicorn's server, returning normally after a signal (uvicorn re-raises it: exit status 143 / 130)."""

    def __init__(self, config: uvicorn.Config, shutdown_timeout_s: float, models: ModelSet) -> None:
        super().__init__(config)
        self.shutdown_timeout_s = shutdown_timeout_s
        self.models = models
        self.before_shutdown: list[Callable] = []

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets=None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_timeout_s
        # Steps still queued or running shortly before the deadline are answered 503 / UNAVAILABLE then,
        # rather than cut off at it (a plain-text 500 and a CancelledError in the log).
        abort = loop.call_at(deadline - min(0.5, self.shutdown_timeout_s / 4), self.models.abort)
        for server in self.servers:
            server.close()
        for stop in self.before_shutdown:
            await stop(max(deadline - loop.time(), 0.0))
        self.config.timeout_graceful_shutdown = max(deadline - loop.time(), 0.1)
        try:
            await super().shutdown(sockets)
        finally:
            abort.cancel()


def serve(
    session: StreamingSession | ModelSet,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str = "model",
    log_level: str = "info",
    access_log: bool = False,
    *,
    limits: Limits | None = None,
    header_timeout_s: float = 10.0,
    body_timeout_s: float = 30.0,
    keep_alive_s: float = 5.0,
    max_connections: int = 512,
    shutdown_timeout_s: float = 10.0,
    grpc_port: int | None = None,
    max_grpc_calls: int = 1024,
    metrics_port: int | None = None,
    on_ready: Callable[[dict], None] | None = None,
    **model_options,
) -> None:
    """Serve ``session`` over HTTP until SIGINT/SIGTERM, then shut down within ``shutdown_timeout_s``.

    ``session`` may be a `ModelSet` instead (a model repository: `open_repository`), whose
    models carry their own options (``model_name``, ``limits`` and ``model_options`` are then not used).

    ``access_log`` logs every request (off by default: a log record per step costs CPU on every step).
    uvicorn uses httptools and uvloop (dependencies of rnndeploy). ``model_options`` go to
    `ModelServer` (batching, eviction, worker thread); ``limits`` bound each request's cost; the slow-
    client guards are described in this module's docstring. ``grpc_port`` serves gRPC too (``None``: off;
    0: any free port), with at most ``max_grpc_calls`` calls open at once (a stream is one call while open;
    RESOURCE_EXHAUSTED beyond), ``metrics_port`` serves ``/metrics`` on a port of its own as well (it is always on the
    HTTP port). ``on_ready`` is called once the server accepts requests, with ``{"model", "version", "models":
    {name: [versions]}, "http": "http://host:port", "grpc": "host:port" or None, "metrics": URL}`` (the ports
    actually bound, also for 0; ``model`` and ``version`` are the first model's).
    Raises `ServeError` when a port cannot be bound or the model cannot be served (its metadata).
    """
    if isinstance(session, ModelSet):
        models = session
    else:
        try:
            models = ModelSet([ModelServer(session, model_name, limits=limits, **model_options)])
        except ModelError as error:
            raise ServeError(str(error)) from None
    app = create_app(None, models=models, body_timeout_s=body_timeout_s)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        lifespan="on",
        http=guarded_protocol(header_timeout_s, max_connections),
        timeout_keep_alive=keep_alive_s,
        timeout_graceful_shutdown=shutdown_timeout_s,
    )
    server = _Server(config, shutdown_timeout_s, models)
    shown = f"[{host}]" if ":" in host else host
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as error:
        raise ServeError(
            f"cannot listen for HTTP on {shown}:{port}: {error.strerror}; choose another port"
        ) from None
    bound_port = sock.getsockname()[1]
    metrics_url = f"http://{shown}:{bound_port}/metrics"
    metrics_server = None
    if metrics_port is not None:
        try:
            metrics_server = start_metrics_server(models.registry, host, metrics_port)
        except OSError as error:
            sock.close()
            raise ServeError(
                f"cannot listen for metrics on {shown}:{metrics_port}: {error.strerror}; choose another port"
            ) from None
        metrics_url = f"http://{shown}:{metrics_server.server_port}/metrics"

    async def main() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if not server.started:
            await task
            return
        grpc_address = None
        if grpc_port is not None:
            from rnndeploy.server.grpc_service import start_grpc_server

            try:
                grpc_server, bound = await start_grpc_server(models, host, grpc_port, max_grpc_calls)
            except OSError as error:
                server.should_exit = True
                await task
                raise ServeError(f"{error}; choose another gRPC port") from None
            server.before_shutdown.append(lambda grace: grpc_server.stop(grace))
            grpc_address = f"{shown}:{bound}"
        if on_ready is not None:
            on_ready(
                {
                    "model": models.servers[0].model_name,
                    "version": models.servers[0].model_version,
                    "models": {name: list(versions) for name, versions in models.by_name.items()},
                    "http": f"http://{shown}:{bound_port}",
                    "grpc": grpc_address,
                    "metrics": metrics_url,
                }
            )
        await task

    try:
        if uvloop is None:
            asyncio.run(main())
        else:
            uvloop.run(main())
    finally:
        sock.close()
        if metrics_server is not None:
            metrics_server.shutdown()
