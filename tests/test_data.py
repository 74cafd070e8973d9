"""Data sources, splits and truncated-BPTT batching, checked against plain slicing of the raw data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnndeploy.data import DataError, StreamBatcher, builtin_text, decode, encode, load_data


def test_builtin_corpus_is_pydoc_topics_in_sorted_key_order():
    from pydoc_data.topics import topics

    data = load_data("builtin", valid_fraction=0.05)
    text = "".join(topics[k] for k in sorted(topics))
    assert builtin_text() == text
    assert data.vocab == sorted(set(text))
    assert decode(torch.cat([data.train, data.valid]), data.vocab) == text
    assert len(data.valid) == round(len(text) * 0.05)


def test_text_file_vocab_and_split(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("héllo wörld\n" * 20, encoding="utf-8")
    data = load_data(path, valid_fraction=0.1)
    assert data.kind == "text" and data.vocab == sorted(set("héllo wörld\n"))
    assert decode(data.valid, data.vocab) == ("héllo wörld\n" * 20)[-24:]
    assert data.data_stats == {}


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "does not exist"), ("", "is empty"), ("aaaa", "1 distinct character")],
    ids=["missing", "empty", "one-char"],
)
def test_bad_text_files(tmp_path, content, message):
    path = tmp_path / "t.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_data(path)


def test_encode_rejects_unknown_characters():
    with pytest.raises(DataError, match=r"\['z'\] are not in the vocabulary"):
        encode("abz", ["a", "b"])


def test_npy_series_is_normalised_with_training_statistics(tmp_path):
    rng = np.random.default_rng(0)
    series = rng.normal(5.0, 3.0, size=(200, 2)).astype(np.float32)
    np.save(tmp_path / "s.npy", series)
    data = load_data(tmp_path / "s.npy", valid_fraction=0.1)
    train = series[:180]
    np.testing.assert_allclose(data.data_stats["mean"], train.mean(0), rtol=1e-5)
    np.testing.assert_allclose(data.data_stats["std"], train.std(0), rtol=1e-5)
    expected = (series - train.mean(0)) / train.std(0)
    np.testing.assert_allclose(torch.cat([data.train, data.valid]).numpy(), expected, rtol=1e-4, atol=1e-5)
    assert data.kind == "series" and data.num_features == 2


def test_one_dimensional_series_becomes_one_feature(tmp_path):
    np.save(tmp_path / "s.npy", np.arange(50.0))
    data = load_data(tmp_path / "s.npy")
    assert data.train.shape[1] == 1 and data.train.dtype == torch.float32


def test_csv_with_header(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("a,b\n" + "".join(f"{i},{2 * i}\n" for i in range(40)))
    data = load_data(path, valid_fraction=0.1)
    assert data.num_features == 2
    np.testing.assert_allclose(data.data_stats["mean"], [17.5, 35.0])


def test_csv_non_numeric_cell_names_file_line_and_value(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("value\n1.0\n2.0\noops\n4.0\n")
    with pytest.raises(DataError, match=r"s\.csv, line 4, column 1: expected a number, got 'oops'"):
        load_data(path)


def test_npy_with_nan_is_rejected(tmp_path):
    np.save(tmp_path / "s.npy", np.array([1.0, 2.0, np.nan, 4.0]))
    with pytest.raises(DataError, match="non-finite value nan at step 2"):
        load_data(tmp_path / "s.npy")


def test_series_too_short_for_seq_len(tmp_path):
    np.save(tmp_path / "s.npy", np.arange(30.0))
    data = load_data(tmp_path / "s.npy", valid_fraction=0.1)
    with pytest.raises(
        DataError, match=r"the training split has 27 steps; 2 stream\(s\) of seq_len 16 need at least 34"
    ):
        StreamBatcher(data.train, batch_size=2, seq_len=16)


def test_stream_batcher_serves_consecutive_chunks_with_next_step_targets():
    data = torch.arange(1000)
    batcher = StreamBatcher(data, batch_size=3, seq_len=7)
    length = 1000 // 3
    assert batcher.chunks_per_epoch == (length - 1) // 7
    for step in range(batcher.chunks_per_epoch + 2):
        x, y, fresh = batcher.batch(step)
        chunk = step % batcher.chunks_per_epoch
        for s in range(3):
            start = s * length + chunk * 7
            assert torch.equal(x[s], data[start : start + 7])
            assert torch.equal(y[s], data[start + 1 : start + 8])
        assert fresh == (chunk == 0)


def test_ranks_split_the_streams_of_the_global_batch():
    data = torch.arange(2000)
    whole = StreamBatcher(data, batch_size=4, seq_len=5)
    parts = [StreamBatcher(data, batch_size=2, seq_len=5, rank=r, world_size=2) for r in range(2)]
    for step in (0, 3, 50):
        assert torch.equal(torch.cat([p.batch(step)[0] for p in parts]), whole.batch(step)[0])
