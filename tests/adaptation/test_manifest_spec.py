"""Stage manifests and the typed job spec."""

from __future__ import annotations

import hashlib

import pytest

from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.manifest import is_complete, read_manifest, write_manifest
from langadapt.core.adaptation.spec import AdaptationSpec, load_spec


def test_manifest_lists_sha256_and_size_and_detects_damage(tmp_path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "sub" / "b.txt").write_text("привет", encoding="utf-8")
    assert not is_complete(str(tmp_path))
    entries = write_manifest(str(tmp_path), {"stage": "x"})
    assert [(e.path, e.size) for e in entries] == [("a.bin", 3), ("sub/b.txt", 12)]
    assert entries[0].sha256 == hashlib.sha256(b"abc").hexdigest()
    assert read_manifest(str(tmp_path))["stage"] == "x"
    assert is_complete(str(tmp_path), verify_hashes=True)
    (tmp_path / "a.bin").write_bytes(b"abd")  # same size, different content
    assert is_complete(str(tmp_path)) and not is_complete(str(tmp_path), verify_hashes=True)
    (tmp_path / "sub" / "b.txt").unlink()
    assert not is_complete(str(tmp_path))


def test_spec_defaults_follow_the_paper() -> None:
    minimal = {"base_model": "b", "corpus": "c.jsonl", "heldout": "h"}
    spec = AdaptationSpec.model_validate({**minimal, "vocab": {"new_tokens": 1000}})
    assert spec.vocab.method == "extended" and spec.init.method == "mean"
    assert spec.cpt.trainable == "embeddings+head" and spec.cpt.lr == 1e-4 and spec.cpt.warmup_steps == 100
    assert spec.cpt.weight_decay == 0.1 and spec.propagation is None and spec.variants == []
    assert spec.evaluation.tasks == ["symbols_per_token", "bits_per_char", "copy_ru", "generation_speed"]
    assert spec.evaluation.limit == 50
    both = AdaptationSpec.model_validate(
        {**minimal, "instruct_model": "i", "propagation": {"variant": ["swap", "overlap", "swap"]}}
    )
    assert both.variants == ["swap", "overlap"]
    assert AdaptationSpec.model_validate({**minimal, "instruct_model": "i"}).variants == ["conversion"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("base_model: b\ncorpus: c\nheldout: h\nvocab: {method: bpe}\n", "vocab_size"),
        ("base_model: b\ncorpus: c\nheldout: h\nvocab: {method: optimized, new_tokens: 5}\n", "keep_tokens"),
        ("base_model: b\ncorpus: c\nheldout: h\nvocab: {new_tokens: 5}\ncpt: {trainable: all}\n", "cpt.trainable"),
        ("base_model: b\ncorpus: c\nheldout: h\nvocab: {new_tokens: 5}\nsurprise: 1\n", "surprise"),
        ("corpus: c\nheldout: h\nvocab: {new_tokens: 5}\n", "base_model"),
        ("base_model: [unclosed\n", "not valid YAML"),
        ("base_model: b\ncorpus: c\nheldout: h\ncpt: {steps: 20, warmup_steps: 100}\n", "cpt.warmup_steps"),
        ("base_model: b\ncorpus: c\nheldout: h\ncpt: {steps: 0}\n", "cpt.steps"),
        ("base_model: b\ncorpus: c\nheldout: h\npropagation: {variant: swap}\n", "propagation: .*instruct_model"),
        ("base_model: b\ncorpus: c\nheldout: h\ncalibration: {language: en}\n", "calibration.language: .*no effect"),
        (
            "base_model: b\ncorpus: c\nheldout: h\nvocab: {method: bpe, vocab_size: 900}\ncpt: {train_rows: new}\n",
            "cpt.train_rows",
        ),
        ("base_model: b\ncorpus: c\nheldout: h\ncpt: {source_mix: 0.1}\n", "cpt.source_corpus"),
        ("base_model: b\ncorpus: c\nheldout: h\ncpt: {source_mix: 0.7, source_corpus: en.txt}\n", "cpt.source_mix"),
        ("base_model: b\ncorpus: c\nheldout: h\nevaluation: {tasks: [copy_en]}\n", "evaluation.tasks: .*source"),
        ("base_model: b\ncorpus: c\nheldout: h\nevaluation: {tasks: [copy_ru, copy_ru]}\n", "twice"),
        ("base_model: b\ncorpus: c\nheldout: h\nevaluation: {tasks: [micro_avg, bits_per_char]}\n", "micro_avg"),
    ],
)
def test_bad_specs_name_the_field(tmp_path, body: str, message: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(body)
    with pytest.raises(AdaptationInputError, match=message):
        load_spec(str(path))
    with pytest.raises(AdaptationInputError, match="not found"):
        load_spec(str(tmp_path / "missing.yaml"))
