"""Gradient flow through time: known decay and growth on hand-built Elman RNNs, agreement with the model."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from rnndeploy.cli import main
from rnndeploy.diagnostics import gradient_flow, report_paths, write_report
from rnndeploy.models import ModelConfig, SequenceModel


def _elman(nonlinearity: str, hidden: int = 6) -> SequenceModel:
    config = ModelConfig(
        task="regression",
        cell="rnn",
        nonlinearity=nonlinearity,
        input_size=1,
        embed_dim=1,
        hidden_size=hidden,
        output_size=1,
    )
    return SequenceModel(config, backend="torch")


def test_scaled_down_w_hh_decays_geometrically():
    # tanh with tiny inputs and no bias stays in its linear part (slope ~1): each step back multiplies
    # dL/dh_t by W_hh^T = 0.5 * (orthogonal), so the norm halves per step
    model = _elman("tanh")
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    with torch.no_grad():
        model.rnn.weight_hh_l0.copy_(0.5 * q)
        model.rnn.bias_hh_l0.zero_()
        model.rnn.bias_ih_l0.zero_()
        model.encoder.bias.zero_()
    x = 1e-3 * torch.randn(4, 15, 1)
    flow = gradient_flow(model, x, torch.zeros(4, 1))
    norms = flow.h_norm[0]
    assert len(norms) == 15 and flow.w_hh_sigma_max == pytest.approx([0.5], rel=1e-5)
    ratios = [norms[t] / norms[t + 1] for t in range(14)]
    assert all(0.499 < r <= 0.5 + 1e-6 for r in ratios), ratios
    assert flow.decay_per_step() == pytest.approx(0.5, rel=1e-3)
    assert norms[0] / norms[-1] == pytest.approx(0.5**14, rel=1e-2)


def test_scaled_up_linear_w_hh_grows():
    # relu with positive weights, inputs and bias never clips: the cell is linear, W_hh = 1.25 * permutation,
    # so each step back multiplies the norm by exactly 1.25
    model = _elman("relu")
    perm = torch.eye(6)[torch.randperm(6)]
    with torch.no_grad():
        model.rnn.weight_hh_l0.copy_(1.25 * perm)
        model.rnn.weight_ih_l0.fill_(0.5)
        model.rnn.bias_ih_l0.fill_(0.1)
        model.rnn.bias_hh_l0.zero_()
        model.encoder.weight.fill_(1.0)
        model.encoder.bias.fill_(0.1)
    x = torch.rand(3, 12, 1)
    flow = gradient_flow(model, x, torch.zeros(3, 1))
    norms = flow.h_norm[0]
    assert flow.w_hh_sigma_max == pytest.approx([1.25], rel=1e-5)
    assert all(norms[t] / norms[t + 1] == pytest.approx(1.25, rel=1e-4) for t in range(11))
    assert flow.decay_per_step() == pytest.approx(1.25, rel=1e-4)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_matches_the_model_and_autograd_through_its_state(cell):
    """The loss equals the model's; dL/dh_t equals the gradient at h_t fed back into the model as a leaf."""
    config = ModelConfig(task="lm", cell=cell, vocab_size=7, embed_dim=5, hidden_size=9, num_layers=1)
    model = SequenceModel(config, backend="torch")
    x = torch.randint(0, 7, (3, 11))
    target = torch.randint(0, 7, (3,))
    flow = gradient_flow(model, x, target)
    y, _ = model(x)
    assert flow.loss == pytest.approx(model.loss(y[:, -1], target).item(), rel=1e-5)
    assert all(p.grad is None for p in model.parameters())
    for t in (0, 5, 9):
        _, state = model(x[:, : t + 1])
        leaves = tuple(s.detach().requires_grad_() for s in state)
        y_rest, _ = model(x[:, t + 1 :], leaves)
        (grad_h,) = torch.autograd.grad(model.loss(y_rest[:, -1], target) * 3, leaves[0])
        expected = grad_h[0].norm(dim=-1).mean().item()
        assert flow.h_norm[0][t] == pytest.approx(expected, rel=1e-4), t
    assert (flow.c_norm is not None) == (cell == "lstm")
    assert (flow.w_hh_sigma_max is not None) == (cell == "rnn")


def test_two_layers_report_both_and_classification_target():
    config = ModelConfig(
        task="classification",
        cell="lstm",
        input_size=2,
        embed_dim=4,
        hidden_size=5,
        num_layers=2,
        output_size=3,
    )
    model = SequenceModel(config, backend="reference")
    x = torch.randn(2, 8, 2)
    target = torch.tensor([0, 2])
    flow = gradient_flow(model, x, target, label="two")
    y, _ = model(x)
    assert flow.loss == pytest.approx(model.loss(y, target).item(), rel=1e-5)
    assert len(flow.h_norm) == 2 and all(len(n) == 8 and min(n) > 0 for n in flow.h_norm)
    assert len(flow.c_norm) == 2


def test_bidirectional_is_refused():
    config = ModelConfig(
        task="classification", cell="gru", vocab_size=5, hidden_size=4, bidirectional=True, output_size=2
    )
    with pytest.raises(ValueError, match="unidirectional"):
        gradient_flow(SequenceModel(config), torch.randint(0, 5, (2, 4)), torch.tensor([0, 1]))


def test_write_report(tmp_path):
    model = _elman("tanh")
    flow = gradient_flow(model, torch.randn(2, 6, 1), torch.zeros(2, 1), label="tiny")
    png, js = report_paths(tmp_path / "m.pt")
    write_report([flow], png, js, "title")
    doc = json.loads(js.read_text())
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert doc["flows"][0]["label"] == "tiny" and len(doc["flows"][0]["h_norm"][0]) == 6
    assert doc["commit"] and doc["torch"] == torch.__version__


def test_train_grad_report(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("abcabcabd " * 300)
    out = tmp_path / "run" / "m.pt"
    args = ["train", "--data", str(text), "--cell", "rnn", "--hidden", "8", "--embed", "4", "--seq-len", "12",
            "--batch", "4", "--steps", "3", "--eval-every", "3", "--device", "cpu", "--no-progress",
            "--out", str(out), "--grad-report"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    png, js = report_paths(out)
    assert f"gradient flow: {png} {js}" in result.output
    doc = json.loads(js.read_text())
    (flow,) = doc["flows"]
    assert flow["cell"] == "rnn" and flow["steps"] == 12 and flow["batch"] == 4
    assert len(flow["w_hh_sigma_max"]) == 1 and min(flow["h_norm"][0]) > 0
    assert doc["model"]["hidden_size"] == 8 and png.read_bytes()[:4] == b"\x89PNG"
