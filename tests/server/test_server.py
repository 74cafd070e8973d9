"""The KServe v2 server on loopback, driven by stock tritonclient.http and httpx, against offline runs."""

import asyncio
import json
import re
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from onnx.reference import ReferenceEvaluator
from tritonclient.utils import InferenceServerException

from rnndeploy.runtime import StreamingSession, testing
from rnndeploy.server import Limits

from ._support import TOL, offline, running

V = 9


@pytest.fixture(scope="module")
def lm_bytes():
    return testing.lstm_lm(hidden_size=7, num_layers=2).SerializeToString()


@pytest.fixture(scope="module")
def lm_raw_bytes():
    """The same model without its vocabulary metadata: token ids reach onnxruntime unchecked."""
    model = testing.lstm_lm(hidden_size=7, num_layers=2)
    kept = [p for p in model.metadata_props if p.key != "rnndeploy.vocab"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    return model.SerializeToString()


@pytest.fixture(scope="module", params=[True, False], ids=["worker_thread", "event_loop"])
def server(lm_bytes, request):
    with running(
        StreamingSession(lm_bytes),
        max_batch_size=64,
        max_queue_delay_us=2000,
        limits=Limits(max_body_bytes=2**18),
        worker_thread=request.param,
    ) as served:
        yield served.http, served.app


def token_input(value: np.ndarray, binary: bool = True) -> httpclient.InferInput:
    tensor = httpclient.InferInput("input", list(value.shape), "INT64")
    tensor.set_data_from_numpy(value, binary_data=binary)
    return tensor


def test_metadata_and_health(server):
    url, _ = server
    client = httpclient.InferenceServerClient(url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("lm") and client.is_model_ready("lm", "1")
    assert not client.is_model_ready("other")
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data", "sequence"]
    meta = client.get_model_metadata("lm", "1")
    assert meta["inputs"] == [{"name": "input", "datatype": "INT64", "shape": [-1, -1]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, -1, V]}]
    config = client.get_model_config("lm")  # an .onnx file: the graph's tensors, batch axis in the dims
    assert (config["name"], config["max_batch_size"]) == ("lm", 0)
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
        ("input", "TYPE_INT64", ["-1", "-1"])
    ]


def test_httpx_json_sequences_interleaved(server, lm_bytes):
    url, _ = server
    S, T = 6, 15
    tokens = np.random.default_rng(1).integers(0, V, (S, T))

    async def sequence(client: httpx.AsyncClient, s: int) -> list:
        rows = []
        for t in range(T):
            body = {
                "inputs": [
                    {"name": "input", "datatype": "INT64", "shape": [1, 1], "data": [int(tokens[s, t])]}
                ],
                "parameters": {
                    "sequence_id": f"seq-{s}",
                    "sequence_start": t == 0,
                    "sequence_end": t == T - 1,
                },
            }
            reply = await client.post(f"http://{url}/v2/models/lm/infer", json=body)
            assert reply.status_code == 200, reply.text
            (output,) = reply.json()["outputs"]
            assert output["shape"] == [1, 1, V] and output["datatype"] == "FP32"
            rows.append(output["data"])
        return rows

    async def main():
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(*(sequence(client, s) for s in range(S)))

    got = np.array(asyncio.run(main()), np.float32)
    np.testing.assert_allclose(got, offline(lm_bytes, tokens), **TOL)


def test_chunk_and_stateless_requests(server, lm_bytes):
    url, _ = server
    tokens = np.random.default_rng(2).integers(0, V, (1, 10))
    client = httpclient.InferenceServerClient(url)
    whole = client.infer("lm", [token_input(tokens)]).as_numpy(
        "output"
    )  # no sequence id: zero state, one-off
    first = client.infer("lm", [token_input(tokens[:, :4])], sequence_id=7, sequence_start=True).as_numpy(
        "output"
    )
    rest = client.infer("lm", [token_input(tokens[:, 4:])], sequence_id=7, sequence_end=True).as_numpy(
        "output"
    )
    want = offline(lm_bytes, tokens)
    np.testing.assert_allclose(whole, want, **TOL)
    np.testing.assert_allclose(np.concatenate([first, rest], axis=1), want, **TOL)


def _post(url: str, body: bytes | dict, path: str = "/v2/models/lm/infer", **headers) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"http://{url}{path}", content=content, headers=headers)


