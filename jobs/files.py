"""Uploaded corpora: validated on arrival (UTF-8 text, non-empty, readable compression), hashed, stored.

The object is written to storage before the row is committed, and removed again if the commit fails, so a file id
always names a stored, valid corpus and a failed upload leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from typing import BinaryIO

from sqlalchemy.orm import Session

from langadapt.core.adaptation.corpus import corpus_stats
from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.jobs import quotas
from langadapt.jobs.errors import Invalid, TooLarge, Unavailable
from langadapt.jobs.layout import file_key, file_prefix
from langadapt.jobs.models import File, Team, new_id
from langadapt.jobs.settings import Settings
from langadapt.jobs.storage import ArtifactStore, StorageError

CORPUS_SUFFIXES = (".jsonl.xz", ".jsonl.gz", ".txt.xz", ".txt.gz", ".jsonl", ".txt")
_COPY_BLOCK = 1 << 20


def corpus_suffix(filename: str) -> str:
    lowered = filename.lower()
    for suffix in CORPUS_SUFFIXES:
        if lowered.endswith(suffix):
            return suffix
    raise Invalid(
        f"unsupported file type {filename!r}: expected one of {', '.join(CORPUS_SUFFIXES)}",
        code="unsupported_file_type",
        param="file",
    )


def display_name(filename: str) -> str:
    base = os.path.basename(filename.replace("\\", "/")) or "upload"
    return re.sub(r"[^A-Za-z0-9._-]", "_", base)[-200:]


def store_upload(*, store: ArtifactStore, settings: Settings, team: Team, filename: str, source: BinaryIO) -> File:
    """Validate an uploaded corpus and put it in the store; returns its row, not yet recorded (`record_upload`).
    No database work: a request holds no connection while it reads, decompresses and stores the file."""
    suffix = corpus_suffix(filename)
    with tempfile.TemporaryDirectory(prefix="langadapt-upload-") as tmp:
        path = os.path.join(tmp, "corpus" + suffix)
        size, sha256 = _copy_limited(source, path, settings.max_upload_bytes)
        if size == 0:
            raise Invalid("the file is empty", code="empty_file", param="file")
        try:
            stats = corpus_stats(path, max_chars=settings.max_corpus_chars, max_line_chars=settings.max_line_chars)
        except AdaptationInputError as exc:
            raise Invalid(str(exc).replace(path, display_name(filename)), code=exc.code, param="file") from None
        if stats.documents == 0:
            raise Invalid("the file holds no text (only blank documents)", code="empty_corpus", param="file")
        row = File(
            id=new_id("file"),
            team_id=team.id,
            filename=display_name(filename),
            bytes=size,
            sha256=sha256,
            documents=stats.documents,
            chars=stats.chars,
            storage_key="",
        )
        row.storage_key = file_key(team.id, row.id, suffix)
        try:
            store.put_file(row.storage_key, path)
        except StorageError as exc:
            raise Unavailable(f"artifact storage is unavailable: {exc}", code="storage_unavailable") from None
    return row


def record_upload(session: Session, *, store: ArtifactStore, settings: Settings, row: File) -> File:
    """Commit a stored upload's row within the team's stored-bytes quota; the stored object is removed again if
    that fails (a 429 too)."""
    try:
        quotas.lock_team(session, row.team_id)
        quotas.check_upload(session, settings, row.team_id, row.bytes)
        session.add(row)
        session.commit()
    except BaseException:
        session.rollback()
        store.delete_prefix(file_prefix(row.team_id, row.id))
        raise
    return row


def _copy_limited(source: BinaryIO, path: str, limit: int) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "wb") as out:
        while block := source.read(_COPY_BLOCK):
            size += len(block)
            if size > limit:
                raise TooLarge(f"the file is larger than the limit of {limit} bytes", param="file")
            digest.update(block)
            out.write(block)
    return size, digest.hexdigest()


def fetch_file(store: ArtifactStore, row: File, directory: str) -> str:
    """Download a stored file into `directory`, keeping the suffix that tells its format; returns the path."""
    path = os.path.join(directory, row.id + corpus_suffix(row.storage_key))
    if not os.path.exists(path):
        store.download(row.storage_key, path)
    return path
