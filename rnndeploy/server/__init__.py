"""The rnndeploy inference server: KServe v2 / Open Inference Protocol (as Triton speaks it) over HTTP.

:func:`create_app` builds the Starlette (ASGI) app around a :class:`~rnndeploy.runtime.StreamingSession`;
:func:`serve` runs it with uvicorn; :class:`SequenceBatcher` keeps per-sequence state and batches
concurrent steps.
"""

from rnndeploy.server.app import create_app, serve
from rnndeploy.server.batcher import SequenceBatcher, SequenceError

__all__ = ["SequenceBatcher", "SequenceError", "create_app", "serve"]
