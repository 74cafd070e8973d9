"""The rnndeploy inference server: KServe v2 / Open Inference Protocol (as Triton speaks it), HTTP and gRPC.

:class:`ModelServer` holds the model, the :class:`Limits` and the :class:`SequenceBatcher` (per-sequence
state, concurrent steps batched); :func:`create_app` builds the Starlette (ASGI) app around it (with
``/metrics``); :mod:`rnndeploy.server.grpc_service` is the gRPC service around the same ModelServer;
:func:`serve` runs both on one event loop, with slow-client guards and a bounded graceful shutdown.
:func:`open_repository` serves a Triton-style model repository instead: a :class:`ModelSet` of one
ModelServer per model version, each configured by its ``config.pbtxt``.
"""

from rnndeploy.server.app import ModelServer, create_app, open_repository
from rnndeploy.server.batcher import SequenceBatcher, SequenceError
from rnndeploy.server.models import ModelSet
from rnndeploy.server.protocol import Limits, RequestError
from rnndeploy.server.serving import ServeError, serve

__all__ = [
    "Limits",
    "ModelServer",
    "ModelSet",
    "RequestError",
    "SequenceBatcher",
    "SequenceError",
    "ServeError",
    "create_app",
    "open_repository",
    "serve",
]
