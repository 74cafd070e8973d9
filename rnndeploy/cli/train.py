"""`rnndeploy train` and `rnndeploy demo`."""

from __future__ import annotations

from pathlib import Path

import click

from .options import (
    CONTEXT_SETTINGS,
    threads_option,
    training_errors,
    write_now,
)


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--data",
    default="builtin",
    show_default=True,
    help="'builtin' (English text of Python's pydoc topics, ~465 kB), a UTF-8 text file (character model), "
    "or a .npy/.csv time series [T] or [T, F] (next-step regression).",
)
@click.option("--cell", type=click.Choice(["rnn", "lstm", "gru"]), default="lstm", show_default=True)
@click.option(
    "--hidden", type=click.IntRange(min=1), default=256, show_default=True, help="Hidden units per layer."
)
@click.option("--layers", type=click.IntRange(min=1), default=1, show_default=True, help="Recurrent layers.")
@click.option(
    "--embed", type=click.IntRange(min=1), default=64, show_default=True, help="Embedding / input width."
)
@click.option(
    "--dropout",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=0.0,
    show_default=True,
    help="Dropout between recurrent layers.",
)
@click.option(
    "--seq-len",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Truncated-BPTT chunk length.",
)
@click.option(
    "--batch", type=click.IntRange(min=1), default=32, show_default=True, help="Parallel streams per process."
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=2000,
    show_default=True,
    help="Total optimizer steps (with --resume: train until this step).",
)
@click.option("--lr", type=click.FloatRange(min=0.0, min_open=True), default=3e-3, show_default=True)
@click.option(
    "--clip",
    type=click.FloatRange(min=0.0),
    default=1.0,
    show_default=True,
    help="Clip the global gradient norm to this (0: no clipping).",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--amp", type=click.Choice(["bf16"]), default=None, help="bf16 autocast (CUDA only).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Checkpoint to write; the log (.log.jsonl) and loss curve (.loss.png) go next to it. "
    "[default: the --resume checkpoint, else runs/model.pt]",
)
@click.option(
    "--resume",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Continue the run saved in this checkpoint; options not given are taken from it.",
)
@click.option(
    "--eval-every",
    type=click.IntRange(min=1),
    default=200,
    show_default=True,
    help="Steps between validations and checkpoints.",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "torch", "triton", "reference"]),
    default="auto",
    show_default=True,
    help="Recurrent backend: Triton kernels where faster, torch (cuDNN), or the plain reference.",
)
@click.option(
    "--valid-fraction",
    type=click.FloatRange(0.0, 0.5, min_open=True),
    default=0.05,
    show_default=True,
    help="Share at the end of the data held out for validation.",
)
@click.option(
    "--progress/--no-progress", default=True, help="Show a progress bar (without: a line per validation)."
)
@threads_option
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing --out checkpoint of another run (refused otherwise).",
)
@click.option(
    "--allow-data-change",
    is_flag=True,
    help="With --resume: continue on training data that differs from the checkpoint's (refused otherwise).",
)
@click.option(
    "--grad-report",
    is_flag=True,
    help="After training, plot ||dL/dh_t|| through time on one batch (.grad.png, .grad.json beside --out).",
)
@click.pass_context
def train(ctx: click.Context, **kwargs) -> None:
    """Train a character language model or a time-series forecaster.

    Text is measured in bits per character on the held-out end of the data, a series in mean squared error
    of normalised values. Runs unchanged under `torchrun --nproc_per_node N` (DistributedDataParallel).

    \b
    Examples:
      rnndeploy train --steps 1000 --out runs/pydoc.pt
      rnndeploy train --resume runs/pydoc.pt --steps 2000
      rnndeploy train --data series.csv --cell gru --hidden 64 --seq-len 32
      torchrun --nproc_per_node 2 -m rnndeploy train --device cpu
    """
    from rnndeploy.train import TrainingInterrupted, TrainOptions, options_for_resume
    from rnndeploy.train import train as run_training

    try:
        if kwargs["resume"] is not None:
            given = {
                name: value
                for name, value in kwargs.items()
                if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT
            }
            options = options_for_resume(given.pop("resume"), **given)
        else:
            options = TrainOptions(**{k: v for k, v in kwargs.items() if v is not None or k != "threads"})
        result = run_training(options, echo=click.echo)
    except TrainingInterrupted as exc:
        if exc.rank == 0:
            click.echo(f"\n{exc}", err=True)
        ctx.exit(128 + exc.signal)
    except training_errors() as exc:
        raise click.ClickException(str(exc)) from exc
    if result.rank != 0:
        return
    metric = result.metric
    click.echo(
        f"validation {metric}: {result.first_valid:.3f} (step {result.history[0]['step']}) -> "
        f"{result.last_valid:.3f} (step {result.step})"
    )
    if result.replicas_identical is not None:
        same = "identical" if result.replicas_identical else "DIFFERENT (see the log)"
        click.echo(f"replicas of {result.world_size} processes: {same}")
    click.echo(f"checkpoint: {result.checkpoint}\nlog:        {result.log}\nloss curve: {result.plot}")
    if options.grad_report:
        from rnndeploy.diagnostics import report_paths

        click.echo("gradient flow: {} {}".format(*report_paths(result.checkpoint)))


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("rnndeploy-demo"),
    show_default=True,
    help="Folder for the checkpoint, log, loss curve and the files later stages write.",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=None,
    help="Training steps [default: 1000; 30 with --quick]",
)
@threads_option
@click.option("--quick", is_flag=True, hidden=True, help="Tiny model and few steps (for tests).")
def demo(out_dir: Path, steps: int | None, threads: int | None, quick: bool) -> None:
    """Train a small character LSTM on the built-in corpus and show what it learned (minutes on 2 CPU cores).

    Prints the validation bits per character before and after training, a sample of generated text, and
    where the files went.
    """
    from rnndeploy.demo import DemoContext, DemoError, run_demo
    from rnndeploy.export import ExportError

    try:
        context = DemoContext(
            out_dir=out_dir, steps=steps, threads=threads, quick=quick, echo=click.echo, write=write_now
        )
        run_demo(context)
    except (*training_errors(), ExportError, DemoError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


# --- export ---
