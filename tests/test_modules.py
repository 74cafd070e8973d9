"""rnndeploy.RNN/LSTM/GRU against torch.nn: outputs, states and every gradient, state_dict round trips, convert.

The "reference" backend runs the module's own layer composition over the plain-torch reference cells, so these
tests check the composition (layers, directions, batch_first, packing, initial state) that every backend shares.
"""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnndeploy

from .tolerances import COMPOSITION_TOL

TORCH = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
OURS = {"rnn": rnndeploy.RNN, "lstm": rnndeploy.LSTM, "gru": rnndeploy.GRU}
ATOL, RTOL = COMPOSITION_TOL

CASES = [
    # cell, nonlinearity, layers, bidirectional, batch_first, bias
    ("rnn", "tanh", 1, False, False, True),
    ("rnn", "relu", 2, True, True, True),
    ("lstm", None, 1, False, True, True),
    ("lstm", None, 2, True, False, True),
    ("lstm", None, 2, False, True, False),
    ("gru", None, 1, True, True, True),
    ("gru", None, 2, False, False, True),
]


def _id(case):
    cell, act, layers, bidir, bf, bias = case
    return f"{cell}{'-' + act if act else ''}-L{layers}{'-bi' if bidir else ''}{'-bf' if bf else ''}{'' if bias else '-nobias'}"


def _pair(case, input_size=3, hidden=5, backend="reference"):
    cell, act, layers, bidir, bf, bias = case
    kw = dict(num_layers=layers, bidirectional=bidir, batch_first=bf, bias=bias)
    if act:
        kw["nonlinearity"] = act
    ref = TORCH[cell](input_size, hidden, **kw)
    ours = OURS[cell](input_size, hidden, backend=backend, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _state(cell, layers, bidir, B, H, requires_grad=True):
    n = layers * (2 if bidir else 1)
    h = torch.randn(n, B, H, requires_grad=requires_grad)
    if cell == "lstm":
        return (h, torch.randn(n, B, H, requires_grad=requires_grad))
    return h


def _flat(hidden):
    return list(hidden) if isinstance(hidden, tuple) else [hidden]


def _assert_same(a, b, what):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("with_h0", [False, True], ids=["zero-h0", "h0"])
def test_forward_and_gradients_match_torch(case, with_h0):
    cell, _, layers, bidir, bf, _ = case
    B, T, I, H = 3, 7, 3, 5
    ref, ours = _pair(case, I, H)
    x = torch.randn((B, T, I) if bf else (T, B, I), requires_grad=True)
    hx = _state(cell, layers, bidir, B, H) if with_h0 else None

    y_ref, h_ref = ref(x, hx)
    y, h = ours(x, hx)
    _assert_same(y, y_ref, "output")
    for a, b in zip(_flat(h), _flat(h_ref)):
        _assert_same(a, b, "final state")

    # a loss that touches every output and every final state
    weights = [torch.randn_like(t) for t in [y_ref, *_flat(h_ref)]]
    loss_ref = sum((w * t).sum() for w, t in zip(weights, [y_ref, *_flat(h_ref)]))
    loss = sum((w * t).sum() for w, t in zip(weights, [y, *_flat(h)]))
    inputs = [x, *(_flat(hx) if hx is not None else [])]
    g_ref = torch.autograd.grad(loss_ref, inputs + list(ref.parameters()))
    g = torch.autograd.grad(loss, inputs + list(ours.parameters()))
    names = ["x", *(["h0", "c0"][: len(inputs) - 1])] + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, g, g_ref):
        _assert_same(a, b, f"grad {name}")


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=_id)
def test_packed_sequence_matches_torch(case):
    cell, _, layers, bidir, bf, _ = case
    B, T, I, H = 4, 6, 3, 5
    ref, ours = _pair(case, I, H)
    lengths = torch.tensor([3, 6, 1, 4])  # unsorted on purpose
    x = torch.randn((B, T, I) if bf else (T, B, I), requires_grad=True)
    hx = _state(cell, layers, bidir, B, H)
    packed = pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=False)

    y_ref, h_ref = ref(packed, hx)
    y, h = ours(packed, hx)
    assert isinstance(y, type(y_ref))
    torch.testing.assert_close(y.batch_sizes, y_ref.batch_sizes)
    torch.testing.assert_close(y.sorted_indices, y_ref.sorted_indices)
    _assert_same(y.data, y_ref.data, "packed output")
    for a, b in zip(_flat(h), _flat(h_ref)):
        _assert_same(a, b, "final state")
    pad, _ = pad_packed_sequence(y, batch_first=bf)
    pad_ref, _ = pad_packed_sequence(y_ref, batch_first=bf)
    g = torch.autograd.grad((pad * pad_ref.detach()).sum(), [x, *_flat(hx)], retain_graph=True)
    g_ref = torch.autograd.grad((pad_ref * pad_ref.detach()).sum(), [x, *_flat(hx)])
    for a, b in zip(g, g_ref):
        _assert_same(a, b, "packed grad")


