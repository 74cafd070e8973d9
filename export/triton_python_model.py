"""Triton Inference Server Python-backend model: the exported graph run through onnxruntime.

``rnndeploy export --triton-backend python`` copies this file as ``<model>/1/model.py`` next to
``model.onnx`` (the same graph the onnxruntime backend runs: ``input``, ``START``, ``state_*_in`` ->
``output``, ``state_*_out``, states batch-first). It needs numpy and onnxruntime importable by the Python that
runs Triton's backend stub, and nothing from rnndeploy.

Triton's Python backend does not write implicit state back (it has no state-update call), so the state of each
sequence lives here, keyed by the request's correlation ID: Triton's ``START`` control input resets it (inside
the graph), ``END`` drops it, and the state of a sequence Triton released for idling (longer than
``max_sequence_idle_microseconds``) is forgotten. The config therefore pins one model instance, so that every
request of a sequence reaches the same state.

Requests of different sequences that Triton hands over together run as one onnxruntime call per input shape
(state rows gathered, run, scattered back).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

# NOTE: the Python-backend stubs of Triton <= 24.10 (server 2.51, pybind11 2.10) misread numpy >= 2 arrays both
# ways: ``Tensor.as_numpy()`` repeats elements ([3, 7] arrives as [3, 3]) and ``pb_utils.Tensor(name, array)``
# sends an empty tensor. Inputs therefore come through DLPack (right with every numpy); outputs too with
# numpy >= 2. With numpy < 2 outputs keep ``pb_utils.Tensor``: the stub renames a capsule it consumed
# ("used_dlpack"), and numpy 1.x's capsule destructor then crashes the stub; numpy 2's reports a harmless
# ValueError instead, which the hook installed in initialize() keeps out of the server log.
_NUMPY_2 = np.lib.NumpyVersion(np.__version__) >= "2.0.0"


class _DLPack:
    """A Triton tensor as an object ``np.from_dlpack`` takes (it wants ``__dlpack__``, not a bare capsule)."""

    def __init__(self, tensor) -> None:
        self.tensor = tensor

    def __dlpack__(self, **kwargs):
        return self.tensor.to_dlpack()

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU: the inputs this model declares live on the host


def _input(request, name: str) -> np.ndarray:
    return np.from_dlpack(_DLPack(pb_utils.get_input_tensor_by_name(request, name)))


def _output(name: str, array: np.ndarray):
    return pb_utils.Tensor.from_dlpack(name, array) if _NUMPY_2 else pb_utils.Tensor(name, array)


def _quiet_consumed_capsules(hook):
    def unraisable(info) -> None:
        if not (
            isinstance(info.exc_value, ValueError)
            and "PyCapsule_GetPointer called with incorrect name" in str(info.exc_value)
        ):
            hook(info)

    return unraisable


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        if _NUMPY_2:
            sys.unraisablehook = _quiet_consumed_capsules(sys.unraisablehook)
        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        threads = config.get("parameters", {}).get("intra_op_thread_count", {}).get("string_value")
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.states = json.loads(meta["rnndeploy.states"])  # [{input, output, shape: [batch, L*D, H]}]
        self.start = meta["rnndeploy.triton.start_input"]
        self.outputs = [o["name"] for o in config["output"]]
        self.inputs = [i["name"] for i in config["input"]]
        controls = config["sequence_batching"].get("control_input", [])
        # JSON without defaults omits the enum's first value, CONTROL_SEQUENCE_START
        kinds = {c["name"]: c["control"][0].get("kind", "CONTROL_SEQUENCE_START") for c in controls}
        self.end = next((n for n, k in kinds.items() if k == "CONTROL_SEQUENCE_END"), None)
        # Triton refuses a released sequence's next request without START itself; forgetting a state only
        # frees memory, so it waits twice the idle timeout (time here is the run's, not the arrival's).
        idle_us = int(config["sequence_batching"].get("max_sequence_idle_microseconds", 1_000_000))
        self.forget_s = 2 * idle_us / 1e6
        self.memory: dict[int | str, tuple[float, list[np.ndarray]]] = {}  # id -> (last use, states)

    def execute(self, requests: list) -> list:
        now = time.monotonic()
        for key in [k for k, (used, _) in self.memory.items() if now - used > self.forget_s]:
            del self.memory[key]
        responses: list = [None] * len(requests)
        # A sequence appears at most once per call; if it ever appears twice, its later request waits for the
        # state of the earlier one (the next wave).
        waves: list[list[int]] = []
        seen: dict[int | str, int] = {}
        for i, request in enumerate(requests):
            key = request.correlation_id()
            wave = seen.get(key, 0)
            seen[key] = wave + 1
            if wave == len(waves):
                waves.append([])
            waves[wave].append(i)
        for wave in waves:
            groups: dict[tuple, list[int]] = {}
            for i in wave:
                x = _input(requests[i], self.inputs[0])
                groups.setdefault((x.shape[1:], x.dtype.str), []).append(i)
            for group in groups.values():
                self._run(requests, group, responses, now)
        return responses

    def _run(self, requests: list, group: list[int], responses: list, now: float) -> None:
        feeds: dict[str, list[np.ndarray]] = {name: [] for name in [*self.inputs, self.start]}
        states: list[list[np.ndarray]] = [[] for _ in self.states]
        rows, ready = [], []
        for i in group:
            request = requests[i]
            tensors = {n: _input(request, n) for n in feeds}
            n = tensors[self.start].shape[0]
            key = request.correlation_id()
            stored = self.memory.get(key)
            if stored is None or stored[1][0].shape[0] != n:
                if not tensors[self.start].all():
                    responses[i] = _error(
                        f"sequence {key!r}: no state for {n} row(s) on this instance (it idled out, ended or "
                        "the model reloaded); send the request with sequence_start=True"
                    )
                    continue
                stored = (now, [np.zeros((n, *s["shape"][1:]), np.float32) for s in self.states])
            for name, value in tensors.items():
                feeds[name].append(value)
            for k, value in enumerate(stored[1]):
                states[k].append(value)
            rows.append(n)
            ready.append(i)
        if not ready:
            return
        feed = {name: np.concatenate(values) for name, values in feeds.items()}
        feed.update({s["input"]: np.concatenate(v) for s, v in zip(self.states, states)})
        names = [*self.outputs, *(s["output"] for s in self.states)]
        try:
            result = self.session.run(names, feed)
        except Exception as exc:  # onnxruntime raises its own exception types; every request hears why
            for i in ready:
                responses[i] = _error(f"onnxruntime run failed: {exc}")
            return
        offsets = np.cumsum([0, *rows])
        for i, lo, hi in zip(ready, offsets[:-1], offsets[1:]):
            request = requests[i]
            key = request.correlation_id()
            outputs = [_output(n, v[lo:hi].copy()) for n, v in zip(self.outputs, result)]
            responses[i] = pb_utils.InferenceResponse(output_tensors=outputs)
            ended = self.end is not None and _input(request, self.end).any()
            if ended:
                self.memory.pop(key, None)
            else:
                self.memory[key] = (now, [v[lo:hi].copy() for v in result[len(self.outputs) :]])

    def finalize(self) -> None:
        self.memory.clear()


def _error(message: str):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
