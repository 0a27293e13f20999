"""Artifact storage behind one interface: a local folder (embedded mode) or an S3 bucket (MinIO, AWS, ...).

Keys are "/"-separated relative paths, validated the same way by both backends so a key that works locally works
on S3 and can never escape the store. A prefix names a folder: "runs/1" and "runs/1/" both mean everything under
runs/1/, never runs/10/, so deleting one job's artifacts cannot touch another's.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import BinaryIO, Protocol
from urllib.parse import quote, urlsplit
from urllib.request import url2pathname

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import MinioException, S3Error, ServerError

# In-flight writes are sibling files with this prefix; keys may not use it, so listing can skip them safely.
_TMP_PREFIX = ".tmp-"
_MAX_KEY_BYTES = 1024  # the S3 limit, enforced for both backends
_MIN_PART_SIZE, _MAX_PART_SIZE = 5 << 20, 5 << 30  # S3 multipart bounds


class StorageError(Exception):
    """A storage operation failed."""


class StorageUnavailable(StorageError):
    """The store cannot be reached (connection error, timeout, 5xx after retries): retry later, not a bad request."""


class ObjectNotFound(StorageError):
    """No object under this key."""


class InvalidKey(StorageError, ValueError):
    """The key is not a safe relative "/"-separated path."""


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative path, else raise InvalidKey (no traversal, no ambiguous encodings)."""
    if not key:
        raise InvalidKey("empty key")
    if len(key.encode()) > _MAX_KEY_BYTES:
        raise InvalidKey(f"key longer than {_MAX_KEY_BYTES} bytes")
    if "\\" in key or "%" in key or any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise InvalidKey(f"key {key!r} contains a backslash, '%' or a control character")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKey(f"key {key!r} has an empty, '.' or '..' segment (or a leading '/')")
        if segment.startswith(_TMP_PREFIX):
            raise InvalidKey(f"key {key!r} uses the reserved {_TMP_PREFIX!r} prefix")
    return key


def _validate_prefix(prefix: str) -> str:
    """Validate a folder prefix and return it without its optional trailing "/"."""
    return validate_key(prefix.removesuffix("/"))


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    version: str = field(default="", compare=False)  # from `stat`: changes when rewritten (S3 ETag, local mtime)


class ArtifactStore(Protocol):
    """What the api and the worker need from artifact storage; see LocalStore and S3Store."""

    def ensure_ready(self) -> None:
        """Create the root folder or bucket if missing (at start-up)."""

    def ping(self) -> None:
        """Raise StorageUnavailable unless the store is usable (readiness probe)."""

    def put_file(self, key: str, path: str) -> StoredObject:
        """Upload a local file; readers never see a partly written object."""

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> StoredObject:
        """Store a small in-memory object."""

    def download(self, key: str, path: str) -> None:
        """Copy an object to a local path atomically, creating parent folders; ObjectNotFound if missing."""

    def iter_bytes(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Stream an object; ObjectNotFound is raised by this call, before any chunk, so a response can still 404."""

    def read_range(self, key: str, offset: int, length: int, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Stream `length` bytes from `offset`; ObjectNotFound is raised by this call, before any chunk."""

    def stat(self, key: str) -> StoredObject | None:
        """The object's size and version, or None if missing."""

    def list(self, prefix: str) -> builtins.list[StoredObject]:
        """All objects under a folder prefix ("" for the whole store), recursively, sorted by key."""

    def delete_prefix(self, prefix: str) -> int:
        """Delete everything under a (non-empty) folder prefix; return how many objects were removed."""

    def presigned_get(self, key: str, expires: timedelta, filename: str | None = None) -> str | None:
        """A time-limited download URL (as an attachment named `filename`), or None if the backend has none."""

    def local_path(self, key: str) -> str | None:
        """The object's file path if it is a local file (to serve it directly), else None."""


@contextlib.contextmanager
def _atomic_write(dest: str) -> Iterator[BinaryIO]:
    """Write a sibling temp file, then rename it over `dest`: `dest` is either absent, old or complete."""
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f"{_TMP_PREFIX}{secrets.token_hex(8)}")
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _save(chunks: Iterator[bytes], path: str) -> None:
    with _atomic_write(path) as f:
        for chunk in chunks:
            f.write(chunk)


