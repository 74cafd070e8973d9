"""gRPC (KServe v2 / Triton's GRPCInferenceService) beside HTTP on one server, through stock tritonclient.grpc,
and the Prometheus page; outputs are compared with offline onnxruntime runs from zero state."""

import queue
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from rnndeploy.runtime import StreamingSession, testing
from rnndeploy.server import Limits

from ._support import TOL, offline, running

V, H = 9, 7


@pytest.fixture(scope="module")
def lm_bytes():
    return testing.lstm_lm(hidden_size=H, num_layers=2).SerializeToString()


def token(value: int, client=grpcclient) -> grpcclient.InferInput:
    tensor = client.InferInput("input", [1, 1], "INT64")
    tensor.set_data_from_numpy(np.array([[value]], np.int64))
    return tensor


class Stream:
    """One tritonclient.grpc client with its stream; ``send`` waits for the reply (result or error)."""

    def __init__(self, address: str) -> None:
        self.client = grpcclient.InferenceServerClient(address)
        self.replies: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.replies.put((result, error)))

    def send(self, value: int, sequence_id, **flags):
        self.client.async_stream_infer("lm", [token(value)], sequence_id=sequence_id, **flags)
        return self.replies.get(timeout=30)

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def test_every_grpc_method(lm_bytes):
    with running(StreamingSession(lm_bytes), idle_timeout_s=30, grpc=True) as served:
        address = served.grpc
        client = grpcclient.InferenceServerClient(address)
        assert client.is_server_live() and client.is_server_ready()
        assert (
            client.is_model_ready("lm")
            and client.is_model_ready("lm", "1")
            and not client.is_model_ready("x")
        )
        metadata = client.get_server_metadata(as_json=True)
        assert metadata["name"] == "rnndeploy" and metadata["extensions"] == [
            "binary_tensor_data",
            "sequence",
        ]
        model = client.get_model_metadata("lm", as_json=True)
        assert model["inputs"] == [{"name": "input", "datatype": "INT64", "shape": ["-1", "-1"]}]
        assert model["outputs"] == [{"name": "output", "datatype": "FP32", "shape": ["-1", "-1", "9"]}]
        config = client.get_model_config("lm", as_json=True)["config"]
        assert config["name"] == "lm" and config["input"][0]["data_type"] == "TYPE_INT64"
        assert config["sequence_batching"]["max_sequence_idle_microseconds"] == "30000000"
        with pytest.raises(InferenceServerException, match="unknown model 'x'") as error:
            client.get_model_metadata("x")
        assert error.value.status() == "StatusCode.NOT_FOUND"
        tokens = [[3, 1, 4]]
        got = [
            client.infer(
                "lm", [token(t)], sequence_id=2**63 - 1, sequence_start=i == 0, sequence_end=i == 2
            ).as_numpy("output")[0, 0]
            for i, t in enumerate(tokens[0])
        ]
        np.testing.assert_allclose(np.array(got), offline(lm_bytes, tokens)[0], **TOL)
        (stats,) = client.get_inference_statistics("lm", as_json=True)["model_stats"]
        assert stats["inference_count"] == "3" and stats["inference_stats"]["success"]["count"] == "3"
        with pytest.raises(InferenceServerException) as error:
            client.infer("lm", [token(1)], sequence_id=5)
        assert (
            error.value.status() == "StatusCode.INVALID_ARGUMENT"
            and "unknown sequence 5" in error.value.message()
        )
        stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest())
        assert [(m.name, m.version, m.state) for m in index.models] == [("lm", "1", "READY")]
        with pytest.raises(grpc.RpcError) as error:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="lm"))
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED


def typed_request(contents: dict, datatype="INT64", shape=(1, 2), **parameters) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="lm")
    tensor = request.inputs.add(name="input", datatype=datatype, shape=list(shape))
    for field, values in contents.items():
        getattr(tensor.contents, field).extend(values)
    for key, value in parameters.items():
        kind = {bool: "bool_param", int: "int64_param", str: "string_param", float: "double_param"}[
            type(value)
        ]
        setattr(request.parameters[key], kind, value)
    return request


