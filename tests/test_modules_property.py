"""Property test: for any small shape, lengths and layer options, the module's own layer composition (on the
plain-torch reference cells) gives what torch.nn gives on a PackedSequence."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnndeploy

from .tolerances import COMPOSITION_TOL

ATOL, RTOL = COMPOSITION_TOL

CLASSES = {"rnn": (nn.RNN, rnndeploy.RNN), "lstm": (nn.LSTM, rnndeploy.LSTM), "gru": (nn.GRU, rnndeploy.GRU)}


@st.composite
def cases(draw):
    batch = draw(st.integers(1, 4))
    time = draw(st.integers(1, 6))
    return dict(
        cell=draw(st.sampled_from(sorted(CLASSES))),
        input_size=draw(st.integers(1, 4)),
        hidden=draw(st.integers(1, 5)),
        layers=draw(st.integers(1, 2)),
        bidirectional=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        time=time,
        lengths=draw(st.lists(st.integers(1, time), min_size=batch, max_size=batch)),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=40, deadline=None)
@given(cases())
def test_reference_composition_matches_torch_on_packed_input(case):
    torch.manual_seed(case["seed"])
    theirs_cls, ours_cls = CLASSES[case["cell"]]
    kwargs = dict(
        num_layers=case["layers"], bidirectional=case["bidirectional"], batch_first=case["batch_first"]
    )
    theirs = theirs_cls(case["input_size"], case["hidden"], **kwargs)
    ours = ours_cls(case["input_size"], case["hidden"], backend="reference", **kwargs)
    ours.load_state_dict(theirs.state_dict())
    batch = len(case["lengths"])
    shape = (batch, case["time"]) if case["batch_first"] else (case["time"], batch)
    x = torch.randn(*shape, case["input_size"])
    packed = pack_padded_sequence(x, torch.tensor(case["lengths"]), case["batch_first"], enforce_sorted=False)

    y_theirs, h_theirs = theirs(packed)
    y_ours, h_ours = ours(packed)
    pad = lambda y: pad_packed_sequence(y, batch_first=case["batch_first"])[0]  # noqa: E731
    torch.testing.assert_close(pad(y_ours), pad(y_theirs), atol=ATOL, rtol=RTOL)
    for a, b in zip(
        h_ours if isinstance(h_ours, tuple) else (h_ours,),
        h_theirs if isinstance(h_theirs, tuple) else (h_theirs,),
    ):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
