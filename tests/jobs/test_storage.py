"""Artifact storage: both backends must behave the same; S3 runs against a real HTTP endpoint (moto's server)."""

from __future__ import annotations

import hashlib
import os
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from langadapt.jobs.storage import (
    ArtifactStore,
    InvalidKey,
    LocalStore,
    ObjectNotFound,
    S3Store,
    StorageUnavailable,
    StoredObject,
    open_store,
    validate_key,
)
from tests.s3_server import free_port, moto_s3_server

PART_SIZE = 5 << 20  # the S3 minimum, so a small file already goes multipart
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
BAD_KEYS = ["", "/abs", "a/../b", "..", "a//b", "a\\b", "a%2Fb", "a/./b", "a\x00b", "a/.tmp-x"]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3_server() as endpoint:
        yield endpoint


def s3_store(endpoint: str, prefix: str = "", bucket: str | None = None, public_endpoint: str | None = None) -> S3Store:
    """A store in a fresh bucket unless one is given (moto accepts any credentials)."""
    bucket = bucket or f"test-{uuid.uuid4().hex}"
    return S3Store(
        bucket, prefix, endpoint, "test", "test", secure=False, public_endpoint=public_endpoint, part_size=PART_SIZE
    )


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        made: ArtifactStore = LocalStore(str(tmp_path / "store"))
    else:
        made = s3_store(request.getfixturevalue("s3_endpoint"))
    made.ensure_ready()
    return made


def write_random(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_put_stat_list_download_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    digest = write_random(tmp_path / "model.bin", 100_000)
    assert store.put_file("runs/1/model.bin", str(tmp_path / "model.bin")) == StoredObject("runs/1/model.bin", 100_000)
    assert store.put_bytes("runs/1/a.json", b"{}", "application/json") == StoredObject("runs/1/a.json", 2)
    store.put_bytes("runs/10/other.json", b"[]")

    assert store.stat("runs/1/model.bin") == StoredObject("runs/1/model.bin", 100_000)
    expected = [StoredObject("runs/1/a.json", 2), StoredObject("runs/1/model.bin", 100_000)]
    assert store.list("runs/1") == expected  # a folder: runs/10 is not under runs/1
    assert store.list("runs/1/") == expected
    assert [o.key for o in store.list("")] == ["runs/1/a.json", "runs/1/model.bin", "runs/10/other.json"]

    out = tmp_path / "out" / "nested" / "model.bin"
    store.download("runs/1/model.bin", str(out))
    assert sha256(out) == digest
    assert os.listdir(out.parent) == ["model.bin"]  # no temp file left behind

    store.put_bytes("runs/1/a.json", b"{}\n")  # overwrite
    assert store.stat("runs/1/a.json") == StoredObject("runs/1/a.json", 3)


def test_file_above_part_size_round_trips(store: ArtifactStore, tmp_path: Path) -> None:
    size = 11 << 20
    digest = write_random(tmp_path / "big.bin", size)
    assert store.put_file("big/weights.bin", str(tmp_path / "big.bin")) == StoredObject("big/weights.bin", size)
    if isinstance(store, S3Store):
        etag = store._client.stat_object(store.bucket, "big/weights.bin").etag
        assert etag is not None and etag.endswith("-3")  # 5 + 5 + 1 MiB parts
    store.download("big/weights.bin", str(tmp_path / "back.bin"))
    assert sha256(tmp_path / "back.bin") == digest


def test_iter_bytes(store: ArtifactStore) -> None:
    data = os.urandom(3000)
    store.put_bytes("x/blob", data)
    chunks = list(store.iter_bytes("x/blob", chunk_size=1000))
    assert b"".join(chunks) == data
    assert all(len(c) <= 1000 for c in chunks)


def test_read_range_and_version(store: ArtifactStore) -> None:
    data = bytes(range(256)) * 40
    store.put_bytes("a/b", data)
    assert b"".join(store.read_range("a/b", 1000, 5000, chunk_size=333)) == data[1000:6000]
    assert b"".join(store.read_range("a/b", 7, 0)) == b""
    with pytest.raises(ObjectNotFound):
        store.read_range("a/missing", 0, 1)  # raised by the call, before any chunk
    first = store.stat("a/b")
    time.sleep(0.01)
    store.put_bytes("a/b", data[::-1])
    second = store.stat("a/b")
    assert first is not None and second is not None and first.version and first.version != second.version


def test_missing_object(store: ArtifactStore, tmp_path: Path) -> None:
    store.put_bytes("x/present", b"1")
    with pytest.raises(ObjectNotFound):
        store.download("x/missing", str(tmp_path / "out" / "missing"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ObjectNotFound):
        store.iter_bytes("x/missing")  # raised before iteration, so an HTTP handler can still answer 404
    with pytest.raises(ObjectNotFound):
        store.iter_bytes("x")  # a folder is not an object
    assert store.stat("x/missing") is None
    assert store.stat("x") is None
    assert store.local_path("x/missing") is None
    assert store.list("nothing/here") == []


def test_delete_prefix(store: ArtifactStore) -> None:
    for key in ["runs/1/a", "runs/1/sub/b", "runs/10/c", "other/d"]:
        store.put_bytes(key, key.encode())
    assert store.delete_prefix("runs/1") == 2
    assert store.list("runs/1") == []
    assert [o.key for o in store.list("")] == ["other/d", "runs/10/c"]
    assert store.delete_prefix("runs/1/") == 0
    with pytest.raises(InvalidKey):
        store.delete_prefix("")  # never the whole store by accident


def test_s3_prefix_isolation(s3_endpoint: str) -> None:
    whole = s3_store(s3_endpoint)
    whole.ensure_ready()
    a = s3_store(s3_endpoint, "tenant/a", bucket=whole.bucket)
    b = s3_store(s3_endpoint, "tenant/b/", bucket=whole.bucket)
    a.put_bytes("x/1", b"a")
    b.put_bytes("x/2", b"bb")

    assert a.list("") == [StoredObject("x/1", 1)]
    assert b.list("x") == [StoredObject("x/2", 2)]
    assert b.stat("x/1") is None
    assert [o.key for o in whole.list("")] == ["tenant/a/x/1", "tenant/b/x/2"]
    assert b.delete_prefix("x") == 1
    assert a.stat("x/1") == StoredObject("x/1", 1)


@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys_are_refused(store: ArtifactStore, key: str) -> None:
    with pytest.raises(InvalidKey):
        validate_key(key)
    assert issubclass(InvalidKey, ValueError)
    calls = [
        lambda: store.put_bytes(key, b""),
        lambda: store.stat(key),
        lambda: store.iter_bytes(key),
        lambda: store.download(key, "/nonexistent/out"),
        lambda: store.local_path(key),
        lambda: store.presigned_get(key, timedelta(minutes=1)),
        lambda: store.delete_prefix(key),
    ]
    if key:  # "" lists the whole store
        calls.append(lambda: store.list(key))
    for call in calls:
        with pytest.raises(InvalidKey):
            call()


def test_valid_keys_pass() -> None:
    for key in ["a", "runs/1/model.safetensors", "a/b-c_d.e/f g", "ünï/кириллица"]:
        assert validate_key(key) == key


def test_local_store_stays_inside_root(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path / "store"))
    store.ensure_ready()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "store" / "link")
    with pytest.raises(InvalidKey):
        store.put_bytes("link/x", b"escape")
    assert not (tmp_path / "outside" / "x").exists()


