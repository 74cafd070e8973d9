"""Server hardening: generated malformed requests, end/step/start races, limits, long requests, slow clients.

Every refusal must be a 4xx naming the field, change no sequence's state and leave the server serving; the
batcher's live table and the session's streams stay one truth under races; outputs that are served equal
offline onnxruntime runs from zero state over the whole token history.
"""

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from rnndeploy.runtime import StreamingSession, testing
from rnndeploy.server import Limits, SequenceBatcher, SequenceError, create_app

from ._support import TOL, offline, running

V, H = 9, 7
HEADER_LENGTH = "Inference-Header-Content-Length"
URL = "/v2/models/lm/infer"


@pytest.fixture(scope="module")
def lm_bytes():
    return testing.lstm_lm(hidden_size=H, num_layers=2).SerializeToString()


def step(token: int, sequence_id=None, **parameters) -> dict:
    if sequence_id is not None:
        parameters["sequence_id"] = sequence_id
    return {
        "inputs": [{"name": "input", "datatype": "INT64", "shape": [1, 1], "data": [token]}],
        "parameters": parameters,
    }


def binary_step(token: int, sequence_id=None) -> tuple[dict, bytes]:
    header = step(token, sequence_id)
    tensor = header["inputs"][0]
    del tensor["data"]
    tensor["parameters"] = {"binary_data_size": 8}
    return header, np.array([[token]], np.int64).tobytes()


# --------------------------------------------------------------------------- generated malformed requests
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def _one_valid_token(data) -> bool:
    while isinstance(data, list) and len(data) == 1:
        data = data[0]
    return type(data) is int and 0 <= data < V


def _with(path: tuple, value) -> dict:
    """The step of sequence 'kept' with the field at ``path`` replaced by ``value``."""
    body = step(3, "kept")
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


def _json(body) -> tuple[bytes, dict, str, str]:
    return json.dumps(body).encode(), {}, "POST", URL


corrupt_json = st.one_of(
    json_values.filter(lambda v: v != "INT64").map(lambda v: _with(("inputs", 0, "datatype"), v)),
    json_values.filter(lambda v: v not in ([1, 1], [1])).map(lambda v: _with(("inputs", 0, "shape"), v)),
    json_values.filter(lambda v: not _one_valid_token(v)).map(lambda v: _with(("inputs", 0, "data"), v)),
    st.one_of(st.integers(-(2**70), -1), st.integers(V, 2**70)).map(
        lambda v: _with(("inputs", 0, "data"), [v])
    ),
    json_values.filter(lambda v: v != "input").map(lambda v: _with(("inputs", 0, "name"), v)),
    json_values.filter(lambda v: v != "kept" and v not in (0, "")).map(
        lambda v: _with(("parameters", "sequence_id"), v)
    ),
    st.sampled_from([0, ""]).map(
        lambda v: _with(("parameters",), {"sequence_id": v, "sequence_start": True})
    ),
    st.sampled_from(["sequence_start", "sequence_end", "binary_data_output"]).flatmap(
        lambda key: json_values.filter(lambda v: not isinstance(v, bool)).map(
            lambda v: _with(("parameters", key), v)
        )
    ),
    json_values.filter(lambda v: v is not None and not isinstance(v, str)).map(lambda v: _with(("id",), v)),
    json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: _with(("parameters",), v)),
    json_values.filter(lambda v: not isinstance(v, list) or v == [] or any(x != {} for x in v)).map(
        lambda v: _with(("inputs",), v)
    ),
    json_values.filter(
        lambda v: v is not None and not (isinstance(v, list) and v in ([], [{}] * len(v)))
    ).map(lambda v: _with(("outputs",), v)),
).map(_json)


def _binary(header: dict, data: bytes, length: str | None = None) -> tuple[bytes, dict, str, str]:
    text = json.dumps(header).encode()
    value = str(len(text)) if length is None else length
    return text + data, {HEADER_LENGTH: value.encode("latin-1")}, "POST", URL


def _binary_size(value) -> tuple:
    header, data = binary_step(3, "kept")
    header["inputs"][0]["parameters"]["binary_data_size"] = value
    return _binary(header, data)


def _zero_size(shape) -> tuple:
    header, _ = binary_step(3, "kept")
    header["inputs"][0]["shape"] = shape
    header["inputs"][0]["parameters"]["binary_data_size"] = 0
    return _binary(header, b"")


