"""Sequence packing: a streamed corpus tokenized, joined with EOS and cut into fixed-length blocks.

The token stream is `doc_0 + [EOS] + doc_1 + [EOS] + ...`, epoch after epoch without a gap, and block k is its
tokens [k·L, (k+1)·L). Each document is tokenized the tokenizer's default way (so with its BOS where it adds one)
and gets one EOS unless the tokenizer already ends it with one. Every token of every block is a real token: no
padding, nothing dropped at document or epoch ends. Tokens attend across document boundaries inside a block, as
in GPT-style packed pretraining (nanoGPT, litgpt); the EOS marks where one document stops.

Order is the corpus order (streamed, never shuffled: shuffle the corpus file beforehand if it is sorted by
source). So the stream is deterministic and a `DataPosition` pins it exactly: the next block starts at token
`offset` of document `document` of epoch `epoch`. Resuming skips `document` documents without tokenizing them and
drops `offset` tokens, so the blocks that follow are the ones an uninterrupted run would have produced.

Source-language replay (`MixedBlocks`): a share of the blocks comes from a second, source-language corpus packed
the same way, interleaved on a fixed schedule, so the mix is exact over any stretch of the run and a
`StreamPosition` (both corpora's positions and the number of blocks drawn) pins the stream just as exactly.

Tokenization runs on batches of documents (the Rust tokenizer releases the GIL), and `Prefetcher` moves the whole
pipeline to a background thread so the accelerator never waits for text.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from langadapt.core.adaptation.corpus import iter_documents
from langadapt.core.adaptation.errors import AdaptationInputError

T = TypeVar("T")
P = TypeVar("P")  # a stream position

# Documents tokenized per call: the Rust tokenizer spreads a batch's documents over its threads, so a batch should
# hold many documents (a corpus of whole books, like ruslit, gets a few per batch).
TOKENIZE_BATCH_CHARS = 4_000_000
TOKENIZE_BATCH_DOCS = 1024


@dataclass(frozen=True)
class DataPosition:
    """Where the next block starts: token `offset` of document `document` (0-based) in epoch `epoch`."""

    epoch: int = 0
    document: int = 0
    offset: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> DataPosition:
        return cls(epoch=int(data["epoch"]), document=int(data["document"]), offset=int(data["offset"]))


@dataclass(frozen=True)
class StreamPosition:
    """Where a (possibly mixed) training stream stands: the next block of the target and of the source corpus,
    and how many blocks were drawn so far (which fixes whose turn the next one is)."""

    target: DataPosition = field(default_factory=DataPosition)
    source: DataPosition = field(default_factory=DataPosition)
    blocks: int = 0

    def to_dict(self) -> dict[str, object]:
        return {"target": self.target.to_dict(), "source": self.source.to_dict(), "blocks": self.blocks}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamPosition:
        return cls(DataPosition.from_dict(data["target"]), DataPosition.from_dict(data["source"]), int(data["blocks"]))


def eos_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    eos = tokenizer.eos_token_id
    if not isinstance(eos, int):
        raise AdaptationInputError("the tokenizer has no EOS token to join packed documents with")
    return eos


class PackedBlocks:
    """Iterable of `(block, position_after)`: block is an int64 array of `seq_len` token ids, position_after the
    `DataPosition` of the block that follows it. Iterating again starts over from `start`."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        corpus_path: str,
        seq_len: int,
        *,
        start: DataPosition = DataPosition(),
    ) -> None:
        if seq_len < 2:
            raise AdaptationInputError(f"seq_len must be at least 2, got {seq_len}")
        self.tokenizer = tokenizer
        self.corpus_path = corpus_path
        self.seq_len = seq_len
        self.start = start
        self.eos = eos_token_id(tokenizer)

    def _tokenize(self, texts: list[str]) -> list[np.ndarray]:
        encoded = self.tokenizer(texts, add_special_tokens=True, return_attention_mask=False, verbose=False)
        out = []
        for ids in encoded["input_ids"]:
            if not ids or ids[-1] != self.eos:
                ids = [*ids, self.eos]
            out.append(np.asarray(ids, dtype=np.int64))
        return out

    def _text_batches(self, docs: Iterator[str]) -> Iterator[list[str]]:
        batch: list[str] = []
        chars = 0
        for doc in docs:
            batch.append(doc)
            chars += len(doc)
            if chars >= TOKENIZE_BATCH_CHARS or len(batch) >= TOKENIZE_BATCH_DOCS:
                yield batch
                batch, chars = [], 0
        if batch:
            yield batch

    def documents(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(epoch, document index, token ids ending in EOS) from `start.document` of `start.epoch` on, forever."""
        epoch, skip = self.start.epoch, self.start.document
        while True:
            docs = iter_documents(self.corpus_path)
            skipped = sum(1 for _ in itertools.islice(docs, skip))
            if skipped < skip:
                raise AdaptationInputError(
                    f"{self.corpus_path}: the corpus has {skipped} documents, the checkpoint's position is at document "
                    f"{skip}: not the corpus the run started with"
                )
            index = skip
            for batch in self._text_batches(docs):
                for ids in self._tokenize(batch):
                    yield epoch, index, ids
                    index += 1
            if index == 0:
                raise AdaptationInputError(f"{self.corpus_path}: corpus is empty (no non-blank documents)")
            epoch, skip = epoch + 1, 0

    def __iter__(self) -> Iterator[tuple[np.ndarray, DataPosition]]:
        docs = self.documents()
        epoch, index, ids = next(docs)
        pos = self.start.offset
        if pos >= len(ids):
            raise AdaptationInputError(
                f"{self.corpus_path}: document {index} has {len(ids)} tokens, the checkpoint's position is at token "
                f"{pos}: not the corpus (or tokenizer) the run started with"
            )
        while True:
            parts = []
            need = self.seq_len
            while need:
                if pos == len(ids):
                    epoch, index, ids = next(docs)
                    pos = 0
                take = min(need, len(ids) - pos)
                parts.append(ids[pos : pos + take])
                pos += take
                need -= take
            after = DataPosition(epoch, index + 1, 0) if pos == len(ids) else DataPosition(epoch, index, pos)
            yield np.concatenate(parts), after


class MixedBlocks:
    """Iterable of `(block, position_after)` like `PackedBlocks`, with a share `mix` of the blocks taken from
    `source_path`: block n (0-based, counted over the whole run) is a source block when floor((n+1)·mix) exceeds
    floor(n·mix), so after any n blocks the source has supplied floor(n·mix) of them. `mix` 0 reads the target only.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        corpus_path: str,
        seq_len: int,
        *,
        source_path: str | None = None,
        mix: float = 0.0,
        start: StreamPosition = StreamPosition(),
    ) -> None:
        if mix and source_path is None:
            raise AdaptationInputError("a source-language mix needs a source corpus")
        self.mix = Fraction(mix).limit_denominator(10_000)
        self.start = start
        self.target = PackedBlocks(tokenizer, corpus_path, seq_len, start=start.target)
        self.source = None
        if mix and source_path is not None:
            self.source = PackedBlocks(tokenizer, source_path, seq_len, start=start.source)

    def is_source(self, n: int) -> bool:
        return math.floor((n + 1) * self.mix) > math.floor(n * self.mix)

    def __iter__(self) -> Iterator[tuple[np.ndarray, StreamPosition]]:
        target = iter(self.target)
        source = iter(self.source) if self.source is not None else None
        position = self.start
        while True:
            if source is not None and self.is_source(position.blocks):
                block, after = next(source)
                position = StreamPosition(position.target, after, position.blocks + 1)
            else:
                block, after = next(target)
                position = StreamPosition(after, position.source, position.blocks + 1)
            yield block, position


