"""What the commands share: option decorators, opening a session, and user errors as click errors."""

from __future__ import annotations

import sys
from pathlib import Path

import click

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


threads_option = click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="torch CPU threads [default: 1: torch's threads spin-wait for each other, and on a busy 2-core machine "
    "two threads took 3.6 to 21 times as long a step as one (benchmarks/results/threads.txt)]",
)


def write_now(text: str) -> None:
    click.echo(text, nl=False)
    sys.stdout.flush()


def training_errors():
    """The user-facing errors of training, shown as click errors (exit code 1) instead of tracebacks.

    OSError: a file that cannot be written (a read-only folder, a full disk); the message names the file.
    """
    from rnndeploy.checkpoint import CheckpointError
    from rnndeploy.data import DataError
    from rnndeploy.train import TrainError

    return (CheckpointError, DataError, TrainError, OSError)


def provider_options(command):
    """--provider and --threads: how the runtime runs a model (every command that opens one)."""
    options = [
        click.option(
            "--provider", default=None, help="cpu, cuda, tensorrt (default: CUDA when usable, else CPU)."
        ),
        click.option("--threads", default=1, show_default=True, help="onnxruntime intra-op threads."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def session_options(command):
    """Options shared by the commands that open any stateful model: state pairs, constants, provider."""
    options = [
        click.option(
            "--state",
            "states",
            multiple=True,
            metavar="IN=OUT",
            help="A state pair (repeat for each); default: model metadata, else naming conventions.",
        ),
        click.option(
            "--const",
            "constants",
            multiple=True,
            metavar="NAME=VALUE",
            help="A constant input (VALUE is JSON, e.g. 16000 or [1,2]); repeat for each.",
        ),
    ]
    command = provider_options(command)
    for option in reversed(options):
        command = option(command)
    return command


def step_form_options(command):
    """--step-graph and --step-form: a model's one-step graph held beside its sequence graph."""
    options = [
        click.option(
            "--step-graph",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            default=None,
            help="The same model's one-step graph (rnndeploy export --step-graph): one-step calls run through "
            "it when --step-form picks it, longer chunks through MODEL; each stream keeps one state.",
        ),
        click.option(
            "--step-form",
            type=click.Choice(["auto", "step", "sequence"]),
            default="auto",
            show_default=True,
            help="With --step-graph (or a repository version holding model.step.onnx): which graph serves "
            "one-step calls; auto times both when the model loads and keeps the faster.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise click.BadParameter(f"expected NAME=VALUE, got {value!r}", param_hint=option)
        pairs[name] = rest
    return pairs


def open_session(
    model,
    states: tuple[str, ...],
    constants: tuple[str, ...],
    provider: str | None,
    threads: int,
    normalize: bool = True,
    step_graph: Path | None = None,
    step_form: str = "auto",
):
    """A StreamingSession for a command; its errors as click errors in the command line's terms."""
    import json

    from rnndeploy.runtime import ModelError, ProviderError, StreamingSession

    values = {}
    for name, text in _pairs(constants, "--const").items():
        try:
            values[name] = json.loads(text)
        except json.JSONDecodeError as error:
            raise click.BadParameter(
                f"{name}={text!r}: VALUE must be JSON ({error})", param_hint="--const"
            ) from error
    try:
        return StreamingSession(
            model,
            _pairs(states, "--state") or None,
            constants=values,
            providers=provider,
            threads=threads,
            normalize=normalize,
            step_graph=step_graph,
            step_form=step_form,
        )
    except ProviderError as error:
        if error.reason is None:
            raise click.ClickException(str(error)) from error
        raise click.ClickException(
            f"--provider {provider}: onnxruntime could not start {error.provider}: {error.reason}. "
            "Run with --provider cpu, or leave --provider out (CUDA where it starts, else the CPU)."
        ) from error
    except ModelError as error:
        raise click.ClickException(str(error)) from error
