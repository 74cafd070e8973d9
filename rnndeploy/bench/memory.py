"""Long-time-lag benchmark: the adding problem (Hochreiter & Schmidhuber 1997) and the copy task.

Trains rnndeploy's Elman RNN (tanh), LSTM and GRU (``rnndeploy.SequenceModel``, the chosen ``backend``) for
each T on fresh sequences (rnndeploy.longlag), and reports per cell and T: training sequences until the stop
criterion held (or "not solved" within the budget), the final test error and fraction correct on 2,560 fresh
sequences, the trivial baseline on the same sequences, and the paper's figure. Then it measures the gradient
flow through time (rnndeploy.diagnostics) on the adding problem at one T, at initialisation and after training.

Writes memory.json, memory.csv, memory.png (error against sequences processed, one line per cell) and
memory-gradflow.{png,json} under ./bench-results (or ``--out``), with machine, versions and commit.

    rnndeploy bench memory [options]     or     python benchmarks/bench_memory.py [options]
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from rnndeploy.checkpoint import atomic_write
from rnndeploy.diagnostics import GradientFlow, gradient_flow, plot_gradient_flow, write_json
from rnndeploy.longlag import (
    ADDING_MAX_ERROR,
    PAPER_ADDING,
    TASKS,
    WINDOW,
    RunResult,
    TrainSettings,
    run_benchmark,
    set_gate_bias,
)
from rnndeploy.models import SequenceModel
from rnndeploy.provenance import git_commit

DEFAULT_OUT = Path("bench-results")
#: Per task: training sequences per run and learning rate when the caller gives none.
DEFAULTS = {"adding": (100_000, 3e-3), "copy": (60_000, 1e-2)}
#: A smoke run: one short length and few training sequences.
QUICK_LENGTHS, QUICK_BUDGET = (20,), 2000


def machine(device: str) -> dict:
    """Where and with what the numbers were measured."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": git_commit(Path(__file__).resolve().parent),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def task_settings(
    tasks: Sequence[str],
    hidden: int,
    batch: int,
    lr: float | None,
    budget: int | None,
    seed: int,
    device: str,
    gate_bias: float | None,
) -> dict[str, TrainSettings]:
    """The training settings of each task; ``lr`` and ``budget`` of None take the task's ``DEFAULTS``."""
    return {
        name: TrainSettings(
            hidden=hidden,
            batch=batch,
            lr=lr or DEFAULTS[name][1],
            budget=budget or DEFAULTS[name][0],
            seed=seed,
            device=device,
            gate_bias=gate_bias,
        )
        for name in tasks
    }


def paper_figure(result: RunResult) -> str:
    if result.task == "adding" and result.T in PAPER_ADDING:
        sequences, wrong = PAPER_ADDING[result.T]
        return f"{sequences:,} seq, {wrong}/2560 wrong"
    return "-"


def table(results: Sequence[RunResult]) -> str:
    """The results as a fixed-width text table."""
    header = (
        f"{'task':6} {'T':>4} {'cell':4} {'backend':7} {'params':>6} {'solved after':>14} {'seen':>7} "
        f"{'test error':>10} {'correct':>7} {'baseline':>8} {'b.corr':>6} {'wall s':>6} {'cpu s':>6}  paper (H&S 1997)"
    )
    lines = [header]
    for r in results:
        solved = f"{r.solved_at:,}" if r.solved_at is not None else "not solved"
        lines.append(
            f"{r.task:6} {r.T:>4} {r.cell:4} {r.backend:7} {r.parameters:>6} {solved:>14} {r.sequences:>7} "
            f"{r.test_error:>10.4f} {r.test_correct:>7.3f} {r.baseline_error:>8.4f} {r.baseline_correct:>6.3f} "
            f"{r.seconds:>6.1f} {r.cpu_seconds:>6.1f}  {paper_figure(r)}"
        )
    return "\n".join(lines)


def flows_on_adding(
    T: int, cells: Sequence[str], trained: dict[str, SequenceModel], settings: TrainSettings, device: str
) -> tuple[list[GradientFlow], list[GradientFlow]]:
    """Gradient flow on one batch of 256 adding-problem sequences of length T: at initialisation, after training.

    At initialisation the models are built as training builds them (same seed and gate bias); the LSTM is
    also shown with torch's default initialisation (no gate bias).
    """
    task = TASKS["adding"](T)
    batch = task.sample(256, torch.Generator().manual_seed(20_000), length=T).to(device)
    initial, after = [], []
    for cell in cells:
        variants = [(settings.gate_bias, "")]
        if cell == "lstm" and settings.gate_bias is not None:
            variants.append((None, ", torch default init"))
        for gate_bias, note in variants:
            torch.manual_seed(settings.seed)
            model = SequenceModel(task.config(cell, settings.hidden)).to(device)
            if gate_bias is not None and cell != "rnn":
                set_gate_bias(model, gate_bias)
            initial.append(gradient_flow(model, batch.x, batch.target, label=f"{cell.upper()}{note}"))
        if cell in trained:
            after.append(gradient_flow(trained[cell], batch.x, batch.target, label=cell.upper()))
    return initial, after


