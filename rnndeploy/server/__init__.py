"""The rnndeploy inference server: KServe v2 / Open Inference Protocol (as Triton speaks it), HTTP and gRPC.

:class:`ModelServer` holds the model, the :class:`Limits` and the :class:`SequenceBatcher` (per-sequence
state, concurrent steps batched); :func:`create_app` builds the Starlette (ASGI) app around it (with
``/metrics``); :mod:`rnndeploy.server.grpc_service` is the gRPC service around the same ModelServer;
:func:`serve` runs both on one event loop, with slow-client guards and a bounded graceful shutdown.
"""

from rnndeploy.server.app import ModelServer, create_app
from rnndeploy.server.batcher import SequenceBatcher, SequenceError
from rnndeploy.server.protocol import Limits, RequestError
from rnndeploy.server.serving import ServeError, serve

__all__ = [
    "Limits",
    "ModelServer",
    "RequestError",
    "SequenceBatcher",
    "SequenceError",
    "ServeError",
    "create_app",
    "serve",
]