def test_typed_contents_raw_contents_and_refusals(lm_bytes):
    limits = Limits(max_rows=2, max_sequences=1)
    with running(StreamingSession(lm_bytes), limits=limits, grpc=True) as served:
        _, address, core = served.http, served.grpc, served.core
        stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))
        reply = stub.ModelInfer(typed_request({"int64_contents": [2, 5]}))
        (output,) = reply.outputs
        assert output.datatype == "FP32" and list(output.shape) == [1, 2, V]
        got = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(1, 2, V)
        np.testing.assert_allclose(got, offline(lm_bytes, [[2, 5]]), **TOL)
        raw = typed_request({})
        raw.raw_input_contents.append(np.array([[2, 5]], np.int64).tobytes())
        np.testing.assert_allclose(
            np.frombuffer(stub.ModelInfer(raw).raw_output_contents[0], np.float32).reshape(1, 2, V),
            got,
            **TOL,
        )
        refusals = [
            (typed_request({"int64_contents": [2, 99]}), grpc.StatusCode.INVALID_ARGUMENT, "token id 99"),
            (typed_request({"int64_contents": [2]}), grpc.StatusCode.INVALID_ARGUMENT, "data has 1 elements"),
            (
                typed_request({"fp32_contents": [1.0, 2.0]}, "FP32"),
                grpc.StatusCode.INVALID_ARGUMENT,
                "dtype int64",
            ),
            (typed_request({}, "FP16"), grpc.StatusCode.INVALID_ARGUMENT, "must come in raw_input_contents"),
            (
                typed_request({"int64_contents": [1] * 3}, shape=(3, 1)),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "max_rows=2",
            ),
            (
                typed_request({"int64_contents": [1, 1]}, sequence_id=0, sequence_start=True),
                grpc.StatusCode.INVALID_ARGUMENT,
                "sequence_id 0 is not a valid sequence id",
            ),
            (
                typed_request({"int64_contents": [1, 1]}, sequence_id=1.5),
                grpc.StatusCode.INVALID_ARGUMENT,
                "unsigned integer or a string",
            ),
        ]
        mismatch = typed_request({})
        mismatch.raw_input_contents.extend([b"", b""])
        refusals.append((mismatch, grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents has 2 entries"))
        wrong_model = typed_request({"int64_contents": [1, 1]})
        wrong_model.model_name = "nope"
        refusals.append((wrong_model, grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"))
        stub.ModelInfer(typed_request({"int64_contents": [1, 1]}, sequence_id="a", sequence_start=True))
        refusals.append(
            (
                typed_request({"int64_contents": [1, 1]}, sequence_id="b", sequence_start=True),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "max_sequences=1",
            )
        )
        for request, code, message in refusals:
            with pytest.raises(grpc.RpcError) as error:
                stub.ModelInfer(request)
            assert error.value.code() == code and message in error.value.details(), error.value
        assert list(core.batcher.live) == ["a"] and core.session.streams == ["a"]


def test_a_malformed_request_inside_a_stream_leaves_it_open(lm_bytes):
    with running(StreamingSession(lm_bytes), grpc=True) as served:
        _, address, core = served.http, served.grpc, served.core
        stream = Stream(address)
        tokens = [[1, 2, 3]]
        outputs = [stream.send(1, "s", sequence_start=True)]
        result, error = stream.send(99, "s")
        assert result is None and "token id 99 is outside the model's vocabulary" in str(error)
        result, error = stream.send(2, "never-started")
        assert result is None and "unknown sequence 'never-started'" in str(error)
        outputs.append(stream.send(2, "s"))
        outputs.append(stream.send(3, "s", sequence_end=True))
        stream.close()
        assert all(error is None for _, error in outputs), outputs
        got = np.array([result.as_numpy("output")[0, 0] for result, _ in outputs])
        np.testing.assert_allclose(got, offline(lm_bytes, tokens)[0], **TOL)
        assert core.batcher.live == {} and core.session.streams == []


def test_a_cancelled_stream_keeps_its_sequence_until_it_ends_or_idles_out(lm_bytes):
    with running(StreamingSession(lm_bytes), idle_timeout_s=1.0, grpc=True) as served:
        http, address, core = served.http, served.grpc, served.core
        stream = Stream(address)
        kept = [stream.send(t, "kept", sequence_start=t == 4)[0].as_numpy("output")[0, 0] for t in (4, 5)]
        stream.send(6, "abandoned", sequence_start=True)
        stream.close(cancel=True)
        assert set(core.batcher.live) == set(core.session.streams) == {"kept", "abandoned"}
        # The sequence continues over HTTP (or a new stream) from the state it had.
        client = httpclient.InferenceServerClient(http)
        last = client.infer("lm", [token(7, httpclient)], sequence_id="kept", sequence_end=True)
        kept.append(last.as_numpy("output")[0, 0])
        np.testing.assert_allclose(np.array(kept), offline(lm_bytes, [[4, 5, 7]])[0], **TOL)
        deadline = time.monotonic() + 30  # a bound on the test, not a measurement: eviction runs each 0.25 s
        while core.batcher.live or core.session.streams:
            assert time.monotonic() < deadline, (core.batcher.live, core.session.streams)
            time.sleep(0.05)
        assert core.batcher.evicted == 1 and core.batcher.ended == 1


def test_32_sequences_streamed_and_unary_mixed_with_http_no_cross_talk(lm_bytes):
    """16 gRPC streams, 16 unary gRPC sequences and 8 HTTP sequences, 200 steps each, all at once: outputs
    equal offline runs, and batches mix steps that came by both protocols."""
    session = StreamingSession(lm_bytes)
    batches: list[set] = []
    step_many = session.step_many

    def recording(xs):
        batches.append({type(s).__name__ for s in xs})
        return step_many(xs)

    session.step_many = recording
    S, T = 40, 200
    tokens = np.random.default_rng(0).integers(0, V, (S, T))
    got = np.full((S, T, V), np.nan, np.float32)
    with running(session, max_queue_delay_us=2000, grpc=True) as served:
        http, address, core = served.http, served.grpc, served.core

        def sequence(s: int) -> None:
            flags = [{"sequence_start": t == 0, "sequence_end": t == T - 1} for t in range(T)]
            if s < 16:  # gRPC stream; integer ids
                stream = Stream(address)
                for t in range(T):
                    result, error = stream.send(int(tokens[s, t]), 1000 + s, **flags[t])
                    assert error is None, error
                    got[s, t] = result.as_numpy("output")[0, 0]
                stream.close()
            elif s < 32:  # gRPC unary; integer ids
                client = grpcclient.InferenceServerClient(address)
                for t in range(T):
                    result = client.infer("lm", [token(int(tokens[s, t]))], sequence_id=1000 + s, **flags[t])
                    got[s, t] = result.as_numpy("output")[0, 0]
            else:  # HTTP; string ids
                client = httpclient.InferenceServerClient(http)
                for t in range(T):
                    tensor = token(int(tokens[s, t]), httpclient)
                    result = client.infer("lm", [tensor], sequence_id=f"h{s}", **flags[t])
                    got[s, t] = result.as_numpy("output")[0, 0]

        with ThreadPoolExecutor(S) as pool:
            list(pool.map(sequence, range(S)))
        assert core.batcher.steps_run == S * T and core.batcher.live == {} and session.streams == []
    np.testing.assert_allclose(got, offline(lm_bytes, tokens), **TOL)
    assert any(kinds == {"int", "str"} for kinds in batches), "no batch held both gRPC and HTTP steps"


# Every family /metrics writes: its type as Triton writes it (counters without _total for Triton's names)
METRIC_TYPES = {
    **dict.fromkeys(
        [
            "nv_inference_request_success",
            "nv_inference_request_failure",
            "nv_inference_count",
            "nv_inference_exec_count",
            *(
                f"nv_inference_{n}_duration_us"
                for n in ("request", "queue", "compute_input", "compute_infer")
            ),
            "nv_inference_compute_output_duration_us",
            "rnndeploy_sequences_started_total",
            "rnndeploy_sequences_ended_total",
            "rnndeploy_sequences_evicted_total",
            "rnndeploy_rejected_requests_total",
        ],
        "counter",
    ),
    "nv_inference_pending_request_count": "gauge",
    "rnndeploy_live_sequences": "gauge",
    "rnndeploy_batch_size": "histogram",
}
SAMPLE_SUFFIXES = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def check_exposition(text: str) -> None:
    """Each family's # TYPE line names its samples, as Triton writes them (Prometheus files a family whose
    samples are named otherwise as untyped), and prometheus_client's parser reads every family typed."""
    declared, family = {}, None
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            family, kind = line.split()[2:]
            declared[family] = kind
        elif not line.startswith("#"):
            name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group()
            assert name in {family + s for s in SAMPLE_SUFFIXES[declared[family]]}, (family, line)
    assert declared == METRIC_TYPES
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    assert {f.name: f.type for f in parsed.values()} == {
        name.removesuffix("_total") if kind == "counter" else name: kind
        for name, kind in METRIC_TYPES.items()
    }
    for f in parsed.values():
        suffixes = ("_total",) if f.type == "counter" else SAMPLE_SUFFIXES[f.type]
        assert f.samples and {s.name for s in f.samples} <= {f.name + x for x in suffixes}, f


def metric_values(text: str) -> dict:
    """``{(sample name as written, labels other than model and version): value}``."""
    check_exposition(text)
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k not in ("model", "version")))
            assert sample.labels.get("model") == "lm" and sample.labels.get("version") == "1", sample
            name = sample.name
            if family.type == "counter" and family.name in METRIC_TYPES:  # the parser added _total
                name = family.name
            values[(name, labels)] = sample.value
    return values


def test_metrics_count_exactly_over_both_protocols(lm_bytes):
    limits = Limits(max_rows=1)
    with running(StreamingSession(lm_bytes), limits=limits, grpc=True) as served:
        http, address = served.http, served.grpc
        base = f"http://{http}/v2/models/lm/infer"

        def body(value, rows=1, **parameters):
            data = [[value]] * rows
            tensor = {"name": "input", "datatype": "INT64", "shape": [rows, 1], "data": data}
            return {"inputs": [tensor], "parameters": parameters}

        good_http = [
            body(1, sequence_id=1, sequence_start=True),
            body(2, sequence_id=1),
            body(3, sequence_id=1, sequence_end=True),
        ]
        bad_http = [body(1, sequence_id=77), body(1, rows=2)]  # unknown sequence; over max_rows
        for request in good_http:
            assert httpx.post(base, json=request).status_code == 200
        assert [httpx.post(base, json=r).status_code for r in bad_http] == [400, 413]
        assert httpx.post("http://" + http + "/v2/models/other/infer", json=good_http[0]).status_code == 404
        client = grpcclient.InferenceServerClient(address)
        client.infer("lm", [token(1)])
        client.infer("lm", [token(2)])
        with pytest.raises(InferenceServerException):
            client.infer("lm", [token(50)])
        stream = Stream(address)
        assert stream.send(1, "s", sequence_start=True)[1] is None
        assert stream.send(2, "s", sequence_end=True)[1] is None
        assert stream.send(2, "s")[1] is not None  # ended: unknown sequence
        stream.close()
        page = httpx.get(f"http://{http}/metrics")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
        values = metric_values(page.text)
    assert "nv_inference_request_success{" in page.text, "Triton's name, without _total"
    assert values[("nv_inference_request_success", ())] == 7
    assert values[("nv_inference_request_failure", ())] == 4  # the unknown model is not this model's
    assert values[("nv_inference_count", ())] == 7
    executions = values[("nv_inference_exec_count", ())]
    assert 1 <= executions <= 7
    assert values[("rnndeploy_batch_size_count", ())] == executions
    assert values[("rnndeploy_batch_size_sum", ())] == 7
    assert values[("rnndeploy_rejected_requests_total", (("limit", "max_rows"),))] == 1
    assert values[("rnndeploy_sequences_started_total", ())] == 2
    assert values[("rnndeploy_sequences_ended_total", ())] == 2
    assert values[("rnndeploy_live_sequences", ())] == 0
    assert values[("nv_inference_pending_request_count", ())] == 0
    for name in ("request", "queue", "compute_input", "compute_infer", "compute_output"):
        assert values[(f"nv_inference_{name}_duration_us", ())] > 0, name


def test_a_step_in_flight_when_its_stream_is_cancelled_runs_and_is_accounted(lm_bytes):
    """The stream is cancelled while the first step of its sequence runs in the worker: the step still runs,
    the sequence stays live with the state it made (no stream left in the session that the live table does
    not know), a later step continues it, and it idles out."""
    session = StreamingSession(lm_bytes)
    gate, entered = threading.Event(), threading.Event()
    step_many = session.step_many

    calls = []

    def gated(xs):
        calls.append(xs)
        if len(calls) == 1:  # the first step of 'slow'
            entered.set()
            assert gate.wait(30), "the test never opened the gate"
        return step_many(xs)

    session.step_many = gated
    with running(session, idle_timeout_s=1.0, grpc=True) as served:
        http, address, core = served.http, served.grpc, served.core
        stream = Stream(address)
        stream.client.async_stream_infer("lm", [token(1)], sequence_id="slow", sequence_start=True)
        assert entered.wait(30)
        stream.close(cancel=True)
        gate.set()
        deadline = time.monotonic() + 30  # a bound on the test, not a measurement
        while core.batcher.steps_run < 1 or "slow" not in session.streams or core.batcher.pending:
            assert time.monotonic() < deadline, "the cancelled step never ran"
            time.sleep(0.02)
        assert set(core.batcher.live) == set(session.streams) == {"slow"}
        client = httpclient.InferenceServerClient(http)
        last = client.infer("lm", [token(3, httpclient)], sequence_id="slow").as_numpy("output")[0, 0]
        np.testing.assert_allclose(last, offline(lm_bytes, [[1, 3]])[0, -1], **TOL)
        while core.batcher.live or session.streams:
            assert time.monotonic() < deadline, (core.batcher.live, session.streams)
            time.sleep(0.05)
        assert core.batcher.evicted == 1


def test_a_grpc_message_over_the_body_limit_is_resource_exhausted(lm_bytes):
    with running(StreamingSession(lm_bytes), limits=Limits(max_body_bytes=4096), grpc=True) as served:
        _, address, core = served.http, served.grpc, served.core
        stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))
        big = typed_request({}, shape=(1, 1000))
        big.raw_input_contents.append(np.zeros((1, 1000), np.int64).tobytes())
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(big)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.value
        assert core.batcher.batches_run == 0
        small = typed_request({"int64_contents": [1, 2]})
        assert list(stub.ModelInfer(small).outputs[0].shape) == [1, 2, V]


