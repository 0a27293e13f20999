"""Stage manifests: the sha256 and size of every file a stage wrote, so completeness can be verified.

A stage's output directory is complete when its `manifest.json` exists and every file it lists is present with the
recorded size (and, when asked, the recorded sha256). The manifest is written last, atomically, so a crash
mid-stage leaves no manifest and the stage re-runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

MANIFEST = "manifest.json"
_HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the stage directory, "/"-separated
    size: int
    sha256: str


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: str) -> list[str]:
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
            if relative != MANIFEST:
                found.append(relative)
    return sorted(found)


def write_manifest(directory: str, extra: dict[str, Any] | None = None) -> list[FileEntry]:
    """Hash every file under `directory` and write `manifest.json` (atomically) listing them."""
    entries = [
        FileEntry(
            path=p, size=os.path.getsize(os.path.join(directory, p)), sha256=sha256_file(os.path.join(directory, p))
        )
        for p in _files(directory)
    ]
    payload = {"files": [asdict(e) for e in entries], **(extra or {})}
    tmp = os.path.join(directory, f".{MANIFEST}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, ensure_ascii=False)
    os.replace(tmp, os.path.join(directory, MANIFEST))
    return entries


def read_manifest(directory: str) -> dict[str, Any] | None:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def is_complete(directory: str, *, verify_hashes: bool = False) -> bool:
    """True when the manifest exists and every listed file is there with its size (and hash, if asked)."""
    manifest = read_manifest(directory)
    if manifest is None:
        return False
    for entry in manifest["files"]:
        path = os.path.join(directory, entry["path"])
        if not os.path.isfile(path) or os.path.getsize(path) != entry["size"]:
            return False
        if verify_hashes and sha256_file(path) != entry["sha256"]:
            return False
    return True
