"""`rnndeploy serve DIR` against the real `tritonserver --model-repository DIR`: one client script, both servers.

The repository is what `rnndeploy export --triton-repo --triton-backend python` writes, with two models (an
LSTM language model in versions 1 and 2, ``version_policy: all``, and a GRU regressor). The same function,
stock tritonclient over HTTP and over one gRPC stream, runs against each server: model metadata and config,
the repository index, concurrent sequences of every model and version (one restarted on its own id), a
sequence that was never started and one that idles out, each version's statistics. Both servers' answers must
be equal, and every output must equal an offline onnxruntime run of the model's plain exported graph with the
state fed back.
"""

from __future__ import annotations

import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from rnndeploy import ModelConfig, SequenceModel
from rnndeploy.export import write_triton_repository

from ..tritonserver_helpers import (
    Reference,
    Request,
    free_port,
    reference_outputs,
    start_tritonserver,
)

http = pytest.importorskip("tritonclient.http")
grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

IDLE_S = 2.0  # max_sequence_idle_microseconds / 1e6 in every config
STEPS = 4
RESPONSE_S = 60
STARTUP_S = 60
TOL = dict(atol=1e-5, rtol=1e-4)
NOT_STARTED = "must specify the START flag on the first request of the sequence"
# (model, version: "" for the latest) of each sequence of a run, ids base + 1, base + 2, ...
ROUTES = [
    ("lm", ""),
    ("lm", ""),
    ("lm", "1"),
    ("lm", "1"),
    ("lm", "2"),
    ("gru", ""),
    ("gru", ""),
    ("gru", "1"),
]
RESTARTED = 2  # this sequence (base + 2) starts again on its own id at step 2


@dataclass
class Repository:
    path: Path
    references: dict[tuple[str, str], Reference]  # (model, version) -> the plain graph


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Repository:
    tmp = tmp_path_factory.mktemp("serve-repository")
    repo = tmp / "repo"
    common = dict(max_batch_size=8, max_queue_delay_us=2000, idle_timeout_us=int(IDLE_S * 1e6))
    torch.manual_seed(0)
    lm1, lm2 = (
        SequenceModel(
            ModelConfig(task="lm", cell="lstm", vocab_size=11, num_layers=2, embed_dim=6, hidden_size=5)
        ).eval()
        for _ in range(2)
    )
    gru = SequenceModel(
        ModelConfig(task="regression", cell="gru", input_size=4, output_size=2, hidden_size=7)
    ).eval()
    folder = write_triton_repository(lm1, repo, "lm", backend="python", **common)
    second = write_triton_repository(lm2, tmp / "lm2", "lm", backend="python", **common)
    shutil.copytree(second / "1", folder / "2")
    config = folder / "config.pbtxt"
    config.write_text(config.read_text() + "version_policy: { all { } }\n")
    write_triton_repository(gru, repo, "gru", backend="python", **common)
    references = {
        ("lm", "1"): Reference.export(lm1, tmp / "lm1.onnx"),
        ("lm", "2"): Reference.export(lm2, tmp / "lm2.onnx"),
        ("gru", "1"): Reference.export(gru, tmp / "gru.onnx"),
    }
    return Repository(repo, references)


@dataclass
class Urls:
    http: str  # "127.0.0.1:port"
    grpc: str