def test_one_stream_carries_many_sequences_in_order_and_batches_them(lm_bytes):
    """8 sequences x 20 steps sent down one stream without waiting for replies: every answer equals the
    offline run, each sequence's answers arrive in its order, and steps of different sequences share batches."""
    S, T = 8, 20
    tokens = np.random.default_rng(3).integers(0, V, (S, T))
    with running(StreamingSession(lm_bytes), max_queue_delay_us=2000, grpc=True) as served:
        client = grpcclient.InferenceServerClient(served.grpc)
        replies: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: replies.put((result, error)))
        for t in range(T):
            for s in range(S):
                flags = {"sequence_start": t == 0, "sequence_end": t == T - 1}
                client.async_stream_infer(
                    "lm", [token(int(tokens[s, t]))], request_id=f"{s}-{t}", sequence_id=s + 1, **flags
                )
        got, order = np.full((S, T, V), np.nan, np.float32), {s: [] for s in range(S)}
        for _ in range(S * T):
            result, error = replies.get(timeout=60)
            assert error is None, error
            s, t = map(int, result.get_response().id.split("-"))
            got[s, t] = result.as_numpy("output")[0, 0]
            order[s].append(t)
        client.stop_stream()
        assert all(order[s] == list(range(T)) for s in range(S)), order
        assert max(served.core.batcher.batch_sizes) > 1, served.core.batcher.batch_sizes
        assert served.core.batcher.live == {} and served.core.session.streams == []
    np.testing.assert_allclose(got, offline(lm_bytes, tokens), **TOL)


