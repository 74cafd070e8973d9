"""Verification of an exported ``SequenceModel`` against PyTorch.

Random inputs (batch sizes and lengths other than the ones traced at export) run through onnxruntime and the
PyTorch model: the whole sequence at once, and step by step with the state fed back; fp32 graphs also run
through ONNX's own reference evaluator (``onnx.reference.ReferenceEvaluator``), an implementation independent
of both onnxruntime and PyTorch. Each comparison is a row of a printable table.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from rnndeploy.models import SequenceModel

from .exporter import example_input

# (atol, rtol) per precision: pass when max |onnx - torch| <= atol + rtol * max |torch| for every output.
# fp16: half weights and activations through the recurrence. int8: DynamicQuantizeLSTM / MatMulInteger with
# per-tensor weight scales; loose, it reports the accuracy change rather than bit parity.
TOLERANCES: dict[str, tuple[float, float]] = {"fp32": (1e-4, 1e-4), "fp16": (2e-2, 2e-2), "int8": (0.1, 0.05)}
DEFAULT_SHAPES: tuple[tuple[int, int], ...] = (
    (1, 1),
    (2, 7),
    (4, 13),
)  # (batch, time), none the traced (3, 5)


@dataclass
class Check:
    """One comparison: ``max_abs = max |got - expected|`` and ``scale = max |expected|``."""

    name: str
    output: str
    shape: tuple[int, ...]
    max_abs: float
    scale: float
    atol: float
    rtol: float

    @property
    def max_rel(self) -> float:
        return self.max_abs / self.scale if self.scale > 0 else 0.0

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs)) and self.max_abs <= self.atol + self.rtol * self.scale


@dataclass
class VerifyReport:
    """All checks of one verification run; ``str(report)`` is the table."""

    precision: str
    providers: list[str]
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.checks), default=float("nan"))

    def table(self) -> str:
        atol, rtol = TOLERANCES[self.precision]
        head = f"{'check':<30} {'output':<7} {'shape':<14} {'max abs':>10} {'max rel':>10}  ok"
        lines = [
            f"verification ({self.precision}, {', '.join(self.providers)}; "
            f"pass: abs <= {atol:g} + {rtol:g} * max|torch|)",
            head,
            "-" * len(head),
        ]
        for c in self.checks:
            shape = "x".join(str(s) for s in c.shape)
            lines.append(
                f"{c.name:<30} {c.output:<7} {shape:<14} {c.max_abs:>10.2e} {c.max_rel:>10.2e}  "
                + ("yes" if c.ok else "NO")
            )
        lines += [f"note: {n}" for n in self.notes]
        lines.append("PASSED" if self.ok else "FAILED")
        return "\n".join(lines)

    __str__ = table


def compare(name: str, output: str, got: np.ndarray, expected: np.ndarray, precision: str) -> Check:
    """A `Check` of ``got`` against ``expected`` (same shape) under ``precision``'s tolerance."""
    atol, rtol = TOLERANCES[precision]
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    if got.shape != expected.shape:
        raise ValueError(f"{name}: {output} has shape {got.shape}, expected {expected.shape}")
    err = float(np.abs(got - expected).max()) if got.size else 0.0
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    return Check(name, output, got.shape, err, scale, atol, rtol)


