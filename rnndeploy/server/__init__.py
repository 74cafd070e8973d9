"""The rnndeploy inference server: KServe v2 / Open Inference Protocol (as Triton speaks it) over HTTP.

:class:`ModelServer` holds the model, the :class:`Limits` and the :class:`SequenceBatcher` (per-sequence
state, concurrent steps batched); :func:`create_app` builds the Starlette (ASGI) app around it; :func:`serve`
runs it with uvicorn, with slow-client guards and a bounded graceful shutdown.
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
