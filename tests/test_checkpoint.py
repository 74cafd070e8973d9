"""Checkpoint files: integrity on load, validation on save, and writes that lose nothing (disk full, a killed
writer, a read-only folder, power loss)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rnndeploy import checkpoint as checkpoint_module
from rnndeploy.checkpoint import CheckpointError, atomic_write, load_checkpoint, save_checkpoint
from rnndeploy.cli import main
from rnndeploy.models import ModelConfig, SequenceModel

VOCAB = list("abcdefg")


def _model() -> SequenceModel:
    torch.manual_seed(0)
    return SequenceModel(ModelConfig(cell="gru", vocab_size=len(VOCAB), embed_dim=4, hidden_size=5))


@pytest.fixture
def saved(tmp_path) -> Path:
    return save_checkpoint(tmp_path / "m.pt", _model(), vocab=VOCAB, step=3)


def _weight_entry_offset(path: Path, tensor: str) -> int:
    """Byte offset in ``path`` of the middle of ``tensor``'s data (a stored, uncompressed zip entry)."""
    payload = torch.load(path, weights_only=True)
    wanted = payload["model"][tensor].untyped_storage()
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.split("/")[-2:-1] == ["data"]:
                continue
            if archive.read(info) != bytes(wanted):
                continue
            with path.open("rb") as fh:
                fh.seek(info.header_offset + 26)
                name_len, extra_len = (int.from_bytes(fh.read(2), "little") for _ in range(2))
            return info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    raise AssertionError(f"no entry holds {tensor}")


def test_a_flipped_byte_inside_a_weight_is_refused_naming_the_file(saved):
    offset = _weight_entry_offset(saved, "rnn.weight_hh_l0")
    data = bytearray(saved.read_bytes())
    data[offset] ^= 0x01
    saved.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=rf"checkpoint {saved} is damaged: entry .* fails its CRC check"
    ):
        load_checkpoint(saved)
    result = CliRunner().invoke(main, ["train", "--resume", str(saved), "--steps", "9", "--no-progress"])
    assert result.exit_code == 1 and "fails its CRC check" in result.output, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("step", "5", "field 'step' should be an int >= 0, found str '5'"),
        ("step", -1, "field 'step' should be an int >= 0, found int -1"),
        ("vocab", [1, 2], "field 'vocab' should be a list of str or None, found a list holding int 1"),
        ("vocab", list("abc"), "its vocab has 3 entries, its model 7"),
        ("extra", [], "field 'extra' should be a dict, found list []"),
        ("data_stats", "x", "field 'data_stats' should be a dict, found str 'x'"),
        ("config", {"cell": "gru"}, "field 'config' should be a JSON string"),
        ("model", None, "field 'model' should be a dict of tensors, found NoneType None"),
    ],
    ids=["step-str", "step-negative", "vocab-ints", "vocab-size", "extra", "data_stats", "config", "model"],
)
def test_fields_of_the_wrong_type_are_refused_by_name(saved, field, value, expected):
    payload = torch.load(saved, weights_only=True)
    payload[field] = value
    torch.save(payload, saved)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(saved)
    assert str(caught.value).startswith(f"checkpoint {saved} is damaged: ")
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("vocab", "step", "expected"),
    [
        (list("abc"), 0, "vocab has 3 entries but the model's vocab_size is 7"),
        ([*"abcdef", 7], 0, "vocab must be a list of str (one entry per token id), got a list holding int 7"),
        ("abcdefg", 0, "vocab must be a list of str (one entry per token id), got str 'abcdefg'"),
        (VOCAB, "3", "step must be an int >= 0, got '3'"),
    ],
    ids=["size", "item-type", "not-a-list", "step"],
)
def test_save_refuses_what_could_not_be_loaded(tmp_path, vocab, step, expected):
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint(tmp_path / "m.pt", _model(), vocab=vocab, step=step)
    assert expected in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def _full_disk_for(monkeypatch, name: str) -> None:
    """os.write fails with ENOSPC once 1000 bytes went to files whose name contains ``name``, as a disk that
    fills up during the write makes it fail."""
    real_write = os.write
    written = [0]

    def write(fd: int, data) -> int:
        if name in os.readlink(f"/proc/self/fd/{fd}"):
            if written[0] + len(data) > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written[0] += len(data)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_a_full_disk_is_named_and_keeps_the_previous_checkpoint(saved, monkeypatch):
    before = saved.read_bytes()
    _full_disk_for(monkeypatch, ".m.pt.")
    with pytest.raises(OSError, match=rf"cannot write {saved}: no space left on device") as caught:
        save_checkpoint(saved, _model(), vocab=VOCAB, step=4)
    assert caught.value.errno == errno.ENOSPC
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == ["m.pt"]  # the partial temporary file is gone


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_train_on_a_full_disk_says_so_in_one_message(tmp_path, monkeypatch):
    from rnndeploy.data import builtin_text

    corpus = tmp_path / "c.txt"
    corpus.write_text(builtin_text()[:3000], encoding="utf-8")
    _full_disk_for(monkeypatch, ".m.pt.")
    out = tmp_path / "m.pt"
    args = ["train", "--data", str(corpus), "--hidden", "8", "--embed", "4", "--seq-len", "8"]
    result = CliRunner().invoke(
        main, [*args, "--batch", "2", "--steps", "2", "--out", str(out), "--no-progress"]
    )
    assert result.exit_code == 1, result.output
    assert f"Error: cannot write {out}: no space left on device" in result.output
    assert (
        "Traceback" not in result.output
        and "iostream" not in result.output
        and "unexpected pos" not in result.output
    )


