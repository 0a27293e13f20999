"""The auxiliary space: static vectors for every token of the new vocabulary, trained on the target corpus.

The corpus is tokenized with the new tokenizer and each token becomes a "word" (its text) of a fastText CBOW model
with subword n-grams (gensim), so tokens the corpus rarely shows still get a vector from their character n-grams.
One worker and a fixed seed make the training deterministic. The result is cached in `cache_dir` under a key made
of the corpus file's sha256, the tokenizer's sha256 and the settings: a retry, or a second method over the same
corpus and tokenizer, reads it instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from gensim.models import FastText
from transformers import PreTrainedTokenizerBase

from langadapt.core.adaptation.config import AuxiliaryConfig
from langadapt.core.adaptation.corpus import require_documents
from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.tokens import Vocabulary

MIN_TOKENS = 10_000  # below this the vectors are noise: refuse rather than initialise from them
_MAX_SENTENCE = 10_000  # gensim silently truncates longer sentences
_ENCODE_BATCH = 256


@dataclass(frozen=True)
class AuxiliarySpace:
    vectors: np.ndarray  # [V_new, dim] float32, row i: token id i of the new vocabulary
    counts: np.ndarray  # [V_new] int64, occurrences of each token in the training text

    def save(self, path: str) -> None:
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".npz", delete=False) as handle:
            np.savez(handle, vectors=self.vectors, counts=self.counts)
        os.replace(handle.name, path)

    @classmethod
    def load(cls, path: str) -> AuxiliarySpace:
        with np.load(path) as data:
            return cls(vectors=data["vectors"], counts=data["counts"])


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(corpus: str, vocab: Vocabulary, config: AuxiliaryConfig, seed: int) -> str:
    parts = {
        "corpus": file_sha256(corpus),
        "tokenizer": hashlib.sha256(vocab.backend.to_str().encode()).hexdigest(),
        "config": config.model_dump(mode="json"),
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def token_words(vocab: Vocabulary) -> list[str]:
    """One distinct word per token id: its text (invalid UTF-8 escaped), suffixed with the id on a collision."""
    words: list[str] = []
    seen: set[str] = set()
    for token_id, key in enumerate(vocab.keys):
        word = key.value.decode("utf-8", errors="backslashreplace") if key is not None else ""
        if key is not None and key.kind != "text":
            word = f"<{key.kind}:{word}>"
        if not word or word in seen:
            word = f"{word}\x00{token_id}"
        seen.add(word)
        words.append(word)
    return words


def _token_ids(tokenizer: PreTrainedTokenizerBase, corpus: str, limit_chars: int | None) -> Iterator[list[int]]:
    batch: list[str] = []
    for doc in require_documents(corpus, limit_chars=limit_chars):
        batch.append(doc)
        if len(batch) == _ENCODE_BATCH:
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]
            batch = []
    if batch:
        yield from tokenizer(batch, add_special_tokens=False)["input_ids"]


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode("utf-8", errors="surrogatepass"))


def train_auxiliary(
    tokenizer: PreTrainedTokenizerBase, corpus: str, config: AuxiliaryConfig, seed: int
) -> AuxiliarySpace:
    vocab = Vocabulary(tokenizer)
    words = token_words(vocab)
    counts = np.zeros(vocab.size, dtype=np.int64)
    sentences: list[list[str]] = []
    for ids in _token_ids(tokenizer, corpus, config.train_chars):
        counts += np.bincount(np.asarray(ids, dtype=np.int64), minlength=vocab.size)[: vocab.size]
        for start in range(0, len(ids), _MAX_SENTENCE):
            sentences.append([words[i] for i in ids[start : start + _MAX_SENTENCE]])
    total = int(counts.sum())
    if total < MIN_TOKENS or int((counts >= config.min_count).sum()) < 2:
        raise AdaptationInputError(
            f"the corpus gives {total} tokens ({int((counts >= config.min_count).sum())} seen at least "
            f"{config.min_count} times): too little text to train the auxiliary space (at least {MIN_TOKENS} "
            "tokens needed)",
            code="corpus_too_small",
        )
    model = FastText(
        vector_size=config.dim,
        window=config.window,
        min_count=config.min_count,
        epochs=config.epochs,
        sg=0,  # CBOW, as FOCUS
        min_n=3,
        max_n=6,
        seed=seed,
        workers=1,  # more workers make the result depend on thread scheduling
        hashfxn=_stable_hash,  # the builtin hash of str changes between processes
    )
    model.build_vocab(corpus_iterable=sentences)
    model.train(corpus_iterable=sentences, total_examples=len(sentences), epochs=config.epochs)
    vectors = np.stack([model.wv[word] for word in words]).astype(np.float32)
    return AuxiliarySpace(vectors=vectors, counts=counts)


def auxiliary_space(
    tokenizer: PreTrainedTokenizerBase, corpus: str, config: AuxiliaryConfig, seed: int, cache_dir: str | None
) -> AuxiliarySpace:
    """The auxiliary space of `tokenizer` on `corpus`: read from `cache_dir` when there, else trained (and stored
    there when a cache folder is given)."""
    if cache_dir is None:
        return train_auxiliary(tokenizer, corpus, config, seed)
    path = os.path.join(cache_dir, f"auxiliary-{cache_key(corpus, Vocabulary(tokenizer), config, seed)}.npz")
    if os.path.exists(path):
        return AuxiliarySpace.load(path)
    space = train_auxiliary(tokenizer, corpus, config, seed)
    space.save(path)
    return space
