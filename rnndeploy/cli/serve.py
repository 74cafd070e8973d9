"""`rnndeploy serve`."""

from __future__ import annotations

from pathlib import Path

import click

from .options import (
    CONTEXT_SETTINGS,
    open_session,
    session_options,
    step_form_options,
)


@click.command("serve", context_settings=CONTEXT_SETTINGS)
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
@session_options
@step_form_options
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
        session = open_session(
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
