"""export_checkpoint on a checkpoint written by `rnndeploy train`: int8 is scored on the run's validation split."""

import re

from rnndeploy.data import builtin_text
from rnndeploy.export import export_checkpoint
from rnndeploy.train import TrainOptions, train


def test_int8_accuracy_uses_the_training_runs_validation_split(tmp_path):
    corpus = tmp_path / "pydoc.txt"
    corpus.write_text(builtin_text()[:8000], encoding="utf-8")
    options = TrainOptions(
        data=str(corpus),
        steps=20,
        eval_every=20,
        hidden=24,
        embed=8,
        seq_len=12,
        batch=4,
        lr=1e-2,
        progress=False,
    )
    result = train(TrainOptions(**{**options.__dict__, "out": tmp_path / "m.pt"}))
    report = export_checkpoint(result.checkpoint, tmp_path / "m.onnx", int8=True)
    text = str(report)
    assert report.ok, text
    assert f"int8 accuracy change (the validation split of {corpus})" in text
    fp32_bits, int8_bits = map(
        float, re.search(r"validation bits/char: fp32 ([\d.]+), int8 ([\d.]+)", text).groups()
    )
    # the fp32 graph scores the split like training's own validation did (same split, same model)
    assert abs(fp32_bits - result.last_valid) < 0.05, (fp32_bits, result.last_valid)
    assert abs(int8_bits - fp32_bits) < 0.1

    corpus.unlink()  # the data is gone: fall back to random inputs, and say so
    text = str(export_checkpoint(result.checkpoint, tmp_path / "m2.onnx", int8=True))
    assert "random inputs" in text and "validation bits/char" not in text
