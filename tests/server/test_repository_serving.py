"""open_repository and the app over a model repository, in process: what each config.pbtxt field does.

An exported onnxruntime-backend repository (state pairs from the config's ``sequence_batching.state``) must
answer as the plain graph run offline with the state fed back; a hand-built graph that outputs its END and
CORRID control inputs shows what the server feeds them; requests are checked against the config; a
repository that cannot be served is refused naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from google.protobuf import json_format, text_format
from onnx import TensorProto, helper
from starlette.testclient import TestClient
from tritonclient.grpc import model_config_pb2

from rnndeploy import ModelConfig, SequenceModel
from rnndeploy.cli import main
from rnndeploy.export import write_triton_repository
from rnndeploy.runtime import StreamingSession
from rnndeploy.server import create_app, open_repository
from rnndeploy.server.repository import RepositoryError

from ..tritonserver_helpers import Reference, Request, reference_outputs

TOL = dict(atol=1e-5, rtol=1e-4)

CONTROLS_CONFIG = """
name: "counter"
backend: "onnxruntime"
max_batch_size: 4
input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] } ]
sequence_batching {
  max_sequence_idle_microseconds: 5000000
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "END" control [ { kind: CONTROL_SEQUENCE_END int32_false_true: [ 0, 1 ] } ] },
    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_INT64 } ] }
  ]
  state [ { input_name: "total_in" output_name: "total_out" data_type: TYPE_FP32 dims: [ 1 ]
            initial_state: { data_type: TYPE_FP32 dims: [ 1 ] zero_data: true name: "zero" } } ]
  direct { }
}
"""


SEQUENCE = 5_000_011  # a float32 holds it exactly


def counter_graph() -> onnx.ModelProto:
    """``total_out = total_in + x``; ``y = [END, CORRID, total_out]`` (floats), all ``[batch, ...]``; its
    metadata says it is a language model of 3 tokens."""
    batch = ["batch", 1]
    nodes = [
        helper.make_node("Add", ["total_in", "x"], ["total_out"]),
        helper.make_node("Cast", ["END"], ["end_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["CORRID"], ["corrid_f"], to=TensorProto.FLOAT),
        helper.make_node("Concat", ["end_f", "corrid_f", "total_out"], ["y"], axis=1),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, batch),
        helper.make_tensor_value_info("START", TensorProto.INT32, batch),
        helper.make_tensor_value_info("END", TensorProto.INT32, batch),
        helper.make_tensor_value_info("CORRID", TensorProto.INT64, batch),
        helper.make_tensor_value_info("total_in", TensorProto.FLOAT, batch),
    ]
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
        helper.make_tensor_value_info("total_out", TensorProto.FLOAT, batch),
    ]
    graph = helper.make_graph(nodes, "counter", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    # a vocabulary of 3 token ids: the server must not take the CORRID it fills in for a token id
    helper.set_model_props(model, {"rnndeploy.task": "lm", "rnndeploy.vocab": '["a", "b", "c"]'})
    return model


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, Reference]:
    root = tmp_path_factory.mktemp("repository") / "repo"
    torch.manual_seed(0)
    lm = SequenceModel(ModelConfig(task="lm", cell="gru", vocab_size=7, num_layers=2, hidden_size=5)).eval()
    write_triton_repository(lm, root, "lm", max_batch_size=4, idle_timeout_us=3_000_000)
    counter = root / "counter"
    (counter / "1").mkdir(parents=True)
    onnx.save(counter_graph(), counter / "1" / "model.onnx")
    (counter / "config.pbtxt").write_text(CONTROLS_CONFIG)
    return root, Reference.export(lm, root.parent / "lm_plain.onnx")


@pytest.fixture(scope="module")
def client(repo):
    models = open_repository(repo[0])
    with TestClient(create_app(None, models=models)) as client:
        yield client


def infer(client, model: str, inputs: list[dict], **parameters):
    return client.post(f"/v2/models/{model}/infer", json={"inputs": inputs, "parameters": parameters})


def test_config_sets_the_batcher_of_each_model(repo):
    models = open_repository(repo[0])
    lm, counter = models.get("lm"), models.get("counter")
    assert (lm.batcher.max_batch_size, lm.batcher.idle_timeout_s) == (4, 3.0)
    assert lm.batcher.max_queue_delay_s == pytest.approx(100e-6)  # the exported config's 100 us
    assert (counter.batcher.idle_timeout_s, counter.batcher.max_queue_delay_s) == (5.0, 0.0)
    assert [p.input for p in lm.session.states] == ["state_h_in"]
    assert [p.batch_axis for p in counter.session.states] == [0]


def test_onnxruntime_repository_model_matches_the_plain_graph(client, repo):
    ref = repo[1]
    requests = [Request(7, 0, (1, 2, 3), True, False), Request(7, 1, (4,), False, False),
                Request(7, 2, (5, 6), False, True)]  # fmt: skip
    want = reference_outputs(ref, requests)
    for r in requests:
        response = infer(
            client,
            "lm",
            [{"name": "input", "datatype": "INT64", "shape": [1, len(r.tokens)], "data": list(r.tokens)}],
            sequence_id=7,
            sequence_start=r.start,
            sequence_end=r.end,
        )
        assert response.status_code == 200, response.text
        (out,) = response.json()["outputs"]
        y = np.array(out["data"], np.float32).reshape(out["shape"])
        np.testing.assert_allclose(y, want[r.key], **TOL, err_msg=f"step {r.step}")


def test_server_fills_the_control_inputs(client):
    rows = []
    for step, (x, end) in enumerate([(1.0, False), (2.0, False), (3.5, True)]):
        response = infer(
            client,
            "counter",
            [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [x]}],
            sequence_id=SEQUENCE,
            sequence_start=step == 0,
            sequence_end=end,
        )
        assert response.status_code == 200, response.text
        rows.append(response.json()["outputs"][0]["data"])
    assert rows == [[0.0, float(SEQUENCE), 1.0], [0.0, float(SEQUENCE), 3.0], [1.0, float(SEQUENCE), 6.5]]
    response = infer(
        client,
        "counter",
        [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}],
        sequence_id="text-id",
        sequence_start=True,
    )
    assert response.status_code == 400 and "sequence_id must be an integer, got 'text-id'" in response.text


def test_metadata_index_and_routing(client):
    metadata = client.get("/v2/models/counter").json()
    assert metadata == {
        "name": "counter",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
    }
    config = client.get("/v2/models/counter/versions/1/config").json()
    assert (config["name"], config["backend"], config["max_batch_size"]) == ("counter", "onnxruntime", 4)
    sequence = config["sequence_batching"]
    assert sequence["max_sequence_idle_microseconds"] == "5000000"  # uint64: a string in protobuf's JSON
    assert [(s["input_name"], s["output_name"]) for s in sequence["state"]] == [("total_in", "total_out")]
    assert client.post("/v2/repository/index").json() == [
        {"name": "counter", "version": "1", "state": "READY"},
        {"name": "lm", "version": "1", "state": "READY"},
    ]
    assert client.post("/v2/repository/index", json={"ready": True}).status_code == 200
    unknown = client.get("/v2/models/nope")
    assert (
        unknown.status_code == 404
        and "unknown model 'nope'; this server serves 'counter', 'lm'" in unknown.text
    )
    version = client.get("/v2/models/lm/versions/3")
    assert version.status_code == 404 and "unknown version '3' of model 'lm'; available: 1" in version.text
    metrics = client.get("/metrics").text
    assert 'nv_inference_request_success{model="lm",version="1"}' in metrics
    assert 'nv_inference_request_success{model="counter",version="1"}' in metrics


@pytest.mark.parametrize(
    "inputs, message",
    [
        ([{"name": "START", "datatype": "INT32", "shape": [1, 1], "data": [1]}],
         "model 'counter' takes inputs ['x'] (its config.pbtxt); missing ['x']; unexpected ['START']"),
        ([{"name": "x", "datatype": "FP64", "shape": [1, 1], "data": [1.0]}],
         "input 'x' of model 'counter' must be FP32, got FP64"),
        ([{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]}],
         "input 'x' of model 'counter' must have shape [-1, 1] (-1: any size), got [1, 2]"),
        ([{"name": "x", "datatype": "FP32", "shape": [5, 1], "data": [1.0] * 5}],
         "input 'x' of model 'counter' has 5 batch rows; max_batch_size is 4"),
    ],
    ids=["control-input-sent", "datatype", "dims", "max-batch-size"],
)  # fmt: skip
def test_requests_are_checked_against_the_config(client, inputs, message):
    response = infer(client, "counter", inputs, sequence_id=99, sequence_start=True)
    assert response.status_code == 400 and message in response.json()["error"], response.text


def test_unservable_repositories_name_the_file(repo, tmp_path):
    root = tmp_path / "repo"
    (root / "plan" / "1").mkdir(parents=True)
    (root / "plan" / "config.pbtxt").write_text('backend: "tensorrt"\nmax_batch_size: 1\n')
    with pytest.raises(
        RepositoryError, match=r"plan/config.pbtxt: rnndeploy serve runs onnxruntime and python"
    ):
        open_repository(root)

    root = tmp_path / "python"
    (root / "py" / "1").mkdir(parents=True)
    (root / "py" / "1" / "model.py").write_text("")
    (root / "py" / "config.pbtxt").write_text('backend: "python"\n')
    with pytest.raises(
        RepositoryError, match=r"py/1/model.onnx: missing; .* runs the model.onnx next to model.py"
    ):
        open_repository(root)

    root = tmp_path / "renamed"
    (root / "counter" / "1").mkdir(parents=True)
    onnx.save(counter_graph(), root / "counter" / "1" / "model.onnx")
    (root / "counter" / "config.pbtxt").write_text(CONTROLS_CONFIG.replace('"x"', '"features"'))
    with pytest.raises(RepositoryError, match=r"graph input 'x' is neither an input nor a sequence control"):
        open_repository(root)


def test_serve_command_refuses_a_bad_repository_and_single_model_options(repo, tmp_path):
    root = tmp_path / "bad"
    (root / "m" / "1").mkdir(parents=True)
    (root / "m" / "config.pbtxt").write_text('backend: "onnxruntime"\nmax_batch_siz: 4\n')
    result = CliRunner().invoke(main, ["serve", str(root), "--port", "0", "--grpc-port", "0"])
    assert result.exit_code == 1 and "unknown field (did you mean 'max_batch_size'?)" in result.output, (
        result.output
    )
    result = CliRunner().invoke(main, ["serve", str(repo[0]), "--name", "x", "--grpc-port", "0"])
    assert result.exit_code == 1 and "--name apply to one .onnx file" in result.output, result.output


@pytest.mark.parametrize("shape, status", [([1, 1], 200), ([1], 400)])
def test_one_request_is_treated_alike_by_the_repository_and_the_single_file_server(
    client, repo, shape, status
):
    """Token ids without the batch axis (``shape: [1]``) are refused by both servers (each one's metadata says
    ``[-1, -1]``, batch axis first, as Triton requires of a batched model); with it, both answer."""
    tokens = {"name": "input", "datatype": "INT64", "shape": shape, "data": [3]}
    declared = {"name": "input", "datatype": "INT64", "shape": [-1, -1]}
    with TestClient(create_app(StreamingSession(repo[0].parent / "lm_plain.onnx"), "lm")) as single:
        for server in (client, single):
            assert server.get("/v2/models/lm").json()["inputs"][0] == declared
            response = infer(server, "lm", [tokens])
            assert response.status_code == status, response.text
            if status == 400:
                assert "input 'input' of model 'lm' must have shape [-1, -1] (-1: any size)" in response.text


def test_config_answers_the_whole_config_pbtxt(client, repo):
    """/config is the model's ModelConfig message as JSON, every field of config.pbtxt (Triton's answer),
    not only the fields the server reads (such as the oldest strategy's preferred batch sizes)."""
    for name in ("lm", "counter"):
        text = (repo[0] / name / "config.pbtxt").read_text()
        want = json_format.MessageToDict(
            text_format.Parse(text, model_config_pb2.ModelConfig()), preserving_proto_field_name=True
        )
        assert client.get(f"/v2/models/{name}/config").json() == {**want, "name": name}
    oldest = client.get("/v2/models/lm/config").json()["sequence_batching"]["oldest"]
    assert oldest["preferred_batch_size"] == [1, 4]