def _tokens(data, shape=(1, 1), datatype="INT64", name="input", **parameters) -> dict:
    return {
        "inputs": [{"name": name, "datatype": datatype, "shape": list(shape), "data": data}],
        **parameters,
    }


BAD_REQUESTS = {
    "unknown-model": (_tokens([1]), {"path": "/v2/models/nope/infer"}, 404, "unknown model 'nope'"),
    "unknown-version": (_tokens([1]), {"path": "/v2/models/lm/versions/9/infer"}, 404, "unknown version '9'"),
    "malformed-json": (b'{"inputs": [', {}, 400, "not valid JSON"),
    "not-an-object": (b"[1, 2]", {}, 400, "must be a JSON object"),
    "no-inputs": ({"inputs": []}, {}, 400, "non-empty 'inputs'"),
    "missing-input": (_tokens([1], name="tokens"), {}, 400, r"missing \['input'\]"),
    "extra-input": (
        {"inputs": _tokens([1])["inputs"] + _tokens([1.0], datatype="FP32", name="h0")["inputs"]},
        {},
        400,
        r"unexpected \['h0'\]",
    ),
    "wrong-dtype": (_tokens([1.5], datatype="FP32"), {}, 400, "must have dtype int64, got float32"),
    "wrong-shape": (_tokens([1], shape=(1, 1, 1)), {}, 400, r"must have shape input: int64\[batch, time\]"),
    "data-vs-shape": (
        _tokens([1, 2, 3], shape=(1, 2)),
        {},
        400,
        r"data has 3 elements, shape \[1, 2\] needs 2",
    ),
    "unknown-datatype": (_tokens([1], datatype="INT3"), {}, 400, "datatype must be one of .*, got 'INT3'"),
    "unknown-sequence": (
        _tokens([1], parameters={"sequence_id": 424242}),
        {},
        400,
        "unknown sequence 424242",
    ),
    "bad-flag": (
        _tokens([1], parameters={"sequence_id": 5, "sequence_start": "yes"}),
        {},
        400,
        "true or false",
    ),
    "unknown-output": (
        {**_tokens([1]), "outputs": [{"name": "hn"}]},
        {},
        400,
        "unknown output 'hn'",
    ),
    "oversized": (_tokens([1] * 300_000, shape=(1, 300_000)), {}, 413, "exceeds the limit"),
}


def test_bad_requests_leave_other_sequences_alone(server, lm_bytes):
    url, _ = server
    tokens = np.random.default_rng(3).integers(0, V, (1, len(BAD_REQUESTS) + 1))
    client = httpclient.InferenceServerClient(url)
    got = [
        client.infer("lm", [token_input(tokens[:, :1])], sequence_id=77, sequence_start=True).as_numpy(
            "output"
        )
    ]
    for t, (case, (body, options, status, message)) in enumerate(BAD_REQUESTS.items(), start=1):
        reply = _post(url, body, **options)
        assert reply.status_code == status, (case, reply.text)
        assert reply.headers["content-type"] == "application/json"
        assert re.search(message, reply.json()["error"]), (case, reply.json())
        got.append(client.infer("lm", [token_input(tokens[:, t : t + 1])], sequence_id=77).as_numpy("output"))
    np.testing.assert_allclose(np.concatenate(got, axis=1), offline(lm_bytes, tokens), **TOL)


def test_bad_binary_body(server):
    url, _ = server
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "INT64",
                    "shape": [1, 2],
                    "parameters": {"binary_data_size": 16},
                }
            ]
        }
    ).encode()
    reply = _post(url, header + b"\0" * 8, **{"Inference-Header-Content-Length": str(len(header))})
    assert reply.status_code == 400, reply.text
    assert "binary_data_size must be an integer in [0, 8]" in reply.json()["error"] and "got 16" in reply.text
    reply = _post(url, header + b"\0" * 24, **{"Inference-Header-Content-Length": str(len(header))})
    assert reply.status_code == 400 and "8 bytes of binary data no input claims" in reply.json()["error"]
    reply = _post(url, header, **{"Inference-Header-Content-Length": "x"})
    assert reply.status_code == 400 and "Inference-Header-Content-Length" in reply.json()["error"]


def test_tritonclient_reports_errors(server):
    url, _ = server
    client = httpclient.InferenceServerClient(url)
    with pytest.raises(InferenceServerException, match="unknown sequence 31337"):
        client.infer("lm", [token_input(np.array([[1]]))], sequence_id=31337)


