"""Where a one-step graph spends its time: onnxruntime's per-operator profile of the GRU 1x64 forecaster's step
graph, fp32 and int8, at batch 64 on the CPU (one thread). It bounds what int8 can gain: quantization speeds up
the products (``Gemm``/``MatMul`` -> ``DynamicQuantizeMatMul``/``MatMulInteger``) and nothing else.

    python benchmarks/profile_step_graph.py [--batch 64] [--runs 2000]

Writes benchmarks/results/step-graph-profile.txt.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from rnndeploy.bench import runtime as bench
from rnndeploy.bench.forms import MODELS, SequenceModel
from rnndeploy.export.step_graph import export_step_graph, quantize_step_graph

RESULTS = Path(__file__).resolve().parent / "results"
PRODUCTS = {"Gemm", "MatMul", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


def profile(path: Path, batch: int, runs: int, prefix: Path) -> tuple[float, collections.Counter]:
    """Kernel time per run (us) and per operator type, from onnxruntime's profiler."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(prefix)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {}
    for i in session.get_inputs():
        shape = [batch if not isinstance(d, int) else d for d in i.shape]
        feeds[i.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for _ in range(runs):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    done = sum(1 for e in events if e.get("name") == "model_run")
    return sum(per_op.values()) / done, collections.Counter({k: v / done for k, v in per_op.items()})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2000)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = SequenceModel(MODELS["gru-1x64"], backend="torch").eval()
    info = bench.machine()
    lines = [
        "# python benchmarks/profile_step_graph.py: onnxruntime's operator profile, GRU 1x64 step graph (fused)",
        f"# date: {info['date']}",
        f"# commit: {info['commit']}",
        f"# machine: {info['cpu']}, {info['cores']} cores, load {info['load_average_at_start']}",
        f"# versions: python {info['python']}, onnxruntime {info['onnxruntime']}, torch {info['torch']}",
        f"# batch {args.batch}, 1 thread, {args.runs} runs; the profiler adds its own cost to every operator",
        "",
    ]
    totals = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_step_graph(model, Path(tmp) / "fp32.onnx", fuse=True)
        int8 = quantize_step_graph(fp32, Path(tmp) / "int8.onnx")
        for name, path in (("fp32", fp32), ("int8", int8)):
            total, per_op = profile(path, args.batch, args.runs, Path(tmp) / name)
            products = sum(v for k, v in per_op.items() if k in PRODUCTS)
            totals[name] = (total, products)
            ops = " ".join(n.op_type for n in onnx.load(str(path)).graph.node)
            lines += [
                f"{name}: {total:.1f} us of kernels per step, products {products:.1f} us ({products / total:.0%})",
                "  " + ", ".join(f"{k} {v:.1f}" for k, v in per_op.most_common()),
                f"  nodes: {ops}",
                "",
            ]
    (total, products), (total8, _) = totals["fp32"], totals["int8"]
    lines += [
        f"int8 / fp32 kernel time: {total8 / total:.2f}; with the products free: {(total - products) / total:.2f}",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    (RESULTS / "step-graph-profile.txt").write_text(text)


if __name__ == "__main__":
    main()
