"""The runtime on models written by rnndeploy.export: the export -> runtime end-to-end test."""

import numpy as np
import pytest
import torch

from rnndeploy.export import export_onnx
from rnndeploy.models import ModelConfig, SequenceModel
from rnndeploy.runtime import StreamingSession, generate

VOCAB = list("abcdefg ")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_exported_lm_steps_like_torch(cell, tmp_path):
    config = ModelConfig(
        task="lm", cell=cell, vocab_size=len(VOCAB), embed_dim=6, hidden_size=5, num_layers=2
    )
    model = SequenceModel(config).eval()
    path = tmp_path / f"{cell}.onnx"
    export_onnx(model, path, vocab=VOCAB)
    tokens = torch.randint(0, len(VOCAB), (3, 9))
    with torch.no_grad():
        want, _ = model(tokens)
    session = StreamingSession(path, providers="cpu")
    assert [p.input for p in session.states] == (["h0", "c0"] if cell == "lstm" else ["h0"])
    got = {s: [] for s in range(3)}
    for t in range(0, 9, 3):  # chunks of 3 steps, three streams batched in one call
        for s, out in session.step_many({s: tokens[s, t : t + 3].numpy() for s in range(3)}).items():
            got[s].append(out["output"])
    for s in range(3):
        np.testing.assert_allclose(np.concatenate(got[s]), want[s].numpy(), rtol=1e-4, atol=1e-5)
    text = "".join(generate(session, "abc", 10, seed=0))
    assert len(text) == 10 and set(text) <= set(VOCAB)


def test_export_checks_run_with_the_runtime_session_options(tmp_path):
    """The exporter's verification sessions use the runtime's defaults (one thread, errors-only logging)."""
    from rnndeploy.export import verification
    from rnndeploy.runtime import default_session_options

    model = SequenceModel(ModelConfig(task="lm", vocab_size=len(VOCAB), embed_dim=4, hidden_size=3)).eval()
    path = tmp_path / "lm.onnx"
    export_onnx(model, path, vocab=VOCAB)
    got, want = verification.session(path).get_session_options(), default_session_options(threads=1)
    for option in ("intra_op_num_threads", "inter_op_num_threads", "log_severity_level", "execution_mode"):
        assert getattr(got, option) == getattr(want, option), option
    assert got.graph_optimization_level == want.graph_optimization_level