@pytest.mark.parametrize("worker_thread", [True, False])
def test_idle_sequences_are_evicted(lm_bytes, worker_thread):
    session = StreamingSession(lm_bytes)
    with running(session, idle_timeout_s=0.2, worker_thread=worker_thread) as served:
        url, app = served.http, served.app
        client = httpclient.InferenceServerClient(url)
        client.infer("lm", [token_input(np.array([[1]]))], sequence_id=5, sequence_start=True)
        assert 5 in app.state.batcher.live and 5 in session.streams
        deadline = time.monotonic() + 10
        while 5 in app.state.batcher.live or 5 in session.streams:
            assert time.monotonic() < deadline, "idle sequence was not evicted"
            time.sleep(0.05)
        with pytest.raises(
            InferenceServerException, match="evicted after 0.2 s idle, ended, or started before"
        ):
            client.infer("lm", [token_input(np.array([[1]]))], sequence_id=5)


def test_capacity_limit(lm_bytes):
    with running(StreamingSession(lm_bytes), limits=Limits(max_sequences=2)) as served:
        url, _ = served.http, served.app
        client = httpclient.InferenceServerClient(url)
        for seq in (1, 2):
            client.infer("lm", [token_input(np.array([[1]]))], sequence_id=seq, sequence_start=True)
        reply = _post(url, _tokens([1], parameters={"sequence_id": 3, "sequence_start": True}))
        assert (
            reply.status_code == 429
            and "too many live sequences (limit max_sequences=2)" in reply.json()["error"]
        )
        client.infer("lm", [token_input(np.array([[1]]))], sequence_id=1, sequence_end=True)
        client.infer("lm", [token_input(np.array([[1]]))], sequence_id=3, sequence_start=True)


@pytest.mark.parametrize("mapping", ["inferred", "explicit"])
def test_unusual_state_names_with_constant(mapping):
    if mapping == "inferred":
        model = testing.scaled_rnn()
        session = StreamingSession(model.SerializeToString(), constants={"sample_rate": 1.5})
        state_names = ("state_in", "past_total")
    else:
        model = testing.scaled_rnn(
            memory=("mem", "mem_updated"), total=("acc", "acc_new"), const="sample_rate"
        )
        session = StreamingSession(
            model.SerializeToString(),
            {"mem": "mem_updated", "acc": "acc_new"},
            constants={"sample_rate": 1.5},
        )
        state_names = ("mem", "acc")
    x = np.random.default_rng(4).normal(size=(1, 5, 3)).astype(np.float32)
    zeros = np.zeros((1, 5), np.float32)
    want = ReferenceEvaluator(model).run(
        None,
        {"x": x, state_names[0]: zeros, state_names[1]: zeros, "sample_rate": np.array([1.5], np.float32)},
    )[0]
    with running(session) as served:
        url, _ = served.http, served.app
        client = httpclient.InferenceServerClient(url)
        assert [i["name"] for i in client.get_model_metadata("lm")["inputs"]] == ["x"]
        got = []
        for t in range(5):
            tensor = httpclient.InferInput("x", [1, 1, 3], "FP32")
            tensor.set_data_from_numpy(x[:, t : t + 1])
            result = client.infer("lm", [tensor], sequence_id="a", sequence_start=t == 0, sequence_end=t == 4)
            got.append(result.as_numpy("y"))
    np.testing.assert_allclose(np.concatenate(got, axis=1), want, **TOL)


def _step_body(token: int, sequence_id=None, **flags) -> dict:
    parameters = {} if sequence_id is None else {"sequence_id": sequence_id, **flags}
    return _tokens([token], parameters=parameters)


