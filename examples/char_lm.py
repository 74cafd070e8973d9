"""A character language model on Python's own documentation, step by step on the Python API.

This is what `rnndeploy demo` does, without the CLI:

    python examples/char_lm.py                       # under a minute on 2 idle CPU cores
    python examples/char_lm.py --steps 20 --hidden 32  # a smoke run
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rnndeploy.data import load_data
from rnndeploy.export import export_checkpoint
from rnndeploy.runtime import StreamingSession, generate
from rnndeploy.train import TrainOptions, train


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out-dir", type=Path, default=Path("runs/char_lm"))
    parser.add_argument("--cell", choices=["rnn", "lstm", "gru"], default="lstm")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=200)
    args = parser.parse_args()

    # 1. The data: ~465 kB of English text that ships with every Python, split into train / validation.
    data = load_data("builtin", valid_fraction=0.05)
    print(
        f"{len(data.train):,} training + {len(data.valid):,} validation characters, {len(data.vocab)} symbols"
    )

    # 2. Train: truncated BPTT over `batch` parallel streams, state carried from chunk to chunk.
    options = TrainOptions(
        data="builtin",
        cell=args.cell,
        hidden=args.hidden,
        seq_len=args.seq_len,
        batch=args.batch,
        steps=args.steps,
        eval_every=args.eval_every,
        device="cpu",
        out=args.out_dir / "model.pt",
        overwrite=True,  # the example's folder is its own; a rerun starts over
    )
    result = train(options)
    for record in result.history:
        print(f"step {record['step']:>5}: validation {record['valid_bpc']:.3f} bits/char")

    # 3. Export to standard ONNX (one LSTM node, state as graph input/output) and check it against PyTorch.
    report = export_checkpoint(result.checkpoint, args.out_dir / "model.onnx", verify=True, overwrite=True)
    if not report.ok:  # a graph that failed verification replaces nothing: the report says where it is kept
        raise SystemExit(str(report))
    print(f"exported {report.paths['fp32']}: verification passed")

    # 4. Stream text from the ONNX graph with onnxruntime, one character per step, the state carried.
    session = StreamingSession(report.paths["fp32"])
    text = "".join(generate(session, "The ", 200, temperature=0.7, seed=0))
    print("sample: The " + text)
    print(f"checkpoint {result.checkpoint}, log {result.log}, loss curve {result.plot}")


if __name__ == "__main__":
    main()
