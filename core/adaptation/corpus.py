"""Streaming corpus readers: `.txt` (one document per non-empty line) and `.jsonl` (a `text` field per line),
each optionally `.xz` / `.gz` compressed. Never reads a whole file into memory."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from langadapt.core.adaptation.errors import AdaptationInputError

_OPENERS = {".xz": lzma.open, ".gz": gzip.open}
_SNIFF_BYTES = 8192
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON's \uXXXX escapes can spell them; UTF-8 cannot


@dataclass(frozen=True)
class CorpusStats:
    documents: int
    chars: int


def _split_suffixes(path: str) -> tuple[str, str | None]:
    """Return (format suffix, compression suffix), e.g. ('.jsonl', '.xz')."""
    root, ext = os.path.splitext(path)
    compression = ext if ext in _OPENERS else None
    if compression:
        root, ext = os.path.splitext(root)
    return ext.lower(), compression


def _open_text(path: str) -> IO[str]:
    if not os.path.isfile(path):
        raise AdaptationInputError(f"corpus file not found: {path}", "file_not_found")
    _, compression = _split_suffixes(path)
    opener = _OPENERS.get(compression or "", open)
    with opener(path, "rb") as raw:  # type: ignore[operator]
        if b"\x00" in raw.read(_SNIFF_BYTES):
            raise AdaptationInputError(f"{path}: binary data (NUL bytes), expected UTF-8 text", "binary_file")
    # errors="strict": non-UTF-8 data must fail loudly, not be silently replaced.
    return opener(path, "rt", encoding="utf-8", errors="strict")  # type: ignore[operator]


def iter_documents(
    path: str,
    *,
    limit_chars: int | None = None,
    max_chars: int | None = None,
    max_line_chars: int | None = None,
) -> Iterator[str]:
    """Yield the documents of a corpus file one by one.

    `.jsonl`: one JSON object per line, its `text` field is the document. Anything else is plain text with one
    document per non-empty line. Stops after `limit_chars` characters (the last document is cut to fit).
    Raises `AdaptationInputError` for a missing, compressed-but-corrupt, binary or non-UTF-8 file, a `.jsonl`
    line without a string `text` field or with text that is not valid Unicode (a lone surrogate), and, as they are
    read (no more than one line over the limit is ever held), a file of over `max_chars` characters once
    decompressed (`corpus_too_large`) or a line of over `max_line_chars` (`line_too_long`).
    """
    fmt, compression = _split_suffixes(path)
    produced = read = 0
    try:
        with _open_text(path) as stream:
            line_no = 0
            while line := stream.readline(-1 if max_line_chars is None else max_line_chars + 1):
                line_no += 1
                read += len(line)
                if max_line_chars is not None and len(line.rstrip("\n")) > max_line_chars:
                    raise AdaptationInputError(
                        f"{path}: line {line_no} is longer than {max_line_chars} characters", "line_too_long"
                    )
                if max_chars is not None and read > max_chars:
                    raise AdaptationInputError(
                        f"{path}: more than {max_chars} characters of text (decompressed)", "corpus_too_large"
                    )
                if "\x00" in line:
                    raise AdaptationInputError(f"{path}: binary data (NUL byte) on line {line_no}", "binary_file")
                if fmt == ".jsonl":
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise AdaptationInputError(
                            f"{path}: line {line_no} is not valid JSON ({exc.msg})", "invalid_jsonl"
                        ) from None
                    except RecursionError:
                        raise AdaptationInputError(
                            f"{path}: line {line_no} is JSON nested too deeply", "invalid_jsonl"
                        ) from None
                    text = record.get("text") if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        raise AdaptationInputError(
                            f"{path}: line {line_no} has no string 'text' field", "invalid_jsonl"
                        )
                    if not text.isascii() and _SURROGATE.search(text):
                        raise AdaptationInputError(
                            f"{path}: line {line_no} holds a lone surrogate (\\ud800-\\udfff), not valid Unicode",
                            "invalid_unicode",
                        )
                else:
                    text = line.rstrip("\n")
                if not text.strip():
                    continue
                if limit_chars is not None and produced + len(text) >= limit_chars:
                    yield text[: limit_chars - produced]
                    return
                produced += len(text)
                yield text
    except UnicodeDecodeError as exc:
        raise AdaptationInputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})", "not_utf8") from None
    except (lzma.LZMAError, gzip.BadGzipFile, zlib.error, EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        kind = compression or "file"
        raise AdaptationInputError(f"{path}: unreadable {kind} data ({exc})", "corrupt_file") from None


def require_documents(path: str, *, limit_chars: int | None = None) -> Iterator[str]:
    """Like `iter_documents`, but raises `AdaptationInputError` if the corpus holds no text at all."""
    docs = iter_documents(path, limit_chars=limit_chars)
    first = next(docs, None)
    if first is None:
        raise AdaptationInputError(f"{path}: corpus is empty (no non-blank documents)", "empty_corpus")

    def chained() -> Iterator[str]:
        yield first
        yield from docs

    return chained()


def corpus_stats(
    path: str, *, limit_chars: int | None = None, max_chars: int | None = None, max_line_chars: int | None = None
) -> CorpusStats:
    documents = chars = 0
    for doc in iter_documents(path, limit_chars=limit_chars, max_chars=max_chars, max_line_chars=max_line_chars):
        documents += 1
        chars += len(doc)
    return CorpusStats(documents=documents, chars=chars)


def split_heldout(path: str, heldout_chars: int, train_out: str, heldout_out: str) -> CorpusStats:
    """Write the corpus's first `heldout_chars` characters to `heldout_out` and the rest to `train_out` (both
    `.jsonl`), so a job given one file never trains on the text it is evaluated on. Returns the held-out stats."""
    documents = chars = train_documents = 0
    with open(train_out, "w", encoding="utf-8") as train, open(heldout_out, "w", encoding="utf-8") as heldout:
        for doc in require_documents(path):
            if chars < heldout_chars:
                take = doc[: heldout_chars - chars]
                heldout.write(json.dumps({"text": take}, ensure_ascii=False) + "\n")
                documents, chars = documents + 1, chars + len(take)
                doc = doc[len(take) :]
            if doc.strip():
                train.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
                train_documents += 1
    if not train_documents:
        raise AdaptationInputError(
            f"{path}: nothing left to train on after holding out {heldout_chars} characters for evaluation "
            "(give a separate held-out file or a larger corpus)",
            "corpus_too_small",
        )
    return CorpusStats(documents=documents, chars=chars)