@pytest.mark.parametrize("worker_thread", [True, False])
def test_a_rejected_token_fails_only_its_request(lm_bytes, lm_raw_bytes, worker_thread):
    """Token 99999 passes the shape check, onnxruntime rejects it inside the batch: the other sequence of that
    batch gets its result, the bad request a 400, and neither sequence's state moves."""
    tokens = np.random.default_rng(5).integers(0, V, (2, 3))
    session = StreamingSession(lm_raw_bytes)
    # A long queue delay and two live sequences: each round's two steps run as one batch.
    with running(session, max_queue_delay_us=1e6, worker_thread=worker_thread) as served:
        url, app = served.http, served.app

        async def round_(client, *bodies):
            replies = await asyncio.gather(
                *(client.post(f"http://{url}/v2/models/lm/infer", json=b) for b in bodies)
            )
            return replies

        async def main():
            async with httpx.AsyncClient() as client:
                first = await round_(
                    client,
                    _step_body(int(tokens[0, 0]), "a", sequence_start=True),
                    _step_body(int(tokens[1, 0]), "b", sequence_start=True),
                )
                bad, good = await round_(client, _step_body(99999, "a"), _step_body(int(tokens[1, 1]), "b"))
                assert bad.status_code == 400, bad.text
                assert bad.headers["content-type"] == "application/json"
                assert "stream 'a': input int64[1, 1] with values in [99999, 99999]" in bad.json()["error"]
                assert "indices element out of data bounds" in bad.json()["error"]
                rest = await round_(
                    client,
                    _step_body(int(tokens[0, 1]), "a"),
                    _step_body(int(tokens[1, 2]), "b", sequence_end=True),
                )
                last = await round_(client, _step_body(int(tokens[0, 2]), "a", sequence_end=True))
                for reply in [*first, good, *rest, *last]:
                    assert reply.status_code == 200, reply.text
                a = [first[0], rest[0], last[0]]
                b = [first[1], good, rest[1]]
                return [[r.json()["outputs"][0]["data"] for r in s] for s in (a, b)]

        got = np.array(asyncio.run(main()), np.float32).reshape(2, 3, V)
        assert app.state.batcher.live == {} and session.streams == []
    np.testing.assert_allclose(got, offline(lm_bytes, tokens), **TOL)


def test_failed_steps_leave_no_stream_behind(lm_raw_bytes):
    session = StreamingSession(lm_raw_bytes)
    with running(session) as served:
        url, app = served.http, served.app
        batcher = app.state.batcher
        assert _post(url, _step_body(1, "kept", sequence_start=True)).status_code == 200
        failing = [
            _step_body(99999),  # one-off request: a stream of its own, started and ended
            _step_body(99999, "new", sequence_start=True),
            _step_body(99999, "kept", sequence_end=True),
        ]
        for body in failing:
            reply = _post(url, body)
            assert reply.status_code == 400 and "99999" in reply.json()["error"], reply.text
        assert session.streams == [] and batcher.live == {}
        reply = _post(url, _step_body(1, "new"))
        assert reply.status_code == 400 and "unknown sequence 'new'" in reply.json()["error"]


def test_a_bad_output_request_does_not_step(server, lm_bytes):
    url, _ = server
    tokens = np.random.default_rng(6).integers(0, V, (1, 3))
    replies = [_post(url, _step_body(int(tokens[0, 0]), 41, sequence_start=True))]
    bad = {**_step_body(int(tokens[0, 1]), 41), "outputs": [{"name": "nope"}]}
    reply = _post(url, bad)
    assert reply.status_code == 400 and "unknown output 'nope'" in reply.json()["error"]
    bad = _step_body(int(tokens[0, 1]), 41, binary_data_output="yes")
    reply = _post(url, bad)
    assert reply.status_code == 400 and "binary_data_output must be true or false" in reply.json()["error"]
    replies.append(_post(url, _step_body(int(tokens[0, 1]), 41)))
    replies.append(_post(url, _step_body(int(tokens[0, 2]), 41, sequence_end=True)))
    got = [r.json()["outputs"][0]["data"] for r in replies]
    np.testing.assert_allclose(np.array(got, np.float32).reshape(1, 3, V), offline(lm_bytes, tokens), **TOL)


def test_a_failed_restart_keeps_the_old_state(server, lm_bytes):
    url, _ = server
    tokens = np.random.default_rng(8).integers(0, V, (1, 2))
    replies = [_post(url, _step_body(int(tokens[0, 0]), 43, sequence_start=True))]
    reply = _post(url, _step_body(99999, 43, sequence_start=True))
    assert reply.status_code == 400 and "99999" in reply.json()["error"]
    replies.append(_post(url, _step_body(int(tokens[0, 1]), 43, sequence_end=True)))
    got = [r.json()["outputs"][0]["data"] for r in replies]
    np.testing.assert_allclose(np.array(got, np.float32).reshape(1, 2, V), offline(lm_bytes, tokens), **TOL)
