"""Training step time of the demo-size model with 1 and 2 torch threads, as found and under added load.

Usage: python benchmarks/bench_threads.py [--steps N] [--out benchmarks/results/threads.txt]

Each (threads, load) case runs in a fresh process: a few warm-up steps, then ``--steps`` timed optimizer steps
of the demo's model (LSTM 256, embed 64, batch 32 x 64 characters of the built-in corpus). "loaded" adds two
busy-looping processes (one per core of a 2-core machine), standing in for other users of a shared machine.
The report gives the median and the 0.2/0.8 quantiles of the step time, with the machine, versions and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASE = r"""
import json, sys, time, torch
from rnndeploy.data import load_data, StreamBatcher
from rnndeploy.models import ModelConfig, SequenceModel
threads, steps = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)
data = load_data("builtin")
model = SequenceModel(ModelConfig(task="lm", cell="lstm", vocab_size=len(data.vocab), embed_dim=64,
                                  hidden_size=256), backend="torch")
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
batcher = StreamBatcher(data.train, 32, 64)
times, state = [], None
for step in range(steps + 3):
    x, y, fresh = batcher.batch(step)
    start = time.perf_counter()
    out, state = model(x, None if fresh else state)
    loss = model.loss(out, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    state = tuple(s.detach() for s in state)
    if step >= 3:
        times.append(time.perf_counter() - start)
print(json.dumps(times))
"""

BUSY = "while True: pass"


def run_case(threads: int, steps: int) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(
        [sys.executable, "-c", CASE, str(threads), str(steps)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/threads.txt"))
    args = parser.parse_args()
    import torch

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    lines = [
        "# training step time of the demo model (LSTM 256, embed 64, batch 32 x 64), 1 vs 2 torch threads",
        f"# date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
        f"# commit: {commit}",
        f"# machine: {cpu}, {os.cpu_count()} cores; load average at start {os.getloadavg()}",
        f"# versions: python {platform.python_version()}, torch {torch.__version__}",
        f"# command: python benchmarks/bench_threads.py --steps {args.steps}",
        "# 'as found': the machine as it was (the load average above); 'loaded': plus 2 busy-looping processes",
        f"{'condition':<10} {'threads':>7} {'median s/step':>14} {'q0.2':>8} {'q0.8':>8}",
    ]
    for condition in ("as found", "loaded"):
        busy = [
            subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(2 if condition == "loaded" else 0)
        ]
        try:
            for threads in (1, 2):
                times = sorted(run_case(threads, args.steps))
                q = statistics.quantiles(times, n=10)
                lines.append(
                    f"{condition:<10} {threads:>7} {statistics.median(times):>14.3f} {q[1]:>8.3f} {q[7]:>8.3f}"
                )
                print(lines[-1], flush=True)
        finally:
            for proc in busy:
                proc.kill()
                proc.wait()
    lines.append(f"# load average at end {os.getloadavg()}")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
