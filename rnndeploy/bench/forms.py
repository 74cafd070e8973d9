"""One-step latency: the sequence graph (RNN/LSTM/GRU node) against the one-step graph, fp32 and int8, on the CPU.

Part of ``rnndeploy bench runtime`` (and ``python benchmarks/bench_step_graph.py``, which adds the int8 accuracy
on trained checkpoints). One process, one onnxruntime thread, alternating blocks (the runtime benchmark's bare
``InferenceSession.run`` loop with the state fed back), batch 1 and 64, for a GRU 1x64 forecaster (1 feature),
an Elman RNN 1x128 and an LSTM 2x256 character model (embed 64, vocab 103). Ratios are against the bare loop on
the fp32 sequence graph. Both product layouts of the step graph (one MatMul over ``concat([x, h])`` or two) are
timed; ``step_graph.FUSE`` follows these numbers. With trained checkpoints it also reports int8's accuracy
change on each model's validation split. Writes step-graph.json, .csv and .png.
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import torch

from rnndeploy import ModelConfig, SequenceModel
from rnndeploy.checkpoint import atomic_write, load_checkpoint
from rnndeploy.export import export_onnx, quantize_int8
from rnndeploy.export.pipeline import int8_accuracy, validation_split
from rnndeploy.export.step_graph import export_step_graph, quantize_step_graph, step_int8_accuracy

MODELS = {
    "gru-1x64": ModelConfig(
        task="regression", cell="gru", input_size=1, output_size=1, embed_dim=16, hidden_size=64
    ),
    "rnn-1x128": ModelConfig(task="lm", cell="rnn", vocab_size=103, embed_dim=64, hidden_size=128),
    "lstm-2x256": ModelConfig(
        task="lm", cell="lstm", vocab_size=103, embed_dim=64, hidden_size=256, num_layers=2
    ),
}
BATCHES = (1, 64)


def load_model(name: str, checkpoints: Path | None):
    """The trained model and its checkpoint if ``checkpoints/<cell>.pt`` exists, else seeded random weights."""
    cell = name.split("-")[0]
    if checkpoints is not None and (checkpoints / f"{cell}.pt").exists():
        ckpt = load_checkpoint(checkpoints / f"{cell}.pt", backend="torch")
        return ckpt.model.eval(), ckpt
    torch.manual_seed(0)
    return SequenceModel(MODELS[name], backend="torch").eval(), None


def write_graphs(name: str, model: SequenceModel, folder: Path) -> dict[str, Path]:
    paths = {"seq fp32": folder / f"{name}.seq.onnx"}
    export_onnx(model, paths["seq fp32"])
    if model.config.cell == "lstm":
        paths["seq int8 (DynamicQuantizeLSTM)"] = folder / f"{name}.seq.int8.onnx"
        quantize_int8(paths["seq fp32"], paths["seq int8 (DynamicQuantizeLSTM)"])
    for fuse, layout in ((True, "fused"), (False, "separate")):
        fp32 = export_step_graph(model, folder / f"{name}.step.{layout}.onnx", fuse=fuse)
        paths[f"step fp32 {layout}"] = fp32
        paths[f"step int8 {layout}"] = quantize_step_graph(fp32, folder / f"{name}.step.{layout}.int8.onnx")
    return paths


def run(
    out: Path,
    steps: int = 200,
    blocks: int = 15,
    models: list[str] | None = None,
    checkpoints: Path | None = None,
) -> dict:
    """Time every graph of every model in alternating blocks; write step-graph.json, .csv and .png into ``out``.

    ``checkpoints``: a folder holding ``gru.pt``, ``rnn.pt``, ``lstm.pt`` (trained models; random weights for
    a missing one), whose validation splits score int8's accuracy change."""
    from rnndeploy.bench import runtime as bench

    rows, accuracy = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models or list(MODELS):
            model, ckpt = load_model(name, checkpoints)
            paths = write_graphs(name, model, Path(tmp))
            if ckpt is not None:
                accuracy[name] = {
                    "checkpoint": str(checkpoints / f"{name.split('-')[0]}.pt"),
                    "lines": _accuracy(model, ckpt, paths),
                }
                print(f"\n{name}:", *accuracy[name]["lines"], sep="\n")
            for batch in BATCHES:
                cases = {kind: bench.bare_loop(path, 1, batch) for kind, path in paths.items()}
                timed = bench.alternate(cases, steps, blocks)
                base = timed["seq fp32"]["us"]
                for kind, t in timed.items():
                    rows.append(
                        {
                            "model": name,
                            "batch": batch,
                            "graph": kind,
                            "us_per_step": round(t["us"], 2),
                            "p20_us": round(t["p20_us"], 2),
                            "p80_us": round(t["p80_us"], 2),
                            "vs_seq_fp32": round(t["us"] / base, 3),
                        }
                    )
                bench.print_table(
                    f"{name}, batch {batch} (us per step, 1 thread)",
                    [r for r in rows if r["model"] == name and r["batch"] == batch],
                    ["graph", "us_per_step", "p20_us", "p80_us", "vs_seq_fp32"],
                )
    record = {
        "machine": bench.machine()
        | {
            "models": "gru-1x64 (forecaster, 1 feature, embed 16), rnn-1x128 (LM, embed 64, vocab 103), "
            "lstm-2x256 (LM, embed 64, vocab 103)",
            "method": f"bare InferenceSession.run loop, state fed back, 1 thread, {blocks} alternating blocks "
            f"of {steps} calls, median of block medians",
        },
        "latency": rows,
        "int8_accuracy": accuracy,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(
        out / "step-graph.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n")
    )
    atomic_write(out / "step-graph.csv", lambda tmp: write_csv(Path(tmp), rows))
    atomic_write(out / "step-graph.png", lambda tmp: plot(Path(tmp), rows))
    print(f"\nwrote {out / 'step-graph.json'}, .csv and .png")
    return record


def _accuracy(model: SequenceModel, ckpt, paths: dict[str, Path]) -> list[str]:
    split = validation_split(ckpt)
    fp32, int8 = paths["step fp32 fused"], paths["step int8 fused"]
    # the forecaster's validation split is short (about 46 months): one stream
    lines = step_int8_accuracy(model, fp32, int8, split, batch=16 if ckpt.config.task == "lm" else 1)
    if "seq int8 (DynamicQuantizeLSTM)" in paths:
        lines += ["sequence graph, DynamicQuantizeLSTM:"]
        lines += int8_accuracy(model, paths["seq fp32"], paths["seq int8 (DynamicQuantizeLSTM)"], split)
    return lines


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(path: Path, rows: list[dict]) -> None:
    """One panel per model and batch: time per step of each graph relative to the fp32 sequence graph."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["batch"]) for r in rows}, key=lambda p: (list(MODELS).index(p[0]), p[1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), sharey=True, squeeze=False)
    for ax, (model, batch) in zip(axes[0], panels, strict=True):
        mine = [r for r in rows if r["model"] == model and r["batch"] == batch]
        ax.barh([r["graph"] for r in mine], [r["vs_seq_fp32"] for r in mine], color="tab:blue")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"{model}, batch {batch}", fontsize=9)
        ax.set_xlabel("time per step / fp32 sequence graph", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle("one step on the CPU, onnxruntime, 1 thread (lower is faster)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
