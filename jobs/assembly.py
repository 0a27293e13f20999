"""Model weights stored once per job: a `.safetensors` file is kept as a recipe plus the bytes of its new tensors.

A safetensors file is an 8-byte little-endian header length, a JSON header ({name: {dtype, shape, data_offsets}}),
then the tensors' bytes back to back. At publish, each tensor's bytes are hashed; a tensor whose bytes are already
stored (in an earlier stage of the job) or lie in one of the job's input models is referenced, not stored again;
the others go, concatenated, into one object of this file. The recipe (on the artifact row) holds the original
header bytes and, in file order, where each tensor's bytes are. Assembly streams the header, then the pieces.

Stages write float32 weights; an input model in bfloat16 or float16 still serves as a source: its tensor, widened to
float32 (exact in both cases), is referenced when the widened bytes are the stage's (`Piece.widen`).

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

import numpy as np

from langadapt.jobs.errors import Conflict, Gone
from langadapt.jobs.storage import ArtifactStore, ObjectNotFound, StoredObject

FORMAT = "langadapt.safetensors-recipe/1"
JOB_OBJECT, INPUT_FILE, INPUT_OBJECT = "object", "input_file", "input_object"  # where a piece's bytes are
_BLOCK = 1 << 20
WIDENED = {"BF16", "F16"}  # input dtypes whose tensors are referenced widened to float32


@dataclass(frozen=True)
class Piece:
    kind: str  # JOB_OBJECT | INPUT_FILE | INPUT_OBJECT
    location: str  # a store key (objects) or an absolute path (input files)
    offset: int
    length: int  # of the piece's bytes in the assembled file
    sha256: str
    widen: str | None = None  # the source's dtype (BF16 / F16) when its bytes are widened to float32: length / 2 read


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


def tensor_ranges(path: str) -> tuple[int, list[tuple[int, int, str]]]:
    """The header's length (with its 8-byte prefix) and each tensor's absolute (offset, length, dtype) in file order;
    ValueError unless the tensors cover the data exactly (as safetensors writes them)."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: not a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        header = json.loads(handle.read(header_len))
    start = 8 + header_len
    spans = sorted((*v["data_offsets"], v["dtype"]) for k, v in header.items() if k != "__metadata__")
    position = 0
    for begin, end, _ in spans:
        if begin != position or end < begin:
            raise ValueError(f"{path}: tensor data is not contiguous at byte {begin}")
        position = end
    if start + position != os.path.getsize(path):
        raise ValueError(f"{path}: tensor data does not end the file")
    return start, [(start + begin, end - begin, dtype) for begin, end, dtype in spans]


def widen(data: bytes, dtype: str) -> bytes:
    """bfloat16 / float16 bytes as float32 bytes (little-endian; both conversions are exact)."""
    if dtype == "BF16":
        return (np.frombuffer(data, dtype="<u2").astype("<u4") << 16).tobytes()
    return np.frombuffer(data, dtype="<f2").astype("<f4").tobytes()


def _aligned(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """The same bytes in chunks of whole `size`-byte elements (a network read may split an element)."""
    rest = b""
    for chunk in chunks:
        data = rest + chunk
        cut = len(data) - len(data) % size
        rest = data[cut:]
        if cut:
            yield data[:cut]
    if rest:
        raise OSError("a widened piece ends inside an element")


def _sha_range(path: str, offset: int, length: int) -> str:
    digest = hashlib.sha256()
    for chunk in _file_range(path, offset, length):
        digest.update(chunk)
    return digest.hexdigest()


def _sha_widened(path: str, offset: int, length: int, dtype: str) -> str:
    digest = hashlib.sha256()
    for chunk in _file_range(path, offset, length):  # whole blocks: elements are never split
        digest.update(widen(chunk, dtype))
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
        self._candidates: dict[int, list[tuple[InputFile, int, str | None]]] = {}  # by length as assembled

    def add_recipe(self, recipe: dict[str, Any]) -> None:
        for piece in recipe["pieces"]:
            self.known.setdefault(piece["sha256"], Piece(**piece))

    def add_inputs(self, files: Iterable[InputFile]) -> None:
        for file in files:
            try:
                _, ranges = tensor_ranges(file.local)
            except (OSError, ValueError):
                continue  # not a safetensors file we can reference: its tensors are stored with the job
            for offset, length, dtype in ranges:
                self._candidates.setdefault(length, []).append((file, offset, None))
                if dtype in WIDENED:
                    self._candidates.setdefault(2 * length, []).append((file, offset, dtype))

    def find(self, sha: str, length: int) -> Piece | None:
        for file, offset, dtype in self._candidates.pop(length, []):
            if dtype is None:
                found = _sha_range(file.local, offset, length)
            else:
                found = _sha_widened(file.local, offset, length // 2, dtype)
            self.known.setdefault(found, Piece(file.kind, file.location, offset, length, found, dtype))
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
        for offset, length, _ in ranges:
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
            if skip >= piece.length:
                continue
            if piece.widen is None:
                yield from self._read(replace(piece, offset=piece.offset + skip, length=piece.length - skip))
                continue
            elements = skip // 4  # whole float32 elements skipped: two source bytes each
            later = replace(piece, offset=piece.offset + 2 * elements, length=piece.length - 4 * elements)
            partial = skip % 4
            for chunk in self._read(later):
                yield chunk[partial:]
                partial = 0

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
        left = piece.length if piece.widen is None else piece.length // 2  # source bytes
        try:
            if piece.kind == INPUT_FILE:
                chunks = _file_range(piece.location, piece.offset, left)
            else:
                chunks = self.store.read_range(piece.location, piece.offset, left)
            if piece.widen is not None:
                chunks = _aligned(chunks, 2)
            for chunk in chunks:
                left -= len(chunk)
                yield chunk if piece.widen is None else widen(chunk, piece.widen)
        except (OSError, ObjectNotFound):
            raise _unavailable(piece) from None
        if left:
            raise _unavailable(piece)


def _unavailable(piece: Piece) -> InputModelUnavailable:
    return InputModelUnavailable(f"{piece.location} (a model this job stored tensors of) is gone", param="name")
