"""Writes the benchmarks page at build time from ``benchmarks/results/*.json`` (mkdocs-gen-files).

A rerun of a benchmark rewrites its results file; the next docs build shows the new numbers. Every table and
figure is captioned with the machine, versions and date its file records.
"""

from __future__ import annotations

import json
from pathlib import Path

import mkdocs_gen_files

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _caption(machine: dict, keys: tuple[str, ...]) -> str:
    parts = [f"{k} {machine[k]}" for k in keys if machine.get(k) not in (None, "")]
    return "*" + "; ".join(parts) + "*"


def _table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _figure(name: str, alt: str) -> str:
    source = RESULTS / name
    if not source.exists():
        return ""
    with mkdocs_gen_files.open(f"figures/{name}", "wb") as out:
        out.write(source.read_bytes())
    return f"![{alt}](figures/{name})"


def runtime_section() -> list[str]:
    data = _load("runtime.json")
    if data is None:
        return []
    m = data["machine"]
    out = [
        "## Stepwise runtime (CPU)",
        "",
        "`rnndeploy bench runtime` (`benchmarks/results/runtime.json`): per-step latency against a bare "
        "`InferenceSession.run` loop that feeds the state back by hand, same file and session options; "
        "alternating blocks, the median of the block medians.",
        "",
        _caption(m, ("date", "cpu", "cores", "python", "onnxruntime", "numpy", "torch", "commit")),
        "",
        f"Models: {m.get('models', '')}.",
        "",
    ]
    rows = [
        [r["model"], r["precision"], r["threads"], r["case"], f"{r['us']:.1f}", f"{r['vs_bare']:.2f}x"]
        for r in data["latency"]
    ]
    out += [_table(["model", "precision", "threads", "case", "us per step", "vs bare loop"], rows), ""]
    rows = [
        [
            r["model"],
            r["streams"],
            r["case"],
            f"{r['us']:.0f}",
            f"{r['per_stream_us']:.2f}",
            f"{r['vs_bare']:.2f}x",
        ]
        for r in data["step_many"]
    ]
    out += [
        "### Many streams in one call",
        "",
        _table(["model", "streams", "case", "us", "us per stream", "vs bare batch"], rows),
        "",
    ]
    out += [_figure("runtime.png", "runtime latency"), ""]
    return out


def step_graph_section() -> list[str]:
    data = _load("step-graph.json")
    if data is None:
        return []
    m = data["machine"]
    out = [
        "## The one-step graph (CPU)",
        "",
        "`rnndeploy bench runtime`, with int8 accuracy on trained checkpoints `python benchmarks/bench_step_graph.py` "
        "(`benchmarks/results/step-graph.json`): one time step as plain "
        f"ONNX operators (`rnndeploy export --step-graph`) against the sequence graph's RNN node; {m['method']}.",
        "",
        _caption(m, ("date", "cpu", "cores", "python", "onnxruntime", "numpy", "torch", "commit")),
        "",
        f"Models: {m.get('models', '')}.",
        "",
    ]
    rows = [
        [r["model"], r["batch"], r["graph"], f"{r['us_per_step']:.1f}", f"{r['vs_seq_fp32']:.2f}x"]
        for r in data["latency"]
    ]
    out += [_table(["model", "batch", "graph", "us per step", "vs sequence graph fp32"], rows), ""]
    out += [_figure("step-graph.png", "step graph latency"), ""]
    out += ["Accuracy of int8 on each model's validation split (fp32 -> int8):", "", "```text"]
    for model, entry in data.get("int8_accuracy", {}).items():
        out += [f"{model}:", *entry["lines"], ""]
    out += ["```", ""]
    return out