corrupt_binary = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=8)
    .filter(lambda t: t.strip(" \t") != str(len(json.dumps(binary_step(3, "kept")[0]))))
    .map(lambda t: _binary(*binary_step(3, "kept"), length=t)),
    json_values.filter(lambda v: v != 8).map(_binary_size),
    st.binary(min_size=1, max_size=16).map(
        lambda extra: _binary(*binary_step(3, "kept")[:1], b"\0" * 8 + extra)
    ),
    st.binary(max_size=7).map(lambda short: _binary(binary_step(3, "kept")[0], short)),
    st.one_of(st.integers(-(2**63), -1), st.integers(V, 2**63 - 1)).map(
        lambda v: _binary(binary_step(3, "kept")[0], np.array([[v]], np.int64).tobytes())
    ),
    st.lists(st.integers(0, 2**63), min_size=2, max_size=3).filter(lambda shape: 0 in shape).map(_zero_size),
)

corrupt_other = st.one_of(
    st.binary(max_size=40).map(lambda raw: (raw, {}, "POST", URL)),
    st.sampled_from(["/v2/models/nope/infer", "/v2/models/lm/versions/2/infer", "/v2/nothing"]).map(
        lambda path: (json.dumps(step(3, "kept")).encode(), {}, "POST", path)
    ),
    st.sampled_from(
        [("GET", URL), ("PUT", URL), ("POST", "/v2/health/live"), ("DELETE", "/v2/models/lm")]
    ).map(lambda m: (b"", {}, *m)),
)


@pytest.fixture(scope="module")
def in_process(lm_bytes):
    session = StreamingSession(lm_bytes)
    app = create_app(session, "lm", limits=Limits(max_body_bytes=4096))
    with TestClient(app, raise_server_exceptions=False) as client:
        reply = client.post(URL, json=step(2, "kept", sequence_start=True))
        assert reply.status_code == 200, reply.text
        yield client, session, app.state.batcher


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=st.one_of(corrupt_json, corrupt_binary, corrupt_other))
def test_generated_malformed_requests_are_4xx_and_change_nothing(in_process, request):
    client, session, batcher = in_process
    body, headers, method, path = request
    before = session.get_state("kept")
    reply = client.request(method, path, content=body, headers=headers)
    assert 400 <= reply.status_code < 500, (reply.status_code, reply.text)
    assert reply.headers["content-type"] == "application/json", reply.headers
    assert isinstance(reply.json()["error"], str) and reply.json()["error"]
    if reply.status_code == 405:
        assert "POST" in reply.headers["allow"] or "GET" in reply.headers["allow"], reply.headers
    after = session.get_state("kept")
    assert all(np.array_equal(before[k], after[k]) for k in before), "a refused request changed the state"
    assert session.streams == ["kept"] and list(batcher.live) == ["kept"]
    assert client.get("/v2/health/live").status_code == 200


def test_the_sequence_refusals_left_alone_continues_exactly(in_process, lm_bytes):
    """After the generated requests, 'kept' steps on as if none of them had arrived."""
    client, session, _ = in_process
    reply = client.post(URL, json=step(5, "kept", sequence_end=True))
    assert reply.status_code == 200, reply.text
    got = np.array(reply.json()["outputs"][0]["data"], np.float32).reshape(V)
    np.testing.assert_allclose(got, offline(lm_bytes, [[2, 5]])[0, -1], **TOL)
    assert session.streams == []


STRICT_CASES = {
    "int8-overflow": ({"datatype": "INT8", "data": [300]}, "INT8 data must lie in \\[-128, 127\\], got 300"),
    "uint8-negative": ({"datatype": "UINT8", "data": [-1]}, "UINT8 data must lie in \\[0, 255\\], got -1"),
    "int64-2**63": ({"data": [2**63]}, "INT64 data must lie in .*, got 9223372036854775808"),
    "int64-float": ({"data": [1.7]}, "INT64 data must be JSON integers, got 1.7"),
    "int64-string": ({"data": ["7"]}, "INT64 data must be JSON integers, got '7'"),
    "int64-bool": ({"data": [True]}, "INT64 data must be JSON integers, got True"),
    "fp32-nan-string": ({"datatype": "FP32", "data": ["NaN"]}, "FP32 data must be JSON numbers, got 'NaN'"),
    "fp16-overflow": ({"datatype": "FP16", "data": [1e6]}, "FP16 data must lie in"),
    "datatype-object": ({"datatype": {}}, "datatype must be one of .*, got {}"),
    "datatype-list": ({"datatype": []}, "datatype must be one of .*, got \\[\\]"),
    "token-minus-1": ({"data": [-1]}, "token id -1 is outside the model's vocabulary \\[0, 9\\)"),
    "token-minus-104": ({"data": [-104]}, "token id -104 is outside"),
    "token-9": ({"data": [9]}, "token id 9 is outside"),
    "zero-steps": ({"shape": [1, 0], "data": []}, "a step needs at least one time step"),
}


