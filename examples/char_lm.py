"""A character language model on Python's own documentation, step by step on the Python API.

This is what `rnndeploy demo` does, without the CLI:

    python examples/char_lm.py                       # ~1-2 minutes on 2 CPU cores
    python examples/char_lm.py --steps 20 --hidden 32  # a smoke run
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rnndeploy.checkpoint import load_checkpoint
from rnndeploy.data import load_data
from rnndeploy.demo import sample_text
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
    )
    result = train(options)
    for record in result.history:
        print(f"step {record['step']:>5}: validation {record['valid_bpc']:.3f} bits/char")

    # 3. Load the checkpoint (config, weights and vocabulary) and generate text one character at a time.
    ckpt = load_checkpoint(result.checkpoint)
    print("sample:", "The " + sample_text(ckpt.model, ckpt.vocab, "The ", length=200, temperature=0.7))
    print(f"checkpoint {result.checkpoint}, log {result.log}, loss curve {result.plot}")


if __name__ == "__main__":
    main()
