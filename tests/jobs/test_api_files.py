"""POST /v1/files: valid corpora are counted, hashed and stored; bad ones get a coded 4xx and leave nothing."""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma

import httpx
import pytest

RU = "Мороз и солнце; день чудесный!\nЕщё ты дремлешь, друг прелестный —\n\nПора, красавица, проснись.\n"


def _store(settings):
    return settings.open_store()


@pytest.mark.parametrize(
    ("name", "data", "documents"),
    [
        ("ru.txt", RU.encode(), 3),
        ("ru.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in RU.split("\n") if t).encode(), 3),
        ("ru.txt.gz", gzip.compress(RU.encode()), 3),
        ("ru.jsonl.xz", lzma.compress(json.dumps({"text": RU}).encode()), 1),
    ],
)
def test_upload_counts_hashes_and_stores(client, auth, settings, name, data, documents) -> None:
    response = client.post("/v1/files", headers=auth, files={"file": (name, data)})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["id"].startswith("file_") and body["filename"] == name
    assert body["bytes"] == len(data) and body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["documents"] == documents
    lines = [line for line in RU.split("\n") if line]
    assert body["chars"] == (len(RU) if documents == 1 else sum(map(len, lines)))
    stored = _store(settings).list("teams/")
    assert [obj.size for obj in stored] == [len(data)]
    assert client.get(f"/v1/files/{body['id']}", headers=auth).json() == body
    assert client.get("/v1/files", headers=auth).json() == {"data": [body], "next": None}


@pytest.mark.parametrize(
    ("name", "data", "status", "code"),
    [
        ("empty.txt", b"", 422, "empty_file"),
        ("blank.txt", b"\n \n\t\n", 422, "empty_corpus"),
        ("binary.txt", b"\x7fELF\x02\x01\x00\x00" * 64, 422, "binary_file"),
        ("latin1.txt", "café crème brûlée\n".encode("latin-1"), 422, "not_utf8"),
        ("corrupt.txt.gz", b"\x1f\x8b\x08\x00" + b"not really gzip" * 10, 422, "corrupt_file"),
        ("corrupt.jsonl.xz", b"\xfd7zXZ\x00" + b"garbage" * 10, 422, "corrupt_file"),
        ("bad.jsonl", b'{"text": "ok"}\n{"txt": 1}\n', 422, "invalid_jsonl"),
        ("model.bin", b"weights", 422, "unsupported_file_type"),
        ("big.txt", b"a" * 5000 + b"\n", 413, "file_too_large"),
        ("surrogate.jsonl", b'{"text": "ok"}\n{"text": "half \\ud800 a pair"}\n', 422, "invalid_unicode"),
        ("deep.jsonl", b"[" * 1500 + b"]" * 1500 + b"\n", 422, "invalid_jsonl"),
        ("long-line.txt.gz", gzip.compress(b"short\n" + b"a" * 5000 + b"\n"), 422, "line_too_long"),
        ("bomb.txt.xz", lzma.compress(b"line of text\n" * 2000), 422, "corpus_too_large"),
    ],
)
def test_bad_uploads_are_refused_and_leave_nothing(make_settings, name, data, status, code) -> None:
    from fastapi.testclient import TestClient

    from langadapt.api.app import create_app
    from tests.jobs.conftest import new_team_key

    settings = make_settings(max_upload_bytes=4096, max_line_chars=3500, max_corpus_chars=20_000)
    with TestClient(create_app(settings)) as client:
        auth = {"Authorization": f"Bearer {new_team_key(settings)}"}
        response = client.post("/v1/files", headers=auth, files={"file": (name, data)})
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code and error["param"] == "file" and error["message"]
        assert "Traceback" not in response.text and "/tmp" not in error["message"]
        assert client.get("/v1/files", headers=auth).json()["data"] == []
    assert _store(settings).list("") == []


def test_files_need_a_valid_key_and_are_per_team(client, auth, settings, upload) -> None:
    from tests.jobs.conftest import new_team_key

    assert client.get("/v1/files").json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/files", headers={"Authorization": "Bearer la_nope"}).status_code == 401
    mine = upload(RU)
    other = {"Authorization": f"Bearer {new_team_key(settings)}"}
    assert client.get(f"/v1/files/{mine['id']}", headers=other).status_code == 404
    assert client.get("/v1/files", headers=other).json() == {"data": [], "next": None}


def test_file_pagination(client, auth, upload) -> None:
    ids = [upload(f"document {i}\n")["id"] for i in range(5)]
    first = client.get("/v1/files?limit=2", headers=auth).json()
    assert [f["id"] for f in first["data"]] == ids[::-1][:2] and first["next"] == ids[3]
    rest = client.get(f"/v1/files?limit=10&after={first['next']}", headers=auth).json()
    assert [f["id"] for f in rest["data"]] == ids[::-1][2:] and rest["next"] is None


def _raw_post(port: int, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], float]:
    """Send a request head and the first `body` bytes of a longer declared body; return the status, headers and
    seconds until the answer came (the server answers without reading the rest)."""
    import socket
    import time

    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        started = time.perf_counter()
        conn.sendall(f"POST /v1/files HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode() + body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += conn.recv(65536)
        elapsed = time.perf_counter() - started
    status_line, *lines = answer.split(b"\r\n\r\n")[0].decode().split("\r\n")
    return int(status_line.split()[1]), dict(line.split(": ", 1) for line in lines), elapsed


def test_uploads_are_refused_before_their_body_is_read(settings) -> None:
    from tests.jobs.conftest import LiveServer, new_team_key

    boundary = "b0undary"
    form = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="c.txt"\r\n\r\n'.encode()
    with LiveServer(settings) as server:
        for auth in ({}, {"Authorization": "Bearer la_garbage"}):  # 300 MB declared, 64 KiB sent
            status, _, seconds = _raw_post(
                server.port, {**form, **auth, "Content-Length": str(300 << 20)}, part + b"a" * (64 << 10)
            )
            assert status == 401 and seconds < 1
        key = {"Authorization": f"Bearer {new_team_key(settings)}"}
        status, _, seconds = _raw_post(server.port, {**form, **key, "Content-Length": str(3 << 30)}, part)
        assert status == 413 and seconds < 1
        # No declared length: the body is counted as it arrives and cut off past the limit.
        with httpx.Client(base_url=server.url, headers={**key, **form}, timeout=30) as api:
            limit = settings.max_upload_bytes

            def chunks():
                yield part
                sent = 0
                while sent <= limit + (2 << 20):
                    yield b"a" * (1 << 20)
                    sent += 1 << 20

            response = api.post("/v1/files", content=chunks())
    assert response.status_code == 413 and response.json()["error"]["code"] == "file_too_large"