def test_a_read_only_folder_is_one_line(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(checkpoint_module.tempfile, "mkstemp", refuse)
    out = tmp_path / "m.pt"
    result = CliRunner().invoke(
        main, ["train", "--out", str(out), "--hidden", "8", "--steps", "1", "--no-progress"]
    )
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1] == (
        f"Error: cannot write {out.with_name('m.log.jsonl')}: Read-only file system (creating a file in "
        f"{tmp_path} failed); the previous m.log.jsonl, if any, is unchanged"
    )
    assert "Traceback" not in result.output


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from rnndeploy.checkpoint import atomic_write

    def write(tmp):
        Path(tmp).write_bytes(b"x" * 100000)
        Path(sys.argv[2]).write_text(tmp)
        time.sleep(600)

    atomic_write(Path(sys.argv[1]), write)
    """
)


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    target, marker = tmp_path / "m.pt", tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target), str(marker)])
    try:
        deadline = time.monotonic() + 300
        while not marker.is_file():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=300)
    orphan = Path(marker.read_text())
    assert orphan.is_file() and orphan.name.startswith(".m.pt.")
    other_target = tmp_path / ".m.pt.1.x.tmp"  # a temporary file of a process that runs (process 1)
    other_target.write_bytes(b"")
    save_checkpoint(target, _model(), vocab=VOCAB, step=1)
    assert not orphan.exists()
    assert other_target.exists()  # process 1 runs: its temporary file may still be written
    assert load_checkpoint(target).step == 1


def test_the_file_and_its_folder_are_flushed_around_the_rename(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        events.append("fsync folder" if os.path.isdir(path) else f"fsync {Path(path).name[:6]}")
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write(tmp_path / "m.pt", lambda tmp: Path(tmp).write_bytes(b"data"))
    assert events == ["fsync .m.pt.", "replace", "fsync folder"]
    assert (tmp_path / "m.pt").read_bytes() == b"data"


def test_a_full_disk_while_appending_to_the_training_log_names_the_log(tmp_path, monkeypatch):
    real_open = Path.open

    def open_(self, mode="r", *args, **kwargs):
        if self.name == "m.log.jsonl" and mode == "a":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    out = tmp_path / "m.pt"
    result = CliRunner().invoke(
        main, ["train", "--out", str(out), "--hidden", "8", "--steps", "1", "--no-progress"]
    )
    assert result.exit_code == 1, result.output
    expected = (
        f"Error: cannot write {out.with_name('m.log.jsonl')}: no space left on device (appending a record)"
    )
    assert result.output.strip().splitlines()[-1] == expected
