"""Long-time-lag tasks: the adding problem as the paper defines it, the copy task, and a training smoke test
that a broken backward through time fails."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from rnndeploy import kernels
from rnndeploy.longlag import (
    AddingProblem,
    CopyTask,
    TrainSettings,
    evaluate_task,
    set_gate_bias,
    train_on_task,
)
from rnndeploy.models import ModelConfig, SequenceModel


def test_adding_problem_follows_the_paper():
    T, n = 100, 4000
    batch = AddingProblem(T).sample(n, torch.Generator().manual_seed(0))
    values, markers = batch.x[..., 0], batch.x[..., 1]
    assert batch.x.shape == (n, int(batch.lengths.max()), 2)
    assert int(batch.lengths.min()) == T and int(batch.lengths.max()) == T + T // 10
    assert values.abs().max() <= 1 and set(markers.unique().tolist()) == {-1.0, 0.0, 1.0}
    steps = torch.arange(batch.x.shape[1])
    beyond = steps[None, :] >= batch.lengths[:, None]
    assert (batch.x[beyond] == 0).all()
    marked = markers == 1
    assert (marked.sum(1) == 2).all()
    first = marked.float().argmax(1)  # the earlier marked pair
    second = (marked * steps).max(1).values  # the later one
    assert first.max() <= 9 and second.max() == T // 2 - 2  # one of the first ten, one of the first T/2 - 1
    assert set(first.tolist()) == set(range(10))  # one of the first ten is always marked
    rows = torch.arange(n)
    # the first and the last pair carry -1 unless marked; no other pair carries -1
    assert (markers[rows, batch.lengths - 1] == -1).all()
    assert ((markers[:, 0] == -1) | (markers[:, 0] == 1)).all()
    assert ((markers == -1).sum(1) == 2 - (markers[:, 0] == 1).long()).all()
    # X1 is zero when the first pair is the marked one
    assert (values[markers[:, 0] == 1, 0] == 0).all() and (markers[:, 0] == 1).any()
    expected = 0.5 + (values * marked).sum(1) / 4
    torch.testing.assert_close(batch.target[:, 0], expected)
    # always predicting the mean: MSE ~ Var(X1 + X2) / 16 = 1/24, ~15% within 0.04
    error, correct = AddingProblem(T).baseline(batch)
    assert error == pytest.approx(1 / 24, rel=0.1) and correct == pytest.approx(0.154, abs=0.03)


def test_adding_problem_fixed_length_and_bad_arguments():
    batch = AddingProblem(20).sample(5, torch.Generator().manual_seed(0), length=20)
    assert batch.x.shape == (5, 20, 2) and (batch.lengths == 20).all()
    with pytest.raises(ValueError, match="length must be >= T=20"):
        AddingProblem(20).sample(5, torch.Generator(), length=19)
    with pytest.raises(ValueError, match="T >= 12"):
        AddingProblem(11)


def test_copy_task_layout():
    task = CopyTask(7, symbols=3, alphabet=4)
    batch = task.sample(6, torch.Generator().manual_seed(0))
    assert batch.x.shape == (6, 7 + 6) and batch.target.shape == (6, 3)
    torch.testing.assert_close(batch.x[:, :3], batch.target + 1)
    assert (batch.x[:, 3:9] == 0).all() and (batch.x[:, 9] == 5).all() and (batch.x[:, 10:] == 0).all()
    error, correct = task.baseline(batch)
    assert error == pytest.approx(math.log(4)) and correct == pytest.approx(4**-3)
    # a perfect prediction is all correct with zero loss, a uniform one is the baseline
    perfect = torch.nn.functional.one_hot(batch.target, 4).float().clamp_min(1e-12).log()
    e, c = task.errors(perfect, batch.target)
    assert c.all() and e.max() < 1e-6
    e, _ = task.errors(torch.full((6, 3, 4), math.log(0.25)), batch.target)
    torch.testing.assert_close(e, torch.full((6,), math.log(4)))


def test_set_gate_bias():
    lstm = SequenceModel(
        ModelConfig(task="regression", cell="lstm", input_size=2, hidden_size=3, output_size=1, num_layers=2)
    )
    set_gate_bias(lstm, 4.0)
    for layer in (0, 1):
        total = getattr(lstm.rnn, f"bias_ih_l{layer}") + getattr(lstm.rnn, f"bias_hh_l{layer}")
        torch.testing.assert_close(total[3:6], torch.full((3,), 4.0))  # forget gate
        torch.testing.assert_close(total[0:3], torch.full((3,), -4.0))  # input gate
    gru = SequenceModel(
        ModelConfig(task="regression", cell="gru", input_size=2, hidden_size=3, output_size=1)
    )
    before = gru.rnn.bias_hh_l0.detach().clone()
    set_gate_bias(gru, 2.0)
    torch.testing.assert_close(
        (gru.rnn.bias_ih_l0 + gru.rnn.bias_hh_l0)[3:6], torch.full((3,), 2.0)
    )  # update gate
    torch.testing.assert_close(gru.rnn.bias_hh_l0[6:], before[6:])  # the candidate's bias is untouched
    rnn = SequenceModel(
        ModelConfig(task="regression", cell="rnn", input_size=2, hidden_size=3, output_size=1)
    )
    with pytest.raises(ValueError, match="no gate"):
        set_gate_bias(rnn, 1.0)


# The smoke test: a small LSTM learns the adding problem at T = 20 within 16,000 sequences (seconds on CPU).
SMOKE = TrainSettings(hidden=16, batch=32, lr=1e-2, gate_bias=5.0, budget=16_000)


@pytest.fixture
def one_thread():
    """Tiny matrices: a second intra-op thread only adds synchronisation (10x slower on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _detached_every_step(original):
    """A reference layer whose backward stops at every step: BPTT truncated to one step (a broken backward)."""

    def layer(cell, x, state, weights, lengths=None, reverse=False, nonlinearity="tanh"):
        ys = []
        for t in range(x.shape[0]):
            y, state = original(
                cell, x[t : t + 1], tuple(s.detach() for s in state), weights, nonlinearity=nonlinearity
            )
            ys.append(y)
        return torch.cat(ys), state

    return layer


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_lstm_learns_adding_at_T20(backend, one_thread):
    result = train_on_task(AddingProblem(20), "lstm", dataclasses.replace(SMOKE, backend=backend))
    assert result.baseline_error > 0.03
    assert result.test_error < 0.1 * result.baseline_error, result.curve
    assert result.test_correct > 0.5


def test_a_backward_cut_at_every_step_fails_the_smoke_test(monkeypatch, one_thread):
    monkeypatch.setattr(kernels, "reference_layer", _detached_every_step(kernels.reference_layer))
    result = train_on_task(AddingProblem(20), "lstm", dataclasses.replace(SMOKE, backend="reference"))
    assert result.test_error > 0.8 * result.baseline_error


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_lstm_learns_adding_at_T20_on_gpu(backend):
    settings = dataclasses.replace(SMOKE, backend=backend, device="cuda")
    result = train_on_task(AddingProblem(20), "lstm", settings)
    assert result.test_error < 0.1 * result.baseline_error, result.curve


def test_the_untrained_model_scores_near_the_baseline():
    task = AddingProblem(20)
    model = SequenceModel(task.config("lstm", 8))
    test = task.sample(512, torch.Generator().manual_seed(1))
    error, correct = evaluate_task(model, task, test, chunk=100)
    baseline, _ = task.baseline(test)
    assert error > baseline and 0 <= correct < 0.5


def test_the_benchmark_steps_through_the_training_step_function():
    """One step function for `rnndeploy train` and this benchmark, not a copy: backward, clipping and the
    update are the same code in both."""
    import rnndeploy.longlag
    import rnndeploy.train

    assert rnndeploy.longlag.optimizer_step is rnndeploy.train.optimizer_step
