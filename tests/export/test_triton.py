"""Triton Inference Server repository: config.pbtxt checked with Triton's own schema; the graph's reset."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format

from rnndeploy import ModelConfig, SequenceModel
from rnndeploy.export import write_triton_repository

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")

CONFIGS = {
    "lstm-L2-embed": dict(task="lm", cell="lstm", vocab_size=11, num_layers=2),
    "gru-L1-linear": dict(task="regression", cell="gru", input_size=3, output_size=2),
}


def make_model(**kwargs) -> SequenceModel:
    return SequenceModel(ModelConfig(embed_dim=6, hidden_size=5, **kwargs)).eval()


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def repo(request, tmp_path):
    model = make_model(**CONFIGS[request.param])
    folder = write_triton_repository(
        model, tmp_path / "repo", "seq", max_batch_size=8, max_queue_delay_us=250
    )
    return model, folder


def test_config_parses_with_tritons_schema(repo):
    model, folder = repo
    c = model.config
    assert sorted(p.name for p in folder.iterdir()) == ["1", "config.pbtxt"]
    assert (folder / "1" / "model.onnx").is_file()
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    mc = model_config_pb2
    assert (config.name, config.backend, config.max_batch_size) == ("seq", "onnxruntime", 8)
    (inp,) = config.input
    assert inp.name == "input"
    if c.vocab_size is not None:
        assert (inp.data_type, list(inp.dims)) == (mc.TYPE_INT64, [-1])
    else:
        assert (inp.data_type, list(inp.dims)) == (mc.TYPE_FP32, [-1, c.input_size])
    (out,) = config.output
    assert (out.name, out.data_type, list(out.dims)) == ("output", mc.TYPE_FP32, [-1, c.output_size])
    seq = config.sequence_batching
    assert seq.max_sequence_idle_microseconds > 0
    (control,) = seq.control_input
    assert control.name == "START"
    assert control.control[0].kind == mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_START
    assert list(control.control[0].int32_false_true) == [0, 1]
    assert [(s.input_name, s.output_name) for s in seq.state] == [
        (f"state_{s}_in", f"state_{s}_out") for s in c.state_names
    ]
    for state in seq.state:
        assert state.data_type == mc.TYPE_FP32
        assert list(state.dims) == [c.num_layers * c.num_directions, c.hidden_size]
        assert state.initial_state[0].zero_data and list(state.initial_state[0].dims) == list(state.dims)
    assert seq.WhichOneof("strategy_choice") == "oldest"
    assert seq.oldest.max_queue_delay_microseconds == 250
    assert seq.oldest.max_candidate_sequences == 8


def test_graph_names_match_the_config(repo):
    _, folder = repo
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    seq = config.sequence_batching
    assert set(inputs) == {"input", "START", *(s.input_name for s in seq.state)}
    assert set(outputs) == {"output", *(s.output_name for s in seq.state)}
    for s in seq.state:  # batch-first state at the boundary, as Triton's implicit state expects
        assert inputs[s.input_name][1:] == list(s.dims) == outputs[s.output_name][1:]
    assert inputs["START"][1:] == [1]


def test_start_in_the_middle_resets_the_state(repo):
    model, folder = repo
    c = model.config
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    B, T, restart = 3, 7, 4
    x = torch.randint(0, c.vocab_size, (B, T)) if c.vocab_size else torch.randn(B, T, c.input_size)
    rows = c.num_layers * c.num_directions
    # garbage state on the first request: START must ignore it
    state = {
        f"state_{s}_in": np.random.randn(B, rows, c.hidden_size).astype(np.float32) for s in c.state_names
    }
    ys = []
    for t in range(T):
        start = np.full((B, 1), int(t in (0, restart)), np.int32)
        out = session.run(
            ["output", *(f"state_{s}_out" for s in c.state_names)],
            {"input": x[:, t : t + 1].numpy(), "START": start, **state},
        )
        ys.append(out[0])
        state = {f"state_{s}_in": o for s, o in zip(c.state_names, out[1:], strict=True)}
    with torch.no_grad():
        first, _ = model(x[:, :restart])
        second, final = model(x[:, restart:])  # a fresh sequence from the zero state
    np.testing.assert_allclose(
        np.concatenate(ys, 1), torch.cat([first, second], 1).numpy(), atol=1e-5, rtol=1e-4
    )
    for s, f in zip(c.state_names, final, strict=True):
        np.testing.assert_allclose(state[f"state_{s}_in"], f.transpose(0, 1).numpy(), atol=1e-5, rtol=1e-4)
    # without the restart the second half continues the first: outputs differ
    with torch.no_grad():
        continued, _ = model(x)
    assert not np.allclose(continued[:, restart:].numpy(), second.numpy(), atol=1e-3)


def test_checkpoint_export_keeps_vocab_and_stats_in_the_triton_graph(tmp_path):
    import json

    import onnx

    from rnndeploy import save_checkpoint
    from rnndeploy.export import export_checkpoint

    model = make_model(**CONFIGS["lstm-L2-embed"])
    vocab = list("abcdefghijk")
    ckpt = save_checkpoint(tmp_path / "m.pt", model, vocab=vocab)
    export_checkpoint(
        ckpt, tmp_path / "m.onnx", verify=False, triton_repo=tmp_path / "repo", triton_name="lm"
    )
    meta = {p.key: p.value for p in onnx.load(tmp_path / "repo" / "lm" / "1" / "model.onnx").metadata_props}
    assert json.loads(meta["rnndeploy.vocab"]) == vocab
    assert json.loads(meta["rnndeploy.data_stats"]) == {}
