"""Triton Inference Server repository: config.pbtxt checked with Triton's own schema; the graph's reset."""

from __future__ import annotations

import json
import sys
import types

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


def parse(folder):
    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_python_backend_is_the_same_model_with_its_state_in_model_py(tmp_path):
    import onnx

    from rnndeploy.export.triton import PYTHON_MODEL

    model = make_model(**CONFIGS["lstm-L2-embed"])
    kw = dict(max_batch_size=8, max_queue_delay_us=250, idle_timeout_us=3_000_000)
    ort_folder = write_triton_repository(model, tmp_path / "repo", "ort", **kw)
    py_folder = write_triton_repository(model, tmp_path / "repo", "py", backend="python", **kw)
    assert sorted(p.name for p in (py_folder / "1").iterdir()) == ["model.onnx", "model.py"]
    assert (py_folder / "1" / "model.py").read_text() == PYTHON_MODEL.read_text()
    assert onnx.load(py_folder / "1" / "model.onnx").graph == onnx.load(ort_folder / "1" / "model.onnx").graph
    ort_config, py_config = parse(ort_folder), parse(py_folder)
    mc = model_config_pb2
    assert (py_config.backend, ort_config.backend) == ("python", "onnxruntime")
    (group,) = py_config.instance_group  # one instance holds every sequence's state
    assert (group.kind, group.count) == (mc.ModelInstanceGroup.KIND_CPU, 1)
    assert not ort_config.instance_group
    seq = py_config.sequence_batching
    assert not seq.state  # the Python backend cannot write implicit state back
    kinds = mc.ModelSequenceBatching.Control
    assert [(c.name, c.control[0].kind, list(c.control[0].int32_false_true)) for c in seq.control_input] == [
        ("START", kinds.CONTROL_SEQUENCE_START, [0, 1]),
        ("END", kinds.CONTROL_SEQUENCE_END, [0, 1]),
    ]
    # everything else is the onnxruntime config
    for field in ("input", "output", "max_batch_size"):
        assert getattr(py_config, field) == getattr(ort_config, field), field
    assert seq.oldest == ort_config.sequence_batching.oldest
    assert seq.max_sequence_idle_microseconds == 3_000_000


def test_unknown_backend_is_refused_by_name(tmp_path):
    model = make_model(**CONFIGS["gru-L1-linear"])
    with pytest.raises(ValueError, match=r"backend must be one of onnxruntime, python, got 'tensorrt'"):
        write_triton_repository(model, tmp_path / "repo", "m", backend="tensorrt")
    assert not (tmp_path / "repo").exists()


def test_export_command_writes_the_python_backend_repository(tmp_path):
    from click.testing import CliRunner

    from rnndeploy import save_checkpoint
    from rnndeploy.cli import main

    ckpt = save_checkpoint(
        tmp_path / "lm.pt", make_model(**CONFIGS["lstm-L2-embed"]), vocab=list("abcdefghijk")
    )
    args = ["export", str(ckpt), "--triton-repo", str(tmp_path / "repo"), "--triton-name", "lm"]
    result = CliRunner().invoke(main, [*args, "--triton-backend", "python"])
    assert result.exit_code == 0, result.output
    assert parse(tmp_path / "repo" / "lm").backend == "python"
    assert (tmp_path / "repo" / "lm" / "1" / "model.py").is_file()
    result = CliRunner().invoke(main, [*args, "--triton-backend", "tensorrt"])
    assert result.exit_code == 2 and "'tensorrt' is not one of 'onnxruntime', 'python'" in result.output


# --- model.py without Triton: a stand-in for triton_python_backend_utils ---


class _Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self.array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def to_dlpack(self):
        return self.array.__dlpack__()

    @classmethod
    def from_dlpack(cls, name: str, obj) -> _Tensor:
        return cls(name, np.from_dlpack(obj).copy())


class _Request:
    def __init__(self, correlation_id: int, x: np.ndarray, start: bool = False, end: bool = False) -> None:
        self.id = correlation_id
        self.inputs = {
            "input": _Tensor("input", x),
            "START": _Tensor("START", np.array([[int(start)]], np.int32)),
            "END": _Tensor("END", np.array([[int(end)]], np.int32)),
        }

    def correlation_id(self) -> int:
        return self.id


def _response(output_tensors, error=None):
    return types.SimpleNamespace(outputs={t.name(): t.array for t in output_tensors}, error=error)


_FEATURES = np.random.default_rng(0).standard_normal((12, 3)).astype(np.float32)  # token k -> features