def test_unbatched_input_matches_torch():
    ref, ours = _pair(CASES[3])
    x = torch.randn(7, 3)
    h0 = (torch.randn(4, 5), torch.randn(4, 5))
    y_ref, (h_ref, c_ref) = ref(x, h0)
    y, (h, c) = ours(x, h0)
    assert y.shape == y_ref.shape == (7, 10)
    _assert_same(y, y_ref, "output")
    _assert_same(h, h_ref, "h")
    _assert_same(c, c_ref, "c")


def test_dropout_between_layers_only_in_training():
    ours = rnndeploy.GRU(3, 5, num_layers=2, dropout=0.5, backend="reference")
    x = torch.randn(7, 2, 3)
    ours.train()
    torch.manual_seed(1)
    a, _ = ours(x)
    torch.manual_seed(2)
    b, _ = ours(x)
    assert not torch.allclose(a, b), "dropout between layers had no effect in training"
    ours.eval()
    ref = nn.GRU(3, 5, num_layers=2, dropout=0.5)
    ref.load_state_dict(ours.state_dict())
    ref.eval()
    _assert_same(ours(x)[0], ref(x)[0], "eval output")


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_state_dict_moves_both_ways(cell):
    torch_model = TORCH[cell](4, 6, num_layers=2, bidirectional=True)
    ours = OURS[cell](4, 6, num_layers=2, bidirectional=True, backend="reference")
    ours.load_state_dict(torch_model.state_dict(), strict=True)
    back = TORCH[cell](4, 6, num_layers=2, bidirectional=True)
    back.load_state_dict(ours.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(torch_model.state_dict())
    x = torch.randn(5, 2, 4)
    for model in (ours, back):
        for a, b in zip(_flat(model(x)[1]), _flat(torch_model(x)[1])):
            torch.testing.assert_close(a, b)


def test_batch_size_seen_by_the_dispatcher():
    lstm = rnndeploy.LSTM(3, 4, batch_first=True)
    assert lstm.batch_size(torch.randn(5, 7, 3)) == 5
    assert lstm.batch_size(torch.randn(7, 3)) == 1  # unbatched
    packed = pack_padded_sequence(torch.randn(6, 2, 3), torch.tensor([2, 6]), enforce_sorted=False)
    assert lstm.batch_size(packed) == 2
    assert rnndeploy.GRU(3, 4).batch_size(torch.randn(7, 5, 3)) == 5  # time-major


def test_torch_backend_is_the_default_on_cpu():
    m = rnndeploy.LSTM(3, 4)
    assert m.backend == "auto"
    assert m.resolve_backend(torch.randn(2, 1, 3)) == "torch"


def test_triton_backend_unavailable_says_why(monkeypatch):
    monkeypatch.setattr(rnndeploy.kernels, "triton_unavailable_reason", lambda device: "no kernels here")
    m = rnndeploy.GRU(3, 4, backend="triton")
    with pytest.raises(RuntimeError, match="backend='triton' cannot run on cpu: no kernels here"):
        m(torch.randn(2, 1, 3))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="backend must be one of"):
        rnndeploy.LSTM(3, 4, backend="cudnn")
    with pytest.raises(ValueError, match="proj_size=2 is not supported"):
        rnndeploy.LSTM(3, 4, proj_size=2)
    m = rnndeploy.LSTM(3, 4, backend="reference")
    with pytest.raises(RuntimeError, match="must be equal to input_size. Expected 3, got 7"):
        m(torch.randn(5, 2, 7))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(1, 2, 4\), got \[1, 3, 4\]: h_0 is"):
        m(torch.randn(5, 2, 3), (torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)))


def test_convert_swaps_layers_in_place_keeping_parameters():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 3)
            self.body = nn.Sequential(nn.GRU(3, 5, batch_first=True))
            self.lstm = nn.LSTM(5, 4, num_layers=2)
            self.head = nn.Linear(4, 2)

    net = Net()
    params_before = {n: p for n, p in net.named_parameters()}
    x = torch.randint(0, 10, (2, 6))
    gru_out = net.body[0](net.emb(x))[0]

    assert rnndeploy.convert(net, backend="reference") is net
    assert type(net.body[0]) is rnndeploy.GRU and type(net.lstm) is rnndeploy.LSTM
    assert isinstance(net.lstm, nn.LSTM) and net.lstm.backend == "reference"
    for n, p in net.named_parameters():
        assert p is params_before[n], f"{n} was replaced, optimizers holding it would break"
    _assert_same(net.body[0](net.emb(x))[0], gru_out, "converted output")

    with pytest.raises(ValueError, match="proj_size=2 is not supported"):
        rnndeploy.convert(nn.Sequential(nn.LSTM(3, 4, proj_size=2)))
