"""The exported repositories on the real Triton Inference Server (``tritonserver`` from PyPI's nvidia-pytriton).

The wheel (a ``[dev]`` dependency on Linux x86_64) ships ``tritonserver`` 2.51 with the Python backend and its
stubs, but no onnxruntime backend. One server per module, on loopback ports, runs the Python-backend repository
(``model.py`` running the exported graph through onnxruntime) and is asked to load the onnxruntime-backend
repository. Stock tritonclient streams 16 concurrent sequences over HTTP and over gRPC; every response equals
an offline onnxruntime run of the plain exported graph with the state fed back (``rnndeploy.export`` is
checked against PyTorch elsewhere).
"""

from __future__ import annotations

import queue
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from rnndeploy import ModelConfig, SequenceModel
from rnndeploy.export import write_triton_repository

from ..tritonserver_helpers import (
    Reference,
    Request,
    _server_files,
    reference_outputs,
    start_tritonserver,
)

http = pytest.importorskip("tritonclient.http")
grpc = pytest.importorskip("tritonclient.grpc")
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

PY_MODEL, ORT_MODEL, ORT_AS_PY_MODEL = "rnn_py", "rnn_ort", "rnn_ort_config_python"
GRU_MODEL = "gru_regression_py"  # float features in, a second model of the same repository
MAX_BATCH = 16  # also the oldest strategy's candidate sequences: the 17th sequence waits for a free slot
IDLE_S = 2.0
STEPS = 8
RESPONSE_S = 120
TOL = dict(atol=1e-5, rtol=1e-4)


