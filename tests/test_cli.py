"""The `langadapt` CLI end to end on tiny saved models: JSON output, atomic directories, exit code 2 on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from langadapt.cli.main import main
from langadapt.core.adaptation.sources import load_model, load_tokenizer, save_pretrained


def _run(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    return code, (json.loads(out[-1]) if out else None), captured.err


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tiny_model, english_byte_level_tokenizer):
    root = tmp_path_factory.mktemp("models")
    base = tiny_model(len(english_byte_level_tokenizer), tied=False, seed=5)
    save_pretrained(base, english_byte_level_tokenizer, str(root / "base"))
    instruct = tiny_model(len(english_byte_level_tokenizer), tied=False, seed=6)
    save_pretrained(instruct, english_byte_level_tokenizer, str(root / "instruct"))
    save_pretrained(tiny_model(300), english_byte_level_tokenizer, str(root / "mismatched"))  # 300 rows, 1200 tokens
    return root


def test_full_cli_flow(capsys, tmp_path, tiny_dirs, ru_corpus) -> None:
    code, stats, _ = _run(
        capsys,
        "tokenizer",
        "stats",
        "--tokenizer",
        str(tiny_dirs / "base"),
        "--corpus",
        ru_corpus,
        "--limit-chars",
        "5000",
    )
    assert (
        code == 0
        and stats["chars"] == 5000
        and stats["chars_per_token"] == pytest.approx(5000 / stats["tokens"], abs=1e-3)
    )

    vocab_dir = tmp_path / "vocab"
    code, report, _ = _run(
        capsys,
        "vocab",
        "build",
        "--method",
        "extended",
        "--source",
        str(tiny_dirs / "base"),
        "--corpus",
        ru_corpus,
        "--new-tokens",
        "1500",
        "--out",
        str(vocab_dir),
    )
    assert code == 0 and report["method"] == "extended" and report["new_tokens"] > 500
    assert json.loads((vocab_dir / "vocab_report.json").read_text()) == report
    assert len(load_tokenizer(str(vocab_dir))) == report["vocab_size"]

    code, init, _ = _run(
        capsys,
        "embed",
        "init",
        "--model",
        str(tiny_dirs / "base"),
        "--tokenizer",
        str(vocab_dir),
        "--init",
        "mean",
        "--scale",
        "0.9",
        "--out",
        str(tmp_path / "adapted"),
    )
    assert code == 0 and init["vocab_size"] == report["vocab_size"] and init["new_row_scale"] == 0.9
    adapted, adapted_tok = load_model(str(tmp_path / "adapted"))
    assert adapted.get_input_embeddings().weight.shape[0] == len(adapted_tok) == report["vocab_size"]

    code, prop, _ = _run(
        capsys,
        "propagate",
        "--base",
        str(tiny_dirs / "base"),
        "--adapted-base",
        str(tmp_path / "adapted"),
        "--instruct",
        str(tiny_dirs / "instruct"),
        "--variant",
        "conversion",
        "--out",
        str(tmp_path / "out"),
    )
    assert code == 0 and prop["variant"] == "conversion" and prop["vocab_size"] == report["vocab_size"]
    result, result_tok = load_model(str(tmp_path / "out"))
    original, _ = load_model(str(tiny_dirs / "instruct"))
    for name, value in original.model.layers.state_dict().items():
        assert torch.equal(result.model.layers.state_dict()[name], value)
    assert result_tok.chat_template is not None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tokenizer", "stats", "--tokenizer", "{base}", "--corpus", "{missing}"], "not found"),
        (["tokenizer", "stats", "--tokenizer", "{base}", "--corpus", "{binary}"], "binary"),
        (
            [
                "vocab",
                "build",
                "--method",
                "bpe",
                "--source",
                "{base}",
                "--corpus",
                "{empty}",
                "--vocab-size",
                "900",
                "--out",
                "{out}",
            ],
            "empty",
        ),
        (
            [
                "vocab",
                "build",
                "--method",
                "bpe",
                "--source",
                "{base}",
                "--corpus",
                "{latin1}",
                "--vocab-size",
                "900",
                "--out",
                "{out}",
            ],
            "UTF-8",
        ),
        (
            ["embed", "init", "--model", "{mismatched}", "--tokenizer", "{base}", "--init", "mean", "--out", "{out}"],
            "does not match",
        ),
        (
            ["embed", "init", "--model", "{base}", "--tokenizer", "{base}", "--init", "focus", "--out", "{out}"],
            "needs --corpus",
        ),
        (
            ["embed", "init", "--model", "{base}", "--tokenizer", "{base}", "--init", "mean", "--scale", "fit"]
            + ["--out", "{out}"],
            "needs --corpus",
        ),
        (
            ["embed", "init", "--model", "{base}", "--tokenizer", "{base}", "--init", "mean", "--scale", "big"]
            + ["--out", "{out}"],
            "--scale takes a number or 'fit'",
        ),
        (
            ["embed", "init", "--model", "{base}", "--tokenizer", "{base}", "--init", "omp", "--corpus", "{empty}"]
            + ["--neighbours", "5", "--out", "{out}"],
            "init.neighbours only applies",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_output(capsys, tmp_path, tiny_dirs, argv, message) -> None:
    files = {
        "missing": tmp_path / "nope.txt",
        "binary": tmp_path / "b.txt",
        "empty": tmp_path / "e.jsonl",
        "latin1": tmp_path / "l.txt",
        "out": tmp_path / "out",
        "base": tiny_dirs / "base",
        "mismatched": tiny_dirs / "mismatched",
    }
    files["binary"].write_bytes(b"\x00\x01\x02\xff" * 50)
    files["empty"].write_text("\n\n")
    files["latin1"].write_bytes("d\xe9j\xe0 vu".encode("latin-1"))
    code, _, err = _run(capsys, *[a.format(**{k: str(v) for k, v in files.items()}) for a in argv])
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("langadapt: error:") and message in err
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out.tmp")]


def test_unknown_method_is_a_usage_error(tmp_path) -> None:
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "vocab",
            "build",
            "--method",
            "wordpiece",
            "--source",
            "x",
            "--corpus",
            "y",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert process.returncode == 2 and "invalid choice: 'wordpiece'" in process.stderr
