"""Model weights stored once per job: a `.safetensors` file is kept as a recipe plus the bytes of its new tensors.

A safetensors file is an 8-byte little-endian header length, a JSON header ({name: {dtype, shape, data_offsets}}),
then the tensors' bytes back to back. At publish, each tensor's bytes are hashed; a tensor whose bytes are already
stored (in an earlier stage of the job) or lie in one of the job's input models is referenced, not stored again;
the others go, concatenated, into one object of this file. The recipe (on the artifact row) holds the original
header bytes and, in file order, where each tensor's bytes are. Assembly streams the header, then the pieces.

Pieces in this job's own objects are trusted; pieces in input models (files on the service's disks, or objects in
its store) carry their sha256 and are verified before a download or restore starts: a changed input answers 409
`input_model_changed`, a missing one 410 `input_model_unavailable`, never wrong bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from langadapt.jobs.errors import Conflict, Gone
from langadapt.jobs.storage import ArtifactStore, ObjectNotFound, StoredObject

FORMAT = "langadapt.safetensors-recipe/1"
JOB_OBJECT, INPUT_FILE, INPUT_OBJECT = "object", "input_file", "input_object"  # where a piece's bytes are
_BLOCK = 1 << 20


@dataclass(frozen=True)
class Piece:
    kind: str  # JOB_OBJECT | INPUT_FILE | INPUT_OBJECT
    location: str  # a store key (objects) or an absolute path (input files)
    offset: int
    length: int
    sha256: str


@dataclass(frozen=True)
class InputFile:
    """A safetensors file of an input model: `location` is where assembly reads it later (a path, or a store key
    for s3:// models), `local` the copy on this worker's disk."""

    kind: str  # INPUT_FILE | INPUT_OBJECT
    location: str
    local: str


class InputModelChanged(Conflict):
    code = "input_model_changed"


class InputModelUnavailable(Gone):
    code = "input_model_unavailable"


def tensor_ranges(path: str) -> tuple[int, list[tuple[int, int]]]:
    """The header's length (with its 8-byte prefix) and each tensor's absolute (offset, length) in file order;
    ValueError unless the tensors cover the data exactly (as safetensors writes them)."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: not a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        header = json.loads(handle.read(header_len))
    start = 8 + header_len
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    position = 0
    for begin, end in spans:
        if begin != position or end < begin:
            raise ValueError(f"{path}: tensor data is not contiguous at byte {begin}")
        position = end
    if start + position != os.path.getsize(path):
        raise ValueError(f"{path}: tensor data does not end the file")
    return start, [(start + begin, end - begin) for begin, end in spans]


def _sha_range(path: str, offset: int, length: int) -> str:
    digest = hashlib.sha256()
    for chunk in _file_range(path, offset, length):
        digest.update(chunk)
    return digest.hexdigest()


def _file_range(path: str, offset: int, length: int) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        handle.seek(offset)
        while length > 0:
            chunk = handle.read(min(_BLOCK, length))
            if not chunk:
                raise OSError(f"{path}: ends before byte {offset + length}")
            length -= len(chunk)
            yield chunk


class TensorIndex:
    """Tensor bytes already stored (by sha256), and the input models' tensors, hashed only when a tensor of the
    same length is looked up."""

    def __init__(self) -> None:
        self.known: dict[str, Piece] = {}
        self._candidates: dict[int, list[tuple[InputFile, int]]] = {}

    def add_recipe(self, recipe: dict[str, Any]) -> None:
        for piece in recipe["pieces"]:
            self.known.setdefault(piece["sha256"], Piece(**piece))

    def add_inputs(self, files: Iterable[InputFile]) -> None:
        for file in files:
            try:
                _, ranges = tensor_ranges(file.local)
            except (OSError, ValueError):
                continue  # not a safetensors file we can reference: its tensors are stored with the job
            for offset, length in ranges:
                self._candidates.setdefault(length, []).append((file, offset))

    def find(self, sha: str, length: int) -> Piece | None:
        for file, offset in self._candidates.pop(length, []):
            found = _sha_range(file.local, offset, length)
            self.known.setdefault(found, Piece(file.kind, file.location, offset, length, found))
        return self.known.get(sha)


def split(path: str, index: TensorIndex, blob_key: str, blob_path: str) -> tuple[dict[str, Any], int]:
    """The recipe of the safetensors file at `path` and the bytes written to `blob_path` (its new tensors, to be
    stored under `blob_key`); the new tensors join `index`."""
    start, ranges = tensor_ranges(path)
    with open(path, "rb") as handle:
        header = handle.read(start)
    pieces, written = [], 0
    whole = hashlib.sha256(header)
    with open(blob_path, "wb") as blob:
        for offset, length in ranges:
            digest = hashlib.sha256()
            for chunk in _file_range(path, offset, length):
                digest.update(chunk)
                whole.update(chunk)
            sha = digest.hexdigest()
            piece = index.find(sha, length)
            if piece is None:
                for chunk in _file_range(path, offset, length):
                    blob.write(chunk)
                piece = Piece(JOB_OBJECT, blob_key, written, length, sha)
                index.known[sha] = piece
                written += length
            pieces.append(piece)
    recipe = {
        "format": FORMAT,
        "size": os.path.getsize(path),
        "sha256": whole.hexdigest(),
        "header": base64.b64encode(header).decode(),
        "pieces": [asdict(piece) for piece in pieces],
    }
    return recipe, written


class Assembler:
    """Complete safetensors files from recipes, on the API (downloads) and the worker (restores)."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self._verified: set[tuple[str, str, str, int, int, str]] = set()  # (kind, location, version, piece)

    def verify(self, recipe: dict[str, Any]) -> None:
        """Raise InputModelChanged / InputModelUnavailable unless every input piece still has its bytes.
        A piece once verified is not read again while its file (or object) is unchanged."""
        for piece in (Piece(**p) for p in recipe["pieces"]):
            if piece.kind == JOB_OBJECT:
                continue
            version = self._version(piece)
            mark = (piece.kind, piece.location, version, piece.offset, piece.length, piece.sha256)
            if mark in self._verified:
                continue
            digest = hashlib.sha256()
            for chunk in self._read(piece):
                digest.update(chunk)
            if digest.hexdigest() != piece.sha256:
                raise InputModelChanged(
                    f"input model file {piece.location} has changed since the job stored this model", param="name"
                )
            self._verified.add(mark)

    def chunks(self, recipe: dict[str, Any], start: int = 0) -> Iterator[bytes]:
        """The complete file's bytes from byte `start` on (call `verify` first: a started stream cannot become an
        error response)."""
        header = base64.b64decode(recipe["header"])
        yield header[start:]
        position = len(header)
        for piece in (Piece(**p) for p in recipe["pieces"]):
            skip = max(0, start - position)
            position += piece.length
            if skip < piece.length:
                yield from self._read(replace(piece, offset=piece.offset + skip, length=piece.length - skip))

    def save(self, recipe: dict[str, Any], path: str) -> None:
        """Write the complete file to `path` (atomically), checking its sha256 against the recipe's."""
        self.verify(recipe)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        digest = hashlib.sha256()
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), delete=False) as out:
            try:
                for chunk in self.chunks(recipe):
                    digest.update(chunk)
                    out.write(chunk)
                if digest.hexdigest() != recipe["sha256"]:
                    raise InputModelChanged(f"{path}: assembled bytes do not match sha256 {recipe['sha256']}")
            except BaseException:
                os.unlink(out.name)
                raise
        os.replace(out.name, path)

    def _version(self, piece: Piece) -> str:
        if piece.kind == INPUT_FILE:
            try:
                info = os.stat(piece.location)
            except OSError:
                raise _unavailable(piece) from None
            return f"{info.st_size}:{info.st_mtime_ns}"
        found: StoredObject | None = self.store.stat(piece.location)
        if found is None:
            raise _unavailable(piece)
        return f"{found.size}:{found.version}"

    def _read(self, piece: Piece) -> Iterator[bytes]:
        if piece.kind == JOB_OBJECT:
            yield from self.store.read_range(piece.location, piece.offset, piece.length)
            return
        left = piece.length
        try:
            if piece.kind == INPUT_FILE:
                chunks = _file_range(piece.location, piece.offset, piece.length)
            else:
                chunks = self.store.read_range(piece.location, piece.offset, piece.length)
            for chunk in chunks:
                left -= len(chunk)
                yield chunk
        except (OSError, ObjectNotFound):
            raise _unavailable(piece) from None
        if left:
            raise _unavailable(piece)


def _unavailable(piece: Piece) -> InputModelUnavailable:
    return InputModelUnavailable(f"{piece.location} (a model this job stored tensors of) is gone", param="name")
