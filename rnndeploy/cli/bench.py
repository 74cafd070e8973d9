"""`rnndeploy bench runtime | kernels | memory`: the benchmarks behind the docs' figures."""

from __future__ import annotations

from pathlib import Path

import click

from .options import (
    CONTEXT_SETTINGS,
)


@click.group(context_settings=CONTEXT_SETTINGS)
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