def plot_curves(results: Sequence[RunResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r.task for r in results})
    lengths = sorted({r.T for r in results})
    fig, axes = plt.subplots(
        len(tasks), len(lengths), figsize=(4.5 * len(lengths), 3.4 * len(tasks)), squeeze=False
    )
    for i, task in enumerate(tasks):
        for j, T in enumerate(lengths):
            ax = axes[i][j]
            runs = [r for r in results if r.task == task and r.T == T]
            for r in runs:
                label = r.cell.upper() + ("" if len({x.backend for x in runs}) == 1 else f" ({r.backend})")
                ax.plot([p[0] for p in r.curve], [max(p[1], 1e-6) for p in r.curve], label=label)
                if r.solved_at is not None:
                    ax.plot([r.solved_at], [max(r.curve[-1][1], 1e-6)], "k*", ms=7)
            if runs:
                ax.axhline(runs[0].baseline_error, color="gray", ls="--", lw=1, label="mean baseline")
            if task == "adding":
                ax.axhline(ADDING_MAX_ERROR, color="gray", ls=":", lw=1, label="paper's stop error")
                if T in PAPER_ADDING:
                    ax.axvline(PAPER_ADDING[T][0], color="C3", ls=":", lw=1, label="H&S 1997 stopped")
            ax.set_yscale("log")
            ax.set_title(f"{task}, T={T}", fontsize=9)
            ax.set_xlabel("training sequences")
            ax.set_ylabel(f"error, last {WINDOW} seq" if task == "adding" else f"nats/symbol, last {WINDOW}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def plot_flows(initial: list[GradientFlow], after: list[GradientFlow], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if after else 1, figsize=(13 if after else 7, 4), squeeze=False)
    plot_gradient_flow(axes[0][0], initial)
    axes[0][0].set_title("at initialisation", fontsize=9)
    if after:
        plot_gradient_flow(axes[0][1], after)
        axes[0][1].set_title("after training", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def main(
    tasks: Sequence[str] = ("adding", "copy"),
    cells: Sequence[str] = ("rnn", "lstm", "gru"),
    lengths: Sequence[int] = (50, 100, 200),
    backends: Sequence[str] = ("torch",),
    settings: dict[str, TrainSettings] | None = None,
    grad_T: int | None = None,
    out: Path | None = None,
    echo: Callable[[str], None] = print,
    progress: Callable[[str], None] | None = None,
) -> list[Path]:
    """Runs the benchmark, prints the table, writes the files; returns their paths."""
    out = Path(out) if out is not None else DEFAULT_OUT
    settings = settings or {name: TrainSettings() for name in tasks}
    device = next(iter(settings.values())).device
    info = machine(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    results = run_benchmark(tasks, cells, lengths, settings, backends, progress=progress)
    info["seconds_total"] = round(time.perf_counter() - start, 1)
    info["cpu_seconds_total"] = round(time.process_time() - cpu_start, 1)
    info["load_average_at_end"] = os.getloadavg()
    echo(table(results))
    echo(
        f"total {info['seconds_total']} s wall, {info['cpu_seconds_total']} s CPU on {info['cpu']} "
        f"({info['device']}, {info['torch_threads']} torch thread(s), load average {info['load_average_at_start']}"
        f" at start, {info['load_average_at_end']} at the end; torch {info['torch']})"
    )
    doc = {
        "machine": info,
        "settings": {name: dataclasses.asdict(s) for name, s in settings.items()},
        "backends": list(backends),
        "results": [r.to_dict() for r in results],
    }
    paths = [out / "memory.json", out / "memory.csv", out / "memory.png"]
    atomic_write(paths[0], lambda p: Path(p).write_text(json.dumps(doc, indent=1), encoding="utf-8"))
    columns = [k for k in results[0].to_dict() if k not in ("settings", "curve")]

    def write_csv(p: str) -> None:
        with open(p, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*columns, "commit", "cpu", "date"])
            writer.writeheader()
            for r in results:
                row = {k: v for k, v in r.to_dict().items() if k in columns}
                writer.writerow({**row, "commit": info["commit"], "cpu": info["cpu"], "date": info["date"]})

    atomic_write(paths[1], write_csv)
    title = f"{info['cpu']} ({device}, torch {info['torch']}), commit {info['commit'][:10]}"
    plot_curves(results, paths[2], title)
    if "adding" in tasks:
        T = grad_T if grad_T is not None else sorted(lengths)[len(lengths) // 2]
        trained = {
            r.cell: r.model for r in results if r.task == "adding" and r.T == T and r.model is not None
        }
        initial, after = flows_on_adding(T, cells, trained, settings["adding"], device)
        png, json_path = out / "memory-gradflow.png", out / "memory-gradflow.json"
        flow_title = f"adding problem, T={T}, loss at the last step; {title}"
        plot_flows(initial, after, png, flow_title)
        stages = {
            "machine": info,
            "initial": [f.label for f in initial],
            "after_training": [f.label for f in after],
        }
        write_json(initial + after, json_path, flow_title, stages)
        for flow in initial + after:
            stage = "initial" if flow in initial else "trained"
            n = flow.h_norm[0]
            echo(
                f"gradient flow {stage:7} {flow.label:28} ||dL/dh_t|| at t = T-1: {n[-1]:.3g}, T-2: {n[-2]:.3g}, "
                f"T/2: {n[T // 2]:.3g}, 0: {n[0]:.3g}; per step over [0, T-2]: {flow.decay_per_step(last=T - 1):.3f}"
            )
        paths += [png, json_path]
    for path in paths:
        echo(f"wrote {path}")
    return paths
