"""StreamingSession against independent references: onnx.reference on whole sequences."""

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

from rnndeploy.runtime import (
    ModelError,
    ProviderError,
    StepInputError,
    StreamingSession,
    available_providers,
    testing,
)

TOL = {"rtol": 1e-5, "atol": 1e-6}
V = 9


@pytest.fixture(scope="module")
def lm():
    return testing.lstm_lm(hidden_size=7, num_layers=2)


@pytest.fixture(scope="module")
def lm_bytes(lm):
    return lm.SerializeToString()


def reference_lm(model, tokens: np.ndarray, state: dict | None = None) -> dict:
    """Whole-sequence run of the LM through onnx.reference: tokens [B, T] -> output, hn, cn."""
    B = tokens.shape[0]
    state = state or {"h0": np.zeros((2, B, 7), np.float32), "c0": np.zeros((2, B, 7), np.float32)}
    output, hn, cn = ReferenceEvaluator(model).run(None, {"input": tokens, **state})
    return {"output": output, "hn": hn, "cn": cn}


@pytest.mark.parametrize("io_binding", [False, True], ids=["run", "iobinding"])
@pytest.mark.parametrize("chunk", [1, 3, 11], ids=lambda c: f"chunk{c}")
def test_stepwise_equals_full_sequence(lm, lm_bytes, io_binding, chunk):
    tokens = np.random.default_rng(1).integers(0, V, (2, 11))
    full = reference_lm(lm, tokens)
    session = StreamingSession(lm_bytes, io_binding=io_binding, providers="cpu")
    outs = [session.step(tokens[:, t : t + chunk], stream="s")["output"] for t in range(0, 11, chunk)]
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full["output"], **TOL)
    state = session.get_state("s")
    np.testing.assert_allclose(state["h0"], full["hn"], **TOL)
    np.testing.assert_allclose(state["c0"], full["cn"], **TOL)


def test_batch_axis_may_be_left_out(lm, lm_bytes):
    tokens = np.array([3, 1, 4, 1, 5])
    session = StreamingSession(lm_bytes)
    out = np.concatenate([session.step(tokens[t : t + 1])["output"] for t in range(5)])  # [T, V]
    np.testing.assert_allclose(out, reference_lm(lm, tokens[None])["output"][0], **TOL)


def test_interleaved_streams_equal_independent_runs(lm, lm_bytes):
    rng = np.random.default_rng(2)
    seqs = {name: rng.integers(0, V, (1, 6 + k)) for k, name in enumerate(["a", "b", ("c", 1)])}
    session = StreamingSession(lm_bytes)
    got = {name: [] for name in seqs}
    order = [(name, t) for name, seq in seqs.items() for t in range(seq.shape[1])]
    rng.shuffle(order)
    order.sort(key=lambda item: item[1])  # keep each stream's own steps in order, streams interleaved
    for name, t in order:
        got[name].append(session.step(seqs[name][:, t : t + 1], stream=name)["output"])
    for name, seq in seqs.items():
        np.testing.assert_allclose(np.concatenate(got[name], axis=1), reference_lm(lm, seq)["output"], **TOL)


@pytest.mark.parametrize("io_binding", [False, True], ids=["run", "iobinding"])
def test_step_many_equals_separate_steps(lm_bytes, io_binding):
    rng = np.random.default_rng(3)
    batched = StreamingSession(lm_bytes, io_binding=io_binding, providers="cpu")
    separate = StreamingSession(lm_bytes, providers="cpu")
    rows = {s: 1 + s % 3 for s in range(7)}
    for round_ in range(4):
        # Mixed chunk lengths and batch rows: streams with equal shapes share one call, others run apart.
        xs = {s: rng.integers(0, V, (rows[s], 1 + (s + round_) % 2)) for s in rows if (s + round_) % 5}
        xs[99] = rng.integers(0, V, (2,))  # batch axis left out
        got = batched.step_many(xs)
        assert list(got) == list(xs)
        for s, x in xs.items():
            np.testing.assert_allclose(got[s]["output"], separate.step(x, stream=s)["output"], **TOL)
    for s in rows:
        for name, value in separate.get_state(s).items():
            np.testing.assert_allclose(batched.get_state(s)[name], value, **TOL)


