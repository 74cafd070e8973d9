"""The rnndeploy inference server: KServe v2 / Open Inference Protocol (as Triton speaks it), HTTP and gRPC.

One data plane, two thin front ends (imports flow down this list, never up):

- :mod:`~rnndeploy.server.protocol`: what a request may carry (:class:`Limits`, :class:`RequestError`);
  :mod:`~rnndeploy.server.repository`: a model repository, ``config.pbtxt`` as Triton's ``ModelConfig``;
  :mod:`~rnndeploy.server.metrics`: statistics with Triton's Prometheus names;
- :mod:`~rnndeploy.server.batcher`: per-sequence state, concurrent steps batched (:class:`SequenceBatcher`);
- :mod:`~rnndeploy.server.core`: the data plane, no HTTP or gRPC in it: :class:`ModelServer` (one model
  version), :class:`ModelSet` (routing), :func:`open_repository`;
- :mod:`~rnndeploy.server.rest` (:func:`create_app`, Starlette) and :mod:`~rnndeploy.server.grpc_service`:
  the front ends, which translate requests, answers and errors;
- :mod:`~rnndeploy.server.serving`: :func:`serve` runs both on one event loop, with slow-client guards and a
  bounded graceful shutdown.
"""

from rnndeploy.server.batcher import SequenceBatcher, SequenceError
from rnndeploy.server.core import ModelServer, ModelSet, open_repository
from rnndeploy.server.protocol import Limits, RequestError
from rnndeploy.server.rest import create_app
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
