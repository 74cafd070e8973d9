"""SequenceModel and ModelConfig: shapes, state carrying, config round trip, checkpoints."""

import argparse

import pytest
import torch
from torch import nn

import rnndeploy
from rnndeploy import ModelConfig, SequenceModel


def test_lm_state_carry_equals_one_long_pass():
    model = SequenceModel(
        ModelConfig(task="lm", cell="lstm", vocab_size=11, embed_dim=4, hidden_size=6, num_layers=2)
    )
    x = torch.randint(0, 11, (3, 9))
    y_full, s_full = model(x)
    assert y_full.shape == (3, 9, 11)
    torch.testing.assert_close(y_full.exp().sum(-1), torch.ones(3, 9))  # log_softmax head
    y1, s = model(x[:, :4])
    y2, s = model(x[:, 4:], s)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full)
    for a, b in zip(s, s_full):
        torch.testing.assert_close(a, b)


def test_regression_head_is_linear_map_of_recurrent_output():
    cfg = ModelConfig(task="regression", cell="gru", input_size=2, output_size=1, embed_dim=3, hidden_size=4)
    model = SequenceModel(cfg, backend="reference")
    x = torch.randn(2, 5, 2)
    y, (h,) = model(x)
    gru = nn.GRU(3, 4, batch_first=True)
    gru.load_state_dict(model.rnn.state_dict())
    out, h_ref = gru(model.encoder(x))
    torch.testing.assert_close(y, model.head(out))
    torch.testing.assert_close(h, h_ref)


def test_bidirectional_classifier_uses_both_final_states_and_lengths():
    cfg = ModelConfig(
        task="classification",
        cell="rnn",
        vocab_size=7,
        output_size=3,
        embed_dim=4,
        hidden_size=5,
        bidirectional=True,
    )
    model = SequenceModel(cfg)
    x = torch.randint(0, 7, (2, 6))
    y, (h,) = model(x, lengths=torch.tensor([6, 2]))
    assert y.shape == (2, 3) and h.shape == (2, 2, 5)
    # row 1 must equal a run on its first two tokens alone
    y1, _ = model(x[1:, :2])
    torch.testing.assert_close(y[1:], y1)


def test_config_json_round_trip_and_errors():
    cfg = ModelConfig(task="lm", cell="gru", vocab_size=20, hidden_size=8)
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert cfg.output_size == 20 and cfg.head == "log_softmax"
    with pytest.raises(ValueError, match="cell must be one of"):
        ModelConfig(cell="transformer", vocab_size=3)
    with pytest.raises(ValueError, match="exactly one of vocab_size"):
        ModelConfig(task="regression", output_size=1)
    with pytest.raises(ValueError, match="bidirectional=True .* task='classification' only"):
        ModelConfig(task="lm", vocab_size=5, bidirectional=True)
    with pytest.raises(ValueError, match=r"unknown model config keys \['colour'\]"):
        ModelConfig.from_dict({"vocab_size": 3, "colour": "red"})


def test_token_model_rejects_float_input():
    model = SequenceModel(ModelConfig(vocab_size=5, hidden_size=4))
    with pytest.raises(TypeError, match="token ids"):
        model(torch.randn(2, 3))


def test_checkpoint_round_trip(tmp_path):
    cfg = ModelConfig(task="lm", cell="lstm", vocab_size=6, hidden_size=4, embed_dim=3)
    model = SequenceModel(cfg)
    opt = torch.optim.Adam(model.parameters())
    path = rnndeploy.save_checkpoint(tmp_path / "m.pt", model, vocab=list("abcdef"), step=7, optimizer=opt)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"], "temporary files left behind"
    ck = rnndeploy.load_checkpoint(path)
    assert ck.config == cfg and ck.vocab == list("abcdef") and ck.step == 7 and ck.optimizer is not None
    x = torch.randint(0, 6, (2, 5))
    torch.testing.assert_close(ck.model(x)[0], model(x)[0])


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(rnndeploy.CheckpointError, match="does not exist"):
        rnndeploy.load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(rnndeploy.CheckpointError, match="bad.pt is not a checkpoint: expected the .pt file"):
        rnndeploy.load_checkpoint(bad)
    pickled = tmp_path / "pickled.pt"
    torch.save(argparse.Namespace(code="would run on load"), pickled)
    with pytest.raises(
        rnndeploy.CheckpointError, match="pickled.pt is a torch file rnndeploy cannot load safely"
    ):
        rnndeploy.load_checkpoint(pickled)
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(rnndeploy.CheckpointError, match="not an rnndeploy checkpoint"):
        rnndeploy.load_checkpoint(other)


def test_atomic_write_keeps_the_umask_mode(tmp_path):
    import os

    from rnndeploy.checkpoint import atomic_write

    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "x.txt", lambda tmp: open(tmp, "w").write("hi"))
    finally:
        os.umask(umask)
    assert (tmp_path / "x.txt").read_text() == "hi"
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o644
