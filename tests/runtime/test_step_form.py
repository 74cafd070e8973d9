"""A session holding both forms of one model: one-step calls through the step graph (when it serves them), chunks
through the sequence graph, one state per stream across both; outputs equal PyTorch's and a single-file session's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnndeploy import ModelConfig, SequenceModel
from rnndeploy.export import export_onnx
from rnndeploy.export.step_graph import export_step_graph, quantize_step_graph
from rnndeploy.export.verification import compare
from rnndeploy.runtime import ModelError, StreamingSession, forms
from rnndeploy.runtime import session as session_module

MODELS = {
    "gru-lm": dict(task="lm", cell="gru", vocab_size=11),
    "lstm-regression": dict(task="regression", cell="lstm", num_layers=2, input_size=3, output_size=2),
}
CASES = [("gru-lm", "fp32"), ("lstm-regression", "fp32"), ("gru-lm", "int8")]
# (call, {stream: time steps}): one-step and longer calls interleaved on the same streams
CALLS = [
    ("step", {"a": 3}),
    ("step", {"a": 1}),
    ("step", {"a": 1}),
    ("step", {"a": 2}),
    ("step", {"a": 1}),
    ("step_many", {"p": 1, "q": 1}),
    ("step_many", {"p": 1, "q": 1}),
    ("step_many", {"p": 2, "q": 2}),
    ("step_many", {"p": 1, "q": 3}),
    ("step_many", {"p": 1, "q": 1}),
    ("step_stacked", {"s": 1, "t": 1}),
    ("step_stacked", {"s": 3, "t": 3}),
    ("step_stacked", {"s": 1, "t": 1}),
    ("step", {"s": 1}),
]
BATCH = 2


def make_model(name: str, seed: int = 0) -> SequenceModel:
    torch.manual_seed(seed)
    return SequenceModel(ModelConfig(embed_dim=5, hidden_size=6, **MODELS[name])).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``{(model, precision): (model, sequence path, step path)}``."""
    out = {}
    for name in MODELS:
        model = make_model(name)
        folder = tmp_path_factory.mktemp(name)
        seq = folder / "seq.onnx"
        export_onnx(model, seq)
        step = export_step_graph(model, folder / "step.onnx")
        out[name, "fp32"] = (model, seq, step)
        out[name, "int8"] = (model, seq, quantize_step_graph(step, folder / "step.int8.onnx"))
    return out


def inputs(model: SequenceModel) -> dict[str, np.ndarray]:
    """Each stream's whole input ``[BATCH, T, ...]``, T the sum of its calls' steps."""
    lengths: dict[str, int] = {}
    for _, steps in CALLS:
        for stream, t in steps.items():
            lengths[stream] = lengths.get(stream, 0) + t
    rng = np.random.default_rng(1)
    c = model.config
    return {
        s: rng.integers(0, c.vocab_size, (BATCH, t))
        if c.task == "lm"
        else rng.standard_normal((BATCH, t, c.input_size)).astype(np.float32)
        for s, t in lengths.items()
    }


def drive(session: StreamingSession, xs: dict[str, np.ndarray], after_call=None) -> dict[str, np.ndarray]:
    """Run `CALLS` on ``session``; returns each stream's outputs concatenated over time.
    ``after_call(steps)`` runs after each call."""
    done = dict.fromkeys(xs, 0)
    outs: dict[str, list[np.ndarray]] = {s: [] for s in xs}
    for call, steps in CALLS:
        chunk = {s: xs[s][:, done[s] : done[s] + t] for s, t in steps.items()}
        if call == "step":
            ((stream, x),) = chunk.items()
            results = {stream: session.step(x, stream)["output"]}
        elif call == "step_many":
            results = {s: r["output"] for s, r in session.step_many(chunk).items()}
        else:
            stacked = session.step_stacked(list(chunk), np.concatenate(list(chunk.values())))["output"]
            results = dict(zip(chunk, np.split(stacked, len(chunk)), strict=True))
        for s, t in steps.items():
            outs[s].append(results[s])
            done[s] += t
        if after_call is not None:
            after_call(steps)
    return {s: np.concatenate(o, axis=1) for s, o in outs.items()}


