"""The one-step graph: one time step of a ``SequenceModel`` as plain ONNX operators, for stepwise serving.

The sequence graph (`rnndeploy.export.export_onnx`) holds one ``RNN``/``LSTM``/``GRU`` node per layer and
serves any number of steps per call. The step graph computes exactly one step with ``Gather``/``MatMul``/``Add``
and elementwise activations (no recurrent node, no ``Loop``/``Scan``), under the same contract: inputs ``input``
(``[batch, 1]`` token ids or ``[batch, 1, F]`` features) and ``h0`` (``c0``) ``[layers, batch, hidden]``,
outputs ``output`` (``[batch, 1, O]``; ``[batch, O]`` for a classifier) and ``hn`` (``cn``), the same
``metadata_props`` plus ``rnndeploy.form = "step"``. Because every product is a ``MatMul`` with an initializer
weight, ``onnxruntime.quantization.quantize_dynamic`` quantizes every cell (onnxruntime has a quantized LSTM
node only), and TensorRT or CUDA graphs see a static, loop-free graph.

Per step and layer (``x`` the layer input, ``h``/``c`` its state; PyTorch's formulas and gate order):
- Elman RNN: ``h' = f(x W_ih^T + h W_hh^T + b_ih + b_hh)``;
- LSTM: ``i, f, g, o`` from one ``[B, 4H]`` product, ``c' = f*c + i*g``, ``h' = o*tanh(c')``;
- GRU: ``r, z`` from the summed products, ``n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn))``,
  ``h' = (1 - z)*n + z*h``.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from rnndeploy.models import SequenceModel

from .exporter import (
    DEFAULT_OPSET,
    MAX_OPSET,
    MIN_OPSET,
    ExportError,
    check_and_infer,
    contract_metadata,
    example_input,
    save_onnx,
    set_metadata,
)
from .variants import to_fp16
from .verification import TOLERANCES, VerifyReport, _run_stepwise, compare, int8_accuracy_lines, session

FORM_KEY = "rnndeploy.form"
RECURRENT_OPS = ("RNN", "LSTM", "GRU", "Loop", "Scan", "If")
QUANTIZED_MATMULS = ("MatMulInteger", "DynamicQuantizeMatMul")


def export_step_graph(
    model: SequenceModel,
    path: str | Path,
    *,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    vocab: list[str] | None = None,
    data_stats: dict[str, Any] | None = None,
    fuse: bool | None = None,
) -> Path:
    """Writes one time step of ``model`` as a checked ONNX graph of plain operators (atomically).

    Args:
        model: a unidirectional `SequenceModel` (any cell, task, layer count); not modified.
        path: the ``.onnx`` file to write.
        fp16: half-precision weights and arithmetic, float32 graph inputs and outputs (``Cast`` at the boundary,
            as `rnndeploy.export.to_fp16` does for the sequence graph).
        opset: ONNX opset, ``MIN_OPSET..MAX_OPSET``.
        vocab, data_stats: stored in ``metadata_props`` as for the sequence graph.
        fuse: one ``MatMul`` over ``concat([x, h])`` per layer (``True``) or one product for ``x`` and one for
            ``h`` (``False``); ``None`` picks the faster one on onnxruntime's CPU provider (see `FUSE`).

    Returns:
        ``path``. Inputs ``input`` ``[batch, 1]`` int64 or ``[batch, 1, F]`` float32, ``h0`` (``c0``)
        ``[L, batch, H]``; outputs ``output`` ``[batch, 1, O]`` (classification ``[batch, O]``), ``hn`` (``cn``).
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset must be in [{MIN_OPSET}, {MAX_OPSET}], got {opset}")
    if not isinstance(model, SequenceModel):
        raise ExportError(f"a step graph is built from a SequenceModel, got {type(model).__name__}")
    if model.config.bidirectional:
        raise ExportError(
            "a bidirectional model has no step graph (its backward direction needs the whole sequence); "
            "export it with export_onnx"
        )
    model = copy.deepcopy(model).cpu().float().eval()
    proto = _build(model, opset, FUSE[model.config.cell] if fuse is None else fuse)
    set_metadata(proto, {**contract_metadata(model, vocab, data_stats), FORM_KEY: "step"})
    proto = check_and_infer(proto)
    if fp16:
        proto = to_fp16(proto)
    _check_plain(proto)
    return save_onnx(proto, path)


