"""The ``rnndeploy`` command line. Heavy modules (torch, onnxruntime) are imported inside commands."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from rnndeploy import __version__

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="rnndeploy")
def main() -> None:
    """Train recurrent networks (RNN, LSTM, GRU), export them to ONNX and serve them step by step.

    Start with `rnndeploy demo`; every command explains itself with --help.

    \b
    Exit codes:
      0    done (for `serve`: stopped by Ctrl-C or SIGTERM after a graceful shutdown)
      1    a user error: the message names the input, what was expected and what to do
      2    a usage error: an unknown option or a value of the wrong kind
      130  stopped by Ctrl-C (`train` says which step its checkpoint holds and how to resume)
      143  stopped by SIGTERM (the same)
    """


# --- training ---

_threads_option = click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="torch CPU threads [default: 1: torch's threads spin-wait for each other, and on a busy 2-core machine "
    "two threads took 3.6 to 21 times as long a step as one (benchmarks/results/threads.txt)]",
)


def _write_now(text: str) -> None:
    click.echo(text, nl=False)
    sys.stdout.flush()


def _training_errors():
    """The user-facing errors of training, shown as click errors (exit code 1) instead of tracebacks.

    OSError: a file that cannot be written (a read-only folder, a full disk); the message names the file.
    """
    from rnndeploy.checkpoint import CheckpointError
    from rnndeploy.data import DataError
    from rnndeploy.train import TrainError

    return (CheckpointError, DataError, TrainError, OSError)


@main.command(context_settings=CONTEXT_SETTINGS)
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
@_threads_option
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
    except _training_errors() as exc:
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


@main.command(context_settings=CONTEXT_SETTINGS)
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
@_threads_option
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
            out_dir=out_dir, steps=steps, threads=threads, quick=quick, echo=click.echo, write=_write_now
        )
        run_demo(context)
    except (*_training_errors(), ExportError, DemoError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


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


# --- runtime ---
def _provider_options(command):
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


def _session_options(command):
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
    command = _provider_options(command)
    for option in reversed(options):
        command = option(command)
    return command


def _step_form_options(command):
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


def _open_session(
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


@main.command("run")
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
@_session_options
@_step_form_options
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
    import sys

    import numpy as np

    from rnndeploy.runtime import StepInputError

    session = _open_session(
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
    import sys

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


@main.command("generate")
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
@_provider_options
def generate_command(
    model, prompt, length, temperature, top_k, seed, continuation_only, provider, threads
) -> None:
    """Sample text from a character language model: print the prompt, then characters as they are drawn."""
    from rnndeploy.runtime import GenerateError, generate

    session = _open_session(model, (), (), provider, threads)
    chars = generate(session, prompt, length, temperature=temperature, top_k=top_k, seed=seed)
    try:
        first = next(chars, "")  # checks the prompt and the settings before anything is printed
        _write_now(first if continuation_only else prompt + first)
        for char in chars:
            _write_now(char)
    except GenerateError as error:
        raise click.ClickException(str(error)) from error
    click.echo()


@main.command("info")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_session_options
def info_command(model, states, constants, provider, threads) -> None:
    """Show a model's inputs, outputs, state pairs, metadata and the execution providers that start (JSON).

    providers_available lists the providers that can run this model here (CPU always; CUDA and TensorRT only
    with a GPU, its driver and the CUDA libraries onnxruntime needs).
    """
    import json

    from rnndeploy.runtime import usable_providers

    session = _open_session(model, states, constants, provider, threads)
    info = {**session.describe(), "providers_available": usable_providers(model)}
    click.echo(json.dumps(info, indent=2))


@main.command("serve")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, help="HTTP port (0: any free port, printed).")
@click.option("--grpc-port", default=8001, show_default=True, help="gRPC port (0: no gRPC).")
@click.option(
    "--metrics-port", type=int, default=None, help="Also serve /metrics on this port (always on --port)."
)
@click.option("--name", default=None, help="Model name in URLs (default: the file name without .onnx).")
@click.option(
    "--max-batch-size", default=64, show_default=True, help="Most sequences per batched step (1: off)."
)
@click.option("--max-queue-delay-us", default=500.0, show_default=True, help="Wait for a batch to fill (us).")
@click.option("--idle-timeout", default=60.0, show_default=True, help="Evict sequences idle this long (s).")
@click.option("--max-sequences", default=1024, show_default=True, help="Most live sequences (429 beyond).")
@click.option("--max-state-mb", default=1024.0, show_default=True, help="All sequences' state (429 beyond).")
@click.option("--max-rows", default=64, show_default=True, help="Batch rows of one request (413 beyond).")
@click.option("--max-steps", default=4096, show_default=True, help="Rows x time steps of a request (413).")
@click.option("--max-response-mb", default=64.0, show_default=True, help="Largest response (413 beyond).")
@click.option("--max-body-mb", default=16.0, show_default=True, help="Largest request body (413 beyond).")
@click.option("--max-connections", default=512, show_default=True, help="Open connections (503 beyond).")
@click.option(
    "--max-grpc-calls",
    default=1024,
    show_default=True,
    help="gRPC calls open at once; a stream is one while open (RESOURCE_EXHAUSTED beyond).",
)
@click.option("--header-timeout", default=10.0, show_default=True, help="Request headers within (s; 408).")
@click.option("--body-timeout", default=30.0, show_default=True, help="Request body within (s; 408).")
@click.option(
    "--shutdown-timeout", default=10.0, show_default=True, help="SIGTERM: finish open requests within (s)."
)
@click.option("--log-level", default="info", show_default=True)
@click.option("--access-log/--no-access-log", default=False, show_default=True, help="Log every request.")
@click.option(
    "--worker-thread/--no-worker-thread",
    default=True,
    show_default=True,
    help="Run batches in a worker thread (off: on the event loop, no hand-off; for steps of ~1 ms or less).",
)
@_session_options
@_step_form_options
def serve_command(
    model,
    host,
    port,
    grpc_port,
    metrics_port,
    name,
    max_batch_size,
    max_queue_delay_us,
    idle_timeout,
    max_sequences,
    max_state_mb,
    max_rows,
    max_steps,
    max_response_mb,
    max_body_mb,
    max_connections,
    max_grpc_calls,
    header_timeout,
    body_timeout,
    shutdown_timeout,
    log_level,
    access_log,
    worker_thread,
    states,
    constants,
    provider,
    threads,
    step_graph,
    step_form,
) -> None:
    """Serve a model with the KServe v2 protocol of Triton Inference Server over HTTP and gRPC.

    MODEL is an .onnx file, or a Triton-style model repository (a folder of <model>/config.pbtxt and
    numbered version folders, as rnndeploy export --triton-repo writes): every ready version of every model
    is served, each config.pbtxt giving the model's name, inputs and outputs, max_batch_size and, from
    sequence_batching, its idle timeout, queue delay and state pairs (in place of --name, --state, --const,
    --max-batch-size, --max-queue-delay-us and --idle-timeout).

    Stateful models keep one state per sequence (sequence_id / sequence_start / sequence_end request
    parameters; a gRPC stream per sequence with tritonclient.grpc); steps of concurrent sequences run as one
    batch, whichever protocol they came by. Prometheus metrics at /metrics. Prints the model and its URLs
    when ready.
    Stop with Ctrl-C or SIGTERM: open requests finish (up to --shutdown-timeout), then it exits with 0.
    Sequence state lives in memory: a restart loses every live sequence.
    """
    from rnndeploy.server import Limits, ServeError, serve

    try:
        limits = Limits(
            max_rows=max_rows,
            max_steps=max_steps,
            max_response_bytes=int(max_response_mb * 2**20),
            max_state_bytes=int(max_state_mb * 2**20),
            max_sequences=max_sequences,
            max_body_bytes=int(max_body_mb * 2**20),
        )
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    if model.is_dir():
        from rnndeploy.runtime import ProviderError
        from rnndeploy.server import open_repository
        from rnndeploy.server.repository import RepositoryError

        given = [o for o, v in (("--name", name), ("--state", states), ("--const", constants)) if v]
        if given:
            raise click.ClickException(
                f"{', '.join(given)} apply to one .onnx file; {model} is a model repository, whose "
                "config.pbtxt files name the models and their inputs"
            )
        if step_graph is not None:
            raise click.ClickException(
                f"--step-graph applies to one .onnx file; in the model repository {model} a version's step "
                "graph is the model.step.onnx beside its model file"
            )
        try:
            session = open_repository(
                model,
                limits=limits,
                providers=provider,
                threads=threads,
                worker_thread=worker_thread,
                step_form=step_form,
            )
        except (RepositoryError, ProviderError) as error:
            raise click.ClickException(str(error)) from error
    else:
        session = _open_session(
            model, states, constants, provider, threads, step_graph=step_graph, step_form=step_form
        )

    def ready(where: dict) -> None:
        model_url = f"{where['http']}/v2/models/{where['model']}"
        if model.is_dir():
            click.echo(f"Serving the model repository {model}")
            for served, versions in where["models"].items():
                click.echo(f"  model '{served}' (versions {', '.join(versions)})")
                click.echo(f"    HTTP (KServe v2): {where['http']}/v2/models/{served}/infer")
            click.echo(f"  HTTP health: {where['http']}/v2/health/ready")
        else:
            click.echo(f"Serving model '{where['model']}' (version {where['version']}) from {model}")
            click.echo(f"  HTTP (KServe v2): {model_url}/infer   health: {where['http']}/v2/health/ready")
        if where["grpc"] is not None:
            click.echo(f"  gRPC (KServe v2, streaming): {where['grpc']}")
        click.echo(f"  metrics (Prometheus): {where['metrics']}")
        click.echo("Stop with Ctrl-C or SIGTERM.", nl=True)

    try:
        serve(
            session,
            host=host,
            port=port,
            grpc_port=grpc_port or None,
            metrics_port=metrics_port,
            model_name=name or model.stem,
            log_level=log_level,
            access_log=access_log,
            limits=limits,
            header_timeout_s=header_timeout,
            body_timeout_s=body_timeout,
            max_connections=max_connections,
            max_grpc_calls=max_grpc_calls,
            shutdown_timeout_s=shutdown_timeout,
            on_ready=ready,
            max_batch_size=max_batch_size,
            max_queue_delay_us=max_queue_delay_us,
            idle_timeout_s=idle_timeout,
            worker_thread=worker_thread,
        )
    except ServeError as error:
        raise click.ClickException(str(error)) from error


# --- benchmarks ---


@main.group()
def bench() -> None:
    """Benchmarks; each prints a table and writes JSON, CSV and a PNG under ./bench-results (or --out)."""


@bench.command("runtime")
@click.option("--quick", is_flag=True, help="Fewer repeats and sizes (a smoke run).")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("bench-results"),
    show_default=True,
    help="Results folder (runtime.json, runtime.csv, runtime.png).",
)
@click.option(
    "--server/--no-server", default=True, show_default=True, help="Also benchmark `rnndeploy serve`."
)
def bench_runtime(quick, out, server) -> None:
    """Runtime and server: per-step latency against a bare onnxruntime loop (three model sizes, fp32 and int8,
    1 and 2 threads), step_many against one run on the stacked batch, server throughput and latency (batched
    vs unbatched; HTTP vs gRPC unary and streamed)."""
    from rnndeploy.bench.runtime import main as run_benchmarks

    if server:
        missing = [m for m in ("aiohttp", "httpx", "tritonclient.http") if not _module_available(m)]
        if missing:
            raise click.ClickException(
                f"the server part of `bench runtime` needs {', '.join(missing)}: "
                "pip install 'rnndeploy[bench]', or run with --no-server"
            )
    run_benchmarks(quick=quick, out=out, server=server)


def _module_available(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a missing parent package (tritonclient for tritonclient.http)
        return False


def _csv_list(convert):
    def parse(ctx: click.Context, param: click.Parameter, value: str) -> list:
        try:
            return [convert(v.strip()) for v in value.split(",") if v.strip()]
        except ValueError as e:
            raise click.BadParameter(f"expected a comma-separated list, got {value!r} ({e})") from e

    return parse


def _choices(allowed: tuple[str, ...]):
    def check(v: str) -> str:
        if v not in allowed:
            raise ValueError(f"{v!r} is not one of {', '.join(allowed)}")
        return v

    return check


@bench.command("kernels")
@click.option(
    "--cells",
    default="rnn,lstm,gru",
    callback=_csv_list(_choices(("rnn", "lstm", "gru"))),
    help="Comma-separated cells.",
)
@click.option(
    "--modes",
    default="forward,full",
    callback=_csv_list(_choices(("forward", "full"))),
    help="forward, full (forward + backward).",
)
@click.option(
    "--providers",
    default="triton,cudnn,reference",
    callback=_csv_list(_choices(("triton", "cudnn", "reference"))),
    help="What to time.",
)
@click.option(
    "--dtypes",
    default="fp32,bf16",
    callback=_csv_list(_choices(("fp32", "bf16", "fp16"))),
    help="Input dtypes.",
)
@click.option("--batch", default="1,8,16,64,256", callback=_csv_list(int), help="Batch sizes.")
@click.option("--hidden", default="128,256,512,768,1024", callback=_csv_list(int), help="Hidden sizes.")
@click.option("--seq-len", default="256,1024", callback=_csv_list(int), help="Sequence lengths.")
@click.option(
    "--reference-max-t",
    default=256,
    show_default=True,
    help="Run the plain reference only up to this sequence length (it is slow).",
)
@click.option("--rep-ms", default=100, show_default=True, help="do_bench measuring time per case (ms).")
@click.option("--time-budget-s", type=float, default=None, help="Stop starting new cases after this long.")
@click.option(
    "--out",
    "out_dir",
    default=Path("bench-results"),
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the JSON, CSV and PNG go.",
)
def bench_kernels(
    cells, modes, providers, dtypes, batch, hidden, seq_len, reference_max_t, rep_ms, time_budget_s, out_dir
):
    """Time the Triton kernels against torch.nn (cuDNN) and the plain reference: forward and forward+backward.

    Median and 0.2/0.8 quantiles of triton.testing.do_bench, peak memory. Needs a CUDA GPU. Example:
    `rnndeploy bench kernels --cells lstm --batch 16 --hidden 768 --seq-len 1024 --dtypes bf16`.
    """
    import torch

    if not torch.cuda.is_available():
        raise click.ClickException(
            "`rnndeploy bench kernels` needs a CUDA GPU and torch.cuda.is_available() is False here. "
            "The kernels' correctness runs on CPU: `python -m pytest tests/kernels` (Triton's interpreter)."
        )
    from rnndeploy.bench import kernels as bench

    out_dir.mkdir(parents=True, exist_ok=True)
    env = bench.environment()
    lines_path = out_dir / "kernels.jsonl"
    rows, failures, interrupted = bench.run_logged(
        lines_path, env, cells, modes, providers, dtypes, batch, hidden, seq_len, reference_max_t, rep_ms,
        time_budget_s, progress=lambda s: click.echo(f"  {s}", err=True),
    )  # fmt: skip
    if interrupted:
        click.echo(f"interrupted: the table holds the {len(rows)} case(s) that finished", err=True)
    click.echo(f"wrote {lines_path} (one JSON line per case as it finished)")
    for f in failures:
        click.echo(f"FAILED {f.cell} {f.mode} {f.provider} {f.dtype} B={f.batch} H={f.hidden} T={f.seq_len}: "
                   f"{f.error.splitlines()[0] if f.error else ''}")  # fmt: skip
    if not rows:
        raise click.ClickException(
            f"nothing was measured: {len(failures)} case(s) failed, the others were filtered out "
            "(--reference-max-t) or not reached"
        )
    click.echo(bench.table(rows))
    options = dict(cells=cells, modes=modes, providers=providers, dtypes=dtypes, batch=batch, hidden=hidden,
                   seq_len=seq_len, reference_max_t=reference_max_t, rep_ms=rep_ms,
                   time_budget_s=time_budget_s)  # fmt: skip
    for path in bench.write_results(rows, env, options, out_dir, failures):
        click.echo(f"wrote {path}")


@bench.command("memory")
@click.option(
    "--tasks",
    default="adding,copy",
    callback=_csv_list(_choices(("adding", "copy"))),
    help="adding (Hochreiter & Schmidhuber 1997), copy (memory task).",
)
@click.option("--cells", default="rnn,lstm,gru", callback=_csv_list(_choices(("rnn", "lstm", "gru"))))
@click.option("--lengths", default="50,100,200", callback=_csv_list(int), help="Minimal lengths / delays T.")
@click.option(
    "--backends",
    default="torch",
    callback=_csv_list(_choices(("torch", "triton", "reference"))),
    help="Run each cell with each (on a GPU: triton,torch puts the Triton kernels beside cuDNN).",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option(
    "--budget",
    type=click.IntRange(min=1),
    default=None,
    help="Most training sequences per run [default: adding 100000, copy 60000].",
)
@click.option("--hidden", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--lr",
    type=click.FloatRange(min=0.0, min_open=True),
    default=None,
    help="[default: adding 3e-3, copy 1e-2]",
)
@click.option(
    "--gate-bias",
    type=float,
    default=5.0,
    show_default=True,
    help="Initial LSTM forget-gate bias (input gate: minus it) and GRU update-gate bias.",
)
@click.option("--default-init", is_flag=True, help="Keep torch's initialisation (no --gate-bias).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--grad-t",
    type=click.IntRange(min=12),
    default=None,
    help="T of the gradient-flow picture [default: middle T].",
)
@click.option(
    "--threads", type=click.IntRange(min=1), default=1, show_default=True, help="torch CPU threads."
)
@click.option("--quick", is_flag=True, help="T=20 and 2000 sequences per run (a smoke run).")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("bench-results"),
    show_default=True,
    help="Results folder.",
)
def bench_memory(tasks, cells, lengths, backends, device, budget, hidden, batch, lr, gate_bias, default_init,
                 seed, grad_t, threads, quick, out) -> None:  # fmt: skip
    """Long time lags: Elman RNN, LSTM and GRU on the adding problem and the copy task (CPU: minutes).

    Per cell and T: training sequences until the stop criterion of Hochreiter & Schmidhuber (1997) held,
    test error and fraction correct on 2,560 fresh sequences, the mean baseline, the paper's figure; and the
    gradient flow through time on the adding problem. On CPU use the torch backend (Triton would run in
    its interpreter).
    """
    import dataclasses

    import torch

    from rnndeploy.bench import memory
    from rnndeploy.train import TrainError, resolve_device

    try:
        where = str(resolve_device(device))
    except TrainError as exc:
        raise click.ClickException(str(exc)) from exc
    if "triton" in backends and where == "cpu":
        click.echo(
            "note: backend triton on CPU runs in Triton's interpreter (slow); use torch on CPU", err=True
        )
    torch.set_num_threads(threads)
    if quick:
        lengths, budget, grad_t = memory.QUICK_LENGTHS, budget or memory.QUICK_BUDGET, None
    if not lengths or min(lengths) < (12 if "adding" in tasks else 1):
        raise click.BadParameter(
            f"give lengths >= 12 for the adding problem (ten candidates for its first marker), >= 1 for copy; "
            f"got {lengths}",
            param_hint="--lengths",
        )
    settings = memory.task_settings(
        tasks, hidden, batch, lr, budget, seed, where, None if default_init else gate_bias
    )
    click.echo(
        "settings: " + "; ".join(f"{k}: {dataclasses.asdict(s)}" for k, s in settings.items()), err=True
    )
    memory.main(tasks, cells, lengths, backends, settings, grad_t, out, echo=click.echo,
                progress=lambda s: click.echo(f"  {s}", err=True))  # fmt: skip