def test_step_many_bad_input_changes_no_state(lm_bytes):
    session = StreamingSession(lm_bytes)
    session.step(np.array([[1, 2]]), stream="a")
    before = session.get_state("a")
    with pytest.raises(StepInputError, match="input must have dtype int64"):
        session.step_many({"a": np.array([[1]]), "b": np.array([[0.5]], np.float32)})
    for name, value in session.get_state("a").items():
        np.testing.assert_array_equal(value, before[name])


def test_reset_and_close(lm, lm_bytes):
    session = StreamingSession(lm_bytes)
    tokens = np.array([[2, 5, 7]])
    first = session.step(tokens, stream="x")["output"]
    session.reset("x")
    np.testing.assert_allclose(session.step(tokens, stream="x")["output"], first, **TOL)
    session.close("x")
    assert "x" not in session.streams
    with pytest.raises(KeyError, match="not open"):
        session.close("x")
    state = reference_lm(lm, tokens)
    session.reset("y", state={"h0": state["hn"], "c0": state["cn"]})
    more = np.array([[1, 1]])
    full = reference_lm(lm, np.concatenate([tokens, more], axis=1))["output"][:, 3:]
    np.testing.assert_allclose(session.step(more, stream="y")["output"], full, **TOL)


def test_stream_batch_size_is_fixed(lm_bytes):
    session = StreamingSession(lm_bytes)
    session.step(np.array([[1], [2]]), stream=0)
    with pytest.raises(StepInputError, match="stream 0 has batch size 2, this step has 1"):
        session.step(np.array([[1]]), stream=0)


@pytest.mark.parametrize(
    "x, message",
    [
        (np.array([[0.5]], np.float32), "input must have dtype int64, got float32"),
        (
            np.zeros((1, 1, 1), np.int64),
            r"input must have shape input: int64\[batch, time\].*got \[1, 1, 1\]",
        ),
        ({"input": np.array([[1]]), "h0": np.zeros(1)}, r"unexpected \['h0'\]"),
        ({}, r"missing \['input'\]"),
        (np.zeros((0, 1), np.int64), "at least one batch row"),
    ],
    ids=["dtype", "rank", "extra", "missing", "empty-batch"],
)
def test_bad_step_input(lm_bytes, x, message):
    with pytest.raises(StepInputError, match=message):
        StreamingSession(lm_bytes).step(x)


def reference_scaled(model, x, rate, names=("state_in", "past_total")):
    B, H = x.shape[0], 5
    zeros = np.zeros((B, H), np.float32)
    return ReferenceEvaluator(model).run(
        None, {"x": x, names[0]: zeros, names[1]: zeros, "sample_rate": np.array([rate], np.float32)}
    )


def test_inferred_names_and_constant():
    model = testing.scaled_rnn()
    session = StreamingSession(model.SerializeToString(), constants={"sample_rate": 2.5})
    assert [(p.input, p.output, p.batch_axis) for p in session.states] == [
        ("state_in", "state_out", 0),
        ("past_total", "present_total", 0),
    ]
    assert list(session.inputs) == ["x"] and list(session.outputs) == ["y"]
    x = np.random.default_rng(4).normal(size=(3, 6, 3)).astype(np.float32)
    y = np.concatenate([session.step(x[:, t : t + 2])["y"] for t in range(0, 6, 2)], axis=1)
    y_ref, h_ref, total_ref = reference_scaled(model, x, 2.5)
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_allclose(session.get_state()["state_in"], h_ref, **TOL)
    np.testing.assert_allclose(session.get_state()["past_total"], total_ref, **TOL)


