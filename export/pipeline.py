"""``export_checkpoint``: checkpoint -> ONNX (+ fp16, int8, Triton repository), verified, with a report.

This is what ``rnndeploy export`` and the demo call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from rnndeploy.checkpoint import Checkpoint, atomic_write, load_checkpoint
from rnndeploy.data import DataError, load_data
from rnndeploy.models import SequenceModel

from .exporter import DEFAULT_OPSET, OutputExistsError, example_input, export_onnx
from .step_graph import export_step_graph, quantize_step_graph, step_int8_accuracy, verify_step_graph
from .variants import latency_us, quantize_int8, to_fp16
from .verification import VerifyReport, int8_accuracy_lines
from .verification import verify as verify_graph


@dataclass
class ExportReport:
    """What ``export_checkpoint`` wrote and measured; ``str(report)`` prints it all."""

    paths: dict[str, Path] = field(default_factory=dict)
    rejected: dict[str, Path] = field(default_factory=dict)
    verifications: dict[str, VerifyReport] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every verification that ran passed (vacuously True when none ran)."""
        return all(v.ok for v in self.verifications.values())

    def __str__(self) -> str:
        out = [f"wrote {kind}: {path}" for kind, path in self.paths.items()]
        out += [
            f"rejected {kind} (failed verification, nothing replaced): kept at {path}"
            for kind, path in self.rejected.items()
        ]
        for v in self.verifications.values():
            out += ["", v.table()]
        if self.lines:
            out += ["", *self.lines]
        return "\n".join(out)


def variant_path(onnx_path: Path, precision: str) -> Path:
    """``model.onnx`` -> ``model.fp16.onnx`` / ``model.int8.onnx``."""
    return onnx_path.with_name(f"{onnx_path.stem}.{precision}{onnx_path.suffix}")


def write_verified(
    path: Path, write: Callable[[Path], None], check: Callable[[Path], VerifyReport] | None = None
) -> tuple[Path, VerifyReport | None]:
    """Writes a file aside, verifies it, and only then moves it to ``path``.

    ``write(tmp)`` writes the candidate to a temporary file in ``path``'s folder; ``check(tmp)`` verifies it.
    On success the file is fsynced, renamed over ``path`` and the folder fsynced (so a power loss leaves the old
    file or the new one). On a failed check ``path`` is left as it was and the candidate is kept at
    ``<stem>.rejected<suffix>`` for inspection.

    Returns:
        Where the file now is (``path``, or the rejected copy) and the verification report (``None`` unchecked).
    """
    report: VerifyReport | None = None

    def destination(tmp: str) -> Path:
        nonlocal report
        report = check(Path(tmp)) if check is not None else None
        return path if report is None or report.ok else path.with_name(f"{path.stem}.rejected{path.suffix}")

    target = atomic_write(path, lambda tmp: write(Path(tmp)), destination)
    return target, report


