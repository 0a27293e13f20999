"""`langadapt admin`: teams and key rotation on the embedded database."""

from __future__ import annotations

import json

import pytest

from langadapt.cli.main import main
from langadapt.jobs.db import make_engine, make_sessionmaker
from langadapt.jobs.settings import Settings
from langadapt.jobs.teams import authenticate


def _run(capsys, *argv: str) -> dict:
    assert main(["admin", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_keys_are_created_listed_and_revoked(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("DATABASE_URL", "BROKER_URL", "STORAGE_URL"):
        monkeypatch.delenv(f"LANGADAPT_{name}", raising=False)
    monkeypatch.setenv("LANGADAPT_HOME", str(tmp_path / "data"))
    first = _run(capsys, "create-team", "research")
    second = _run(capsys, "create-key", "research")
    assert first["api_key"].startswith("la_") and second["api_key"] != first["api_key"]
    keys = _run(capsys, "list-keys", "research")["keys"]
    assert [k["hint"] for k in keys] == [f"...{first['api_key'][-4:]}", f"...{second['api_key'][-4:]}"]
    assert first["api_key"] not in json.dumps(keys)  # only hashes are stored, only hints are shown
    revoked = _run(capsys, "revoke-key", keys[0]["id"])
    assert revoked["revoked_at"] is not None

    engine = make_engine(Settings(_env_file=None).database)
    with make_sessionmaker(engine)() as session:
        assert authenticate(session=session, key=first["api_key"]) is None
        assert authenticate(session=session, key=second["api_key"]).name == "research"
    engine.dispose()
    with pytest.raises(SystemExit, match="team 'research' exists"):
        main(["admin", "create-team", "research"])
    with pytest.raises(SystemExit, match="no key 'key_nope'"):
        main(["admin", "revoke-key", "key_nope"])
    with pytest.raises(SystemExit, match="no team 'nobody'"):
        main(["admin", "create-key", "nobody"])