@dataclass
class Server:
    http_url: str
    grpc_url: str
    repo: Path
    log: Path
    references: dict[str, Reference]

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def read_config(folder: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def write_config(folder: Path, config: model_config_pb2.ModelConfig) -> None:
    (folder / "config.pbtxt").write_text(text_format.MessageToString(config))


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    _server_files()  # skips (or fails, saying why) before anything is exported
    tmp = tmp_path_factory.mktemp("tritonserver")
    torch.manual_seed(0)
    model = SequenceModel(
        ModelConfig(task="lm", cell="lstm", vocab_size=11, num_layers=2, embed_dim=6, hidden_size=5)
    ).eval()
    gru = SequenceModel(
        ModelConfig(task="regression", cell="gru", input_size=4, output_size=2, hidden_size=7)
    ).eval()
    repo = tmp / "repo"
    common = dict(max_batch_size=MAX_BATCH, max_queue_delay_us=5000, idle_timeout_us=int(IDLE_S * 1e6))
    py_folder = write_triton_repository(model, repo, PY_MODEL, backend="python", **common)
    # Exported configs prefer batches of 1 (no wait when one request is ready), so how many requests share an
    # execution depends on timing. Here Triton waits (up to 0.2 s) for all 16 sequences: model.py gets batches.
    config = read_config(py_folder)
    del config.sequence_batching.oldest.preferred_batch_size[:]
    config.sequence_batching.oldest.preferred_batch_size.append(16)
    config.sequence_batching.oldest.max_queue_delay_microseconds = 200000
    write_config(py_folder, config)
    write_triton_repository(gru, repo, GRU_MODEL, backend="python", **common)
    ort_folder = write_triton_repository(model, repo, ORT_MODEL, **common)
    # The onnxruntime repository's exact config, run by model.py: Triton's core then checks its sequence
    # batcher (controls, implicit state declarations), which the missing backend never lets it reach.
    swapped = repo / ORT_AS_PY_MODEL
    shutil.copytree(ort_folder, swapped)
    shutil.copy(repo / PY_MODEL / "1" / "model.py", swapped / "1" / "model.py")
    config = read_config(ort_folder)
    config.name, config.backend = ORT_AS_PY_MODEL, "python"
    write_config(swapped, config)
    references = {
        PY_MODEL: Reference.export(model, tmp / "lm.onnx"),
        GRU_MODEL: Reference.export(gru, tmp / "gru.onnx"),
    }

    with start_tritonserver(repo, tmp, [PY_MODEL, GRU_MODEL], explicit=True) as triton:
        yield Server(triton.http_url, triton.grpc_url, repo, triton.log, references)


# --- the streams: who sends what at which step ---


def plan(base: int) -> tuple[list[list[Request]], int]:
    """16 concurrent sequences ``base+1 .. base+16`` over ``STEPS`` steps, and the one that idles out.

    Sequences 1-13 run every step (chunks of 1-3 tokens, sequence 1's of another length); 14 ends at step 3 and 17
    starts at step 4 in the slot it frees; 15 restarts (START on the same id) at step 4; 16 stops after step 1
    and idles out. Returns the requests per step and the idle sequence's id.
    """
    rng = np.random.default_rng(base)
    steps: list[list[Request]] = []
    for t in range(STEPS):
        batch = []
        for s in range(1, 18):
            if (s == 14 and t > 3) or (s == 17 and t < 4) or (s == 16 and t > 1):
                continue
            n = 1 + (t + (s == 1)) % 3  # Triton batches equal shapes only: sequence 1 stands apart
            tokens = tuple(int(v) for v in rng.integers(0, 11, n))
            start = t == 0 or (s == 17 and t == 4) or (s == 15 and t == 4)
            end = t == STEPS - 1 or (s == 14 and t == 3)
            batch.append(Request(base + s, t, tokens, start, end))
        steps.append(batch)
    return steps, base + 16


def assert_equal_outputs(
    got: dict[str, np.ndarray], requests: list[Request], ref: Reference, how: str
) -> None:
    want = reference_outputs(ref, requests)
    assert sorted(got) == sorted(want), f"{how}: responses for {sorted(set(want) - set(got))} missing"
    for r in requests:
        np.testing.assert_allclose(
            got[r.key],
            want[r.key],
            **TOL,
            err_msg=f"{how}: sequence {r.seq} step {r.step} (start={r.start}) differs from onnxruntime offline",
        )


def _input(module, ref: Reference, tokens: tuple[int, ...]):
    x = ref.encode(tokens)
    tensor = module.InferInput("input", list(x.shape), "INT64" if x.dtype == np.int64 else "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def _inference_counts(client, model: str) -> tuple[int, int]:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


# --- tests ---


@pytest.mark.parametrize("model", [PY_MODEL, GRU_MODEL])
def test_python_backend_over_http_matches_onnxruntime(server, model):
    ref = server.references[model]
    steps, idle = plan(base=100)
    client = http.InferenceServerClient(server.http_url, concurrency=16)
    got = {}
    try:
        for batch in steps:  # one step of every sequence in flight at once, then the next step
            pending = [
                (
                    r,
                    client.async_infer(
                        model,
                        [_input(http, ref, r.tokens)],
                        sequence_id=r.seq,
                        sequence_start=r.start,
                        sequence_end=r.end,
                    ),
                )
                for r in batch
            ]
            for r, p in pending:
                got[r.key] = p.get_result(timeout=RESPONSE_S).as_numpy("output")
        requests = [r for batch in steps for r in batch]
        assert_equal_outputs(got, requests, ref, "HTTP")

        time.sleep(2 * IDLE_S + 1)  # past the idle timeout: Triton has released sequence `idle`
        with pytest.raises(InferenceServerException, match="must specify the START flag"):
            client.infer(model, [_input(http, ref, (1, 2))], sequence_id=idle)
        again = Request(idle, STEPS, (4, 5, 6), True, True)
        y = client.infer(model, [_input(http, ref, again.tokens)], sequence_id=idle, sequence_start=True)
        assert_equal_outputs({again.key: y.as_numpy("output")}, [again], ref, "HTTP after idling out")
    finally:
        client.close()


def test_python_backend_over_grpc_stream_matches_onnxruntime(server):
    ref = server.references[PY_MODEL]
    steps, idle = plan(base=200)
    client = grpc.InferenceServerClient(server.grpc_url)
    responses: queue.Queue = queue.Queue()

    def on_response(result, error):
        responses.put((result, error))

    def collect(n: int) -> dict[str, np.ndarray | InferenceServerException]:
        out: dict[str, np.ndarray | InferenceServerException] = {}
        for _ in range(n):
            try:
                result, error = responses.get(timeout=RESPONSE_S)
            except queue.Empty:
                pytest.fail(
                    f"gRPC stream: {len(out)} of {n} responses after {RESPONSE_S} s\n{server.log_tail()}"
                )
            if error is not None:
                out[f"error-{len(out)}"] = error
            else:
                out[result.get_response().id] = result.as_numpy("output")
        return out

    before = _inference_counts(client, PY_MODEL)
    client.start_stream(callback=partial(on_response))
    try:
        requests = [r for batch in steps for r in batch]
        for r in requests:  # all at once: Triton keeps each sequence's order and batches across sequences
            client.async_stream_infer(
                PY_MODEL,
                [_input(grpc, ref, r.tokens)],
                request_id=r.key,
                sequence_id=r.seq,
                sequence_start=r.start,
                sequence_end=r.end,
            )
        got = collect(len(requests))
        errors = {k: v for k, v in got.items() if k.startswith("error-")}
        assert not errors, f"gRPC stream: {len(errors)} requests failed, e.g. {next(iter(errors.values()))}"
        assert_equal_outputs(got, requests, ref, "gRPC stream")
        inferences, executions = (a - b for a, b in zip(_inference_counts(client, PY_MODEL), before))
        assert inferences == len(requests), (inferences, len(requests))
        assert executions < inferences, (
            f"Triton ran {inferences} requests in {executions} executions: model.py never got a batch"
        )

        time.sleep(2 * IDLE_S + 1)
        client.async_stream_infer(PY_MODEL, [_input(grpc, ref, (1, 2))], request_id="late", sequence_id=idle)
        (late,) = collect(1).values()
        assert isinstance(late, InferenceServerException), f"sequence {idle} did not idle out: got {late}"
        assert "must specify the START flag" in str(late), late
        again = Request(idle, STEPS, (4, 5, 6), True, True)
        client.async_stream_infer(
            PY_MODEL,
            [_input(grpc, ref, again.tokens)],
            request_id=again.key,
            sequence_id=idle,
            sequence_start=True,
            sequence_end=True,
        )
        assert_equal_outputs(collect(1), [again], ref, "gRPC after idling out")
    finally:
        client.stop_stream()
        client.close()


def test_onnxruntime_backend_repository_reaches_the_missing_backend(server):
    """How far the real server gets with the onnxruntime repository: config read, then no backend.

    Its text parses (a config Triton cannot read fails earlier, "failed to poll from model repository");
    the same config under the Python backend loads, so Triton's sequence batcher accepts its controls and
    implicit state declarations. Only the backend library is missing from this wheel (NGC images ship it).
    """
    client = http.InferenceServerClient(server.http_url)
    try:
        with pytest.raises(InferenceServerException) as failure:
            client.load_model(ORT_MODEL)
        assert "unable to find backend library for backend 'onnxruntime'" in str(failure.value), failure.value
        index = {m["name"]: m for m in client.get_model_repository_index()}
        assert index[ORT_MODEL]["state"] == "UNAVAILABLE"
        assert "unable to find backend library for backend 'onnxruntime'" in index[ORT_MODEL]["reason"]

        client.load_model(ORT_AS_PY_MODEL)
        assert client.is_model_ready(ORT_AS_PY_MODEL), server.log_tail()
        config = client.get_model_config(ORT_AS_PY_MODEL)
        seq = config["sequence_batching"]
        assert [s["input_name"] for s in seq["state"]] == [
            f"state_{s}_in" for s in server.references[PY_MODEL].state_names
        ]
        assert [c["name"] for c in seq["control_input"]] == ["START"]
        assert config["max_batch_size"] == MAX_BATCH
        client.unload_model(ORT_AS_PY_MODEL)
    finally:
        client.close()


def assert_within(ours: object, theirs: object, where: str = "config") -> None:
    """Every field of ``ours`` (a ModelConfig as JSON) is in ``theirs`` with the same value (Triton adds the
    fields it defaults)."""
    if isinstance(ours, dict):
        for key, value in ours.items():
            assert key in theirs, f"{where}.{key}"
            assert_within(value, theirs[key], f"{where}.{key}")
    elif isinstance(ours, list):
        assert len(ours) == len(theirs), where
        for i, (mine, triton) in enumerate(zip(ours, theirs)):
            assert_within(mine, triton, f"{where}[{i}]")
    else:  # protobuf's JSON writes 64-bit integers as strings, Triton's sometimes as numbers
        assert str(ours) == str(theirs), where


def test_repository_reader_agrees_with_tritonserver(server):
    """rnndeploy.server.repository reads the repository as the real server does (index and configs)."""
    from google.protobuf.json_format import MessageToDict

    from rnndeploy.server.repository import read_repository

    repository = read_repository(server.repo)
    client = http.InferenceServerClient(server.http_url)
    try:
        assert sorted(m["name"] for m in client.get_model_repository_index()) == sorted(repository)
        client.load_model(ORT_AS_PY_MODEL)  # the onnxruntime config, with its implicit state declarations
        for name in (PY_MODEL, GRU_MODEL, ORT_AS_PY_MODEL):
            ours, theirs = repository[name], client.get_model_config(name)
            assert_within(MessageToDict(ours.config, preserving_proto_field_name=True), theirs, name)
            tseq = theirs["sequence_batching"]
            assert ours.idle_timeout_us == int(tseq["max_sequence_idle_microseconds"])
            assert ours.max_queue_delay_us == int(tseq["oldest"]["max_queue_delay_microseconds"])
            assert [(c.name, c.kind, list(c.false_true)) for c in ours.controls] == [
                (c["name"], c["control"][0]["kind"], c["control"][0]["int32_false_true"])
                for c in tseq["control_input"]
            ]
        assert len(repository[ORT_AS_PY_MODEL].sequence_batching.state) == 2  # h and c
        client.unload_model(ORT_AS_PY_MODEL)
    finally:
        client.close()