def _encode(model: SequenceModel, tokens: list[int]) -> np.ndarray:
    """``[1, T]`` token ids, or ``[1, T, F]`` features (a fixed row per token) for a regression model."""
    if model.config.vocab_size is not None:
        return np.array([tokens], np.int64)
    return _FEATURES[None, tokens, : model.config.input_size]


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def model_py(request, tmp_path, monkeypatch):
    """``model.py`` of a python-backend repository, initialized as Triton would, and its torch model."""
    import importlib.util

    from google.protobuf import json_format

    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor = _Tensor
    fake.InferenceResponse = _response
    fake.TritonError = str
    fake.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # initialize() wraps it
    model = make_model(**CONFIGS[request.param])
    folder = write_triton_repository(
        model, tmp_path / "repo", "py", backend="python", max_batch_size=8, idle_timeout_us=1_000_000
    )
    spec = importlib.util.spec_from_file_location("rnndeploy_triton_model", folder / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = json_format.MessageToDict(parse(folder), preserving_proto_field_name=True)
    instance = module.TritonPythonModel()
    instance.initialize(
        {"model_config": json.dumps(config), "model_repository": str(folder), "model_version": "1"}
    )
    return module, instance, model


def test_model_py_batches_sequences_and_keeps_their_state(model_py, monkeypatch):
    module, instance, model = model_py
    clock = [100.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: clock[0])

    def step(key: int, tokens: list[int], **flags: bool) -> _Request:
        return _Request(key, _encode(model, tokens), **flags)

    calls = [  # what Triton's sequence batcher might hand over together: mixed lengths, a repeated id
        [step(1, [1, 2], start=True), step(2, [3], start=True), step(3, [4, 5], start=True)],
        [step(1, [6]), step(2, [7], end=True), step(3, [8, 9]), step(1, [10])],
        [step(3, [1], start=True)],  # restart: a fresh state
    ]
    got: dict[int, list[np.ndarray]] = {1: [], 2: [], 3: []}
    for requests in calls:
        responses = instance.execute(requests)
        assert len(responses) == len(requests)
        for request, response in zip(requests, responses):
            assert response.error is None, response.error
            got[request.id].append(response.outputs["output"])

    def run(tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.from_numpy(_encode(model, tokens)))[0]

    want = {1: run([1, 2, 6, 10]), 2: run([3, 7]), 3: torch.cat([run([4, 5, 8, 9]), run([1])], 1)}
    for key, outputs in got.items():
        np.testing.assert_allclose(
            np.concatenate(outputs, 1), want[key].numpy(), atol=1e-5, rtol=1e-4, err_msg=f"sequence {key}"
        )
    assert sorted(instance.memory) == [1, 3]  # END dropped sequence 2

    (ended,) = instance.execute([step(2, [1])])
    assert "sequence 2: no state" in ended.error and "sequence_start=True" in ended.error
    clock[0] += 2.5  # past twice max_sequence_idle_microseconds (1 s)
    idle, fresh = instance.execute([step(1, [1]), step(4, [2], start=True)])
    assert "sequence 1: no state" in idle.error, idle.error
    assert fresh.error is None and sorted(instance.memory) == [4]


def test_a_model_folder_is_not_replaced_unless_asked(tmp_path):
    """Another model's (or an earlier export's) folder in the repository is refused by name; overwrite=True
    replaces it, and the CLI names --overwrite."""
    from click.testing import CliRunner

    from rnndeploy import save_checkpoint
    from rnndeploy.cli import main
    from rnndeploy.export import OutputExistsError

    model = SequenceModel(ModelConfig(task="lm", cell="gru", vocab_size=7, embed_dim=3, hidden_size=4))
    folder = write_triton_repository(model, tmp_path / "repo", "lm")
    before = (folder / "1" / "model.onnx").read_bytes()
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        write_triton_repository(model, tmp_path / "repo", "lm", max_batch_size=2)
    assert (folder / "1" / "model.onnx").read_bytes() == before
    write_triton_repository(model, tmp_path / "repo", "lm", max_batch_size=2, overwrite=True)
    assert "max_batch_size: 2" in (folder / "config.pbtxt").read_text()

    ckpt = save_checkpoint(tmp_path / "m.pt", model)
    args = ["export", str(ckpt), "-o", str(tmp_path / "m.onnx"), "--triton-repo", str(tmp_path / "repo")]
    result = CliRunner().invoke(main, [*args, "--triton-name", "lm"])
    assert result.exit_code == 1 and f"{folder} exists; pass --overwrite" in result.output, result.output
    assert not (tmp_path / "m.onnx").exists(), "nothing is written when the repository folder is refused"