def test_explicit_mapping_with_unusual_names():
    names = {"mem": "mem_updated", "acc": "acc_new"}
    model = testing.scaled_rnn(memory=("mem", "mem_updated"), total=("acc", "acc_new"), const="gain")
    with pytest.raises(ModelError, match="no state pairs found"):
        StreamingSession(model.SerializeToString(), constants={"gain": 1.0})
    session = StreamingSession(model.SerializeToString(), names, constants={"gain": 0.5})
    x = np.random.default_rng(5).normal(size=(2, 4, 3)).astype(np.float32)
    y = np.concatenate([session.step(x[:, t : t + 1])["y"] for t in range(4)], axis=1)
    zeros = np.zeros((2, 5), np.float32)
    y_ref, *_ = ReferenceEvaluator(model).run(
        None, {"x": x, "mem": zeros, "acc": zeros, "gain": np.array([0.5], np.float32)}
    )
    np.testing.assert_allclose(y, y_ref, **TOL)


def test_unset_constant_is_a_step_input():
    model = testing.scaled_rnn()
    session = StreamingSession(model.SerializeToString())
    assert sorted(session.inputs) == ["sample_rate", "x"]
    x = np.ones((1, 2, 3), np.float32)
    with pytest.raises(StepInputError, match="several step inputs"):
        session.step(x)
    y = session.step({"x": x, "sample_rate": np.array([3.0], np.float32)})["y"]
    np.testing.assert_allclose(y, reference_scaled(model, x, 3.0)[0], **TOL)


@pytest.mark.parametrize(
    "states, constants, message",
    [
        ({"nope": "hn"}, None, "state input 'nope' from the states mapping is not a model input"),
        ({"h0": "nope"}, None, "state output 'nope' from the states mapping is not a model output"),
        ({"input": "hn"}, None, "dtypes differ"),
        ({"h0": "output"}, None, "shapes differ"),
        ({"h0": "hn", "c0": "hn"}, None, "appear in more than one pair"),
        (None, {"temperature": 1.0}, r"constants \['temperature'\] are not inputs"),
    ],
    ids=["missing-input", "missing-output", "dtype", "shape", "duplicate", "const"],
)
def test_bad_mapping(lm_bytes, states, constants, message):
    with pytest.raises(ModelError, match=message):
        StreamingSession(lm_bytes, states, constants=constants)


def test_inferred_without_metadata_matches_metadata():
    bare = StreamingSession(testing.lstm_lm(metadata=False).SerializeToString())
    described = StreamingSession(testing.lstm_lm().SerializeToString())
    assert bare.states == described.states


def test_providers():
    with pytest.raises(ProviderError, match="'nosuch' .* not available"):
        StreamingSession(testing.lstm_lm().SerializeToString(), providers="nosuch")
    if "CUDAExecutionProvider" in available_providers() and not _cuda_works():
        with pytest.raises(ProviderError, match="could not start it"):
            StreamingSession(testing.lstm_lm().SerializeToString(), providers="cuda")
    assert StreamingSession(testing.lstm_lm().SerializeToString(), providers="cpu").providers == [
        "CPUExecutionProvider"
    ]


def _cuda_works() -> bool:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(
        testing.lstm_lm().SerializeToString(), options, providers=["CUDAExecutionProvider"]
    )
    return "CUDAExecutionProvider" in session.get_providers()