def session(path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",), precision: str = "fp32"):
    """An onnxruntime session with the runtime's one-thread options (``runtime.default_session_options``);
    fp16 on the CPU execution provider gets ``ORT_ENABLE_EXTENDED``.

    NOTE: onnxruntime 1.31's CPU execution provider runs float16 RNN/LSTM/GRU by casting to float32, but its
    ``ORT_ENABLE_ALL`` layout optimizations crash (segfault) while loading such a graph; ``EXTENDED`` is safe.
    """
    import onnxruntime as ort

    from rnndeploy.runtime import default_session_options

    options = default_session_options(threads=1)
    if precision == "fp16" and list(providers)[:1] == ["CPUExecutionProvider"]:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return ort.InferenceSession(str(path), options, providers=list(providers))


def verify(
    model: SequenceModel,
    onnx_path: str | Path,
    *,
    precision: str = "fp32",
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    reference_evaluator: bool = True,
    seed: int = 0,
) -> VerifyReport:
    """Compares the ONNX graph at ``onnx_path`` with ``model`` on random inputs.

    Args:
        model: the PyTorch ``SequenceModel`` the graph was exported from (run in fp32 on CPU).
        onnx_path: the exported graph (inputs ``input``, ``h0`` [, ``c0``]; outputs ``output``, ``hn``
            [, ``cn``]).
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``: picks the tolerance from `TOLERANCES`.
        shapes: ``(batch, time)`` pairs; each runs full-sequence and step-by-step with a random initial state.
        providers: onnxruntime execution providers.
        reference_evaluator: also run ``onnx.reference.ReferenceEvaluator`` (fp32 and fp16) on the first shape
            with more than one step.

    Returns:
        A `VerifyReport`; ``report.ok`` is False when any output exceeds the tolerance.
    """
    if precision not in TOLERANCES:
        raise ValueError(f"precision must be one of {sorted(TOLERANCES)}, got {precision!r}")
    model = copy.deepcopy(model).cpu().float().eval()
    c = model.config
    sess = session(onnx_path, providers, precision)
    report = VerifyReport(precision, sess.get_providers())
    if precision == "fp16" and report.providers[0] == "CPUExecutionProvider":
        report.notes.append(
            "fp16 on the CPU execution provider computes in fp32 (casts); onnx.reference rows run true fp16"
        )
    state_in = [f"{s}0" for s in c.state_names]
    names = ["output"] + [f"{s}n" for s in c.state_names]
    generator = torch.Generator().manual_seed(seed)
    stepwise = not c.bidirectional
    if not stepwise:
        report.notes.append(
            "bidirectional: no step-by-step check (the backward direction needs the whole sequence)"
        )
    ref_shape = next((s for s in shapes if s[1] > 1), None) if reference_evaluator else None
    for batch, time in shapes:
        x = example_input(model, batch, time, generator)
        state = tuple(torch.randn(s.shape, generator=generator) for s in model.init_state(batch))
        with torch.no_grad():
            y, new_state = model(x, state)
        expected = [y.numpy(), *(s.numpy() for s in new_state)]
        feeds = {"input": x.numpy(), **{n: s.numpy() for n, s in zip(state_in, state, strict=True)}}
        got = sess.run(names, feeds)
        tag = f"B{batch}-T{time}"
        for name, g, e in zip(names, got, expected, strict=True):
            report.checks.append(compare(f"onnxruntime full {tag}", name, g, e, precision))
        if stepwise:
            got = _run_stepwise(sess, names, state_in, x.numpy(), [s.numpy() for s in state])
            for name, g, e in zip(names, got, expected, strict=True):
                report.checks.append(compare(f"onnxruntime stepwise {tag}", name, g, e, precision))
        if (batch, time) == ref_shape:
            _reference_checks(report, onnx_path, model, names, feeds, expected, tag)
    return report


def _run_stepwise(sess, names: list[str], state_in: list[str], x: np.ndarray, state: list[np.ndarray]):
    """Runs one step per call, feeding the returned state back; outputs concatenated over time."""
    ys = []
    for t in range(x.shape[1]):
        outs = sess.run(names, {"input": x[:, t : t + 1], **dict(zip(state_in, state, strict=True))})
        ys.append(outs[0])
        state = outs[1:]
    # per-step outputs [B, 1, O] concatenate over time; a classifier's output is the last step's [B, O]
    y = np.concatenate(ys, axis=1) if ys[0].ndim == 3 else ys[-1]
    return [y, *state]


def _reference_checks(report, onnx_path, model, names, feeds, expected, tag) -> None:
    if report.precision == "int8":  # com.microsoft quantized ops: onnxruntime only
        return
    proto = onnx.load(str(onnx_path))
    if any(n.op_type == "RNN" and "Relu" in _activations(n) for n in proto.graph.node):
        report.notes.append("onnx.reference has no Relu RNN activation: reference-evaluator check skipped")
        return
    from onnx.reference import ReferenceEvaluator

    got = ReferenceEvaluator(proto).run(names, feeds)
    for name, g, e in zip(names, got, expected, strict=True):
        report.checks.append(compare(f"onnx.reference full {tag}", name, g, e, report.precision))


def _activations(node: onnx.NodeProto) -> list[str]:
    for attr in node.attribute:
        if attr.name == "activations":
            return [s.decode() for s in attr.strings]
    return []


def accuracy_inputs(
    model: SequenceModel, validation: tuple[torch.Tensor, str] | None, batch: int, time: int
) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """What an int8 accuracy check feeds both graphs: ``(x, target, label)``.

    With ``validation`` (``[N]`` token ids or ``[N, F]`` features and a label): the split cut into ``batch``
    contiguous streams ``x`` ``[batch, L-1, ...]`` and their next steps ``target``. Without it: seeded random
    inputs ``[batch, time, ...]``, no target and no label.
    """
    if validation is None:
        return example_input(model, batch, time, torch.Generator().manual_seed(1)).numpy(), None, None
    data, label = validation
    length = len(data) // batch
    split = data[: batch * length].reshape(batch, length, *data.shape[1:])
    return split[:, :-1].numpy(), split[:, 1:].numpy(), label


def int8_accuracy_lines(
    model: SequenceModel,
    fp32_path: str | Path,
    int8_path: str | Path,
    validation: tuple[torch.Tensor, str] | None,
    batch: int,
    time: int,
    *,
    stepwise: bool,
) -> list[str]:
    """How much int8 changes a graph's outputs, as printable lines: both graphs on the same `accuracy_inputs`.

    Args:
        validation: ``[N]`` token ids or ``[N, F]`` features and a label; the split is cut into ``batch``
            contiguous streams scored against their next step (bits per character or mean squared error).
            ``None``: random inputs ``[batch, time]``, compared with fp32 only.
        stepwise: run one step per call with the state fed back (a step graph), else each stream as one
            sequence (a sequence graph).

    Language models and classifiers also report top-1 agreement with fp32; regression the RMS difference.
    """
    from rnndeploy.runtime.generate import log_probs

    c = model.config
    x, target, label = accuracy_inputs(model, validation, batch, time)
    label = label or f"random inputs, batch {batch} x time {time}; no validation data given"
    names = ["output"] + [f"{s}n" for s in c.state_names]
    state_in = [f"{s}0" for s in c.state_names]
    zeros = [np.zeros(s.shape, np.float32) for s in model.init_state(batch)]

    def run(path: str | Path, precision: str) -> np.ndarray:
        sess = session(path, precision=precision)
        if stepwise:
            return _run_stepwise(sess, names, state_in, x, zeros)[0]
        return sess.run(["output"], {"input": x, **dict(zip(state_in, zeros, strict=True))})[0]

    y32, y8 = run(fp32_path, "fp32"), run(int8_path, "int8")
    lines = [f"int8 {'step-graph ' if stepwise else ''}accuracy change ({label}):"]
    if c.task == "regression":
        rms = float(np.sqrt(np.mean((y8 - y32) ** 2)))
        if target is not None:
            mse32, mse8 = float(np.mean((y32 - target) ** 2)), float(np.mean((y8 - target) ** 2))
            lines.append(
                f"  validation MSE (normalised): fp32 {mse32:.5f}, int8 {mse8:.5f} ({mse8 / mse32 - 1:+.2%})"
            )
        return [
            *lines,
            f"  RMS(int8 - fp32) = {rms:.3e}, {rms / (float(y32.std()) or 1.0):.2%} of the output std",
        ]
    top32, top8 = y32.argmax(-1), y8.argmax(-1)
    logp32, logp8 = log_probs(y32, c.head), log_probs(y8, c.head)
    if target is not None:
        bits32 = float(-np.take_along_axis(logp32, target[..., None], -1).mean() / np.log(2))
        bits8 = float(-np.take_along_axis(logp8, target[..., None], -1).mean() / np.log(2))
        lines.append(
            f"  validation bits/char: fp32 {bits32:.4f}, int8 {bits8:.4f} ({bits8 / bits32 - 1:+.2%})"
        )
    else:
        picked32 = np.take_along_axis(logp32, top32[..., None], -1).mean()
        picked8 = np.take_along_axis(logp8, top32[..., None], -1).mean()
        lines.append(f"  mean log-prob of the fp32 top-1 class: fp32 {picked32:.4f}, int8 {picked8:.4f}")
    return [
        *lines,
        f"  top-1 agreement with fp32: {float((top32 == top8).mean()):.2%}",
        f"  max |int8 - fp32| over outputs: {float(np.abs(y8 - y32).max()):.3e}",
    ]
