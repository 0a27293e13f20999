"""Which models a job may name, checked at submit time.

A model reference is one of:
- a name in the catalogue: core's offline shortcuts whose package is installed, plus `LANGADAPT_MODEL_CATALOGUE`;
- an absolute path inside one of `LANGADAPT_ALLOWED_MODEL_ROOTS` (symlinks resolved before the check);
- `s3://<bucket>/<key prefix>` in the service's own bucket, under `models/` (shared) or the team's own prefix.
Anything else (relative paths, `..`, `file://`, `http://`, other buckets, other teams' prefixes) is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from langadapt.core.adaptation.shortcuts import available_shortcuts
from langadapt.jobs.errors import Invalid
from langadapt.jobs.layout import team_prefix
from langadapt.jobs.settings import Settings
from langadapt.jobs.storage import ArtifactStore, InvalidKey, S3Store, StorageError, StoredObject

SHARED_MODELS_PREFIX = "models/"


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    source: str  # builtin | configured
    location: str

    @property
    def kind(self) -> str:
        return model_kind(self.location)


def catalogue(settings: Settings) -> dict[str, CatalogueEntry]:
    entries = {name: CatalogueEntry(name, "builtin", path) for name, path in available_shortcuts().items()}
    entries.update({name: CatalogueEntry(name, "configured", loc) for name, loc in settings.model_catalogue.items()})
    return entries


def check_model_reference(ref: str, *, param: str, team_id: str, settings: Settings, store: ArtifactStore) -> None:
    """Raise `Invalid` (code `invalid_model`) unless `ref` names a model this team may use."""
    entry = catalogue(settings).get(ref)
    if entry is not None:
        if entry.kind != "model":
            raise _refused(ref, param, "a tokenizer, not a model")
        return
    if ref.startswith("s3://"):
        _check_s3_reference(ref, param=param, team_id=team_id, store=store)
        return
    if "://" in ref or not os.path.isabs(ref):
        raise _refused(ref, param, "not a catalogue name, an absolute path under an allowed root or an s3:// URI")
    real = allowed_path(ref, settings)
    if real is None:
        raise _refused(ref, param, "path is outside the allowed model roots")
    if not os.path.exists(real):
        raise _refused(ref, param, "no such file or directory")
    if model_kind(real) != "model":
        raise _refused(ref, param, "a tokenizer, not a model (a Hugging Face folder with config.json or a .gguf)")


def allowed_path(path: str, settings: Settings) -> str | None:
    """`path` with every symlink resolved, when that lies inside an allowed model root; else None. Checked at
    submit and again when the worker opens the model (a link swapped in between is caught)."""
    real = os.path.realpath(path)
    roots = [os.path.realpath(root) for root in settings.allowed_model_roots]
    return real if any(real == root or real.startswith(root + os.sep) for root in roots) else None


def model_kind(location: str) -> str:
    """`model` for what core loads as a model (a Hugging Face folder, a .gguf file, an s3:// URI, checked when
    fetched), `tokenizer` for the rest (a SentencePiece / tiktoken / tokenizer.json file)."""
    if location.startswith("s3://") or location.lower().endswith(".gguf"):
        return "model"
    return "model" if os.path.isfile(os.path.join(location, "config.json")) else "tokenizer"


def local_location(ref: str, settings: Settings) -> str | None:
    """The local file or folder a (checked) model reference names; None for s3:// models."""
    entry = catalogue(settings).get(ref)
    location = entry.location if entry is not None else ref
    return None if "://" in location else os.path.realpath(location)


def _check_s3_reference(ref: str, *, param: str, team_id: str, store: ArtifactStore) -> None:
    if not isinstance(store, S3Store):
        raise _refused(ref, param, "this server has no S3 store")
    key = store_key(store, ref)
    if key is None:
        where = f"{store.bucket}/{store.prefix}" if store.prefix else store.bucket
        raise _refused(ref, param, f"only the service store s3://{where} may be used")
    prefix = key.rstrip("/") + "/"
    if not (prefix.startswith(SHARED_MODELS_PREFIX) or prefix.startswith(team_prefix(team_id))):
        raise _refused(ref, param, f"s3 models must be under {SHARED_MODELS_PREFIX} or your team's prefix")
    try:
        found = model_objects(store, key)
    except InvalidKey:
        raise _refused(ref, param, "malformed key") from None
    except StorageError:
        raise _refused(ref, param, "could not be read from storage") from None
    if not found:
        raise _refused(ref, param, "no objects under this URI")


def model_objects(store: ArtifactStore, key: str) -> list[StoredObject]:
    """The objects a model reference names: the files under `key/` (an HF folder), or the one file `key`."""
    if objects := store.list(key + "/"):
        return objects
    single = store.stat(key)
    return [single] if single is not None else []


def store_key(store: S3Store, uri: str) -> str | None:
    """The store key an `s3://bucket/...` URI names, or None when it lies outside the store."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if bucket != store.bucket:
        return None
    if store.prefix:
        if not key.startswith(store.prefix + "/"):
            return None
        key = key[len(store.prefix) + 1 :]
    return key.strip("/") or None


def _refused(ref: str, param: str, why: str) -> Invalid:
    return Invalid(f"model reference {ref!r} refused: {why}", code="invalid_model", param=param)
