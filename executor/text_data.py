"""`foldplan tokenize`: text to a Megatron indexed dataset (PREFIX.bin / PREFIX.idx) for `--data`.

Input, by extension: `.txt` (documents separated by blank lines), `.jsonl` (one JSON object
per line with a string `text` field), `.parquet` (a `text` column, read in record batches with
pyarrow). Each document is tokenized with the Hugging Face `tokenizers` library from
DIR/tokenizer.json (no special tokens added), followed by the EOS token (as Megatron's
preprocess_data.py appends the end-of-document token); empty documents are skipped. The
EOS id comes from DIR/config.json `eos_token_id`, else DIR/generation_config.json, else
DIR/tokenizer_config.json `eos_token`. Tokens are stored as uint16 when the vocabulary has
fewer than 65,500 ids, else int32 (Megatron's rule). Documents are written as they are
tokenized (data.IndexedDatasetWriter), so the input never has to fit in memory.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import IndexedDatasetWriter

BATCH_DOCS = 1000  # documents tokenized per call (tokenizers parallelises inside a batch)


class TokenizeError(ValueError):
    """Bad tokenizer folder or input; the message names the file, line or field."""


@dataclass(frozen=True)
class TokenizeSummary:
    """What `tokenize_file` wrote."""

    prefix: str
    documents: int
    tokens: int
    seconds: float
    tokens_per_s: float
    dtype: str
    eos_token_id: int


def _eos_id(tokenizer_dir: Path, tokenizer) -> int:
    for name in ("config.json", "generation_config.json"):
        f = tokenizer_dir / name
        if f.is_file():
            eos = json.loads(f.read_text()).get("eos_token_id")
            if isinstance(eos, list):
                eos = eos[0] if eos else None
            if isinstance(eos, int):
                return eos
    f = tokenizer_dir / "tokenizer_config.json"
    if f.is_file():
        eos = json.loads(f.read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and tokenizer.token_to_id(eos) is not None:
            return tokenizer.token_to_id(eos)
    raise TokenizeError(f"{tokenizer_dir}: no EOS token (eos_token_id in config.json or "
                        "generation_config.json, or eos_token in tokenizer_config.json)")


def _documents(path: Path) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        block: list[str] = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    block.append(line)
                elif block:
                    yield "".join(block).rstrip("\n")
                    block = []
        if block:
            yield "".join(block).rstrip("\n")
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TokenizeError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise TokenizeError(f"{path}:{i}: no string 'text' field")
                yield obj["text"]
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise TokenizeError(f"{path}: reading parquet needs pyarrow ({exc})") from None
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise TokenizeError(f"{path}: no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(columns=["text"], batch_size=BATCH_DOCS):
            yield from (t for t in batch.column(0).to_pylist() if t is not None)
    else:
        raise TokenizeError(f"{path}: unknown input type {suffix!r} (use .txt, .jsonl or .parquet)")


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    for d in docs:
        if d:
            batch.append(d)
        if len(batch) == BATCH_DOCS:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_file(tokenizer_dir: str | Path, input_path: str | Path, out_prefix: str | Path,
                  progress: bool = True) -> TokenizeSummary:
    """Tokenize `input_path` into `out_prefix`.bin/.idx (module docstring); a progress bar
    (bytes of the input read) and a summary line on stderr when `progress`."""
    from tokenizers import Tokenizer

    tokenizer_dir, input_path = Path(tokenizer_dir), Path(input_path)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise TokenizeError(f"{tokenizer_dir}: no tokenizer.json")
    if not input_path.is_file():
        raise TokenizeError(f"{input_path}: no such file")
    if input_path.suffix.lower() not in (".txt", ".jsonl", ".parquet"):
        raise TokenizeError(f"{input_path}: unknown input type {input_path.suffix!r} "
                            "(use .txt, .jsonl or .parquet)")
    docs = _documents(input_path)
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos = _eos_id(tokenizer_dir, tokenizer)
    dtype = np.uint16 if tokenizer.get_vocab_size() < 65500 else np.int32
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    writer = IndexedDatasetWriter(out_prefix, dtype)
    t0 = time.perf_counter()
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("tokenizing {task.fields[docs]} documents"), BarColumn(),
                  TextColumn("{task.percentage:>3.0f}%"), TimeRemainingColumn(),
                  console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task("tokenize", total=input_path.stat().st_size, docs=0)
        for batch in _batches(docs):
            for enc in tokenizer.encode_batch(batch, add_special_tokens=False):
                writer.add(enc.ids + [eos])
            bar.update(task, advance=sum(len(d.encode("utf-8")) for d in batch), docs=len(writer.sizes))
    writer.close()
    seconds = time.perf_counter() - t0
    summary = TokenizeSummary(prefix=str(out_prefix), documents=len(writer.sizes), tokens=writer.num_tokens,
                              seconds=round(seconds, 3), tokens_per_s=round(writer.num_tokens / max(seconds, 1e-9), 1),
                              dtype=np.dtype(dtype).name, eos_token_id=eos)
    if progress:
        print(f"{summary.documents} documents, {summary.tokens} tokens in {seconds:.2f} s "
              f"({summary.tokens_per_s:,.0f} tokens/s) -> {out_prefix}.bin/.idx", file=sys.stderr)
    return summary
