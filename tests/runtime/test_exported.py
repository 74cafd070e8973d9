"""The runtime on models written by rnndeploy.export (skipped where the exporter is not installed)."""

import numpy as np
import pytest
import torch

from rnndeploy.models import ModelConfig, SequenceModel
from rnndeploy.runtime import StreamingSession, generate

export = pytest.importorskip("rnndeploy.export")
if not hasattr(export, "export_onnx"):
    pytest.skip("rnndeploy.export has no export_onnx in this checkout", allow_module_level=True)

VOCAB = list("abcdefg ")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_exported_lm_steps_like_torch(cell, tmp_path):
    config = ModelConfig(
        task="lm", cell=cell, vocab_size=len(VOCAB), embed_dim=6, hidden_size=5, num_layers=2
    )
    model = SequenceModel(config).eval()
    path = tmp_path / f"{cell}.onnx"
    export.export_onnx(model, path, vocab=VOCAB)
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
