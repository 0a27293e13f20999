"""The installed project is one namespace, `langadapt.*`: nothing else claims a top-level import name, and every
module imports without the repository on `sys.path` (so no module leans on the old top-level names)."""

from __future__ import annotations

import importlib
import pkgutil
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "jobs", "api", "worker", "cli", "client")


def test_every_module_imports_from_outside_the_repository(tmp_path: Path) -> None:
    modules = []
    for package in PACKAGES:
        top = importlib.import_module(f"langadapt.{package}")
        modules.append(top.__name__)
        walked = pkgutil.walk_packages(top.__path__, f"{top.__name__}.")
        modules += [info.name for info in walked if not info.name.endswith("__main__")]
    assert len(modules) > 60
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('ok')"
    done = subprocess.run(
        [sys.executable, "-c", code, *modules], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


def test_the_wheel_installs_only_the_langadapt_namespace(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: setuptools builds inside the source tree
    for folder in (*PACKAGES, "migrations"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("langadapt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")}
    assert top_level == {"langadapt"}
    assert "langadapt/__init__.py" not in names  # an implicit namespace package: the folders map into it
    for expected in (
        "langadapt/core/adaptation/pipeline.py",
        "langadapt/migrations/env.py",
        "langadapt/api/app.py",
        "langadapt/client/client.py",
        "langadapt/api/dashboard/templates/job.html",  # the dashboard's templates and stylesheet ship with it
        "langadapt/api/dashboard/static/dashboard.css",
    ):
        assert expected in names
    assert any(name.startswith("langadapt/migrations/versions/") for name in names)
    assert "langadapt/migrations/script.py.mako" in names


def test_the_service_side_never_imports_torch(tmp_path: Path) -> None:
    """The API and the job domain validate and record jobs without loading training code."""
    code = (
        "import sys\n"
        "import langadapt.api.app, langadapt.jobs.attempt, langadapt.jobs.artifacts, langadapt.jobs.progress\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"
