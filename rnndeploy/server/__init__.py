"""The rnndeploy inference server: KServe v2 / Open Inference Protocol (as Triton speaks it), HTTP and gRPC.

One data plane, two thin front ends (imports flow down this list, never up):

- `protocol`: what a request may carry (`Limits`, `RequestError`);
  `repository`: a model repository, ``config.pbtxt`` as Triton's ``ModelConfig``;
  `metrics`: statistics with Triton's Prometheus names;
- `batcher`: per-sequence state, concurrent steps batched (`SequenceBatcher`);
- `core`: the data plane, no HTTP or gRPC in it: `ModelServer` (one model
  version), `ModelSet` (routing), `open_repository`;
- `rest` (`create_app`, Starlette) and `grpc_service`:
  the front ends, which translate requests, answers and errors;
- `serving`: `serve` runs both on one event loop, with slow-client guards and a
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
