"""Data: bundled corpus, byte tokenizer, Megatron indexed dataset reader, batch order."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from executor.data import (BatchOrder, IndexedDataset, bundled_corpus_tokens, byte_tokenize,
                           write_indexed_dataset)


def test_bundled_corpus_is_english_bytes():
    tokens = bundled_corpus_tokens()
    assert len(tokens) > 150_000  # a couple of hundred KB of prose
    assert tokens.min() >= 0 and tokens.max() < 256
    text = bytes(tokens[:2000].astype(np.uint8)).decode("utf-8", errors="replace")
    assert text.count(" the ") > 5


def test_byte_tokenizer_roundtrip():
    t = byte_tokenize("héllo")
    assert t.tolist() == list("héllo".encode())


def test_indexed_dataset_roundtrip(tmp_path):
    seqs = [np.array([1, 2, 3]), np.array([500, 60000]), np.array([7])]
    write_indexed_dataset(tmp_path / "ds", seqs, dtype=np.uint16)
    raw = (tmp_path / "ds.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00" and struct.unpack("<Q", raw[9:17])[0] == 1
    assert raw[17] == 8  # uint16 code
    ds = IndexedDataset(tmp_path / "ds")
    assert len(ds) == 3
    assert ds.sizes.tolist() == [3, 2, 1]
    assert ds[1].tolist() == [500, 60000]
    assert ds.tokens().tolist() == [1, 2, 3, 500, 60000, 7]
    assert ds.doc_idx.tolist() == [0, 1, 2, 3]


def test_indexed_dataset_reads_handwritten_int32_file(tmp_path):
    # Built byte by byte from the format description, independent of our writer.
    data = np.array([10, 11, 12, 13, 14], dtype=np.int32)
    (tmp_path / "h.bin").write_bytes(data.tobytes())
    idx = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 4, 2, 3)
    idx += np.array([2, 3], dtype=np.int32).tobytes() + np.array([0, 8], dtype=np.int64).tobytes()
    idx += np.array([0, 1, 2], dtype=np.int64).tobytes()
    (tmp_path / "h.idx").write_bytes(idx)
    ds = IndexedDataset(tmp_path / "h")
    assert ds[0].tolist() == [10, 11] and ds[1].tolist() == [12, 13, 14]


def test_indexed_dataset_rejects_bad_magic(tmp_path):
    (tmp_path / "x.idx").write_bytes(b"NOTMAGIC!" + bytes(40))
    (tmp_path / "x.bin").write_bytes(bytes(8))
    with pytest.raises(ValueError, match="MMIDIDX"):
        IndexedDataset(tmp_path / "x")


def test_batch_order_independent_of_mapping():
    tokens = np.arange(10_000) % 251
    order = BatchOrder(tokens, seq_length=16, global_batch_size=8, seed=3)
    full_x, full_y = order.micro_batch(step=2, micro=0, mbs=8, dp=1, dp_rank=0)
    # dp=4, mbs=1: two micro-batches, rank d takes sequences 4m + d
    parts = {}
    for m in range(2):
        for d in range(4):
            parts[4 * m + d] = order.micro_batch(2, m, 1, 4, d)
    for g in range(8):
        assert np.array_equal(parts[g][0][0].numpy(), full_x[g].numpy())
        assert np.array_equal(parts[g][1][0].numpy(), full_y[g].numpy())
    assert np.array_equal(full_x[:, 1:].numpy(), full_y[:, :-1].numpy())
    other = BatchOrder(tokens, 16, 8, seed=4).micro_batch(2, 0, 8, 1, 0)[0]
    assert not np.array_equal(other.numpy(), full_x.numpy())