def quantize_step_graph(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 quantization of the step graph at ``src`` (every product -> ``MatMulInteger``), atomically.

    Weights become int8 with one scale per output column; activations and states are quantized per call, so
    the graph I/O and the state contract do not change. onnxruntime only (``com.microsoft`` operators), CPU
    execution provider. ``rnndeploy.precision`` becomes ``"int8"``.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    meta = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
    if meta.get(FORM_KEY) != "step" or meta.get("rnndeploy.precision") != "fp32":
        raise ExportError(
            f"{src} is not an fp32 step graph (rnndeploy.form={meta.get(FORM_KEY)!r}, "
            f"precision={meta.get('rnndeploy.precision')!r}); quantize the file export_step_graph wrote"
        )
    with tempfile.TemporaryDirectory() as tmp:
        tmp_out = Path(tmp) / "int8.onnx"
        # NOTE: per-channel scales: a step graph's products join weights of different ranges in one matrix
        # (the folded encoder with W_hh, several gates), and one scale per tensor rounds the small ones away.
        # quantize_dynamic's root-logger advice about pre-processing is for conv nets and stays off the terminal.
        logging.disable(logging.WARNING)
        try:
            quantize_dynamic(str(src), str(tmp_out), weight_type=QuantType.QInt8, per_channel=True)
        finally:
            logging.disable(logging.NOTSET)
        proto = onnx.load(str(tmp_out))
    set_metadata(proto, {"rnndeploy.precision": "int8"})
    onnx.checker.check_model(proto, full_check=True)
    left = [n.name for n in proto.graph.node if n.op_type in ("MatMul", "Gemm")]
    if left:
        raise ExportError(f"quantize_dynamic left float products {left} in {src}; expected every one in int8")
    return save_onnx(proto, dst)


def verify_step_graph(
    model: SequenceModel,
    path: str | Path,
    *,
    steps: int = 6,
    batches: Sequence[int] = (1, 3),
    seed: int = 0,
) -> VerifyReport:
    """Runs the step graph at ``path`` one step per call with the state fed back, against PyTorch doing the same.

    The model runs in fp32 on ``[B, 1]`` inputs, one call per step, its state fed back; the graph likewise on
    onnxruntime's CPU provider. Outputs over all ``steps`` and the final state are compared within
    `TOLERANCES` of the graph's precision (from its metadata).

    Returns:
        A `VerifyReport`; ``report.ok`` is False when any output exceeds the tolerance.
    """
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    precision = meta.get("rnndeploy.precision", "fp32")
    if meta.get(FORM_KEY) != "step" or precision not in TOLERANCES:
        raise ExportError(
            f"{path} is not a step graph (rnndeploy.form={meta.get(FORM_KEY)!r}, precision={precision!r})"
        )
    model = copy.deepcopy(model).cpu().float().eval()
    c = model.config
    sess = session(path, precision=precision)
    report = VerifyReport(precision, sess.get_providers())
    state_in = [f"{s}0" for s in c.state_names]
    names = ["output"] + [f"{s}n" for s in c.state_names]
    generator = torch.Generator().manual_seed(seed)
    for batch in batches:
        x = example_input(model, batch, steps, generator)
        state = tuple(torch.randn(s.shape, generator=generator) for s in model.init_state(batch))
        ys, torch_state = [], state
        with torch.no_grad():
            for t in range(steps):
                y, torch_state = model(x[:, t : t + 1], torch_state)
                ys.append(y)
        y = torch.cat(ys, dim=1) if ys[0].dim() == 3 else ys[-1]
        expected = [y.numpy(), *(s.numpy() for s in torch_state)]
        got = _run_stepwise(sess, names, state_in, x.numpy(), [s.numpy() for s in state])
        for name, g, e in zip(names, got, expected, strict=True):
            report.checks.append(compare(f"step graph B{batch}-T{steps}", name, g, e, precision))
    return report


def step_int8_accuracy(
    model: SequenceModel,
    fp32_path: Path,
    int8_path: Path,
    validation: tuple[torch.Tensor, str] | None = None,
    batch: int = 16,
    time: int = 64,
) -> list[str]:
    """How much int8 changes a step graph's outputs, as printable lines (the step-graph twin of
    ``pipeline.int8_accuracy``: the same data, cut and scores, run one step per call).

    Args:
        validation: ``[N]`` token ids or ``[N, F]`` features and a label (``pipeline.validation_split``); the
            split is cut into ``batch`` contiguous streams scored against their next step (bits per character
            or mean squared error). ``None``: random inputs, compared with fp32 only.
    """
    return int8_accuracy_lines(model, fp32_path, int8_path, validation, batch, time, stepwise=True)


# NOTE: per cell, whether the input and recurrent products of a layer are one MatMul over concat([x, h]) (the
# GRU's n gate keeps its two halves apart with zero blocks, since r multiplies only the recurrent half) or two
# products. Measured with onnxruntime's CPU provider, one thread, batch 1 and 64, fp32 and int8
# (benchmarks/bench_step_graph.py, results in benchmarks/results/step-graph.*): one product saves a node's fixed
# cost per layer, which dominates small steps, and int8 quantizes the activations once instead of twice. Fused is
# as fast or faster everywhere except the GRU in fp32 at batch 64, where the zero blocks' extra third of
# arithmetic shows; the GRU keeps the fused layout because its int8 graph is faster fused at both batch sizes.
FUSE: dict[str, bool] = {"rnn": True, "lstm": True, "gru": True}


class _Builder:
    """Collects nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def ints(self, values: Sequence[int]) -> str:
        name = "const_" + "_".join(str(v) for v in values)
        if all(i.name != name for i in self.initializers):
            self.const(name, np.asarray(values, np.int64))
        return name

    def op(self, op_type: str, inputs: Sequence[str], outputs: int | Sequence[str] = 1, **attrs) -> Any:
        self._count += 1
        tag = f"{op_type.lower()}_{self._count}"
        names = [f"{tag}_{i}" for i in range(outputs)] if isinstance(outputs, int) else list(outputs)
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=tag, **attrs))
        return names[0] if len(names) == 1 else names

    def linear(self, x: str, weight: np.ndarray, bias: np.ndarray | None, name: str) -> str:
        """``x @ weight^T + bias``: MatMul and Add, which quantize_dynamic turns into int8 products and
        onnxruntime fuses into Gemm / DynamicQuantizeMatMul with bias."""
        y = self.op("MatMul", [x, self.const(f"{name}.weight_t", weight.T.astype(np.float32))])
        return y if bias is None else self.op("Add", [y, self.const(f"{name}.bias", bias.astype(np.float32))])


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float64)


def _layer_params(rnn: torch.nn.Module, k: int, gates: int, hidden: int) -> tuple[np.ndarray, ...]:
    """``W_ih, W_hh, b_ih, b_hh`` of layer ``k``; LSTM gate rows reordered i,f,g,o -> i,f,o,g so the three
    sigmoid gates are one contiguous slice (one Sigmoid node)."""
    w_ih, w_hh = _np(getattr(rnn, f"weight_ih_l{k}")), _np(getattr(rnn, f"weight_hh_l{k}"))
    zeros = np.zeros(gates * hidden)
    b_ih = _np(getattr(rnn, f"bias_ih_l{k}")) if getattr(rnn, "bias", True) else zeros
    b_hh = _np(getattr(rnn, f"bias_hh_l{k}")) if getattr(rnn, "bias", True) else zeros
    if gates == 4:
        order = np.concatenate(
            [np.arange(2 * hidden), np.arange(3 * hidden, 4 * hidden), np.arange(2 * hidden, 3 * hidden)]
        )
        w_ih, w_hh, b_ih, b_hh = w_ih[order], w_hh[order], b_ih[order], b_hh[order]
    return w_ih, w_hh, b_ih, b_hh


def _build(model: SequenceModel, opset: int, fuse: bool) -> onnx.ModelProto:
    c = model.config
    H, L = c.hidden_size, c.num_layers
    gates = {"rnn": 1, "lstm": 4, "gru": 3}[c.cell]
    g = _Builder()
    axis1 = g.ints([1])
    # the encoder folds into layer 0's input product: Embedding -> a [vocab, gates*H] table (one Gather per step);
    # Linear -> one [gates*H, F] weight when that is no more arithmetic than the two products it replaces.
    w_ih0, _, b_ih0, b_hh0 = _layer_params(model.rnn, 0, gates, H)
    merge_bias = c.cell != "gru"  # GRU's b_hn sits inside r * (...), so it stays with the recurrent product
    table_bias = b_ih0 + b_hh0 if merge_bias else b_ih0
    if c.vocab_size is not None:
        ids = g.op("Squeeze", ["input", axis1])
        table = _np(model.encoder.weight) @ w_ih0.T + table_bias
        x_gates: str | None = g.op("Gather", [g.const("encoder.gates_table", table.astype(np.float32)), ids])
        x, x_weight, x_bias = None, None, None
    else:
        x = g.op("Squeeze", ["input", axis1])
        w_enc, b_enc = _np(model.encoder.weight), _np(model.encoder.bias)
        F, E = w_enc.shape[1], w_enc.shape[0]
        if F * gates * H <= E * (F + gates * H):
            x_weight, x_bias = w_ih0 @ w_enc, w_ih0 @ b_enc + b_ih0
        else:
            x = g.linear(x, w_enc, b_enc, "encoder")
            x_weight, x_bias = w_ih0, b_ih0
        x_gates = None
    h_in = [_state_row(g, "h0", k, L) for k in range(L)]
    c_in = [_state_row(g, "c0", k, L) for k in range(L)] if c.cell == "lstm" else []
    h_out, c_out = [], []
    for k in range(L):
        w_ih, w_hh, b_ih, b_hh = _layer_params(model.rnn, k, gates, H)
        if k > 0:
            x, x_weight, x_bias, x_gates = h_out[-1], w_ih, b_ih, None
        hk, ck = _cell(
            g,
            c.cell,
            c.nonlinearity,
            f"rnn.l{k}",
            x,
            x_weight,
            x_bias,
            x_gates,
            h_in[k],
            c_in[k] if c_in else None,
            w_hh,
            b_hh,
            fuse,
            first_merged=(k == 0 and merge_bias),
        )
        h_out.append(hk)
        c_out.append(ck)
    z = g.linear(h_out[-1], _np(model.head.weight), _np(model.head.bias), "head")
    if c.head in ("softmax", "log_softmax"):
        z = g.op({"softmax": "Softmax", "log_softmax": "LogSoftmax"}[c.head], [z], axis=-1)
    if c.task == "classification":
        g.op("Identity", [z], ["output"])
    else:
        g.op("Unsqueeze", [z, axis1], ["output"])
    _stack_states(g, h_out, "hn")
    if c.cell == "lstm":
        _stack_states(g, c_out, "cn")
    batch = "batch"
    if c.vocab_size is not None:
        inputs = [helper.make_tensor_value_info("input", TensorProto.INT64, [batch, 1])]
    else:
        inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, c.input_size])]
    inputs += [
        helper.make_tensor_value_info(f"{s}0", TensorProto.FLOAT, [L, batch, H]) for s in c.state_names
    ]
    out_shape = [batch, c.output_size] if c.task == "classification" else [batch, 1, c.output_size]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)]
    outputs += [
        helper.make_tensor_value_info(f"{s}n", TensorProto.FLOAT, [L, batch, H]) for s in c.state_names
    ]
    graph = helper.make_graph(g.nodes, "rnndeploy_step", inputs, outputs, g.initializers)
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="rnndeploy"
    )
    proto.ir_version = min(proto.ir_version, 8)  # onnxruntime releases in the field load IR 8
    return proto


def _state_row(g: _Builder, name: str, k: int, layers: int) -> str:
    if layers == 1:
        return g.op("Squeeze", [name, g.ints([0])])
    return g.op("Gather", [name, g.const(f"{name}.row{k}", np.asarray(k, np.int64))], axis=0)


def _stack_states(g: _Builder, rows: list[str], name: str) -> None:
    axis0 = g.ints([0])
    if len(rows) == 1:
        g.op("Unsqueeze", [rows[0], axis0], [name])
        return
    g.op("Concat", [g.op("Unsqueeze", [r, axis0]) for r in rows], [name], axis=0)


def _cell(
    g: _Builder,
    cell: str,
    nonlinearity: str,
    name: str,
    x: str | None,
    x_weight: np.ndarray | None,
    x_bias: np.ndarray | None,
    x_gates: str | None,
    h: str,
    c: str | None,
    w_hh: np.ndarray,
    b_hh: np.ndarray,
    fuse: bool,
    first_merged: bool,
) -> tuple[str, str | None]:
    """One layer-step; the input side is either ``x`` with ``x_weight``/``x_bias`` or precomputed ``x_gates``
    (the embedding table, holding ``b_ih`` and, when ``first_merged``, ``b_hh``)."""
    H = w_hh.shape[1]
    if cell == "gru":
        if x_gates is None and fuse:
            # [x, h] @ [[W_irz^T, W_in^T, 0], [W_hrz^T, 0, W_hn^T]]: r and z summed, n's halves apart
            In = x_weight.shape[1]
            w = np.zeros((In + H, 4 * H))
            w[:In, : 2 * H], w[In:, : 2 * H] = x_weight[: 2 * H].T, w_hh[: 2 * H].T
            w[:In, 2 * H : 3 * H], w[In:, 3 * H :] = x_weight[2 * H :].T, w_hh[2 * H :].T
            b = np.concatenate([x_bias[: 2 * H] + b_hh[: 2 * H], x_bias[2 * H :], b_hh[2 * H :]])
            pre = g.linear(g.op("Concat", [x, h], axis=1), w.T, b, name)
            rz_pre, n_x, n_h = g.op("Split", [pre, g.ints([2 * H, H, H])], 3, axis=1)
        else:
            gx = x_gates if x_gates is not None else g.linear(x, x_weight, x_bias, f"{name}.ih")
            gh = g.linear(h, w_hh, b_hh, f"{name}.hh")
            rz_x, n_x = g.op("Split", [gx, g.ints([2 * H, H])], 2, axis=1)
            rz_h, n_h = g.op("Split", [gh, g.ints([2 * H, H])], 2, axis=1)
            rz_pre = g.op("Add", [rz_x, rz_h])
        r, z = g.op("Split", [g.op("Sigmoid", [rz_pre]), g.ints([H, H])], 2, axis=1)
        n = g.op("Tanh", [g.op("Add", [n_x, g.op("Mul", [r, n_h])])])
        return g.op("Add", [n, g.op("Mul", [z, g.op("Sub", [h, n])])]), None
    if x_gates is not None:
        recurrent = g.linear(h, w_hh, None if first_merged else b_hh, f"{name}.hh")
        pre = g.op("Add", [recurrent, x_gates])
    elif fuse:
        w = np.concatenate([x_weight, w_hh], axis=1)
        pre = g.linear(g.op("Concat", [x, h], axis=1), w, x_bias + b_hh, name)
    else:
        pre = g.op(
            "Add", [g.linear(x, x_weight, x_bias + b_hh, f"{name}.ih"), g.linear(h, w_hh, None, f"{name}.hh")]
        )
    if cell == "rnn":
        return g.op("Tanh" if nonlinearity == "tanh" else "Relu", [pre]), None
    ifo, gg = g.op("Split", [pre, g.ints([3 * H, H])], 2, axis=1)
    i, f, o = g.op("Split", [g.op("Sigmoid", [ifo]), g.ints([H, H, H])], 3, axis=1)
    c_new = g.op("Add", [g.op("Mul", [f, c]), g.op("Mul", [i, g.op("Tanh", [gg])])])
    return g.op("Mul", [o, g.op("Tanh", [c_new])]), c_new


def _check_plain(proto: onnx.ModelProto) -> None:
    bad = sorted(
        {n.op_type for n in proto.graph.node if n.op_type in RECURRENT_OPS or n.domain not in ("", "ai.onnx")}
    )
    if bad:
        raise ExportError(f"the step graph holds {bad}; expected plain operators only")
