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


# --- runtime ---
def _session_options(command):
    """Options shared by the commands that open a model with the runtime."""
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
        click.option(
            "--provider", default=None, help="cpu, cuda, tensorrt (default: CUDA when usable, else CPU)."
        ),
        click.option("--threads", default=1, show_default=True, help="onnxruntime intra-op threads."),
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
    model, states: tuple[str, ...], constants: tuple[str, ...], provider: str | None, threads: int
):
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
            model, _pairs(states, "--state") or None, constants=values, providers=provider, threads=threads
        )
    except (ModelError, ProviderError) as error:
        raise click.ClickException(str(error)) from error


@main.command("run")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--input",
    "input_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A .npy file [T, ...]: row t is step t. Default: JSON lines on stdin, one step per line.",
)
@_session_options
def run_command(model, input_path, states, constants, provider, threads) -> None:
    """Run a stateful ONNX model step by step and print each step's outputs as a JSON line.

    A step's input is the model input without its batch and time axes (a token id, a feature vector), or a
    JSON object {name: value} for models with several inputs. Output lines are flushed as steps finish.
    """
    import json
    import sys

    import numpy as np

    from rnndeploy.runtime import StepInputError

    session = _open_session(model, states, constants, provider, threads)
    if input_path is not None:
        if len(session.inputs) != 1:
            raise click.ClickException(
                f"the model has inputs {list(session.inputs)}: give JSON lines on stdin"
            )
        rows = ({next(iter(session.inputs)): row} for row in np.load(input_path))
    else:
        rows = (_json_step(line, session.inputs) for line in sys.stdin if line.strip())
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
            outputs = session.step(arrays)
        except StepInputError as error:
            raise click.ClickException(f"step {t}: {error}") from error
        line = {"step": t}
        for name, out in outputs.items():
            for _ in range(max(lead, 0)):
                out = out[0] if out.ndim and out.shape[0] == 1 else out
            line[name] = out.tolist()
        click.echo(json.dumps(line))
        sys.stdout.flush()


def _json_step(line: str, inputs: dict) -> dict:
    import json

    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        raise click.ClickException(f"input line is not JSON ({error}): {line.strip()[:80]!r}") from error
    if isinstance(value, dict):
        return value
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
@click.option("--provider", default=None, help="cpu, cuda, tensorrt (default: CUDA when usable, else CPU).")
@click.option("--threads", default=1, show_default=True, help="onnxruntime intra-op threads.")
def generate_command(model, prompt, length, temperature, top_k, seed, provider, threads) -> None:
    """Sample text from a character language model, printing characters as they are drawn."""
    import sys

    from rnndeploy.runtime import GenerateError, generate

    session = _open_session(model, (), (), provider, threads)
    try:
        for char in generate(session, prompt, length, temperature=temperature, top_k=top_k, seed=seed):
            click.echo(char, nl=False)
            sys.stdout.flush()
    except GenerateError as error:
        raise click.ClickException(str(error)) from error
    click.echo()


@main.command("info")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_session_options
def info_command(model, states, constants, provider, threads) -> None:
    """Show a model's inputs, outputs, state pairs, metadata and the execution providers available (JSON)."""
    import json

    from rnndeploy.runtime import available_providers

    session = _open_session(model, states, constants, provider, threads)
    click.echo(json.dumps({**session.describe(), "providers_available": available_providers()}, indent=2))


@main.command("serve")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--name", default=None, help="Model name in URLs (default: the file name without .onnx).")
@click.option(
    "--max-batch-size", default=64, show_default=True, help="Most sequences per batched step (1: off)."
)
@click.option("--max-queue-delay-us", default=500.0, show_default=True, help="Wait for a batch to fill (us).")
@click.option("--idle-timeout", default=60.0, show_default=True, help="Evict sequences idle this long (s).")
@click.option("--max-sequences", default=1024, show_default=True, help="Most live sequences (429 beyond).")
@click.option("--max-body-mb", default=16.0, show_default=True, help="Largest request body (413 beyond).")
@click.option("--log-level", default="info", show_default=True)
@_session_options
def serve_command(
    model,
    host,
    port,
    name,
    max_batch_size,
    max_queue_delay_us,
    idle_timeout,
    max_sequences,
    max_body_mb,
    log_level,
    states,
    constants,
    provider,
    threads,
) -> None:
    """Serve a model over HTTP with the KServe v2 protocol of Triton Inference Server (tritonclient works).

    Stateful models keep one state per sequence (sequence_id / sequence_start / sequence_end request
    parameters); steps of concurrent sequences run as one batch. Stop with Ctrl-C or SIGTERM.
    """
    from rnndeploy.server import serve

    session = _open_session(model, states, constants, provider, threads)
    serve(
        session,
        host=host,
        port=port,
        model_name=name or model.stem,
        log_level=log_level,
        max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us,
        idle_timeout_s=idle_timeout,
        max_sequences=max_sequences,
        max_body_bytes=int(max_body_mb * 2**20),
    )


@main.group()
def bench() -> None:
    """Benchmarks: print a table and write JSON/CSV/PNG under benchmarks/results/."""


@bench.command("runtime")
@click.option("--quick", is_flag=True, help="Fewer repeats and sizes (a smoke run).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Results folder.")
def bench_runtime(quick, out) -> None:
    """Runtime and server: per-step latency, batched throughput, server throughput and latency."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_runtime.py"
    if not script.is_file():
        raise click.ClickException(f"{script} not found: run the benchmarks from a source checkout")
    spec = importlib.util.spec_from_file_location("bench_runtime", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(quick=quick, out=out)
