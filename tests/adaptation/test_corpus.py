"""Streaming corpus readers and their errors."""

from __future__ import annotations

import gzip
import json
import lzma

import pytest

from langadapt.core.adaptation.corpus import corpus_stats, iter_documents, require_documents, split_heldout
from langadapt.core.adaptation.errors import AdaptationInputError

DOCS = ["Первый документ.", "Second document", "третий — ёж"]


def _write(path, docs, *, jsonl: bool, opener=open) -> str:
    lines = [json.dumps({"id": i, "text": d}, ensure_ascii=False) if jsonl else d for i, d in enumerate(docs)]
    with opener(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n\n")
    return str(path)


@pytest.mark.parametrize(
    ("name", "jsonl", "opener"),
    [("c.txt", False, open), ("c.jsonl", True, open), ("c.jsonl.xz", True, lzma.open), ("c.txt.gz", False, gzip.open)],
)
def test_formats_stream_the_same_documents(tmp_path, name, jsonl, opener) -> None:
    path = _write(tmp_path / name, DOCS, jsonl=jsonl, opener=opener)
    assert list(iter_documents(path)) == DOCS
    assert corpus_stats(path).documents == 3 and corpus_stats(path).chars == sum(map(len, DOCS))
    assert "".join(iter_documents(path, limit_chars=20)) == "".join(DOCS)[:20]


def test_reader_is_lazy(tmp_path) -> None:
    path = tmp_path / "big.txt"
    path.write_text("строка\n" * 100_000, encoding="utf-8")
    stream = iter_documents(str(path))
    assert next(stream) == "строка"  # a generator: nothing beyond the first line has been read into a list


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.txt", None, "not found"),
        ("empty.txt", b"\n  \n", "empty"),
        ("bin.txt", b"abc\x00\x01\x02", "binary"),
        ("latin1.txt", "caf\xe9 na\xefve".encode("latin-1"), "not UTF-8"),
        ("bad.jsonl.xz", b"definitely not xz", "unreadable"),
        ("bad.txt.gz", b"\x1f\x8b\x08garbage", "unreadable"),
        ("notext.jsonl", b'{"body": "x"}\n', "no string 'text'"),
        ("broken.jsonl", b'{"text": "x"\n', "not valid JSON"),
    ],
)
def test_bad_corpora_are_named_errors(tmp_path, name, content, message) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AdaptationInputError, match=message):
        list(require_documents(str(path)))


def test_corrupt_deflate_stream_is_a_named_error(tmp_path) -> None:
    # A valid gzip header followed by a broken deflate block raises zlib.error, not BadGzipFile.
    path = tmp_path / "bad.txt.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00" + b"not really gzip" * 10)
    with pytest.raises(AdaptationInputError, match="unreadable .gz data") as info:
        list(iter_documents(str(path)))
    assert info.value.code == "corrupt_file"


def test_split_heldout_keeps_evaluated_text_out_of_training(tmp_path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("aaaa\nbbbbbb\ncccc\n", encoding="utf-8")
    train, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    stats = split_heldout(str(corpus), 7, str(train), str(heldout))
    assert list(iter_documents(str(heldout))) == ["aaaa", "bbb"] and stats.chars == 7
    assert list(iter_documents(str(train))) == ["bbb", "cccc"]
    with pytest.raises(AdaptationInputError) as info:
        split_heldout(str(corpus), 100, str(train), str(heldout))
    assert info.value.code == "corpus_too_small"