@pytest.fixture(scope="module")
def rnndeploy_serve(repository) -> Urls:
    """``rnndeploy serve DIR`` in a subprocess, ended by its id."""
    command = [sys.executable, "-m", "rnndeploy", "serve", str(repository.path), "--port", "0"]
    command += ["--grpc-port", str(free_port()), "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    printed: list[str] = []
    deadline = time.monotonic() + STARTUP_S
    try:
        while not printed or "Stop with" not in printed[-1]:
            try:
                printed.append(lines.get(timeout=max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                process.kill()
                pytest.fail(f"rnndeploy serve not ready; printed {printed}, stderr {process.stderr.read()}")
        text = "".join(printed)
        health = re.search(r"HTTP health: http://(\S+)/v2/health/ready", text)
        grpc_address = re.search(r"gRPC \(KServe v2, streaming\): (\S+)", text)
        assert health and grpc_address, text
        for model, versions in (("lm", "1, 2"), ("gru", "1")):
            assert f"model '{model}' (versions {versions})" in text, text
        yield Urls(health.group(1), grpc_address.group(1))
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(20)


@pytest.fixture(scope="module")
def tritonserver(repository, tmp_path_factory) -> Urls:
    with start_tritonserver(
        repository.path, tmp_path_factory.mktemp("tritonserver"), ["lm", "gru"]
    ) as server:
        yield Urls(server.http_url, server.grpc_url)


# --- the client script: the same for both servers ---


def plan(base: int, repo: Repository) -> list[tuple[str, str, Request]]:
    """``STEPS`` steps of each sequence of ``ROUTES`` (ids ``base + 1, ...``), in the order they are sent."""
    rng = np.random.default_rng(base)
    out = []
    for step in range(STEPS):
        for i, (model, version) in enumerate(ROUTES, start=1):
            n = 1 + (step + i) % 3
            tokens = tuple(int(v) for v in rng.integers(0, 11, n))
            start = step == 0 or (i == RESTARTED and step == 2)
            out.append((model, version, Request(base + i, step, tokens, start, step == STEPS - 1)))
    return out


def _input(module, ref: Reference, tokens: tuple[int, ...]):
    x = ref.encode(tokens)
    tensor = module.InferInput("input", list(x.shape), "INT64" if x.dtype == np.int64 else "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def _reference(repo: Repository, model: str, version: str) -> Reference:
    return repo.references[(model, version or max(v for m, v in repo.references if m == model))]


def config_fields(config: dict) -> dict:
    """What a model config says of the fields rnndeploy serve reads (64-bit integers arrive as JSON strings)."""

    def tensors(key: str) -> list:
        return [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in config.get(key, [])]

    seq = config.get("sequence_batching", {})
    return {
        "name": config["name"],
        "backend": config["backend"],
        "max_batch_size": config["max_batch_size"],
        "input": tensors("input"),
        "output": tensors("output"),
        "idle_us": int(seq.get("max_sequence_idle_microseconds", 0)),
    }


@dataclass
class Answers:
    metadata: dict  # (protocol, model, version) -> metadata
    config: dict  # (protocol, model, version) -> the config fields rnndeploy reads
    index: dict  # protocol -> repository index
    outputs: dict  # (protocol, request key) -> (model_version answered, output)
    refusals: dict  # what -> error message
    counts: dict  # (protocol, model, version) -> inference_count of the version's statistics


def client_script(urls: Urls, repo: Repository) -> Answers:
    """What a Triton user's client does; it knows nothing of the server it talks to."""
    answers = Answers({}, {}, {}, {}, {}, {})
    client = http.InferenceServerClient(urls.http, concurrency=len(ROUTES))
    stream_client = grpc.InferenceServerClient(urls.grpc)
    responses: queue.Queue = queue.Queue()
    try:
        for model, version in (("lm", ""), ("lm", "1"), ("gru", "")):
            answers.metadata[("http", model, version)] = client.get_model_metadata(model, version)
            answers.metadata[("grpc", model, version)] = stream_client.get_model_metadata(
                model, version, as_json=True
            )
            answers.config[("http", model, version)] = config_fields(client.get_model_config(model, version))
            answers.config[("grpc", model, version)] = config_fields(
                stream_client.get_model_config(model, version, as_json=True)["config"]
            )
        answers.index["http"] = client.get_model_repository_index()
        answers.index["grpc"] = stream_client.get_model_repository_index(as_json=True)

        # sequences that idle out: one step now, another after the idle timeout
        idle_http, idle_grpc = 901, 902
        ref = _reference(repo, "lm", "")
        client.infer("lm", [_input(http, ref, (1, 2))], sequence_id=idle_http, sequence_start=True)
        stream_client.infer("lm", [_input(grpc, ref, (1, 2))], sequence_id=idle_grpc, sequence_start=True)
        idle_since = time.monotonic()

        requests = plan(100, repo)  # HTTP: every sequence's step in flight at once, then the next step
        for step in range(STEPS):
            pending = [
                (r, client.async_infer(
                    model, [_input(http, _reference(repo, model, version), r.tokens)], model_version=version,
                    sequence_id=r.seq, sequence_start=r.start, sequence_end=r.end,
                ))
                for model, version, r in requests
                if r.step == step
            ]  # fmt: skip
            for r, p in pending:
                result = p.get_result(timeout=RESPONSE_S)
                answers.outputs[("http", r.key)] = (
                    result.get_response()["model_version"],
                    result.as_numpy("output"),
                )

        stream_client.start_stream(callback=lambda result, error: responses.put((result, error)))
        requests = plan(200, repo)  # gRPC: all requests down one stream at once
        for model, version, r in requests:
            stream_client.async_stream_infer(
                model, [_input(grpc, _reference(repo, model, version), r.tokens)], model_version=version,
                request_id=r.key, sequence_id=r.seq, sequence_start=r.start, sequence_end=r.end,
            )  # fmt: skip
        for _ in requests:
            result, error = responses.get(timeout=RESPONSE_S)
            assert error is None, f"gRPC stream: a request failed: {error}"
            response = result.get_response()
            answers.outputs[("grpc", response.id)] = (response.model_version, result.as_numpy("output"))

        def refused(what: str, send) -> None:
            try:
                send()
            except InferenceServerException as error:
                answers.refusals[what] = error.message()
            else:
                answers.refusals[what] = None

        never = _input(http, ref, (3,))
        refused("http never started", lambda: client.infer("lm", [never], sequence_id=903))
        stream_client.async_stream_infer("lm", [_input(grpc, ref, (3,))], request_id="never", sequence_id=904)
        result, error = responses.get(timeout=RESPONSE_S)
        answers.refusals["grpc never started"] = None if error is None else error.message()

        time.sleep(max(2 * IDLE_S + 1 - (time.monotonic() - idle_since), 0))
        refused("http idled out", lambda: client.infer("lm", [never], sequence_id=idle_http))
        stream_client.async_stream_infer(
            "lm", [_input(grpc, ref, (3,))], request_id="idle", sequence_id=idle_grpc
        )
        result, error = responses.get(timeout=RESPONSE_S)
        answers.refusals["grpc idled out"] = None if error is None else error.message()
        for model, version in (("lm", "1"), ("lm", "2"), ("gru", "1")):
            stats = client.get_inference_statistics(model, version)["model_stats"]
            answers.counts[("http", model, version)] = [int(m["inference_count"]) for m in stats]
            stats = stream_client.get_inference_statistics(model, version, as_json=True)["model_stats"]
            answers.counts[("grpc", model, version)] = [int(m.get("inference_count", 0)) for m in stats]
    finally:
        stream_client.stop_stream()
        stream_client.close()
        client.close()
    return answers


@pytest.fixture(scope="module")
def answers(repository, rnndeploy_serve, tritonserver) -> dict[str, Answers]:
    return {
        "rnndeploy serve": client_script(rnndeploy_serve, repository),
        "tritonserver": client_script(tritonserver, repository),
    }


# --- tests ---


def test_metadata_config_and_repository_index_as_triton_answers(answers):
    ours, triton = answers["rnndeploy serve"], answers["tritonserver"]
    for key, theirs in triton.metadata.items():
        assert ours.metadata[key] == theirs, f"model metadata {key}"
    assert ours.metadata[("http", "lm", "")]["versions"] == ["1", "2"]
    assert ours.metadata[("http", "lm", "")]["inputs"] == [
        {"name": "input", "datatype": "INT64", "shape": [-1, -1]}
    ]
    assert ours.index == triton.index
    assert ours.config == triton.config
    assert ours.config[("grpc", "gru", "")]["input"] == [("input", "TYPE_FP32", [-1, 4])]
    assert [(m["name"], m["version"], m["state"]) for m in ours.index["http"]] == [
        ("gru", "1", "READY"),
        ("lm", "1", "READY"),
        ("lm", "2", "READY"),
    ]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_same_outputs_from_both_servers_and_onnxruntime(answers, repository, protocol):
    base = 100 if protocol == "http" else 200
    requests = plan(base, repository)
    by_sequence = {}
    for model, version, r in requests:
        by_sequence.setdefault((model, version), []).append(r)
    want = {}
    for (model, version), group in by_sequence.items():
        for key, y in reference_outputs(_reference(repository, model, version), group).items():
            want[key] = (version or max(v for m, v in repository.references if m == model), y)
    for server, got in answers.items():
        keys = sorted(k for p, k in got.outputs if p == protocol)
        assert keys == sorted(want), (
            f"{server} {protocol}: responses missing for {sorted(set(want) - set(keys))}"
        )
        for model, version, r in requests:
            answered, y = got.outputs[(protocol, r.key)]
            where = f"{server} {protocol}: model {model} version {version or 'latest'} sequence {r.seq} step {r.step}"
            assert answered == want[r.key][0], f"{where}: answered as version {answered}"
            np.testing.assert_allclose(
                y, want[r.key][1], **TOL, err_msg=f"{where} differs from onnxruntime offline"
            )
    ours, triton = answers["rnndeploy serve"].outputs, answers["tritonserver"].outputs
    for _, _, r in requests:
        np.testing.assert_allclose(
            ours[(protocol, r.key)][1], triton[(protocol, r.key)][1], **TOL, err_msg=r.key
        )


def test_sequences_not_started_or_idled_out_are_refused_alike(answers):
    for server, got in answers.items():
        assert set(got.refusals) == {
            "http never started",
            "grpc never started",
            "http idled out",
            "grpc idled out",
        }
        for what, message in got.refusals.items():
            assert message is not None, f"{server}: {what}: answered instead of refused"
            assert NOT_STARTED in message, f"{server}: {what}: {message}"


def test_statistics_count_the_same_inferences(answers, repository):
    ours, triton = answers["rnndeploy serve"], answers["tritonserver"]
    assert ours.counts == triton.counts
    per_route = {route: ROUTES.count(route) * STEPS * 2 for route in set(ROUTES)}  # HTTP and gRPC runs
    lm2 = per_route[("lm", "")] + per_route[("lm", "2")] + 2  # and the two sequences that idled out
    assert ours.counts[("http", "lm", "2")] == [lm2], ours.counts
