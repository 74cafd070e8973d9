"""Rewrites the headline table of README.md from ``benchmarks/results/runtime.json``.

Run ``python docs/gen_readme.py`` after a runtime benchmark; ``tests/test_docs.py`` fails while the README's
table differs from what this script writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- headline:start -->", "<!-- headline:end -->"
CASES = (
    ("torch eager SequenceModel", "PyTorch eager"),
    ("bare run() loop", "onnxruntime, hand-written `run()` loop"),
    ("StreamingSession.step", "rnndeploy `StreamingSession.step`"),
)


def headline_table(results: dict) -> str:
    """The README's table: one LSTM language-model step, batch 1, one thread, per runtime."""
    m = results["machine"]
    by_case = {
        (r["model"], r["precision"], r["case"]): r["us"] for r in results["latency"] if r["threads"] == 1
    }
    lines = [
        "| one step, batch 1, 1 thread | LSTM 2x256 fp32 | LSTM 2x256 int8 | GRU 1x64 fp32 |",
        "|---|---|---|---|",
    ]
    for case, label in CASES:
        cells = []
        for model, precision in (("lstm-2x256", "fp32"), ("lstm-2x256", "int8"), ("gru-1x64", "fp32")):
            us = by_case.get((model, precision, case))
            cells.append(f"{us:.0f} us" if us is not None else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"*{m['cpu']}, {m['cores']} cores, Python {m['python']}, onnxruntime {m['onnxruntime']}, torch "
        f"{m['torch']}, {m['date'][:10]}; `benchmarks/results/runtime.json`, more on the benchmarks page.*"
    )
    return "\n".join(lines)


def render(readme: str, results: dict) -> str:
    """``readme`` with the text between the headline markers replaced by the current table."""
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{headline_table(results)}\n{END}{tail}"


def main() -> int:
    readme = ROOT / "README.md"
    results = json.loads((ROOT / "benchmarks" / "results" / "runtime.json").read_text())
    new = render(readme.read_text(), results)
    if "--check" in sys.argv:
        return 0 if new == readme.read_text() else 1
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
