"""`rnndeploy run`, `generate` and `info`: a model step by step from the command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .options import (
    CONTEXT_SETTINGS,
    open_session,
    provider_options,
    session_options,
    step_form_options,
    write_now,
)


@click.command("run", context_settings=CONTEXT_SETTINGS)
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--input",
    "input_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A .npy file [T, ...] (row t is step t), or a .csv series (a header row names its columns). "
    "Default: JSON lines on stdin, one step per line.",
)
@click.option(
    "--text",
    default=None,
    help="A language model: feed these characters one step each ('-': all of stdin) and print the next "
    "character after each.",
)
@click.option(
    "--temperature",
    default=0.0,
    show_default=True,
    help="With --text: 0 prints the most likely next character, > 0 samples one at this temperature.",
)
@click.option("--seed", type=int, default=None, help="With --text: random seed for reproducible samples.")
@click.option(
    "--raw",
    is_flag=True,
    help="Feed the graph raw values: no normalisation with the model's rnndeploy.data_stats.",
)
@session_options
@step_form_options
def run_command(
    model,
    input_path,
    text,
    temperature,
    seed,
    raw,
    states,
    constants,
    provider,
    threads,
    step_graph,
    step_form,
) -> None:
    """Run a stateful ONNX model step by step and print each step's outputs as a JSON line.

    A step's input is the model input without its batch and time axes (a token id, a feature vector), or a
    JSON object {name: value} for models with several inputs. Output lines are flushed as steps finish.
    Token ids outside a language model's vocabulary are refused; --text feeds characters instead and prints
    {"step", "input", "next", "log_prob"} lines.

    A forecaster trained on a .csv/.npy series takes and returns values in the series' own units (its
    training mean and standard deviation are in the model's metadata); --raw feeds the graph as it is. Its
    steps may come as a .csv with a header, or as JSON lines of named fields ({"temp": 3.1, "load": 0.5}):
    then outputs with one value per column carry the column names.
    """
    import json

    import numpy as np

    from rnndeploy.runtime import StepInputError

    session = open_session(
        model,
        states,
        constants,
        provider,
        threads,
        normalize=not raw,
        step_graph=step_graph,
        step_form=step_form,
    )
    if text is not None:
        if input_path is not None:
            raise click.UsageError("give --text or --input, not both")
        _run_text(session, sys.stdin.read() if text == "-" else text, temperature, seed)
        return
    columns: list[str] = []
    if input_path is not None:
        if len(session.inputs) != 1:
            raise click.ClickException(
                f"the model has inputs {list(session.inputs)}: give JSON lines on stdin"
            )
        steps = _read_steps(input_path, columns)
        rows = ({next(iter(session.inputs)): row} for row in steps)
    else:
        rows = (_json_step(line, session.inputs, columns) for line in sys.stdin if line.strip())
    for t, row in enumerate(rows):
        arrays, lead = {}, None
        for name, value in row.items():
            spec = session.inputs.get(name)
            array = np.asarray(value)
            if spec is not None and np.can_cast(array.dtype, spec.dtype, "same_kind"):
                array = array.astype(spec.dtype)
            missing = len(spec.shape) - array.ndim if spec is not None else 0
            arrays[name] = array.reshape((1,) * max(missing, 0) + array.shape)
            lead = missing if lead is None else min(lead, missing)
        try:
            session.check_tokens(arrays)
            outputs = session.step(arrays)
        except StepInputError as error:
            raise click.ClickException(f"step {t}: {error}") from error
        line = {"step": t}
        for name, out in outputs.items():
            for _ in range(max(lead, 0)):
                out = out[0] if out.ndim and out.shape[0] == 1 else out
            named = columns and out.ndim == 1 and out.shape[0] == len(columns) and out.dtype.kind == "f"
            line[name] = dict(zip(columns, out.tolist(), strict=True)) if named else out.tolist()
        click.echo(json.dumps(line))
        sys.stdout.flush()


def _run_text(session, text: str, temperature: float, seed: int | None) -> None:
    """``run --text``: one JSON line per character fed."""
    import json

    from rnndeploy.runtime import GenerateError, read_text

    try:
        for t, (char, following, log_prob) in enumerate(
            read_text(session, text, temperature=temperature, seed=seed)
        ):
            click.echo(json.dumps({"step": t, "input": char, "next": following, "log_prob": log_prob}))
            sys.stdout.flush()
    except GenerateError as error:
        raise click.ClickException(f"--text: {error}") from error


def _read_steps(path: Path, columns: list[str]):
    """The steps of ``run --input``: a .npy array's rows, or a .csv's rows (its header's names into ``columns``)."""
    import csv

    import numpy as np

    if path.suffix.lower() != ".csv":
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            if "allow_pickle" in str(error):
                error = "it holds Python objects, not numbers"
            raise click.ClickException(
                f"--input {path} is not a readable .npy array of numbers ({error}); give a .npy array or a "
                ".csv series"
            ) from None
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            lines = [(n, row) for n, row in enumerate(csv.reader(fh), start=1) if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise click.ClickException(f"--input {path} is not a readable CSV file: {error}") from None
    if lines and not any(_is_number(cell) for cell in lines[0][1]):
        columns.extend(cell.strip() for cell in lines.pop(0)[1])
    if not lines:
        raise click.ClickException(f"--input {path} has no data rows")
    width = len(columns) or len(lines[0][1])
    steps = np.empty((len(lines), width), np.float64)
    for k, (n, row) in enumerate(lines):
        if len(row) != width or not all(_is_number(cell) for cell in row):
            raise click.ClickException(
                f"--input {path} line {n}: expected {width} numbers"
                + (f" (columns {columns})" if columns else "")
                + f", got {row[:8]!r}"
            )
        steps[k] = [float(cell) for cell in row]
    return steps


def _is_number(cell: str) -> bool:
    """A finite number (what a series' cell must be)."""
    import math

    try:
        return math.isfinite(float(cell))
    except ValueError:
        return False


def _json_step(line: str, inputs: dict, columns: list[str]) -> dict:
    """One step of ``run``'s JSON lines: ``{input: value}``. A line of named fields (an object whose keys are
    not the model's inputs, for a model with one input) becomes the vector of its values in the order of the
    first such line's fields, which go into ``columns``."""
    import json

    try:
        value = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as error:
        raise click.ClickException(f"input line is not JSON ({error}): {line.strip()[:80]!r}") from error
    if isinstance(value, dict):
        if len(inputs) != 1 or set(value) <= set(inputs):
            return value
        if not columns:
            columns.extend(value)
        if set(value) != set(columns):
            raise click.ClickException(
                f"input line has fields {list(value)[:20]}; the first line named {columns[:20]}: every line "
                "needs the same fields"
            )
        return {next(iter(inputs)): [value[c] for c in columns]}
    if len(inputs) != 1:
        raise click.ClickException(f"the model has inputs {list(inputs)}: give each line as a JSON object")
    return {next(iter(inputs)): value}


@click.command("generate", context_settings=CONTEXT_SETTINGS)
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--prompt", required=True, help="Text to start from (characters of the model's vocabulary).")
@click.option("--length", default=200, show_default=True, help="Characters to sample.")
@click.option(
    "--temperature", default=1.0, show_default=True, help="Sampling temperature; 0 picks the argmax."
)
@click.option("--top-k", type=int, default=None, help="Sample among the k most likely characters.")
@click.option("--seed", type=int, default=None, help="Random seed for reproducible samples.")
@click.option(
    "--continuation-only", is_flag=True, help="Print only the sampled text, not the prompt before it."
)
@provider_options
def generate_command(
    model, prompt, length, temperature, top_k, seed, continuation_only, provider, threads
) -> None:
    """Sample text from a character language model: print the prompt, then characters as they are drawn."""
    from rnndeploy.runtime import GenerateError, generate

    session = open_session(model, (), (), provider, threads)
    chars = generate(session, prompt, length, temperature=temperature, top_k=top_k, seed=seed)
    try:
        first = next(chars, "")  # checks the prompt and the settings before anything is printed
        write_now(first if continuation_only else prompt + first)
        for char in chars:
            write_now(char)
    except GenerateError as error:
        raise click.ClickException(str(error)) from error
    click.echo()


@click.command("info", context_settings=CONTEXT_SETTINGS)
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@session_options
def info_command(model, states, constants, provider, threads) -> None:
    """Show a model's inputs, outputs, state pairs, metadata and the execution providers that start (JSON).

    providers_available lists the providers that can run this model here (CPU always; CUDA and TensorRT only
    with a GPU, its driver and the CUDA libraries onnxruntime needs).
    """
    import json

    from rnndeploy.runtime import usable_providers

    session = open_session(model, states, constants, provider, threads)
    info = {**session.describe(), "providers_available": usable_providers(model)}
    click.echo(json.dumps(info, indent=2))
