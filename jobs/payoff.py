"""The payoff of a vocabulary before a job runs: chars/token of the source tokenizer and of the proposed vocabulary
on a sample of the uploaded corpus (its first `SAMPLE_CHARS` characters; the first tenth held out).

The proposed vocabulary is built by the real method (`langadapt vocab build`, the job's vocab settings) in a
subprocess, so the service process never loads training code. Results are cached per (corpus sha256, base model,
vocab settings) under the service's home folder: the same estimate twice builds once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

from sqlalchemy.orm import Session

from langadapt.core.adaptation.corpus import iter_documents
from langadapt.jobs.catalogue import local_location
from langadapt.jobs.files import fetch_file
from langadapt.jobs.models import File
from langadapt.jobs.settings import Settings
from langadapt.jobs.spec import JobRequest
from langadapt.jobs.storage import ArtifactStore

log = logging.getLogger("langadapt.jobs")

SAMPLE_CHARS = 2_000_000


@dataclass(frozen=True)
class Payoff:
    sample_chars: int
    source_chars_per_token: float
    proposed_chars_per_token: float
    proposed: str
    gain: float
    cached: bool = False


def measure_payoff(session: Session, store: ArtifactStore, settings: Settings, request: JobRequest) -> Payoff | None:
    """None when the base model is not on this machine's disk (s3://) or the quick build fails (logged)."""
    source = local_location(request.base_model, settings)
    corpus = session.get(File, request.corpus_file)
    if source is None or corpus is None:
        return None
    vocab = request.vocab.model_dump(mode="json", exclude={"train_chars", "heldout_chars", "source_corpus"})
    key = hashlib.sha256(json.dumps([corpus.sha256, request.base_model, vocab, SAMPLE_CHARS]).encode()).hexdigest()
    cache = os.path.join(settings.home_path, "cache", "payoff", f"{key}.json")
    if os.path.isfile(cache):
        with open(cache, encoding="utf-8") as handle:
            return Payoff(**{**json.load(handle), "cached": True})
    with tempfile.TemporaryDirectory(prefix="langadapt-payoff-") as tmp:
        sample = os.path.join(tmp, "sample.jsonl")
        chars = _write_sample(fetch_file(store, corpus, tmp), sample)
        command = [sys.executable, "-m", "langadapt.cli", "vocab", "build", "--method", request.vocab.method]
        command += ["--source", source, "--corpus", sample, "--heldout-chars", str(max(chars // 10, 1))]
        command += ["--out", os.path.join(tmp, "vocab"), *_method_options(request)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=settings.payoff_timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("payoff build timed out after %s s", settings.payoff_timeout_s)
            return None
        if done.returncode != 0:
            log.warning("payoff build failed: %s", done.stderr[-2000:])
            return None
        report = json.loads(done.stdout.strip().splitlines()[-1])
    payoff = Payoff(
        sample_chars=chars,
        source_chars_per_token=report["source_chars_per_token"],
        proposed_chars_per_token=report["chars_per_token"],
        proposed=f"{request.vocab.method} vocabulary of {report['vocab_size']} tokens built on the sample",
        gain=round(report["chars_per_token"] / report["source_chars_per_token"], 4),
    )
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(cache), delete=False, suffix=".tmp") as handle:
        json.dump(asdict(payoff), handle)
    os.replace(handle.name, cache)
    return payoff


def _write_sample(corpus: str, sample: str) -> int:
    chars = 0
    with open(sample, "w", encoding="utf-8") as out:
        for text in iter_documents(corpus, limit_chars=SAMPLE_CHARS):
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            chars += len(text)
    return chars


def _method_options(request: JobRequest) -> list[str]:
    vocab = request.vocab
    options = {
        "--vocab-size": vocab.vocab_size if vocab.method in ("bpe", "unigram") else None,
        "--new-tokens": vocab.new_tokens if vocab.method in ("extended", "optimized") else None,
        "--keep-tokens": vocab.keep_tokens if vocab.method == "optimized" else None,
        "--keep-by": vocab.keep_by if vocab.method == "optimized" else None,
        "--priority": vocab.priority if vocab.method == "extended" else None,
    }
    return [part for name, value in options.items() if value is not None for part in (name, str(value))]
