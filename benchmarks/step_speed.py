"""StreamingSession.step latency at batch 1 (LSTM 2x256 LM, random weights, 1 thread): median of 5 block medians
of 300 steps. Run it from two checkouts in turn to compare them on one machine:

    PYTHONPATH=OLD_CHECKOUT python benchmarks/step_speed.py old; python benchmarks/step_speed.py new
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import rnndeploy
from rnndeploy import ModelConfig, SequenceModel
from rnndeploy.export import export_onnx
from rnndeploy.runtime import StreamingSession

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        config = ModelConfig(
            task="lm", cell="lstm", vocab_size=103, embed_dim=64, hidden_size=256, num_layers=2
        )
        export_onnx(SequenceModel(config).eval(), Path(tmp) / "lm.onnx")
        session = StreamingSession(Path(tmp) / "lm.onnx", providers="cpu", threads=1)
        x = np.array([5])
        for _ in range(200):
            session.step(x)
        medians = []
        for _ in range(5):
            times = []
            for _ in range(300):
                start = time.perf_counter()
                session.step(x)
                times.append(time.perf_counter() - start)
            medians.append(statistics.median(times))
    label = sys.argv[1] if len(sys.argv) > 1 else "this checkout"
    print(label, rnndeploy.__file__, f"{statistics.median(medians) * 1e6:.2f} us per step")