def test_a_stream_that_never_waits_is_read_no_further_than_its_in_flight_cap(lm_bytes, monkeypatch):
    from rnndeploy.server import grpc_service

    monkeypatch.setattr(grpc_service, "STREAM_IN_FLIGHT", 4)
    session = StreamingSession(lm_bytes)
    queued_at_batches: list[int] = []
    step_many = session.step_many
    with running(session, grpc=True) as served:
        batcher = served.core.batcher

        def sampling(xs):
            if not queued_at_batches:  # hold the first batch while the client floods the stream
                deadline = time.monotonic() + 2  # bounded: with the cap the queue never reaches 10
                while batcher.pending < 10 and time.monotonic() < deadline:
                    time.sleep(0.01)
            queued_at_batches.append(batcher.pending)
            return step_many(xs)

        session.step_many = sampling
        client = grpcclient.InferenceServerClient(served.grpc)
        replies: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: replies.put(error))
        for s in range(40):
            client.async_stream_infer(
                "lm", [token(s % V)], sequence_id=s + 1, sequence_start=True, sequence_end=True
            )
        assert all(replies.get(timeout=60) is None for _ in range(40))
        client.stop_stream()
    assert max(queued_at_batches) <= 3, queued_at_batches  # 4 in flight: one running, three queued


