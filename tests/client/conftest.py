"""One embedded service (`langadapt serve` in a subprocess) per test module, and a small real job's inputs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.embedded import EmbeddedService
from tests.jobs.conftest import model_root  # noqa: F401  (the tiny base / instruct models under an allowed root)


@pytest.fixture(scope="module")
def service(tmp_path_factory, model_root) -> Iterator[EmbeddedService]:  # noqa: F811
    with EmbeddedService(tmp_path_factory.mktemp("service"), model_root) as running:
        yield running


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "ru.txt"
    path.write_text("".join(f"Строка номер {i}: мороз и солнце, день чудесный.\n" for i in range(400)))
    return path


def small_job(models: Path, corpus_file: str, **overrides) -> dict:
    return {
        "base_model": str(models / "base"),
        "corpus_file": corpus_file,
        "vocab": {"method": "extended", "new_tokens": 300},
        "cpt": {"steps": 4, "seq_len": 32, "batch_size": 2, "grad_accum": 1, "warmup_steps": 1, "log_every": 1},
        "evaluation": {"tasks": ["symbols_per_token", "bits_per_char"], "heldout_chars": 2000},
        "labels": {"suite": "client"},
        **overrides,
    }
