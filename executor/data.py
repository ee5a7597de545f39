"""Token sources and the mapping-independent batch order.

Sources: the bundled English corpus (executor/data/*.txt) with a byte-level tokenizer (ids
0..255, so any vocab_size >= 256 works), or a Megatron-LM indexed dataset (.bin/.idx, MMIDIDX).

Order: the token stream is cut into windows of S+1 tokens; window order is a permutation of
all windows drawn from the seed (re-drawn each epoch). Global sequence g of step s is window
order[s * global_batch + g]. Micro-batch m of a step holds global sequences
[m * mbs * dp, (m + 1) * mbs * dp) and data-parallel rank d takes the d-th slice of mbs of
them. So the tokens of a step depend on (seed, S, global batch) only, never on the mapping.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

CORPUS_DIR = Path(__file__).parent / "data"

# Megatron-LM `indexed_dataset.py` dtype codes.
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
           7: np.float32, 8: np.uint16}
_MAGIC = b"MMIDIDX\x00\x00"


def byte_tokenize(text: str) -> np.ndarray:
    """UTF-8 bytes as token ids 0..255."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def bundled_corpus_tokens() -> np.ndarray:
    """The bundled corpus (all .txt files in executor/data, sorted by name), byte-tokenized."""
    files = sorted(CORPUS_DIR.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no corpus .txt files in {CORPUS_DIR}")
    return byte_tokenize("\n\n".join(f.read_text(encoding="utf-8") for f in files))


class IndexedDataset:
    """Reader for Megatron-LM's memory-mapped indexed dataset (`prefix.idx` + `prefix.bin`).

    .idx layout (little endian): magic b"MMIDIDX\\0\\0", u64 version (1), u8 dtype code,
    u64 sequence count n, u64 document count m, i32 sizes[n], i64 byte pointers[n],
    i64 document indices[m].
    """

    def __init__(self, prefix: str | Path):
        prefix = str(prefix)
        with open(prefix + ".idx", "rb") as f:
            magic = f.read(9)
            if magic != _MAGIC:
                raise ValueError(f"{prefix}.idx is not a Megatron MMIDIDX index (magic {magic!r})")
            (version,) = struct.unpack("<Q", f.read(8))
            if version != 1:
                raise ValueError(f"{prefix}.idx: unsupported index version {version}")
            (code,) = struct.unpack("<B", f.read(1))
            if code not in _DTYPES:
                raise ValueError(f"{prefix}.idx: unknown dtype code {code}")
            self.dtype = np.dtype(_DTYPES[code])
            (n,) = struct.unpack("<Q", f.read(8))
            (m,) = struct.unpack("<Q", f.read(8))
            offset = f.tell()
        idx = np.memmap(prefix + ".idx", mode="r", order="C")
        self.sizes = np.frombuffer(idx, dtype=np.int32, count=n, offset=offset)
        self.pointers = np.frombuffer(idx, dtype=np.int64, count=n, offset=offset + 4 * n)
        self.doc_idx = np.frombuffer(idx, dtype=np.int64, count=m, offset=offset + 12 * n)
        self.bin = np.memmap(prefix + ".bin", mode="r", dtype=self.dtype)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = self.pointers[i] // self.dtype.itemsize
        return np.asarray(self.bin[start : start + self.sizes[i]])

    def tokens(self) -> np.ndarray:
        """All sequences concatenated in order (Megatron's GPT dataset also concatenates)."""
        return np.asarray(self.bin, dtype=np.int64)


class IndexedDatasetWriter:
    """Streaming writer of the MMIDIDX format (the layout `IndexedDataset` reads): documents
    are appended to PREFIX.bin as they come; PREFIX.idx is written by `close()`.
    Only the per-document sizes stay in memory."""

    def __init__(self, prefix: str | Path, dtype=np.uint16):
        self.prefix, self.dtype = str(prefix), np.dtype(dtype)
        self.code = {np.dtype(v): k for k, v in _DTYPES.items()}[self.dtype]
        self.sizes: list[int] = []
        self.num_tokens = 0
        self._bin = open(self.prefix + ".bin", "wb")

    def add(self, tokens) -> None:
        """Append one document."""
        arr = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(arr.tobytes())
        self.sizes.append(len(arr))
        self.num_tokens += len(arr)

    def close(self) -> None:
        self._bin.close()
        sizes = np.array(self.sizes, dtype=np.int32)
        pointers = np.concatenate([[0], np.cumsum(sizes[:-1], dtype=np.int64)]) * self.dtype.itemsize
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
        with open(self.prefix + ".idx", "wb") as f:
            f.write(_MAGIC + struct.pack("<Q", 1) + struct.pack("<B", self.code))
            f.write(struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(doc_idx)))
            f.write(sizes.tobytes() + pointers.astype(np.int64).tobytes() + doc_idx.tobytes())


def write_indexed_dataset(prefix: str | Path, sequences: list[np.ndarray], dtype=np.uint16) -> None:
    """Write `sequences` in the MMIDIDX format (one document per sequence)."""
    writer = IndexedDatasetWriter(prefix, dtype)
    for seq in sequences:
        writer.add(seq)
    writer.close()


class BatchOrder:
    """Mapping-independent order of training windows (see module docstring)."""

    def __init__(self, tokens: np.ndarray, seq_length: int, global_batch_size: int, seed: int):
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.S, self.G, self.seed = seq_length, global_batch_size, seed
        self.num_windows = (len(self.tokens) - 1) // seq_length
        if self.num_windows < 1:
            raise ValueError(f"dataset has {len(self.tokens)} tokens, fewer than seq_length+1={seq_length + 1}")
        self._perms: dict[int, np.ndarray] = {}

    def _window(self, g: int) -> np.ndarray:
        epoch, i = divmod(g, self.num_windows)
        if epoch not in self._perms:
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        start = int(self._perms[epoch][i]) * self.S
        return self.tokens[start : start + self.S + 1]

    def micro_batch(self, step: int, micro: int, mbs: int, dp: int, dp_rank: int):
        """(inputs, targets), each [mbs, S] int64, of data-parallel rank `dp_rank`."""
        first = step * self.G + micro * mbs * dp + dp_rank * mbs
        win = np.stack([self._window(first + j) for j in range(mbs)])
        t = torch.from_numpy(win)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()