@pytest.mark.parametrize("case", list(STRICT_CASES))
def test_strict_decoding_names_the_field(in_process, case):
    client, _, _ = in_process
    changes, message = STRICT_CASES[case]
    body = step(1)
    body["inputs"][0].update(changes)
    reply = client.post(URL, json=body)
    assert reply.status_code == 400, reply.text
    assert __import__("re").search(message, reply.json()["error"]), reply.json()


def test_protocol_details(in_process):
    client, _, _ = in_process
    reply = client.post(URL, json={**step(1), "id": 7})
    assert reply.status_code == 400 and "request 'id' must be a string, got 7" in reply.json()["error"]
    assert client.post(URL, json={**step(1), "id": "r-1"}).json()["id"] == "r-1"
    reply = client.get(URL)
    assert reply.status_code == 405 and reply.headers["allow"] == "POST", reply.headers
    for length in ("\xb2", "-1", "1e3", ""):
        body = json.dumps(step(1)).encode()
        reply = client.post(URL, content=body, headers={HEADER_LENGTH: length.encode("latin-1")})
        assert reply.status_code == 400 and HEADER_LENGTH in reply.json()["error"], (length, reply.text)
    reply = client.post(URL, json=step(1, 0, sequence_start=True))
    assert reply.status_code == 400 and "sequence_id 0 is not a valid sequence id" in reply.json()["error"]
    reply = client.post(URL, json=step(1, "", sequence_end=True))
    assert reply.status_code == 400 and "sequence_id '' is not a valid sequence id" in reply.json()["error"]
    reply = client.post(URL, json=step(1, 2**64))
    assert reply.status_code == 400 and "unsigned integer or a string" in reply.json()["error"]


def test_uint64_and_string_ids_are_separate_sequences(in_process, lm_bytes):
    client, session, batcher = in_process
    ids = {2**64 - 1: [1, 4], "18446744073709551615": [6, 0], 7: [8, 8], "7": [2, 3]}
    for sid, tokens in ids.items():
        assert client.post(URL, json=step(tokens[0], sid, sequence_start=True)).status_code == 200
    for sid, tokens in ids.items():
        reply = client.post(URL, json=step(tokens[1], sid, sequence_end=True))
        got = np.array(reply.json()["outputs"][0]["data"], np.float32)
        np.testing.assert_allclose(got, offline(lm_bytes, [tokens])[0, -1], **TOL)
    assert not set(ids) & set(session.streams) and not set(ids) & set(batcher.live)


# --------------------------------------------------------------------------- races
async def _run_ops(batcher: SequenceBatcher, ops: list[tuple]) -> list:
    """Admit ``ops`` (sequence_id, token, start, end) in order, concurrently; results or exceptions."""
    calls = [
        batcher.infer({"input": np.array([[token]], np.int64)}, sid, start=start, end=end)
        for sid, token, start, end in ops
    ]
    return await asyncio.gather(*calls, return_exceptions=True)


class Reference:
    """What a step must answer, in admission order: an end stops a sequence at once, a start begins afresh."""

    def __init__(self, offline: Callable[[list[int]], np.ndarray]) -> None:
        self.offline, self.history, self.ending = offline, {}, set()

    def __call__(self, sid, token, start, end):
        if start:
            self.history[sid] = [token]
            self.ending.discard(sid)
        elif sid not in self.history or sid in self.ending:
            return None  # refused: unknown sequence
        else:
            self.history[sid].append(token)
        want = self.offline(self.history[sid])[0, -1]
        if end:
            self.ending.add(sid)
        return want

    def live(self) -> set:
        return set(self.history) - self.ending


