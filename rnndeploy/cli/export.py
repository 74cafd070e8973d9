"""`rnndeploy export`."""

from __future__ import annotations

from pathlib import Path

import click

from .options import (
    CONTEXT_SETTINGS,
)


@click.command("export", context_settings=CONTEXT_SETTINGS)
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="ONNX file to write [default: CHECKPOINT.onnx].",
)
@click.option(
    "--opset", type=int, default=None, help="ONNX opset [default: 17, for onnxruntime and TensorRT 8.6+]."
)
@click.option(
    "--verify", is_flag=True, help="Compare onnxruntime and onnx.reference with PyTorch; exit 1 on failure."
)
@click.option(
    "--fp16", is_flag=True, help="Also write OUTPUT.fp16.onnx (half compute, fp32 I/O; for GPU runtimes)."
)
@click.option(
    "--int8", is_flag=True, help="Also write OUTPUT.int8.onnx (dynamic int8, CPU) and report accuracy/speed."
)
@click.option(
    "--triton-repo",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write a Triton Inference Server model repository here (sequence batcher, implicit state).",
)
@click.option(
    "--triton-name", default=None, help="Model name inside the Triton repository [default: OUTPUT's stem]."
)
@click.option(
    "--triton-backend",
    type=click.Choice(["onnxruntime", "python"]),
    default="onnxruntime",
    show_default=True,
    help="Triton backend: onnxruntime (NGC images) or python (model.py running the graph with onnxruntime).",
)
@click.option(
    "--max-batch-size",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Triton max_batch_size.",
)
@click.option(
    "--step-graph",
    is_flag=True,
    help="Also write OUTPUT.step.onnx: one time step as plain ONNX operators (no RNN node), for one-step "
    "serving; with --fp16/--int8 its variants too (int8 quantizes every cell, GRU and RNN included).",
)
@click.option("--overwrite", is_flag=True, help="Replace existing ONNX files (refused otherwise).")
def export_cmd(
    checkpoint: Path,
    output: Path | None,
    opset: int | None,
    verify: bool,
    fp16: bool,
    int8: bool,
    triton_repo: Path | None,
    triton_name: str | None,
    triton_backend: str,
    max_batch_size: int,
    step_graph: bool,
    overwrite: bool,
) -> None:
    """Export CHECKPOINT to standard ONNX (RNN/LSTM/GRU nodes, state as graph inputs/outputs).

    With --verify a graph replaces an existing file only after it passed; a failed one is kept aside.
    """
    from rnndeploy.checkpoint import CheckpointError
    from rnndeploy.export import DEFAULT_OPSET, ExportError, OutputExistsError, export_checkpoint

    try:
        report = export_checkpoint(
            checkpoint,
            output,
            overwrite=overwrite,
            verify=verify,
            opset=opset or DEFAULT_OPSET,
            fp16=fp16,
            int8=int8,
            triton_repo=triton_repo,
            triton_name=triton_name,
            triton_backend=triton_backend,
            max_batch_size=max_batch_size,
            step_graph=step_graph,
        )
    except OutputExistsError as exc:
        raise click.ClickException(f"{exc.path} exists; pass --overwrite to replace it") from exc
    except (CheckpointError, ExportError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(str(report))
    if not report.ok:
        kept = ", ".join(str(p) for p in report.rejected.values())
        raise click.ClickException(
            "verification failed: an output differs from PyTorch beyond the tolerance; nothing was replaced"
            + (f" (the rejected graph is kept at {kept})" if kept else "")
        )
