"""User errors across commands end as a one-line message and exit code 1, never a traceback."""

from __future__ import annotations

import onnx
from click.testing import CliRunner

from rnndeploy import ModelConfig, SequenceModel, save_checkpoint
from rnndeploy.cli import main
from rnndeploy.runtime import testing


def _fails_cleanly(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert message in " ".join(result.output.split()), result.output


def test_export_to_an_unwritable_place(tmp_path):
    model = SequenceModel(ModelConfig(task="lm", vocab_size=5, embed_dim=3, hidden_size=4))
    ckpt = save_checkpoint(tmp_path / "m.pt", model, vocab=list("abcde"))
    (tmp_path / "file").write_text("a file, not a folder")
    _fails_cleanly(["export", str(ckpt), "-o", str(tmp_path / "file" / "m.onnx")], "Error:")


def test_run_with_an_input_that_is_not_npy(tmp_path):
    model = tmp_path / "lm.onnx"
    onnx.save(testing.lstm_lm(), model)
    bad = tmp_path / "steps.npy"
    bad.write_text("not numpy")
    _fails_cleanly(["run", str(model), "--input", str(bad)], f"--input {bad} is not a readable .npy array")


def test_info_and_run_on_a_file_that_is_not_onnx(tmp_path):
    model = SequenceModel(ModelConfig(task="lm", vocab_size=5, embed_dim=3, hidden_size=4))
    ckpt = save_checkpoint(tmp_path / "m.pt", model, vocab=list("abcde"))
    _fails_cleanly(
        ["info", str(ckpt)],
        f"Error: {ckpt} is a PyTorch training checkpoint, not an ONNX model: "
        f"export it first with `rnndeploy export {ckpt} -o model.onnx`",
    )
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    _fails_cleanly(["run", str(bad)], f"Error: {bad} is not an ONNX model onnxruntime can load")


def test_run_with_a_token_outside_the_vocabulary(tmp_path):
    model = tmp_path / "lm.onnx"
    onnx.save(testing.lstm_lm(), model)
    result = CliRunner().invoke(main, ["run", str(model)], input="1\n99999\n")
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert result.output.startswith('{"step": 0')
    assert (
        "Error: step 1: input input: token id 99999 is outside the model's vocabulary [0, 9)" in result.output
    )


def _checkpoint(tmp_path):
    model = SequenceModel(ModelConfig(task="lm", vocab_size=5, embed_dim=3, hidden_size=4))
    return save_checkpoint(tmp_path / "m.pt", model, vocab=list("abcde"))


def test_export_of_an_onnx_file_says_it_is_one(tmp_path):
    model = tmp_path / "model.onnx"
    onnx.save(testing.lstm_lm(), model)
    _fails_cleanly(
        ["export", str(model)], f"Error: {model} looks like an ONNX model, not a training checkpoint"
    )
    result = CliRunner().invoke(main, ["export", str(model)])
    assert "weights_only" not in result.output and "file an issue" not in result.output


def test_export_of_a_text_file_says_what_it_starts_with(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("some notes")
    _fails_cleanly(["export", str(notes)], f"Error: {notes} is not a checkpoint: expected the .pt file")
    _fails_cleanly(["export", str(notes)], "but it starts with b'some'")


def test_export_of_a_folder_and_train_on_a_folder_name_the_folder(tmp_path):
    _fails_cleanly(["export", str(tmp_path)], f"Error: checkpoint {tmp_path} is a folder")
    args = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "m.pt")]
    _fails_cleanly(args, f"Error: data file {tmp_path} is a folder, not a file")


def test_export_to_a_folder_that_takes_no_files_names_the_target(tmp_path):
    target = "/proc/rnndeploy-test.onnx"  # /proc exists and refuses new files, even to root
    result = CliRunner().invoke(main, ["export", str(_checkpoint(tmp_path)), "-o", target])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"Error: cannot write {target}:" in result.output
    assert ".tmp" not in result.output  # the temporary file is our business, not the user's
