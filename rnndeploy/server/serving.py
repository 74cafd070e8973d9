"""Run the server: uvicorn for HTTP, with the slow-client guards and the shutdown a deployment expects.

- A connection must send its request headers within ``header_timeout_s`` (from connecting, or from the first
  byte of a later request on a kept-alive connection): else 408 and the connection is closed.
- Bodies must arrive within the app's ``body_timeout_s`` (408).
- At most ``max_connections`` connections at once; one more is answered 503 and closed, so stalled clients
  cannot take the process's file descriptors and the health endpoints keep answering the others.
- SIGTERM / SIGINT: stop accepting, finish open requests for up to ``shutdown_timeout_s``, then cancel what
  is left and return normally (exit status 0). A second SIGINT forces the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable

import uvicorn

try:
    import uvloop
except ImportError:  # Windows: no uvloop
    uvloop = None
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from rnndeploy.runtime import StreamingSession
from rnndeploy.server.app import ModelServer, create_app
from rnndeploy.server.protocol import Limits


def _response(status: bytes, message: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: " + str(len(message)).encode() + b"\r\n\r\n" + message
    )


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a header deadline and a cap on concurrent connections."""
    timeout = _response(b"408 Request Timeout", b'{"error": "request headers not received in time"}')
    busy = _response(b"503 Service Unavailable", b'{"error": "too many connections; retry later"}')

    class GuardedHttpProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
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

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedHttpProtocol


class _Server(uvicorn.Server):
    """uvicorn's server, returning normally after a signal (uvicorn re-raises it: exit status 143 / 130)."""

    def __init__(self, config: uvicorn.Config, shutdown_timeout_s: float) -> None:
        super().__init__(config)
        self.shutdown_timeout_s = shutdown_timeout_s
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
        for server in self.servers:
            server.close()
        for stop in self.before_shutdown:
            await stop(max(deadline - loop.time(), 0.0))
        self.config.timeout_graceful_shutdown = max(deadline - loop.time(), 0.1)
        await super().shutdown(sockets)


def serve(
    session: StreamingSession,
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
    on_ready: Callable[[dict], None] | None = None,
    **model_options,
) -> None:
    """Serve ``session`` over HTTP until SIGINT/SIGTERM, then shut down within ``shutdown_timeout_s``.

    ``access_log`` logs every request (off by default: a log record per step costs CPU on every step).
    uvicorn uses httptools and uvloop (dependencies of rnndeploy). ``model_options`` go to
    :class:`ModelServer` (batching, eviction, worker thread); ``limits`` bound each request's cost; the slow-
    client guards are described in this module's docstring. ``on_ready`` is called once the server accepts
    requests, with ``{"model": name, "version": v, "http": "http://host:port"}`` (the port actually bound,
    also for ``port=0``).
    """
    core = ModelServer(session, model_name, limits=limits, **model_options)
    app = create_app(session, model_server=core, body_timeout_s=body_timeout_s)
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
    server = _Server(config, shutdown_timeout_s)
    sock = config.bind_socket()
    bound_host, bound_port = sock.getsockname()[:2]

    async def main() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started and on_ready is not None:
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            on_ready(
                {
                    "model": core.model_name,
                    "version": core.model_version,
                    "http": f"http://{shown}:{bound_port}",
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