def test_calls_beyond_the_cap_are_resource_exhausted_and_the_open_streams_go_on(lm_bytes):
    """With max_grpc_calls=2, two open streams hold both calls: a third stream and a unary call are refused with
    RESOURCE_EXHAUSTED at once; the two streams keep answering exactly; once one closes, a new call is served."""
    session = StreamingSession(lm_bytes)
    with running(session, grpc=True, max_grpc_calls=2) as served:
        streams = [Stream(served.grpc) for _ in range(2)]
        tokens = {0: [1, 2, 3], 1: [4, 5, 6]}
        got = {k: [] for k in tokens}
        for k, stream in enumerate(streams):  # both streams open and answering
            result, error = stream.send(tokens[k][0], sequence_id=10 + k, sequence_start=True)
            assert error is None, error
            got[k].append(result.as_numpy("output"))
        stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(served.grpc))
        refused = typed_request({"int64_contents": [1, 2]})
        with pytest.raises(grpc.RpcError) as error:
            list(stub.ModelStreamInfer(iter([refused]), timeout=30))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.value
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(refused, timeout=30)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.value
        for k, stream in enumerate(streams):  # the open streams go on
            for value in tokens[k][1:]:
                result, error = stream.send(value, sequence_id=10 + k)
                assert error is None, error
                got[k].append(result.as_numpy("output"))
        for k in tokens:
            want = offline(lm_bytes, np.array([tokens[k]]))
            np.testing.assert_allclose(np.concatenate(got[k], axis=1), want, **TOL)
        streams[0].close()
        deadline = time.monotonic() + 30
        while True:  # the closed stream's call ends on the server shortly after the client stops it
            try:
                reply = stub.ModelInfer(refused, timeout=30)
                break
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                assert time.monotonic() < deadline, "the closed stream's call was never released"
                time.sleep(0.05)
        assert list(reply.outputs[0].shape) == [1, 2, V]
        streams[1].close()