def server_section() -> list[str]:
    data = _load("server_soak.json")
    if data is None:
        return []
    m = data["machine"]
    out = [
        "## Server under load",
        "",
        "`python benchmarks/bench_server.py` (`benchmarks/results/server_soak.json`): soak and per-protocol "
        "latency with stock clients; clients and server share the machine.",
        "",
        _caption(m, ("date", "cpu", "cores", "python", "onnxruntime", "numpy", "commit", "model")),
        "",
    ]
    rows = [
        [
            r["sequences"],
            f"{r['seconds']:.0f}",
            f"{r['steps_per_s']:.0f}",
            r["errors"],
            f"{r['rss_before_mb']:.0f} / {r['rss_peak_mb']:.0f} / {r['rss_after_mb']:.0f}",
        ]
        for r in data["soak"]
    ]
    out += [_table(["sequences", "seconds", "steps/s", "errors", "RSS MB before / peak / after"], rows), ""]
    rows = [
        [r["client"], r["sequences"], f"{r['steps_per_s']:.0f}", f"{r['p50_us']:.0f}", f"{r['p99_us']:.0f}"]
        for r in data["protocols"]
    ]
    out += [_table(["client", "sequences", "steps/s", "p50 us", "p99 us"], rows), ""]
    out += [_figure("server_soak.png", "server soak"), ""]
    floor = _load("protocol-floor.json")
    if floor is not None:
        out += [
            "### Protocol floor",
            "",
            "`python benchmarks/bench_protocol_floor.py`: echo servers on both stacks, no model, one request "
            "in flight: what each protocol costs before rnndeploy does any work.",
            "",
            f"*date {floor['date']}; Python {floor['machine']['python']}; "
            + ", ".join(f"{k} {v}" for k, v in floor["versions"].items())
            + f"; commit {floor['commit'][:12]}*",
            "",
            _table(
                ["client", "p50 us", "p99 us", "vs HTTP p50"],
                [
                    [r["client"], f"{r['p50_us']:.0f}", f"{r['p99_us']:.0f}", f"{r['vs_http_p50']:.2f}x"]
                    for r in floor["rows"]
                ],
            ),
            "",
        ]
    return out


def memory_section() -> list[str]:
    data = _load("memory.json")
    if data is None:
        return []
    m = data["machine"]
    out = [
        "## Long time lags",
        "",
        "`rnndeploy bench memory` (`benchmarks/results/memory.json`): the adding problem and the copy task; "
        "see [Long time lags](long-time-lags.md) for the settings.",
        "",
        _caption(m, ("date", "cpu", "cores", "python", "torch", "commit")),
        "",
    ]
    rows = [
        [
            r["task"],
            r["T"],
            r["cell"],
            r["solved_at"] if r["solved_at"] is not None else "not solved",
            f"{r['test_error']:.4g}",
            f"{100 * r['test_correct']:.1f}%",
            f"{r['baseline_error']:.4g}",
        ]
        for r in data["results"]
    ]
    out += [
        _table(["task", "T", "cell", "solved after (sequences)", "test error", "correct", "baseline"], rows),
        "",
    ]
    out += [_figure("memory.png", "learning curves"), "", _figure("memory-gradflow.png", "gradient flow"), ""]
    return out


def kernels_section() -> list[str]:
    out = [
        "## Kernels: static estimate (no GPU)",
        "",
        "`python benchmarks/bench_kernels.py static` (`benchmarks/results/kernels-static-triton<release>.json`): "
        "sm_90 compiles without a GPU, per-step instruction counts and a first-order estimate from published "
        "H100 rates, one file per triton release (code generation differs by release). No GPU has measured "
        "these kernels yet.",
        "",
    ]
    for path in sorted(RESULTS.glob("kernels-static-triton*.json")):
        data = json.loads(path.read_text())
        env = data["environment"]
        rows = [
            [r["cell"], r["pass_"], r["dtype"], r["B"], r["H"], r["strategy"], r.get("handoff", ""), r["regs"],
             r["shared"], r["loop_spills"], f"{r['est_step_us']:.2f}"]
            for r in data["rows"]
        ]  # fmt: skip
        out += [
            f"### triton {env['triton']}",
            "",
            _caption(env, ("target", "triton", "torch", "python", "commit")),
            "",
            _table(["cell", "pass", "dtype", "B", "H", "strategy", "hand-off", "registers", "shared B",
                    "loop spills", "est. us/step"], rows),
            "",
        ]  # fmt: skip
    return out


with mkdocs_gen_files.open("benchmarks.md", "w") as page:
    lines = [
        "# Benchmarks",
        "",
        "Generated from `benchmarks/results/` when the docs are built: rerun a benchmark and rebuild to update.",
        "",
    ]
    for section in (runtime_section, step_graph_section, server_section, memory_section, kernels_section):
        lines += section()
    page.write("\n".join(lines) + "\n")