@pytest.fixture
def step_runs(monkeypatch):
    """Counts the runs of every step graph a session loads: ``runs[0]``."""
    runs = [0]
    load = session_module.load_session

    def spying_load(source, options, providers):
        loaded = load(source, options, providers)
        if loaded.get_modelmeta().custom_metadata_map.get(forms.FORM_KEY) == "step":
            for method in ("run", "run_with_iobinding"):
                inner = getattr(loaded, method)

                def counted(*args, _inner=inner, **kwargs):
                    runs[0] += 1
                    return _inner(*args, **kwargs)

                setattr(loaded, method, counted)
        return loaded

    monkeypatch.setattr(session_module, "load_session", spying_load)
    return runs


@pytest.mark.parametrize("io_binding", [None, False], ids=["default-store", "host-store"])
@pytest.mark.parametrize("step_form", ["step", "sequence", "auto", "auto-step"])
@pytest.mark.parametrize(("name", "precision"), CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_one_step_calls_run_the_chosen_graph_and_match(
    exported, step_runs, monkeypatch, name, precision, step_form, io_binding
):
    model, seq, step = exported[name, precision]
    if step_form == "auto-step":  # a measurement that finds the step graph faster
        timings = {"step": 1e-4, "sequence": 1e-3}
        monkeypatch.setattr(
            forms,
            "_step_loop",
            lambda s, batch: (
                lambda n: timings[s.get_modelmeta().custom_metadata_map.get(forms.FORM_KEY, "sequence")]
            ),
        )
    prefer = "auto" if step_form.startswith("auto") else step_form
    pair = StreamingSession(seq, step_graph=step, step_form=prefer, io_binding=io_binding)
    described = pair.describe()["step_form"]
    measured = described["sequence_us"] is not None
    assert measured == (prefer == "auto") and (described["step_us"] is not None) == measured
    if step_form == "auto-step":
        assert described == {"form": "step", "path": str(step), "sequence_us": 1e3, "step_us": 1e2}
    elif step_form != "auto":
        assert described["form"] == step_form
    assert described["path"] == str(step if described["form"] == "step" else seq)
    serves_steps = described["form"] == "step"

    xs = inputs(model)
    runs_before = [step_runs[0]]

    def check_graph(steps):
        ran = step_runs[0] - runs_before[0]
        one_step = 1 in steps.values()  # step_many runs each input shape on its own
        assert (ran > 0) == (serves_steps and one_step), (steps, ran)
        runs_before[0] = step_runs[0]

    got = drive(pair, xs, check_graph)
    single = drive(StreamingSession(seq, io_binding=io_binding), xs)
    for stream, x in xs.items():
        with torch.no_grad():
            expected, _ = model(torch.from_numpy(x))
        for what, reference in (("torch", expected.numpy()), ("single-file session", single[stream])):
            check = compare(f"pair vs {what}", f"output of {stream}", got[stream], reference, precision)
            assert check.ok, (what, stream, check.max_abs, check.scale)
    if precision == "int8" and serves_steps:  # the int8 step graph, not the fp32 sequence graph, ran
        assert np.abs(got["a"] - single["a"]).max() > 0
    assert set(pair.get_state("a")) == {p.input for p in pair.states}


def test_no_step_graph_describes_none(exported):
    _, seq, _ = exported["gru-lm", "fp32"]
    assert StreamingSession(seq).describe()["step_form"] is None


def test_mismatched_pair_is_refused(exported, tmp_path):
    _, gru_seq, gru_step = exported["gru-lm", "fp32"]
    _, lstm_seq, lstm_step = exported["lstm-regression", "fp32"]
    with pytest.raises(
        ModelError, match=rf"{gru_seq} and {lstm_step} are not the same model: .*rnndeploy.config"
    ):
        StreamingSession(gru_seq, step_graph=lstm_step)
    # same weights, another vocabulary
    model = make_model("gru-lm")
    other = export_step_graph(model, tmp_path / "vocab.onnx", vocab=[chr(97 + i) for i in range(11)])
    with pytest.raises(ModelError, match=r"not the same model: their rnndeploy.vocab differ"):
        StreamingSession(gru_seq, step_graph=other, step_form="step")
    # the same metadata over a state of another size: the shapes tell them apart
    import onnx

    wider = SequenceModel(ModelConfig(embed_dim=5, hidden_size=7, **MODELS["gru-lm"])).eval()
    proto = onnx.load(str(export_step_graph(wider, tmp_path / "wider.onnx")))
    seq_meta = {p.key: p.value for p in onnx.load(str(gru_seq)).metadata_props}
    for prop in proto.metadata_props:
        if prop.key in ("rnndeploy.config", "rnndeploy.states"):
            prop.value = seq_meta[prop.key]
    onnx.save(proto, tmp_path / "wider.onnx")
    with pytest.raises(
        ModelError, match=rf"{gru_seq} and {tmp_path / 'wider.onnx'} differ in h0: .*6.* vs .*7"
    ):
        StreamingSession(gru_seq, step_graph=tmp_path / "wider.onnx", step_form="sequence")
    with pytest.raises(ModelError, match=rf"{gru_seq} is not a step graph"):
        StreamingSession(gru_seq, step_graph=gru_seq)
    with pytest.raises(ModelError, match=rf"{gru_step} is not a sequence graph"):
        StreamingSession(gru_step, step_graph=gru_step)
    with pytest.raises(ValueError, match="step_form must be 'auto', 'sequence' or 'step', got 'fast'"):
        StreamingSession(gru_seq, step_graph=gru_step, step_form="fast")
    with pytest.raises(FileNotFoundError, match="step graph file"):
        StreamingSession(gru_seq, step_graph=tmp_path / "missing.onnx")


def test_a_repository_version_serves_its_step_graph_beside_the_sequence_graph(exported, tmp_path):
    from rnndeploy.server import open_repository
    from rnndeploy.server.core import STEP_GRAPH_FILE

    model, seq, step = exported["gru-lm", "fp32"]
    version = tmp_path / "lm" / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(seq.read_bytes())
    (tmp_path / "lm" / "config.pbtxt").write_text(
        'name: "lm"\nbackend: "onnxruntime"\nmax_batch_size: 4\n'
        'input [ { name: "input" data_type: TYPE_INT64 dims: [ -1 ] } ]\n'
        'output [ { name: "output" data_type: TYPE_FP32 dims: [ -1, 11 ] } ]\n'
        "sequence_batching { max_sequence_idle_microseconds: 5000000 direct { } }\n"
    )
    assert open_repository(tmp_path).get("lm").session.describe()["step_form"] is None  # no step graph there
    (version / STEP_GRAPH_FILE).write_bytes(step.read_bytes())
    assert open_repository(tmp_path).get("lm").session.describe()["step_form"] is None  # not asked for
    served = open_repository(tmp_path, step_form="step").get("lm").session
    assert served.describe()["step_form"]["path"] == str(version / STEP_GRAPH_FILE)
    x = np.array([[3, 1, 4, 1]])
    got = np.concatenate(
        [served.step(x[:, :2])["output"], served.step(x[:, 2:3])["output"], served.step(x[:, 3:])["output"]],
        1,
    )
    with torch.no_grad():
        expected, _ = model(torch.from_numpy(x))
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=1e-4)
    _, lstm_seq, lstm_step = exported["lstm-regression", "fp32"]
    (version / STEP_GRAPH_FILE).write_bytes(lstm_step.read_bytes())
    with pytest.raises(ValueError, match=rf"{version / 'model.onnx'}.*not the same model"):
        open_repository(tmp_path, step_form="auto")