@pytest.mark.parametrize("worker_thread", [True, False], ids=["worker_thread", "event_loop"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_end_step_start_races_keep_one_truth(lm_bytes, seed, worker_thread):
    """Rounds of concurrent starts, steps and ends on 3 ids: every answer is what admission order says, and
    the live table equals the session's streams after each round."""
    rng = np.random.default_rng(seed)
    session = StreamingSession(lm_bytes)
    reference = Reference(lambda history: offline(lm_bytes, [history]))
    kinds = [(True, False), (False, False), (False, True), (True, True)]

    async def main():
        batcher = SequenceBatcher(
            session, max_batch_size=4, max_queue_delay_s=0.002, worker_thread=worker_thread
        )
        await batcher.start()
        try:
            # The case first: steps right behind a sequence_end.
            rounds = [[(1, 1, True, False), (1, 2, False, False), (1, 3, False, True), (1, 4, False, False)]]
            rounds += [
                [
                    (int(rng.integers(1, 4)), int(rng.integers(0, V)), *kinds[rng.integers(0, 4)])
                    for _ in range(12)
                ]
                for _ in range(15)
            ]
            for ops in rounds:
                results = await _run_ops(batcher, ops)
                for op, result in zip(ops, results):
                    want = reference(*op)
                    if want is None:
                        assert isinstance(result, SequenceError) and "unknown sequence" in str(result), (
                            op,
                            result,
                        )
                    else:
                        assert not isinstance(result, Exception), (op, result)
                        np.testing.assert_allclose(result["output"][0, -1], want, **TOL)
                assert set(batcher.live) == set(session.streams) == reference.live(), ops
                assert batcher.state_bytes == sum(live.batch for live in batcher.live.values()) * 112
        finally:
            await batcher.stop()

    asyncio.run(main())


def test_http_hammering_the_same_ids_leaves_no_orphan(lm_bytes):
    """Concurrent HTTP starts/steps/ends on 4 ids, through uvicorn: no 5xx, and no stream outlives its entry."""
    session = StreamingSession(lm_bytes)
    rng = np.random.default_rng(11)
    with running(session, idle_timeout_s=60) as served:
        base, app = "http://" + served.http, served.app

        async def main():
            async with httpx.AsyncClient(base_url=base) as client:
                for _ in range(8):
                    bodies = []
                    for _ in range(24):
                        kind = int(rng.integers(0, 4))
                        bodies.append(
                            step(
                                int(rng.integers(0, V)),
                                int(rng.integers(1, 5)),
                                sequence_start=kind in (0, 3),
                                sequence_end=kind in (2, 3),
                            )
                        )
                    replies = await asyncio.gather(*(client.post(URL, json=b) for b in bodies))
                    assert all(r.status_code in (200, 400) for r in replies), [r.text for r in replies]
                    assert set(app.state.batcher.live) == set(session.streams)

        asyncio.run(main())


# --------------------------------------------------------------------------- limits
@pytest.fixture
def limited(lm_bytes):
    session = StreamingSession(lm_bytes)
    limits = Limits(max_rows=2, max_steps=5, max_response_bytes=1000, max_state_bytes=300, max_sequences=8)
    app = create_app(session, "lm", limits=limits)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post(URL, json=step(1, "kept", sequence_start=True)).status_code == 200
        yield client, session, app.state.batcher


def tokens_body(rows: int, steps: int, sequence_id=None, binary_output: bool = False, **flags) -> dict:
    parameters = {"binary_data_output": binary_output, **flags}
    if sequence_id is not None:
        parameters["sequence_id"] = sequence_id
    data = [[1] * steps] * rows
    return {
        "inputs": [{"name": "input", "datatype": "INT64", "shape": [rows, steps], "data": data}],
        "parameters": parameters,
    }


def test_limits_refuse_before_any_work(limited):
    client, session, batcher = limited
    before = session.get_state("kept")
    cases = [
        (tokens_body(3, 1), 413, "3 batch rows exceed the limit max_rows=2"),
        (tokens_body(1, 6, "kept"), 413, "1 rows x 6 time steps = 6 steps exceed the limit max_steps=5"),
        (tokens_body(2, 3), 413, "2 rows x 3 time steps = 6 steps exceed the limit max_steps=5"),
        # 5 steps x 9 floats as JSON: 1080 bytes estimated; as binary it would be 180.
        (tokens_body(1, 5, "kept"), 413, "over the limit max_response_bytes=1000"),
        # 112 state bytes per row: 'kept' holds 112, two more rows would make 336.
        (
            tokens_body(2, 1, "new", sequence_start=True),
            429,
            "live sequences hold 112 of the limit max_state_bytes=300",
        ),
    ]
    for body, status, message in cases:
        reply = client.post(URL, json=body)
        assert reply.status_code == status and message in reply.json()["error"], reply.text
    after = session.get_state("kept")
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert session.streams == ["kept"] and list(batcher.live) == ["kept"] and batcher.state_bytes == 112
    assert batcher.steps_run == 1
    assert client.post(URL, json=tokens_body(1, 5, "kept", binary_output=True)).status_code == 200
    assert client.post(URL, json=tokens_body(1, 1, "kept", sequence_end=True)).status_code == 200
    assert client.post(URL, json=tokens_body(2, 1, "new", sequence_start=True)).status_code == 200
    assert batcher.state_bytes == 224


def test_a_huge_stateless_binary_request_is_refused_by_the_default_limits(lm_bytes):
    session = StreamingSession(lm_bytes)
    app = create_app(session, "lm")
    header = {
        "inputs": [
            {
                "name": "input",
                "datatype": "INT64",
                "shape": [1, 10**6],
                "parameters": {"binary_data_size": 8 * 10**6},
            }
        ]
    }
    text = json.dumps(header).encode()
    with TestClient(app, raise_server_exceptions=False) as client:
        reply = client.post(URL, content=text + bytes(8 * 10**6), headers={HEADER_LENGTH: str(len(text))})
        assert reply.status_code == 413, reply.text
        assert (
            "1 rows x 1000000 time steps = 1000000 steps exceed the limit max_steps=4096"
            in reply.json()["error"]
        )
        assert app.state.batcher.batches_run == 0


def test_a_long_request_delays_short_steps_by_at_most_one_batch(lm_bytes):
    """Long requests run in batches of their own: short steps that arrive while one runs go next, before the
    long request queued ahead of them."""
    session = StreamingSession(lm_bytes)
    gate, batches = threading.Event(), []
    step_many = session.step_many

    def gated(xs):
        batches.append(sorted(map(str, xs)))
        if len(batches) == 1:
            assert gate.wait(30), "the test never opened the gate"
        return step_many(xs)

    session.step_many = gated
    long_tokens = np.arange(40).reshape(1, 40) % V

    async def main():
        batcher = SequenceBatcher(session, max_batch_size=8, max_queue_delay_s=0.001)
        await batcher.start()
        try:
            first = asyncio.ensure_future(batcher.infer({"input": long_tokens}, "A", True, cost=40))
            while not batches:
                await asyncio.sleep(0.01)
            rest = [asyncio.ensure_future(batcher.infer({"input": long_tokens}, "B", True, cost=40))]
            rest += [
                asyncio.ensure_future(batcher.infer({"input": np.array([[s]])}, f"s{s}", True))
                for s in range(3)
            ]
            await asyncio.sleep(0)
            gate.set()
            results = await asyncio.gather(first, *rest)
        finally:
            await batcher.stop()
        return results

    results = asyncio.run(main())
    assert batches == [["A"], ["s0", "s1", "s2"], ["B"]]
    np.testing.assert_allclose(results[0]["output"][0], offline(lm_bytes, long_tokens)[0], **TOL)
    np.testing.assert_allclose(results[1]["output"][0], offline(lm_bytes, long_tokens)[0], **TOL)
    for s in range(3):
        np.testing.assert_allclose(results[2 + s]["output"][0, 0], offline(lm_bytes, [[s]])[0, 0], **TOL)


def test_a_long_request_runs_in_pieces_between_short_steps(lm_bytes):
    """Pieces of 16 steps: short steps queued behind two long requests run after the first piece."""
    session = StreamingSession(lm_bytes)
    gate, batches = threading.Event(), []
    step_many = session.step_many

    def gated(xs):
        batches.append({str(s): next(iter(x.values())).shape[1] for s, x in xs.items()})
        if len(batches) == 1:
            assert gate.wait(30), "the test never opened the gate"
        return step_many(xs)

    session.step_many = gated
    tokens = np.random.default_rng(7).integers(0, V, (2, 40))

    async def main():
        batcher = SequenceBatcher(session, max_batch_size=8, max_queue_delay_s=0.001, long_chunk_cost=16)
        await batcher.start()
        try:
            first = asyncio.ensure_future(batcher.infer({"input": tokens[:1]}, "A", True, cost=40))
            while not batches:
                await asyncio.sleep(0.01)
            rest = [asyncio.ensure_future(batcher.infer({"input": tokens[1:]}, "B", True, cost=40))]
            rest += [
                asyncio.ensure_future(batcher.infer({"input": np.array([[s]])}, f"s{s}", True))
                for s in range(3)
            ]
            await asyncio.sleep(0)
            gate.set()
            results = await asyncio.gather(first, *rest)
            assert set(batcher.live) == set(session.streams) == {"A", "B", "s0", "s1", "s2"}
        finally:
            await batcher.stop()
        return results

    results = asyncio.run(main())
    assert batches == [
        {"A": 16},
        {"s0": 1, "s1": 1, "s2": 1},
        {"A": 16},
        {"A": 8},
        {"B": 16},
        {"B": 16},
        {"B": 8},
    ]
    np.testing.assert_allclose(results[0]["output"], offline(lm_bytes, tokens[:1]), **TOL)
    np.testing.assert_allclose(results[1]["output"], offline(lm_bytes, tokens[1:]), **TOL)


@pytest.mark.parametrize("start", [False, True], ids=["step", "restart"])
def test_a_failed_piece_restores_the_state_before_the_request(start):
    """Token 99999 in the third piece of a long request (a model without vocabulary metadata, so
    onnxruntime rejects it): the request fails and the sequence goes on from the state it had before."""
    model = testing.lstm_lm(hidden_size=H, num_layers=2, metadata=False).SerializeToString()
    session = StreamingSession(model, {"h0": "hn", "c0": "cn"})
    bad = np.arange(40).reshape(1, 40) % V
    bad[0, 35] = 99999

    async def main():
        batcher = SequenceBatcher(session, max_batch_size=8, max_queue_delay_s=0.001, long_chunk_cost=16)
        await batcher.start()
        try:
            await batcher.infer({"input": np.array([[3, 1]])}, "s", True)
            with pytest.raises(Exception, match="99999"):
                await batcher.infer({"input": bad}, "s", start, cost=40)
            after = await batcher.infer({"input": np.array([[4]])}, "s", False, True)
            assert batcher.live == {} and session.streams == []
        finally:
            await batcher.stop()
        return after

    after = asyncio.run(main())
    np.testing.assert_allclose(after["output"][0, 0], offline(model, [[3, 1, 4]])[0, -1], **TOL)


# --------------------------------------------------------------------------- slow clients
def _read_until_closed(sock: socket.socket) -> bytes:
    sock.settimeout(20)  # a bound on the test, not a measurement: the server answers well before
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_stalled_headers_and_bodies_get_408_and_are_closed(lm_bytes):
    with running(StreamingSession(lm_bytes), header_timeout_s=0.3, body_timeout_s=0.3) as served:
        base, _ = "http://" + served.http, served.app
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as headers_stall:
            headers_stall.sendall(b"POST /v2/models/lm/infer HTTP/1.1\r\nHost: x\r\n")
            reply = _read_until_closed(headers_stall)
        assert reply.startswith(b"HTTP/1.1 408") and b"request headers not received in time" in reply, reply
        with socket.create_connection(("127.0.0.1", port)) as body_stall:
            body_stall.sendall(
                b'POST /v2/models/lm/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"in'
            )
            reply = _read_until_closed(body_stall)
        assert reply.startswith(b"HTTP/1.1 408") and b"request body not received within 0.3 s" in reply, reply
        assert httpx.get(f"{base}/v2/health/live").status_code == 200


def test_connections_beyond_the_cap_get_503_and_health_recovers(lm_bytes):
    with running(StreamingSession(lm_bytes), header_timeout_s=1.0, max_connections=3) as served:
        base, _ = "http://" + served.http, served.app
        port = int(base.rsplit(":", 1)[1])
        stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            for sock in stalled:
                sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
            with socket.create_connection(("127.0.0.1", port)) as extra:  # answered as it connects
                reply = _read_until_closed(extra)
            assert reply.startswith(b"HTTP/1.1 503") and b"too many connections" in reply, reply
            for sock in stalled:  # the header deadline frees them
                assert _read_until_closed(sock).startswith(b"HTTP/1.1 408")
        finally:
            for sock in stalled:
                sock.close()
        assert httpx.get(f"{base}/v2/health/live").status_code == 200


def test_a_client_that_disconnects_mid_body_logs_no_error(lm_bytes, caplog):
    with running(StreamingSession(lm_bytes)) as served:
        base, app = "http://" + served.http, served.app
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as gone:
            gone.sendall(b'POST /v2/models/lm/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"in')
        stats = app.state.model_server.stats
        deadline = time.monotonic() + 20  # a bound on the test: the server sees the close at once
        while stats.failure == 0:
            assert time.monotonic() < deadline, "the server never noticed the disconnect"
            time.sleep(0.02)
        assert httpx.get(f"{base}/v2/health/live").status_code == 200
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == [], [r.getMessage() for r in errors]


def test_a_refused_body_still_gets_its_413_and_a_stalled_one_is_closed(lm_bytes):
    """A body over max_body_bytes is refused before it is read; closing the socket with the body still
    arriving would make the kernel reset the connection, and the reset can discard the 413 (it did, about 1 in
    100 here). The server half-closes and drops the rest instead: 200 refusals in a row all arrive. A client
    that declares a large body and then stalls is closed after the linger deadline, not kept."""
    from rnndeploy.server.serving import LINGER_S

    body = json.dumps({"inputs": [{"name": "input", "datatype": "INT64", "shape": [1, 300_000],
                                   "data": [1] * 300_000}]}).encode()  # fmt: skip
    with running(StreamingSession(lm_bytes), limits=Limits(max_body_bytes=2**18)) as served:
        for _ in range(200):
            reply = httpx.post(f"http://{served.http}/v2/models/lm/infer", content=body)
            assert reply.status_code == 413 and "max_body_bytes" in reply.json()["error"], reply.text
        host, port = served.http.split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            head = f"POST /v2/models/lm/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
            sock.sendall(head.encode() + body[:1000])  # then nothing more
            began, received = time.monotonic(), b""
            while chunk := sock.recv(65536):  # the 413, then the close
                received += chunk
            assert received.startswith(b"HTTP/1.1 413"), received[:200]
            assert time.monotonic() - began < LINGER_S + 5


@pytest.mark.parametrize("where", ["data", "shape", "id", "parameters"])
def test_json_nested_1000_deep_is_a_400_not_a_recursion_error(in_process, where):
    """Deep JSON (within orjson's own depth limit) is refused before anything walks it recursively."""
    client, _, batcher = in_process
    deep = "DEEP"  # json.dumps itself recurses: the nesting goes into the text
    body = step(1)
    if where == "parameters":
        body["parameters"] = {"sequence_id": deep}
    elif where == "id":
        body["id"] = deep
    else:
        body["inputs"][0][where] = deep
    before = batcher.steps_run
    text = json.dumps(body).replace('"DEEP"', "[" * 1000 + "1" + "]" * 1000)
    reply = client.post(URL, content=text.encode(), headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "nested more than 32 deep" in reply.json()["error"], reply.text[:300]
    assert batcher.steps_run == before


def test_unreadable_vocabulary_metadata_is_refused_not_unchecked(tmp_path):
    """A language model whose rnndeploy.vocab metadata cannot be read is not served without its token-range
    check: `serve` stops naming the metadata; with it readable, token -1 is refused."""
    from click.testing import CliRunner

    from rnndeploy.cli import main

    for vocab in ("{not json", '{"a": 0}', '["a", 1]'):
        model = testing.lstm_lm(hidden_size=5, num_layers=1)
        for prop in model.metadata_props:
            if prop.key == "rnndeploy.vocab":
                prop.value = vocab
        path = tmp_path / "lm.onnx"
        path.write_bytes(model.SerializeToString())
        # an address no interface has: were the model accepted, serve would stop there instead of serving
        result = CliRunner().invoke(main, ["serve", str(path), "--host", "192.0.2.1", "--port", "0"])
        assert result.exit_code == 1 and "metadata rnndeploy.vocab" in result.output, (
            vocab,
            result.output[-500:],
        )
        assert "Traceback" not in result.output
    with TestClient(
        create_app(StreamingSession(testing.lstm_lm(hidden_size=5).SerializeToString()), "lm")
    ) as client:
        reply = client.post(URL, json=step(-1))
        assert reply.status_code == 400 and "token id -1 is outside the model's vocabulary" in reply.text