def export_checkpoint(
    checkpoint: str | Path,
    onnx_path: str | Path | None = None,
    *,
    overwrite: bool = False,
    verify: bool = True,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    int8: bool = False,
    triton_repo: str | Path | None = None,
    triton_name: str | None = None,
    triton_backend: str = "onnxruntime",
    max_batch_size: int = 64,
    step_graph: bool = False,
) -> ExportReport:
    """Exports a checkpoint written by ``rnndeploy.save_checkpoint`` and checks the result.

    Args:
        checkpoint: the ``.pt`` checkpoint.
        onnx_path: the fp32 graph to write; default: the checkpoint's path with ``.onnx``.
        overwrite: replace existing output files; without it an existing one is an
            `OutputExistsError` before anything is written.
        verify: compare every graph with PyTorch (see `rnndeploy.export.verify`) before it replaces
            anything: a graph that fails is kept as ``<name>.rejected.onnx`` (``report.rejected``), the file at
            its path stays as it was, and no later artifact (variants, Triton repository) is written.
        opset: ONNX opset of the graphs.
        fp16: also write ``<name>.fp16.onnx`` (half compute, float32 I/O; for the CUDA/TensorRT providers).
        int8: also write ``<name>.int8.onnx`` (dynamic int8) and measure its accuracy change and CPU speed.
        triton_repo: also write a Triton Inference Server model repository there (see
            `rnndeploy.export.write_triton_repository`); ``triton_name`` names the model (default:
            the ONNX file's stem); ``triton_backend`` is ``"onnxruntime"`` or ``"python"``.
        max_batch_size: Triton ``max_batch_size``.
        step_graph: also write ``<name>.step.onnx``, one time step as plain ONNX operators (see
            `rnndeploy.export.step_graph.export_step_graph`), verified step by step; with ``fp16`` /
            ``int8`` also its ``.step.fp16`` / ``.step.int8`` variants (int8 quantizes every cell).

    Returns:
        An `ExportReport`; ``report.ok`` is False when a verification failed.
    """
    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint, backend="torch")
    onnx_path = Path(onnx_path) if onnx_path is not None else checkpoint.with_suffix(".onnx")
    targets = {"fp32": onnx_path}
    targets.update(
        {p: variant_path(onnx_path, p) for p, wanted in (("fp16", fp16), ("int8", int8)) if wanted}
    )
    if step_graph:
        step_path = variant_path(onnx_path, "step")
        targets["step"] = step_path
        targets.update(
            {
                f"step-{p}": variant_path(step_path, p)
                for p, wanted in (("fp16", fp16), ("int8", int8))
                if wanted
            }
        )
    triton_folder = Path(triton_repo) / (triton_name or onnx_path.stem) if triton_repo is not None else None
    if not overwrite:
        for path in [*targets.values(), *([triton_folder] if triton_folder is not None else [])]:
            if path.exists():
                raise OutputExistsError(path)
    model = ckpt.model
    report = ExportReport()
    proto = export_onnx(model, opset=opset, vocab=ckpt.vocab, data_stats=ckpt.data_stats)

    def place(precision: str, write: Callable[[Path], None]) -> bool:
        if precision.startswith("step"):
            check = (lambda tmp: verify_step_graph(model, tmp)) if verify else None
        else:
            check = (lambda tmp: verify_graph(model, tmp, precision=precision)) if verify else None
        path, result = write_verified(targets[precision], write, check)
        if result is not None:
            report.verifications[precision] = result
        (report.paths if result is None or result.ok else report.rejected)[precision] = path
        return result is None or result.ok

    if not place("fp32", lambda tmp: onnx.save(proto, tmp)):
        return report
    if fp16 and not place("fp16", lambda tmp: onnx.save(to_fp16(proto), tmp)):
        return report
    if int8:
        if not place("int8", lambda tmp: quantize_int8(onnx_path, tmp)):
            return report
        report.lines += int8_accuracy(model, onnx_path, targets["int8"], validation_split(ckpt))
        report.lines += int8_speed(model, onnx_path, targets["int8"])
    if step_graph:
        stats = {"opset": opset, "vocab": ckpt.vocab, "data_stats": ckpt.data_stats}
        if not place("step", lambda tmp: export_step_graph(model, tmp, **stats)):
            return report
        if fp16 and not place("step-fp16", lambda tmp: export_step_graph(model, tmp, fp16=True, **stats)):
            return report
        if int8:
            if not place("step-int8", lambda tmp: quantize_step_graph(targets["step"], tmp)):
                return report
            report.lines += step_int8_accuracy(
                model, targets["step"], targets["step-int8"], validation_split(ckpt)
            )
    if triton_repo is not None:
        from .triton import write_triton_repository

        report.paths["triton"] = write_triton_repository(
            model,
            triton_repo,
            triton_folder.name,
            opset=opset,
            max_batch_size=max_batch_size,
            backend=triton_backend,
            vocab=ckpt.vocab,
            data_stats=ckpt.data_stats,
            overwrite=overwrite,
        )
    return report


def validation_split(ckpt: Checkpoint) -> tuple[torch.Tensor, str] | None:
    """The validation split of the data the checkpoint was trained on, with a label, or ``None``.

    ``rnndeploy train`` saves its options (data source, validation fraction) in the checkpoint; a checkpoint
    from elsewhere, or one whose data file is gone, has no validation data to measure on.
    """
    options = ckpt.extra.get("options") or {}
    source = options.get("data")
    if source is None or ckpt.config.task == "classification":
        return None
    try:
        data = load_data(source, valid_fraction=options.get("valid_fraction", 0.05), vocab=ckpt.vocab)
    except (DataError, OSError):
        return None
    if data.kind != ("text" if ckpt.config.task == "lm" else "series"):
        return None
    return data.valid, f"the validation split of {source}"


def int8_accuracy(
    model: SequenceModel,
    fp32_path: Path,
    int8_path: Path,
    validation: tuple[torch.Tensor, str] | None = None,
    batch: int = 16,
    time: int = 64,
) -> list[str]:
    """How much int8 changes the model's outputs, as printable lines.

    With ``validation`` (``[N]`` token ids or ``[N, F]`` features and a label, see `validation_split`):
    the split cut into ``batch`` contiguous streams, each run as one sequence, scored by both graphs (bits per
    character or mean squared error against the next step). Without it: random inputs, compared with fp32.
    Language models and classifiers also report top-1 agreement with fp32; regression the RMS difference.
    """
    return int8_accuracy_lines(model, fp32_path, int8_path, validation, batch, time, stepwise=False)


def int8_speed(model: SequenceModel, fp32_path: Path, int8_path: Path) -> list[str]:
    """Median CPU latency (1 thread) of fp32 vs int8 at batch 1: one step, and a 64-step sequence."""
    c = model.config
    lines = ["CPU latency, onnxruntime CPUExecutionProvider, 1 thread, median of 200 runs:"]
    for time in (1, 64):
        x = example_input(model, 1, time, torch.Generator().manual_seed(2)).numpy()
        feeds = {
            "input": x,
            **{
                f"{s}0": np.zeros(st.shape, np.float32)
                for s, st in zip(c.state_names, model.init_state(1), strict=True)
            },
        }
        t32 = latency_us(fp32_path, feeds)
        t8 = latency_us(int8_path, feeds)
        lines.append(f"  batch 1 x time {time:>2}: fp32 {t32:8.1f} us, int8 {t8:8.1f} us ({t32 / t8:.2f}x)")
    return lines
