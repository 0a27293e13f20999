"""Where the embedded service keeps its data: from settings, never from the current folder."""

from __future__ import annotations

import os

import platformdirs

from langadapt.jobs.settings import Settings


def test_home_is_the_user_data_directory_unless_langadapt_home_says(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LANGADAPT_HOME", raising=False)
    default = Settings(_env_file=None)
    assert default.home_path == os.path.abspath(platformdirs.user_data_dir("langadapt"))
    assert not default.home_path.startswith(str(tmp_path))
    assert default.database == f"sqlite:///{os.path.join(default.home_path, 'langadapt.db')}"
    monkeypatch.setenv("LANGADAPT_HOME", str(tmp_path / "elsewhere"))
    configured = Settings(_env_file=None)
    assert configured.home_path == str(tmp_path / "elsewhere")
    assert configured.storage == str(tmp_path / "elsewhere" / "artifacts")
    assert configured.work == str(tmp_path / "elsewhere" / "work")


def test_queue_names_carry_the_prefix(monkeypatch) -> None:
    monkeypatch.setenv("LANGADAPT_QUEUE_PREFIX", "staging:")
    settings = Settings(_env_file=None)
    assert (settings.queue("gpu"), settings.queue("maintenance")) == ("staging:gpu", "staging:maintenance")
