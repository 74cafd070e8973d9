"""The ``rnndeploy`` command line. Heavy modules (torch, onnxruntime) are imported inside commands."""

from __future__ import annotations

import click

from rnndeploy import __version__

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="rnndeploy")
def main() -> None:
    """Train recurrent networks (RNN, LSTM, GRU), export them to ONNX and serve them step by step.

    Start with `rnndeploy demo`; every command explains itself with --help.
    """


# --- kernel benchmark ---

from pathlib import Path  # noqa: E402


@main.group()
def bench() -> None:
    """Benchmarks; each prints a table and writes JSON, CSV and a PNG under benchmarks/results/."""


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


def write_kernel_results(rows: list, env: dict, options: dict, out_dir: Path) -> list[Path]:
    """Writes ``kernels.json`` (environment, options, rows, speedups), ``kernels.csv`` and ``kernels.png``."""
    import csv
    import dataclasses
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rnndeploy.checkpoint import atomic_write
    from rnndeploy.kernels.benchmark import speedups

    records = [dataclasses.asdict(r) for r in rows]
    faster = speedups(rows)
    doc = {"environment": env, "options": options, "rows": records, "speedups": faster}
    paths = [out_dir / "kernels.json", out_dir / "kernels.csv", out_dir / "kernels.png"]
    atomic_write(paths[0], lambda p: Path(p).write_text(json.dumps(doc, indent=1)))

    def write_csv(p: str) -> None:
        with open(p, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*records[0], *env])
            writer.writeheader()
            writer.writerows({**r, **env} for r in records)

    atomic_write(paths[1], write_csv)

    cells = sorted({r.cell for r in rows})
    modes = sorted({r.mode for r in rows})
    size = (6 * len(modes), 3.5 * len(cells))
    fig, axes = plt.subplots(len(cells), len(modes), figsize=size, squeeze=False)
    for (i, cell), (j, mode) in ((a, b) for a in enumerate(cells) for b in enumerate(modes)):
        ax = axes[i][j]
        series: dict[tuple, list] = {}
        for s in faster:
            if s["cell"] == cell and s["mode"] == mode:
                line = series.setdefault((s["dtype"], s["seq_len"], s["hidden"]), [])
                line.append((s["batch"], s["speedup"]))
        for (dtype, T, H), pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{dtype} T={T} H={H}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{cell} {mode}: cuDNN ms / Triton ms")
        ax.set_xlabel("batch")
        if series:
            ax.legend(fontsize=6)
    fig.suptitle(f"{env.get('device', '?')} (commit {env.get('commit', '?')[:10]})")
    fig.tight_layout()
    atomic_write(paths[2], lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return paths


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
    default="benchmarks/results",
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
    from rnndeploy.kernels.benchmark import environment, run_benchmark

    rows = run_benchmark(cells, modes, providers, dtypes, batch, hidden, seq_len, reference_max_t, rep_ms,
                         time_budget_s, progress=lambda s: click.echo(f"  {s}", err=True))  # fmt: skip
    if not rows:
        raise click.ClickException("nothing was measured: every case was filtered out (--reference-max-t)")
    header = f"{'cell':5} {'mode':8} {'provider':9} {'dtype':5} {'B':>4} {'H':>5} {'T':>5} " + (
        f"{'ms':>9} {'p20':>9} {'p80':>9} {'peak MiB':>9}  strategy"
    )
    click.echo(header)
    for r in rows:
        click.echo(
            f"{r.cell:5} {r.mode:8} {r.provider:9} {r.dtype:5} {r.batch:>4} {r.hidden:>5} {r.seq_len:>5} "
            f"{r.ms:9.3f} {r.ms_p20:9.3f} {r.ms_p80:9.3f} {r.peak_mib:9.1f}  {r.strategy}"
        )
    options = dict(cells=cells, modes=modes, providers=providers, dtypes=dtypes, batch=batch, hidden=hidden,
                   seq_len=seq_len, reference_max_t=reference_max_t, rep_ms=rep_ms,
                   time_budget_s=time_budget_s)  # fmt: skip
    for path in write_kernel_results(rows, environment(), options, out_dir):
        click.echo(f"wrote {path}")
