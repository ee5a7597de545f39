"""`foldplan tokenize`: .txt / .jsonl / .parquet through a tokenizer.json into a Megatron indexed
dataset that `executor.data.IndexedDataset` (what `--data` reads) reads back token for token."""

from __future__ import annotations

import json

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")

from api.cli import main
from executor.data import IndexedDataset

DOCS = ["The experts fold over the attention ranks.", "Pipeline stages hold layers.\nTwo lines.",
        "Tokens move by all-to-all."]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tiny byte-level BPE tokenizer trained here (no download) with an EOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(DOCS * 10, trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return d


def expected(tokenizer_dir) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos = tok.token_to_id("<eos>")
    return [tok.encode(d, add_special_tokens=False).ids + [eos] for d in DOCS]


def write_input(tmp_path, kind: str):
    if kind == "txt":
        f = tmp_path / "in.txt"
        f.write_text("\n\n".join(DOCS) + "\n")
    elif kind == "jsonl":
        f = tmp_path / "in.jsonl"
        f.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS)) + "\n")
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        f = tmp_path / "in.parquet"
        pq.write_table(pa.table({"text": DOCS}), f)
    return f


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_tokenize_writes_what_the_executor_reads(tmp_path, tokenizer_dir, kind, capsys):
    rc = main(["tokenize", "--tokenizer", str(tokenizer_dir), "--input", str(write_input(tmp_path, kind)),
               "--out", str(tmp_path / "ds" / "corpus")])
    assert rc == 0
    out = capsys.readouterr()
    summary = json.loads(out.out)
    want = expected(tokenizer_dir)
    assert summary["documents"] == 3 and summary["tokens"] == sum(map(len, want))
    assert "tokens/s" in out.err
    ds = IndexedDataset(tmp_path / "ds" / "corpus")
    assert ds.dtype == np.uint16
    assert [ds[i].tolist() for i in range(len(ds))] == want


def test_tokenize_errors_name_the_problem(tmp_path, tokenizer_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    assert main(["tokenize", "--tokenizer", str(tokenizer_dir), "--input", str(bad),
                 "--out", str(tmp_path / "x")]) == 2
    assert "bad.jsonl:2: no string 'text' field" in capsys.readouterr().err
    assert main(["tokenize", "--tokenizer", str(tmp_path), "--input", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    csv = tmp_path / "in.csv"
    csv.write_text("a,b\n")
    assert main(["tokenize", "--tokenizer", str(tokenizer_dir), "--input", str(csv), "--out", str(tmp_path / "x")]) == 2
    assert "unknown input type '.csv'" in capsys.readouterr().err