def test_import_does_not_load_torch():
    code = (
        "import sys, rnndeploy.runtime, rnndeploy.server; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["iobinding", "cuda-graph"])
def test_cuda_state_on_device_matches_cpu(lm_bytes, cuda_graph):
    cpu = StreamingSession(lm_bytes, providers="cpu")
    gpu = StreamingSession(lm_bytes, providers="cuda", cuda_graph=cuda_graph)
    assert gpu.io_binding and gpu.device == "cuda"
    tokens = np.random.default_rng(6).integers(0, V, (2, 1, 12))
    for t in range(12):
        for s in range(2):
            np.testing.assert_allclose(
                gpu.step(tokens[s, :, t : t + 1], stream=s)["output"],
                cpu.step(tokens[s, :, t : t + 1], stream=s)["output"],
                rtol=1e-4,
                atol=1e-5,
            )
    xs = {s: tokens[s, :, :1] for s in range(2)}
    got, want = gpu.step_many(xs), cpu.step_many(xs)
    for s in xs:
        np.testing.assert_allclose(got[s]["output"], want[s]["output"], rtol=1e-4, atol=1e-5)
        for name, value in cpu.get_state(s).items():
            np.testing.assert_allclose(gpu.get_state(s)[name], value, rtol=1e-4, atol=1e-5)


def test_a_step_onnxruntime_rejects_changes_nothing(lm, lm_bytes):
    """Token 99999 has the right shape and dtype; onnxruntime's Gather rejects it. Neither step nor step_many
    changes a state or opens a stream, and the error names the stream and the input."""
    session = StreamingSession(lm_bytes, providers="cpu")
    tokens = np.random.default_rng(7).integers(0, V, (2, 3))
    session.step_many({"a": tokens[0, :1], "b": tokens[1, :1]})
    before = {s: session.get_state(s) for s in ("a", "b")}
    message = r"stream 'a': input int64\[1, 1\] with values in \[99999, 99999\].*out of data bounds"
    with pytest.raises(StepInputError, match=message):
        session.step_many({"a": np.array([99999]), "b": tokens[1, 1:2], "new": tokens[1, 1:2]})
    with pytest.raises(StepInputError, match="stream 'fresh': input"):
        session.step(np.array([[99999]]), stream="fresh")
    assert sorted(session.streams) == ["a", "b"]
    for s in ("a", "b"):
        for name, value in session.get_state(s).items():
            np.testing.assert_array_equal(value, before[s][name])
    got = session.step_many({"a": tokens[0, 1:], "b": tokens[1, 1:]})
    want = reference_lm(lm, tokens)["output"]
    np.testing.assert_allclose(np.stack([got["a"]["output"], got["b"]["output"]]), want[:, 1:], **TOL)


def test_a_file_that_is_not_onnx(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"PK\x03\x04 a zip file, as torch.save writes")
    with pytest.raises(
        ModelError, match=f"{path} is not an ONNX model onnxruntime can load: .*INVALID_PROTOBUF"
    ):
        StreamingSession(path)
    with pytest.raises(ModelError, match="the given 5 bytes are not"):
        StreamingSession(b"bytes")


def test_auto_provider_falls_back_to_cpu_quietly(monkeypatch, capfd):
    """A machine with an NVIDIA driver but without onnxruntime's CUDA libraries (simulated: this CPU machine
    claims a driver; onnxruntime cannot start its CUDA provider here) runs on the CPU without error logs;
    asking for CUDA explicitly still fails clearly."""
    from rnndeploy.runtime import providers as providers_module

    if providers_module._cuda_driver_present():
        pytest.skip("a real CUDA driver is present: auto would use it")
    monkeypatch.setattr(providers_module, "_cuda_driver_present", lambda: True)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(providers_module, "available_providers", lambda: providers)
    model = testing.lstm_lm().SerializeToString()
    capfd.readouterr()
    session = StreamingSession(model)
    assert session.providers == ["CPUExecutionProvider"] and session.device == "cpu"
    assert capfd.readouterr().err == ""
    with pytest.raises(ModelError, match="not an ONNX model"):
        StreamingSession(b"bytes")
    assert capfd.readouterr().err == ""
    with pytest.raises(
        ProviderError, match="asked for CUDAExecutionProvider but onnxruntime could not start it"
    ):
        StreamingSession(model, providers="cuda")


def test_cpu_steps_on_bound_state_by_default(lm, lm_bytes):
    """The default CPU path (state in ping-pong IOBinding buffers, one binding per input shape) equals the
    whole-sequence reference while chunk lengths change, step_many and reset(state) touch the same stream,
    and the batch axis is given or left out."""
    session = StreamingSession(lm_bytes, providers="cpu")
    assert session.io_binding and session.describe()["io_binding"]
    tokens = np.random.default_rng(8).integers(0, V, (1, 16))
    outs, t = [], 0
    for chunk in (1, 3, 1, 2, 1, 1):
        outs.append(session.step(tokens[:, t : t + chunk], stream="s")["output"])
        t += chunk
    outs.append(session.step_many({"s": tokens[:, t : t + 1], "other": tokens[:, :1]})["s"]["output"])
    t += 1
    outs.append(session.step(tokens[0, t : t + 2], stream="s")["output"][None])  # batch axis left out
    t += 2
    np.testing.assert_allclose(np.concatenate(outs, axis=1), reference_lm(lm, tokens[:, :t])["output"], **TOL)
    full = reference_lm(lm, tokens)
    state = session.get_state("s")
    session.reset("s", state={"h0": state["h0"], "c0": state["c0"]})
    rest = [session.step(tokens[:, k : k + 1], stream="s")["output"] for k in range(t, 16)]
    np.testing.assert_allclose(np.concatenate(rest, axis=1), full["output"][:, t:], **TOL)
    np.testing.assert_allclose(session.get_state("s")["h0"], full["hn"], **TOL)


def test_a_changed_signature_is_checked_again(lm, lm_bytes):
    """Signatures are validated once and cached: a later step with another dtype or rank is still refused
    with the same message, and changes no state."""
    session = StreamingSession(lm_bytes, providers="cpu")
    tokens = np.array([[2, 7, 1, 8]])
    session.step(tokens[:, :1], stream="s")
    session.step(tokens[:, 1:2], stream="s")
    before = session.get_state("s")
    with pytest.raises(StepInputError, match="input must have dtype int64, got float32"):
        session.step(np.array([[0.5]], np.float32), stream="s")
    with pytest.raises(StepInputError, match=r"got \[1, 1, 1\]"):
        session.step(np.zeros((1, 1, 1), np.int64), stream="s")
    for name, value in session.get_state("s").items():
        np.testing.assert_array_equal(value, before[name])
    out = [session.step([[1]], stream="s")["output"], session.step(tokens[:, 3:], stream="s")["output"]]
    np.testing.assert_allclose(np.concatenate(out, axis=1), reference_lm(lm, tokens)["output"][:, 2:], **TOL)
    # Lists are converted on every step; their bound buffers are kept by the converted signature.
    more = [session.step([t], stream="s")["output"] for t in (3, 0, 5)]  # batch axis left out: [1, V] each
    full = reference_lm(lm, np.array([[2, 7, 1, 8, 3, 0, 5]]))["output"][0, 4:]
    np.testing.assert_allclose(np.concatenate(more), full, **TOL)


@pytest.mark.parametrize("io_binding", [False, True], ids=["run", "iobinding"])
def test_several_step_inputs_stepwise(io_binding):
    model = testing.scaled_rnn()
    session = StreamingSession(model.SerializeToString(), providers="cpu", io_binding=io_binding)
    x = np.random.default_rng(9).normal(size=(1, 5, 3)).astype(np.float32)
    rate = np.array([1.5], np.float32)
    y = [session.step({"x": x[:, t : t + 1], "sample_rate": rate})["y"] for t in range(5)]
    y_ref, h_ref, total_ref = reference_scaled(model, x, 1.5)
    np.testing.assert_allclose(np.concatenate(y, axis=1), y_ref, **TOL)
    np.testing.assert_allclose(session.get_state()["past_total"], total_ref, **TOL)


@pytest.mark.parametrize("as_dict", [False, True], ids=["arrays", "dicts"])
@pytest.mark.parametrize("io_binding", [False, True], ids=["run", "iobinding"])
def test_repeated_step_many_keeps_stacked_state(lm_bytes, io_binding, as_dict):
    """Streams that step together again reuse the last batch's stacked state; a stream that joins, leaves,
    is reset, steps alone, or comes in another order in between still gets exactly its own state."""
    rng = np.random.default_rng(10)
    batched = StreamingSession(lm_bytes, io_binding=io_binding, providers="cpu")
    separate = StreamingSession(lm_bytes, providers="cpu")
    plan = [
        ["a", "b", "c"],
        ["a", "b", "c"],
        ["a", "b", "c", "d"],
        ["d", "c", "b", "a"],
        ["b", "d"],
        ["a", "b", "c", "d"],
        ["a", "b", "c", "d"],
    ]
    for round_, members in enumerate(plan):
        xs = {s: rng.integers(0, V, (1,)) for s in members}
        if round_ == 4:
            batched.reset("c")
            separate.reset("c")
            lone = rng.integers(0, V, (1, 2))
            np.testing.assert_allclose(
                batched.step(lone, stream="a")["output"], separate.step(lone, stream="a")["output"], **TOL
            )
        got = batched.step_many({s: {"input": x} for s, x in xs.items()} if as_dict else xs)
        for s, x in xs.items():
            np.testing.assert_allclose(got[s]["output"], separate.step(x, stream=s)["output"], **TOL)
    for s in "abcd":
        for name, value in separate.get_state(s).items():
            np.testing.assert_allclose(batched.get_state(s)[name], value, **TOL)


def test_idle_streams_do_not_keep_a_batchs_state_alive(lm_bytes):
    """After step_many, streams hold rows of the batch's stacked state; once fewer than a quarter of them still
    do (the others reset, closed or stepped alone), the rest get copies and the stacked arrays are freed.
    States stay exact throughout."""
    import gc
    import weakref

    session = StreamingSession(lm_bytes, providers="cpu")
    separate = StreamingSession(lm_bytes, providers="cpu")
    xs = {s: np.array([s % V]) for s in range(16)}
    session.step_many(xs)
    for s, x in xs.items():
        separate.step(x, stream=s)
    stacked = weakref.ref(session._streams[0].rows.states["h0"])  # white box: the batch's stacked state
    for s in range(13):
        (session.close if s % 2 else session.reset)(s)
    gc.collect()
    assert stacked() is None, "3 of 16 streams left: their rows should have been copied out"
    for s in (13, 14, 15):
        for name, value in separate.get_state(s).items():
            np.testing.assert_allclose(session.get_state(s)[name], value, **TOL)
        x = np.array([1])
        np.testing.assert_allclose(
            session.step(x, stream=s)["output"], separate.step(x, stream=s)["output"], **TOL
        )


@pytest.mark.parametrize("io_binding", [False, True], ids=["run", "iobinding"])
def test_step_stacked_equals_separate_steps(lm_bytes, io_binding):
    """step_stacked on rows stacked along the batch axis equals one step per stream, round after round, also when
    the streams change between calls (a stream joins, leaves, steps alone, comes in another order)."""
    rng = np.random.default_rng(11)
    stacked = StreamingSession(lm_bytes, io_binding=io_binding, providers="cpu")
    separate = StreamingSession(lm_bytes, providers="cpu")
    plan = [
        ["a", "b", "c"],
        ["a", "b", "c"],
        ["c", "a", "b"],
        ["a", "d"],
        ["a", "b", "c", "d"],
        ["a", "b", "c", "d"],
    ]
    for round_, members in enumerate(plan):
        x = rng.integers(0, V, (2 * len(members), 1 + round_ % 2))  # 2 rows per stream, 1 or 2 steps
        if round_ == 3:
            lone = rng.integers(0, V, (2, 1))
            np.testing.assert_allclose(
                stacked.step(lone, stream="b")["output"], separate.step(lone, stream="b")["output"], **TOL
            )
        got = stacked.step_stacked(members, x)
        want = np.concatenate(
            [separate.step(x[2 * k : 2 * k + 2], stream=s)["output"] for k, s in enumerate(members)]
        )
        assert set(got) == {"output"}
        np.testing.assert_allclose(got["output"], want, **TOL)
    for s in "abcd":
        for name, value in separate.get_state(s).items():
            np.testing.assert_allclose(stacked.get_state(s)[name], value, **TOL)


def test_step_stacked_bad_input_names_it_and_changes_no_state(lm_bytes):
    session = StreamingSession(lm_bytes, providers="cpu")
    session.step_stacked(["a", "b"], np.array([[1], [2]]))
    before = {s: session.get_state(s) for s in "ab"}
    cases = [
        (
            ["a", "b"],
            np.array([[1], [2], [3]]),
            "3 rows along the batch axis, not a multiple of the 2 streams",
        ),
        (["a", "b"], np.array([[1], [2], [3], [4]]), "stream 'a' has batch size 1, this step has 2"),
        (["a", "b"], np.array([1, 2]), "needs the inputs with their batch axis"),
        (["a", "a"], np.array([[1], [2]]), "'a' appear twice"),
        ([], np.array([[1]]), "at least one stream"),
        (["a", "b"], np.array([[0.5], [1.5]], np.float32), "input must have dtype int64"),
        (["a", "b"], np.array([[1], [V + 50]]), "cannot run this step"),  # onnxruntime rejects the token id
    ]
    for streams, x, message in cases:
        with pytest.raises(StepInputError, match=message) as error:
            session.step_stacked(streams, x)
        assert "h0" not in str(error.value), error.value  # names the step's inputs, not the states fed
        for s in "ab":
            for name, value in session.get_state(s).items():
                np.testing.assert_array_equal(value, before[s][name])
    assert sorted(session.streams) == ["a", "b"]


def test_step_stacked_refuses_growing_states():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Concat", ["past_seq", "x"], ["present_seq"], axis=1),
            helper.make_node("ReduceSum", ["present_seq"], ["y"], keepdims=1),
        ],
        "grow",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 1]),
            helper.make_tensor_value_info("past_seq", TensorProto.FLOAT, ["B", "T"]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 1]),
            helper.make_tensor_value_info("present_seq", TensorProto.FLOAT, ["B", "T1"]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = StreamingSession(model.SerializeToString(), providers="cpu", io_binding=False)
    assert session.step(np.ones((1, 1), np.float32))["y"].item() == 1.0  # the model serves step by step
    with pytest.raises(ModelError, match="its states grow.*use step_many"):
        session.step_stacked(["a"], np.ones((1, 1), np.float32))


@pytest.mark.parametrize("with_batch_axis", [True, False], ids=["batch-axis", "no-batch-axis"])
def test_step_many_takes_views_that_are_not_contiguous(lm_bytes, with_batch_axis):
    """Steps given as strided views (no plain buffer to join) are stacked as well as contiguous ones."""
    rng = np.random.default_rng(12)
    batched = StreamingSession(lm_bytes, providers="cpu")
    separate = StreamingSession(lm_bytes, providers="cpu")
    for round_ in range(3):
        grid = rng.integers(0, V, (6, 4, 2))
        # 4 time steps each, every other element of the grid: [1, 4] or [4] views with a stride of 2
        xs = {s: grid[s : s + 1, :, 0] if with_batch_axis else grid[s, :, 0] for s in range(6)}
        if round_ == 1:
            xs = {s: np.ascontiguousarray(x) for s, x in xs.items()}  # contiguous in between
        assert all(x.flags.c_contiguous == (round_ == 1) for x in xs.values())
        got = batched.step_many(xs)
        for s, x in xs.items():
            np.testing.assert_allclose(got[s]["output"], separate.step(x, stream=s)["output"], **TOL)