def test_local_list_skips_in_flight_writes(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path))
    store.put_bytes("runs/a", b"1")
    (tmp_path / "runs" / ".tmp-0123").write_bytes(b"partial")
    assert store.list("runs") == [StoredObject("runs/a", 1)]
    assert store.delete_prefix("runs") == 1


def test_presigned_get(store: ArtifactStore, s3_endpoint: str) -> None:
    data = os.urandom(2048)
    store.put_bytes("runs/1/model.gguf", data)
    if isinstance(store, LocalStore):
        assert store.presigned_get("runs/1/model.gguf", timedelta(minutes=5)) is None
        return
    assert isinstance(store, S3Store)
    url = store.presigned_get("runs/1/model.gguf", timedelta(minutes=5), filename="model.gguf")
    assert url is not None and url.startswith(f"http://{s3_endpoint}/")
    with NO_PROXY.open(url, timeout=10) as response:
        assert response.read() == data
        assert "model.gguf" in response.headers.get("Content-Disposition", "")

    public = s3_store(s3_endpoint, bucket=store.bucket, public_endpoint=s3_endpoint)
    url = public.presigned_get("runs/1/model.gguf", timedelta(minutes=5))
    assert url is not None
    with NO_PROXY.open(url, timeout=10) as response:
        assert response.read() == data


def test_presigned_get_signs_for_public_endpoint() -> None:
    store = s3_store("minio:9000", public_endpoint="https://files.example.com")
    url = store.presigned_get("a/b", timedelta(minutes=5))  # no network: the region is given
    assert url is not None and url.startswith(f"https://files.example.com/{store.bucket}/a/b?")


def test_local_path(store: ArtifactStore) -> None:
    store.put_bytes("runs/1/report.json", b"{}")
    path = store.local_path("runs/1/report.json")
    if isinstance(store, S3Store):
        assert path is None
    else:
        assert path is not None and os.path.isabs(path)
        assert Path(path).read_bytes() == b"{}"


def test_ping(store: ArtifactStore) -> None:
    store.ping()


def test_ping_unreachable_s3_fails_fast() -> None:
    store = s3_store(f"127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(StorageUnavailable):
        store.ping()
    with pytest.raises(StorageUnavailable):
        store.put_bytes("a", b"1")
    assert time.monotonic() - started < 20


def test_ping_missing_bucket(s3_endpoint: str) -> None:
    with pytest.raises(StorageUnavailable):
        s3_store(s3_endpoint).ping()


def test_ping_local_root_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    store = LocalStore(str(tmp_path / "file"))
    with pytest.raises(StorageUnavailable):
        store.ping()
    with pytest.raises(StorageUnavailable):
        store.ensure_ready()


def test_open_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s3 = open_store("s3://bucket/some/prefix", endpoint="minio:9000", access_key="k", secret_key="s")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    s3 = open_store("s3://bucket", endpoint="minio:9000", access_key="k", secret_key="s")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "")
    with pytest.raises(ValueError, match="endpoint"):
        open_store("s3://bucket", endpoint=None, access_key="k", secret_key="s")

    local = open_store(f"file://{tmp_path}/a", endpoint=None, access_key=None, secret_key=None)
    assert isinstance(local, LocalStore) and local.root == str(tmp_path.resolve() / "a")
    monkeypatch.chdir(tmp_path)
    local = open_store("artifacts", endpoint=None, access_key=None, secret_key=None)
    assert isinstance(local, LocalStore) and local.root == str(tmp_path.resolve() / "artifacts")
    with pytest.raises(ValueError):
        open_store("gs://bucket", endpoint=None, access_key=None, secret_key=None)
