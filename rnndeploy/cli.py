"""The ``rnndeploy`` command line. Heavy modules (torch, onnxruntime) are imported inside commands."""

from __future__ import annotations

from pathlib import Path

import click

from rnndeploy import __version__

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="rnndeploy")
def main() -> None:
    """Train recurrent networks (RNN, LSTM, GRU), export them to ONNX and serve them step by step.

    Start with `rnndeploy demo`; every command explains itself with --help.
    """


# --- export ---


@main.command("export")
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
    "--max-batch-size",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Triton max_batch_size.",
)
def export_cmd(
    checkpoint: Path,
    output: Path | None,
    opset: int | None,
    verify: bool,
    fp16: bool,
    int8: bool,
    triton_repo: Path | None,
    triton_name: str | None,
    max_batch_size: int,
) -> None:
    """Export CHECKPOINT to standard ONNX (RNN/LSTM/GRU nodes, state as graph inputs/outputs)."""
    from rnndeploy.checkpoint import CheckpointError
    from rnndeploy.export import DEFAULT_OPSET, ExportError, export_checkpoint

    try:
        report = export_checkpoint(
            checkpoint,
            output,
            verify=verify,
            opset=opset or DEFAULT_OPSET,
            fp16=fp16,
            int8=int8,
            triton_repo=triton_repo,
            triton_name=triton_name,
            max_batch_size=max_batch_size,
        )
    except (CheckpointError, ExportError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(str(report))
    if not report.ok:
        raise click.ClickException("verification failed: an output differs from PyTorch beyond the tolerance")
