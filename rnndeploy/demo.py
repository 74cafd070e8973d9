"""``rnndeploy demo``: the whole pipeline on the built-in corpus, as a list of named stages.

Each stage is a function taking the shared `DemoContext`; it reads what earlier stages left there and
adds its own results and files. Later parts of the pipeline (export and verification, streaming through
onnxruntime) join the demo by adding a `Stage` to `STAGES`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rnndeploy.data import Dataset, load_data
from rnndeploy.train import DEFAULT_THREADS, TrainOptions, TrainResult, describe_device, train

#: The demo's model and schedule: small enough for a laptop CPU (timings: benchmarks/results/demo.txt); ``quick``
#: is the tests' tiny run
FULL = dict(cell="lstm", hidden=256, embed=64, seq_len=64, batch=32, steps=1000, lr=3e-3, eval_every=200)
QUICK = dict(cell="lstm", hidden=32, embed=16, seq_len=32, batch=8, steps=30, lr=3e-3, eval_every=15)


class DemoError(RuntimeError):
    """A demo stage found a result it cannot go on from."""


@dataclass
class DemoContext:
    """What the stages share. ``files`` (label -> path) is printed at the end of the demo; ``threads``: torch
    CPU threads for training (``None``: `rnndeploy.train.DEFAULT_THREADS`)."""

    out_dir: Path
    steps: int | None = None
    threads: int | None = None
    quick: bool = False
    echo: Callable[[str], None] = print
    write: Callable[[str], None] = field(default=lambda text: print(text, end="", flush=True))
    dataset: Dataset | None = None
    result: TrainResult | None = None
    files: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """One step of the demo: ``run(ctx)`` does the work and reports through ``ctx.echo``."""

    name: str
    run: Callable[[DemoContext], None]


def stage_data(ctx: DemoContext) -> None:
    """Loads the built-in corpus (Python's pydoc topics) and describes it."""
    data = load_data("builtin")
    ctx.dataset = data
    ctx.echo(
        f"corpus: {len(data.train) + len(data.valid):,} characters of Python's documentation, "
        f"{len(data.vocab)} distinct; the last {len(data.valid):,} are held out for validation"
    )


def stage_train(ctx: DemoContext) -> None:
    """Trains a character LSTM and reports validation bits per character before and after."""
    settings = dict(QUICK if ctx.quick else FULL)
    if ctx.steps is not None:
        settings["steps"] = ctx.steps
    # the demo folder is the demo's own: a second `rnndeploy demo` starts over in it
    threads = DEFAULT_THREADS if ctx.threads is None else ctx.threads
    options = TrainOptions(
        **settings, out=ctx.out_dir / "model.pt", device="cpu", overwrite=True, threads=threads
    )
    ctx.echo(f"device: {describe_device(torch.device('cpu'), options.backend, threads)}")
    ctx.echo(
        f"training {options.cell.upper()} (hidden {options.hidden}) for {options.steps} steps of "
        f"{options.batch} x {options.seq_len} characters"
    )
    result = train(options)
    ctx.result = result
    ctx.files.update(checkpoint=result.checkpoint, log=result.log, **{"loss curve": result.plot})
    ctx.echo(
        f"validation bits/char: {result.first_valid:.2f} before training -> {result.last_valid:.2f} after "
        f"{result.step} steps"
    )


def stage_export(ctx: DemoContext) -> None:
    """Exports the checkpoint to ONNX and verifies onnxruntime against PyTorch (whole sequence and stepwise)."""
    from rnndeploy.export import export_checkpoint

    report = export_checkpoint(ctx.result.checkpoint, ctx.out_dir / "model.onnx", verify=True, overwrite=True)
    if not report.ok:
        ctx.echo(str(report))
        raise DemoError(
            "the exported ONNX model disagrees with PyTorch beyond tolerance (see the table above)"
        )
    for v in report.verifications.values():
        ctx.echo(
            f"verified {v.precision} graph: {len(v.checks)} checks (onnxruntime and onnx.reference vs PyTorch, "
            f"whole sequence and step by step, new batch sizes and lengths), max abs error {v.max_abs:.1e}"
        )
    ctx.files["onnx model"] = report.paths["fp32"]


def stage_stream(ctx: DemoContext) -> None:
    """Streams generated text from the ONNX model through onnxruntime, one character per step, state carried."""
    from rnndeploy.runtime import StreamingSession, generate

    session = StreamingSession(ctx.files["onnx model"])
    prompt, length = "The ", 40 if ctx.quick else 300
    ctx.echo(f"onnxruntime ({', '.join(session.providers)}), temperature 0.7, prompt {prompt!r}:")
    ctx.write(prompt)
    start = time.perf_counter()
    for char in generate(session, prompt, length, temperature=0.7, seed=0):
        ctx.write(char)
    per_step = (time.perf_counter() - start) / max(length, 1) * 1e6
    ctx.echo(f"\n({length} characters, {per_step:.0f} us per step including sampling)")


STAGES: list[Stage] = [
    Stage("data", stage_data),
    Stage("train", stage_train),
    Stage("export + verify", stage_export),
    Stage("stream", stage_stream),
]


def run_demo(ctx: DemoContext, stages: list[Stage] | None = None) -> DemoContext:
    """Runs ``stages`` (default `STAGES`) in order, then lists the files they wrote."""
    stages = STAGES if stages is None else stages
    seconds: dict[str, float] = {}
    for number, stage in enumerate(stages, start=1):
        ctx.echo(f"[{number}/{len(stages)}] {stage.name}")
        start = time.perf_counter()
        stage.run(ctx)
        seconds[stage.name] = time.perf_counter() - start
    parts = ", ".join(f"{name} {s:.1f} s" for name, s in seconds.items())
    ctx.echo(f"done in {sum(seconds.values()):.1f} s ({parts}); files:")
    width = max((len(label) for label in ctx.files), default=0)
    for label, path in ctx.files.items():
        ctx.echo(f"  {label + ':':<{width + 1}} {path}")
    return ctx
