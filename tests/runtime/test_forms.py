"""Choosing the form for one-step requests: the rule, the measurement, and the checks that both files are one model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnndeploy import ModelConfig, SequenceModel
from rnndeploy.export import export_onnx
from rnndeploy.export.step_graph import export_step_graph, quantize_step_graph
from rnndeploy.runtime import ModelError, default_session_options
from rnndeploy.runtime.forms import DEFAULT_MARGIN, FormChoice, choose_step_form, pick


def make_model(seed: int = 0, cell: str = "gru") -> SequenceModel:
    torch.manual_seed(seed)
    return SequenceModel(ModelConfig(task="lm", cell=cell, vocab_size=13, embed_dim=5, hidden_size=9)).eval()


@pytest.fixture
def pair(tmp_path):
    model = make_model()
    export_onnx(model, tmp_path / "seq.onnx")
    export_step_graph(model, tmp_path / "step.onnx")
    return tmp_path / "seq.onnx", tmp_path / "step.onnx"


@pytest.mark.parametrize(
    ("sequence_us", "step_us", "form"),
    [(100.0, 50.0, "step"), (50.0, 100.0, "sequence"), (100.0, 100.0, "sequence"), (100.0, 99.0, "sequence")],
    ids=["step-faster", "step-slower", "tie", "within-margin"],
)
def test_pick_takes_the_step_graph_only_when_clearly_faster(sequence_us, step_us, form):
    assert pick(sequence_us, step_us) == form
    assert pick(100.0, (1 - DEFAULT_MARGIN) * 100.0 - 0.01) == "step"


def test_choice_is_measured_and_names_the_faster_file(pair):
    seq, step = pair
    choice = choose_step_form(seq, step, batch=3, calls=5, blocks=2)
    assert isinstance(choice, FormChoice)
    assert choice.sequence_us > 0 and choice.step_us > 0
    assert choice.form == pick(choice.sequence_us, choice.step_us)
    assert choice.path == str({"sequence": seq, "step": step}[choice.form])


@pytest.mark.parametrize("prefer", ["sequence", "step"])
def test_an_option_overrides_the_measurement(pair, prefer):
    seq, step = pair
    choice = choose_step_form(seq, step, prefer=prefer)
    assert choice == FormChoice(prefer, str(seq if prefer == "sequence" else step), None, None)


def test_both_forms_give_the_same_step(pair):
    # what the chooser relies on: either file serves a one-step request with the same result
    import onnxruntime as ort

    seq, step = pair
    sessions = [ort.InferenceSession(str(p), default_session_options(1)) for p in (seq, step)]
    rng = np.random.default_rng(0)
    feed = {"input": rng.integers(0, 13, (4, 1)), "h0": rng.standard_normal((1, 4, 9)).astype(np.float32)}
    (y_seq, h_seq), (y_step, h_step) = (s.run(["output", "hn"], feed) for s in sessions)
    np.testing.assert_allclose(y_step, y_seq, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(h_step, h_seq, atol=1e-4, rtol=1e-4)


def test_an_int8_step_graph_pairs_with_its_fp32_sequence_graph(pair, tmp_path):
    seq, step = pair
    int8 = quantize_step_graph(step, tmp_path / "step.int8.onnx")
    assert choose_step_form(seq, int8, calls=3, blocks=1).form in ("sequence", "step")


def test_mismatched_or_swapped_files_are_refused(pair, tmp_path):
    seq, step = pair
    with pytest.raises(ModelError, match="is not a step graph"):
        choose_step_form(seq, seq)
    with pytest.raises(ModelError, match="is not a sequence graph"):
        choose_step_form(step, step)
    other = make_model(seed=0, cell="lstm")
    export_step_graph(other, tmp_path / "other.onnx")
    with pytest.raises(ModelError, match="not the same model: their rnndeploy.config differ"):
        choose_step_form(seq, tmp_path / "other.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="junk.onnx"):
        choose_step_form(seq, tmp_path / "junk.onnx")
    with pytest.raises(ValueError, match="prefer must be"):
        choose_step_form(seq, step, prefer="fastest")
    with pytest.raises(ValueError, match="batch must be >= 1, got 0"):
        choose_step_form(seq, step, batch=0)


def test_forms_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, rnndeploy.runtime.forms; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(("sequence_s", "step_s", "form"), [(1e-3, 1e-4, "step"), (1e-4, 1e-3, "sequence")])
def test_the_faster_measured_graph_is_chosen(pair, monkeypatch, sequence_s, step_s, form):
    from rnndeploy.runtime import forms

    def fake_loop(session, batch):
        is_step = session.get_modelmeta().custom_metadata_map.get(forms.FORM_KEY) == "step"
        return lambda n: step_s if is_step else sequence_s

    monkeypatch.setattr(forms, "_step_loop", fake_loop)
    choice = choose_step_form(*pair)
    assert (choice.form, choice.sequence_us, choice.step_us) == (form, sequence_s * 1e6, step_s * 1e6)