def test_run_and_serve_take_the_step_graph_from_the_command_line(exported, tmp_path):
    """`rnndeploy run --step-graph/--step-form` prints what the sequence graph alone prints; a mismatched pair
    and a step graph given for a repository are refused in one line."""
    import json

    from click.testing import CliRunner

    from rnndeploy.cli import main

    _, seq, step = exported["gru-lm", "fp32"]
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, 11, 9))

    def run(*extra: str) -> list[dict]:
        result = CliRunner().invoke(main, ["run", str(seq), "--input", str(tokens), *extra])
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in result.output.splitlines()]

    alone = run()
    paired = run("--step-graph", str(step), "--step-form", "step")
    assert len(paired) == len(alone) == 9
    for a, b in zip(alone, paired, strict=True):
        np.testing.assert_allclose(np.asarray(b["output"]), np.asarray(a["output"]), rtol=1e-4, atol=1e-5)
    other = export_step_graph(make_model("lstm-regression"), tmp_path / "other.onnx")
    refused = CliRunner().invoke(main, ["run", str(seq), "--input", str(tokens), "--step-graph", str(other)])
    assert refused.exit_code == 1 and "Traceback" not in refused.output, refused.output
    assert str(other) in refused.output, refused.output
    repository = tmp_path / "repository"
    repository.mkdir()
    refused = CliRunner().invoke(main, ["serve", str(repository), "--step-graph", str(step)])
    assert refused.exit_code == 1 and "model.step.onnx" in refused.output, refused.output