class LocalStore:
    """Objects are files under `root` (embedded mode and tests)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)

    def _path(self, key: str) -> str:
        path = os.path.realpath(os.path.join(self.root, *validate_key(key).split("/")))
        if os.path.commonpath([self.root, path]) != self.root:  # a symlink inside the store pointing out of it
            raise InvalidKey(f"key {key!r} resolves outside the store")
        return path

    def _open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise ObjectNotFound(key) from e

    def ensure_ready(self) -> None:
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise StorageUnavailable(f"cannot create {self.root}: {e}") from e

    def ping(self) -> None:
        if not (os.path.isdir(self.root) and os.access(self.root, os.W_OK | os.X_OK)):
            raise StorageUnavailable(f"{self.root} is not a writable folder")

    def put_file(self, key: str, path: str) -> StoredObject:
        dest = self._path(key)
        with open(path, "rb") as src, _atomic_write(dest) as f:
            shutil.copyfileobj(src, f, 1 << 20)
            size = f.tell()
        return StoredObject(key, size)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> StoredObject:
        """`content_type` is not kept: files are served with a type guessed from their name."""
        with _atomic_write(self._path(key)) as f:
            f.write(data)
        return StoredObject(key, len(data))

    def download(self, key: str, path: str) -> None:
        _save(self.iter_bytes(key), path)

    def iter_bytes(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        return self._chunks(self._open(key), chunk_size)

    @staticmethod
    def _chunks(f: BinaryIO, chunk_size: int, length: int | None = None) -> Iterator[bytes]:
        """The file's bytes from where it stands, up to `length` (all when None)."""
        with f:
            left = length
            while left is None or left > 0:
                chunk = f.read(chunk_size if left is None else min(chunk_size, left))
                if not chunk:
                    return
                if left is not None:
                    left -= len(chunk)
                yield chunk

    def read_range(self, key: str, offset: int, length: int, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        f = self._open(key)
        f.seek(offset)
        return self._chunks(f, chunk_size, length)

    def stat(self, key: str) -> StoredObject | None:
        path = self.local_path(key)
        if path is None:
            return None
        info = os.stat(path)
        return StoredObject(key, info.st_size, str(info.st_mtime_ns))

    def list(self, prefix: str) -> builtins.list[StoredObject]:
        base = self._path(_validate_prefix(prefix)) if prefix else self.root
        found = []
        for folder, _, files in os.walk(base):
            for name in files:
                if not name.startswith(_TMP_PREFIX):
                    path = os.path.join(folder, name)
                    key = os.path.relpath(path, self.root).replace(os.sep, "/")
                    found.append(StoredObject(key, os.path.getsize(path)))
        return sorted(found, key=lambda o: o.key)

    def delete_prefix(self, prefix: str) -> int:
        base = self._path(_validate_prefix(prefix))
        removed = len(self.list(prefix))
        if os.path.isdir(base):
            shutil.rmtree(base)
        return removed

    def presigned_get(self, key: str, expires: timedelta, filename: str | None = None) -> str | None:
        validate_key(key)
        return None

    def local_path(self, key: str) -> str | None:
        path = self._path(key)
        return path if os.path.isfile(path) else None


@contextlib.contextmanager
def _s3_errors(what: str) -> Iterator[None]:
    """Translate SDK and transport errors into this module's exceptions."""
    try:
        yield
    except S3Error as e:
        if e.code == "NoSuchKey":
            raise ObjectNotFound(what) from e
        raise StorageError(f"{what}: {e.code}: {e.message}") from e
    except (ServerError, urllib3.exceptions.HTTPError) as e:
        raise StorageUnavailable(f"{what}: {e}") from e
    except MinioException as e:
        raise StorageError(f"{what}: {e}") from e


def _endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
    """Accept "host:port" (TLS per `secure`) or "http(s)://host:port" (a public endpoint often differs in TLS)."""
    if "://" not in endpoint:
        return endpoint, secure
    url = urlsplit(endpoint)
    if url.scheme not in ("http", "https") or url.path.strip("/"):
        raise ValueError(f"S3 endpoint must be host:port or http(s)://host:port, got {endpoint!r}")
    return url.netloc, url.scheme == "https"


def content_disposition(filename: str) -> str:
    """RFC 6266: an ASCII fallback for old clients plus the exact UTF-8 name."""
    fallback = filename.encode("ascii", "replace").decode().replace('"', "_").replace("\\", "_")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


class S3Store:
    """Objects are `prefix/key` in an S3 bucket, through the MinIO SDK."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        endpoint: str,
        access_key: str,
        secret_key: str,
        *,
        secure: bool,
        region: str = "us-east-1",
        public_endpoint: str | None = None,
        part_size: int = 64 << 20,
        timeout_s: float = 30.0,
    ) -> None:
        if not _MIN_PART_SIZE <= part_size <= _MAX_PART_SIZE:
            raise ValueError(f"part_size must be between 5 MiB and 5 GiB, got {part_size}")
        self.bucket = bucket
        self.prefix = _validate_prefix(prefix) if prefix else ""
        self.part_size = part_size
        # The SDK's default client waits 5 minutes per attempt and retries 5 times: an outage would hang requests.
        http = urllib3.PoolManager(
            maxsize=10,  # fput_object uploads parts in parallel
            timeout=urllib3.Timeout(connect=5, read=timeout_s),
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )
        host, tls = _endpoint(endpoint, secure)
        # An explicit region spares a bucket-location request, and lets presigning work offline.
        self._client = Minio(host, access_key, secret_key, secure=tls, region=region, http_client=http)
        self._signer = self._client
        if public_endpoint:
            public_host, public_tls = _endpoint(public_endpoint, secure)
            self._signer = Minio(public_host, access_key, secret_key, secure=public_tls, region=region)

    def _name(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _folder(self, prefix: str) -> str:
        """The object-name prefix of a folder, with its trailing "/" ("" for the whole bucket)."""
        if prefix:
            return self._name(_validate_prefix(prefix)) + "/"
        return f"{self.prefix}/" if self.prefix else ""

    def ensure_ready(self) -> None:
        with _s3_errors(f"bucket {self.bucket}"):
            if self._client.bucket_exists(self.bucket):
                return
            try:
                self._client.make_bucket(self.bucket)
            except S3Error as e:
                if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):  # another process won the race
                    raise

    def ping(self) -> None:
        with _s3_errors(f"bucket {self.bucket}"):
            exists = self._client.bucket_exists(self.bucket)
        if not exists:
            raise StorageUnavailable(f"bucket {self.bucket} does not exist")

    def put_file(self, key: str, path: str) -> StoredObject:
        with _s3_errors(key):
            self._client.fput_object(self.bucket, self._name(key), path, part_size=self.part_size)
        return StoredObject(key, os.path.getsize(path))

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> StoredObject:
        with _s3_errors(key):
            self._client.put_object(self.bucket, self._name(key), io.BytesIO(data), len(data), content_type)
        return StoredObject(key, len(data))

    def download(self, key: str, path: str) -> None:
        _save(self.iter_bytes(key), path)

    def iter_bytes(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        with _s3_errors(key):
            response = self._client.get_object(self.bucket, self._name(key))
        return self._chunks(response, key, chunk_size)

    def read_range(self, key: str, offset: int, length: int, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        if length == 0:
            return iter(())
        with _s3_errors(key):
            response = self._client.get_object(self.bucket, self._name(key), offset=offset, length=length)
        return self._chunks(response, key, chunk_size)

    @staticmethod
    def _chunks(response: urllib3.BaseHTTPResponse, key: str, chunk_size: int) -> Iterator[bytes]:
        try:
            with _s3_errors(key):
                yield from response.stream(chunk_size)
        finally:
            response.close()
            response.release_conn()

    def stat(self, key: str) -> StoredObject | None:
        try:
            with _s3_errors(key):
                info = self._client.stat_object(self.bucket, self._name(key))
        except ObjectNotFound:
            return None
        return StoredObject(key, info.size or 0, info.etag or "")

    def list(self, prefix: str) -> builtins.list[StoredObject]:
        folder = self._folder(prefix)
        skip = len(f"{self.prefix}/") if self.prefix else 0
        with _s3_errors(f"list {prefix!r}"):
            objects = self._client.list_objects(self.bucket, prefix=folder, recursive=True)
            found = [StoredObject(o.object_name[skip:], o.size or 0) for o in objects if o.object_name]
        return sorted(found, key=lambda o: o.key)

    def delete_prefix(self, prefix: str) -> int:
        folder = self._folder(_validate_prefix(prefix))
        with _s3_errors(f"delete {prefix!r}"):
            names = [o.object_name for o in self._client.list_objects(self.bucket, prefix=folder, recursive=True)]
            errors = list(self._client.remove_objects(self.bucket, [DeleteObject(n) for n in names if n]))
        if errors:
            raise StorageError(f"delete {prefix!r}: {len(errors)} objects failed, e.g. {errors[0]}")
        return len(names)

    def presigned_get(self, key: str, expires: timedelta, filename: str | None = None) -> str | None:
        headers = {"response-content-disposition": content_disposition(filename)} if filename else None
        return self._signer.presigned_get_object(self.bucket, self._name(key), expires, response_headers=headers)

    def local_path(self, key: str) -> str | None:
        validate_key(key)
        return None


def open_store(
    url: str,
    *,
    endpoint: str | None,
    access_key: str | None,
    secret_key: str | None,
    secure: bool = False,
    region: str = "us-east-1",
    public_endpoint: str | None = None,
) -> ArtifactStore:
    """`s3://bucket[/prefix]` -> S3Store; `file:///abs/path` or a folder path -> LocalStore."""
    if url.startswith("s3://"):
        parts = urlsplit(url)
        if not parts.netloc:
            raise ValueError(f"storage URL {url!r} names no bucket")
        if not endpoint:
            raise ValueError(f"storage URL {url!r} needs an S3 endpoint (host:port)")
        if not access_key or not secret_key:
            raise ValueError(f"storage URL {url!r} needs an S3 access key and secret key")
        return S3Store(
            parts.netloc,
            parts.path.strip("/"),
            endpoint,
            access_key,
            secret_key,
            secure=secure,
            region=region,
            public_endpoint=public_endpoint,
        )
    if url.startswith("file://"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"storage URL {url!r} must be file:///absolute/path")
        return LocalStore(url2pathname(parts.path))
    if "://" in url:
        raise ValueError(f"storage URL {url!r}: expected s3://, file:// or a folder path")
    return LocalStore(os.path.abspath(url))