def micro_batches(
    blocks: Iterable[tuple[np.ndarray, P]],
    micro_batch_size: int,
    *,
    num_processes: int = 1,
    process_index: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, P]]:
    """`(input_ids [micro_batch_size, L] int64, position after)` for one process.

    Every process reads the same stream; of each run of `micro_batch_size x num_processes` blocks, process i takes
    the i-th slice. The position after is the same on every process, so any one of them can checkpoint it.
    """
    global_size = micro_batch_size * num_processes
    first = process_index * micro_batch_size
    iterator = iter(blocks)
    while True:
        group = list(itertools.islice(iterator, global_size))
        if len(group) < global_size:
            return
        ids = torch.from_numpy(np.stack([block for block, _ in group[first : first + micro_batch_size]]))
        yield (ids.pin_memory() if pin_memory else ids), group[-1][1]


class _Done:
    """End-of-stream marker put on the queue by the producer thread."""


class Prefetcher(Generic[T]):
    """Run an iterator in a daemon thread, `depth` items ahead; re-raises its exceptions in the consumer.

    Use as a context manager (or call `close`): the thread stops at the next item it produces.
    """

    def __init__(self, iterable: Iterable[T], depth: int = 8) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(iterable,), daemon=True, name="cpt-prefetch")
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, iterable: Iterable[T]) -> None:
        try:
            for item in iterable:
                if not self._put(item):
                    return
            self._put(_Done())
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(exc)

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        item = self._queue.get()
        if isinstance(item, _Done):
            self._queue.put(item)  # stay exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[return-value]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
