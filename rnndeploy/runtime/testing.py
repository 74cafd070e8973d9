"""Small stateful ONNX models built with ``onnx.helper``, for tests, benchmarks and examples.

They follow the ONNX contract of ``rnndeploy.export`` (``lstm_lm``), deliberately break its naming
(``scaled_rnn``), count their steps (``counter_rnn``) or take long over one (``slow_rnn``), so the runtime and server can be tested without torch
and without the exporter.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def lstm_lm(
    vocab: list[str] | None = None,
    embed_dim: int = 8,
    hidden_size: int = 16,
    num_layers: int = 2,
    seed: int = 0,
    metadata: bool = True,
) -> onnx.ModelProto:
    """A character LSTM language model as the exporter writes it.

    Graph: ``input`` ``[batch, time]`` int64 -> Gather (embedding) -> ``num_layers`` ONNX LSTM nodes -> MatMul
    head -> LogSoftmax ``output`` ``[batch, time, V]``; states ``h0``/``c0`` -> ``hn``/``cn``, each
    ``[num_layers, batch, hidden_size]`` (batch axis 1). With ``metadata`` the model carries
    ``rnndeploy.states``, ``rnndeploy.task`` = ``lm`` and ``rnndeploy.vocab``.
    """
    vocab = vocab if vocab is not None else list("abcdefgh ")
    rng = np.random.default_rng(seed)
    V, E, H, L = len(vocab), embed_dim, hidden_size, num_layers

    def init(name: str, array: np.ndarray) -> TensorProto:
        return numpy_helper.from_array(array.astype(np.float32) if array.dtype.kind == "f" else array, name)

    inits = [
        init("embedding", rng.normal(0.0, 1.0, (V, E))),
        init("W_hy", rng.normal(0.0, 0.5, (H, V))),
        init("b_y", rng.normal(0.0, 0.1, (V,))),
        init("axis0", np.array([0], np.int64)),
        init("axis1", np.array([1], np.int64)),
    ]
    nodes = [
        helper.make_node("Gather", ["embedding", "input"], ["embedded"]),
        helper.make_node("Transpose", ["embedded"], ["x_0"], perm=[1, 0, 2]),
    ]
    h_outs, c_outs = [], []
    for layer in range(L):
        width = E if layer == 0 else H
        scale = 1.0 / np.sqrt(H)
        inits += [
            init(f"W_{layer}", rng.uniform(-scale, scale, (1, 4 * H, width))),
            init(f"R_{layer}", rng.uniform(-scale, scale, (1, 4 * H, H))),
            init(f"B_{layer}", rng.uniform(-scale, scale, (1, 8 * H))),
            init(f"start_{layer}", np.array([layer], np.int64)),
            init(f"end_{layer}", np.array([layer + 1], np.int64)),
        ]
        nodes += [
            helper.make_node("Slice", ["h0", f"start_{layer}", f"end_{layer}", "axis0"], [f"h0_{layer}"]),
            helper.make_node("Slice", ["c0", f"start_{layer}", f"end_{layer}", "axis0"], [f"c0_{layer}"]),
            helper.make_node(
                "LSTM",
                [f"x_{layer}", f"W_{layer}", f"R_{layer}", f"B_{layer}", "", f"h0_{layer}", f"c0_{layer}"],
                [f"Y_{layer}", f"hn_{layer}", f"cn_{layer}"],
                hidden_size=H,
            ),
            helper.make_node("Squeeze", [f"Y_{layer}", "axis1"], [f"x_{layer + 1}"]),
        ]
        h_outs.append(f"hn_{layer}")
        c_outs.append(f"cn_{layer}")
    nodes += [
        helper.make_node("Concat", h_outs, ["hn"], axis=0),
        helper.make_node("Concat", c_outs, ["cn"], axis=0),
        helper.make_node("Transpose", [f"x_{L}"], ["features"], perm=[1, 0, 2]),
        helper.make_node("MatMul", ["features", "W_hy"], ["logits_nobias"]),
        helper.make_node("Add", ["logits_nobias", "b_y"], ["logits"]),
        helper.make_node("LogSoftmax", ["logits"], ["output"], axis=-1),
    ]
    state_shape = [L, "batch", H]
    graph = helper.make_graph(
        nodes,
        "lstm_lm",
        [
            helper.make_tensor_value_info("input", TensorProto.INT64, ["batch", "time"]),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, state_shape),
            helper.make_tensor_value_info("c0", TensorProto.FLOAT, state_shape),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", "time", V]),
            helper.make_tensor_value_info("hn", TensorProto.FLOAT, state_shape),
            helper.make_tensor_value_info("cn", TensorProto.FLOAT, state_shape),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    if metadata:
        states = [
            {"input": i, "output": o, "shape": state_shape, "batch_axis": 1, "dtype": "float32"}
            for i, o in (("h0", "hn"), ("c0", "cn"))
        ]
        helper.set_model_props(
            model,
            {
                "rnndeploy.version": "0.1.0",
                "rnndeploy.states": json.dumps(states),
                "rnndeploy.task": "lm",
                "rnndeploy.vocab": json.dumps(vocab),
            },
        )
    onnx.checker.check_model(model)
    return model


def scaled_rnn(
    input_size: int = 3,
    hidden_size: int = 5,
    memory: tuple[str, str] = ("state_in", "state_out"),
    total: tuple[str, str] = ("past_total", "present_total"),
    const: str = "sample_rate",
    seed: int = 0,
) -> onnx.ModelProto:
    """A stateful model outside the contract: batch axis 0, two state pairs with free names, a constant input.

    Inputs: ``x`` ``[batch, time, input_size]`` float32, ``memory[0]`` ``[batch, hidden_size]`` (an Elman
    RNN state), ``total[0]`` ``[batch, hidden_size]`` (a running sum of all outputs),
    ``const`` ``[1]`` float32.
    Outputs: ``y`` ``[batch, time, hidden_size]`` = RNN outputs * ``const``, ``memory[1]``, ``total[1]``.
    No metadata: the runtime must infer (default names) or be told (other names) the state pairs.
    """
    rng = np.random.default_rng(seed)
    F, H = input_size, hidden_size
    inits = [
        numpy_helper.from_array(rng.uniform(-0.5, 0.5, (1, H, F)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.uniform(-0.5, 0.5, (1, H, H)).astype(np.float32), "R"),
        numpy_helper.from_array(rng.uniform(-0.5, 0.5, (1, 2 * H)).astype(np.float32), "B"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_tbf"], perm=[1, 0, 2]),
        helper.make_node("Unsqueeze", [memory[0], "axis0"], ["h_init"]),
        helper.make_node("RNN", ["x_tbf", "W", "R", "B", "", "h_init"], ["Y", "Y_h"], hidden_size=H),
        helper.make_node("Squeeze", ["Y_h", "axis0"], [memory[1]]),
        helper.make_node("Squeeze", ["Y", "axis1"], ["y_tbh"]),
        helper.make_node("Transpose", ["y_tbh"], ["y_raw"], perm=[1, 0, 2]),
        helper.make_node("Mul", ["y_raw", const], ["y"]),
        helper.make_node("ReduceSum", ["y", "axis1"], ["y_sum"], keepdims=0),
        helper.make_node("Add", [total[0], "y_sum"], [total[1]]),
    ]
    graph = helper.make_graph(
        nodes,
        "scaled_rnn",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", F]),
            helper.make_tensor_value_info(memory[0], TensorProto.FLOAT, ["N", H]),
            helper.make_tensor_value_info(total[0], TensorProto.FLOAT, ["N", H]),
            helper.make_tensor_value_info(const, TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", H]),
            helper.make_tensor_value_info(memory[1], TensorProto.FLOAT, ["N", H]),
            helper.make_tensor_value_info(total[1], TensorProto.FLOAT, ["N", H]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def counter_rnn(hidden_size: int = 2) -> onnx.ModelProto:
    """A model whose state counts its steps exactly: an Elman RNN with relu, input weights 0, recurrent weights
    the identity and bias 1, so ``h_t = relu(h_{t-1} + 1) = h_{t-1} + 1`` whatever the input.

    Inputs: ``x`` ``[batch, time, 1]`` float32, ``h0`` ``[batch, hidden_size]``. Outputs: ``y``
    ``[batch, time, hidden_size]`` (the count after each step), ``hn``. Every element of ``hn`` equals the
    number of time steps the stream has run (exact in float32 up to 2**24), so lost or repeated steps show.
    """
    H = hidden_size
    inits = [
        numpy_helper.from_array(np.zeros((1, H, 1), np.float32), "W"),
        numpy_helper.from_array(np.eye(H, dtype=np.float32)[None], "R"),
        numpy_helper.from_array(np.concatenate([np.ones(H), np.zeros(H)]).astype(np.float32)[None], "B"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_tbf"], perm=[1, 0, 2]),
        helper.make_node("Unsqueeze", ["h0", "axis0"], ["h_init"]),
        helper.make_node(
            "RNN", ["x_tbf", "W", "R", "B", "", "h_init"], ["Y", "Y_h"], hidden_size=H, activations=["Relu"]
        ),
        helper.make_node("Squeeze", ["Y_h", "axis0"], ["hn"]),
        helper.make_node("Squeeze", ["Y", "axis1"], ["y_tbh"]),
        helper.make_node("Transpose", ["y_tbh"], ["y"], perm=[1, 0, 2]),
    ]
    graph = helper.make_graph(
        nodes,
        "counter_rnn",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "time", 1]),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["batch", H]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "time", H]),
            helper.make_tensor_value_info("hn", TensorProto.FLOAT, ["batch", H]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def slow_rnn(iterations: int, hidden: int = 256) -> onnx.ModelProto:
    """A foreign stateful model whose every step runs ``iterations`` matrix-vector products (a Loop):
    ``y = x`` ``[N, T, 1]``, ``state_out = tanh(... tanh(state_in W) ... W)`` ``[N, hidden]``."""
    rng = np.random.default_rng(0)
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["h", "W"], ["hw"]),
            helper.make_node("Tanh", ["hw"], ["h_next"]),
            helper.make_node("Identity", ["cond"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", hidden]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_next", TensorProto.FLOAT, ["N", hidden]),
        ],
    )
    weights = (rng.standard_normal((hidden, hidden)) / hidden**0.5).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Loop", ["M", "true", "state_in"], ["state_out"], body=body),
            helper.make_node("Identity", ["x"], ["y"]),
        ],
        "slow",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 1]),
            helper.make_tensor_value_info("state_in", TensorProto.FLOAT, ["N", hidden]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", 1]),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, ["N", hidden]),
        ],
        [
            numpy_helper.from_array(weights, "W"),
            numpy_helper.from_array(np.array(iterations, np.int64), "M"),
            numpy_helper.from_array(np.array(True), "true"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model
