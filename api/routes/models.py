from __future__ import annotations

from fastapi import APIRouter

from langadapt.api.deps import CurrentTeam, SettingsDep
from langadapt.api.schemas import ERROR_RESPONSES, ModelPublic, ModelsPublic
from langadapt.jobs.catalogue import catalogue

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES)


@router.get("", response_model=ModelsPublic)
def list_models(_: CurrentTeam, settings: SettingsDep) -> ModelsPublic:
    """The model catalogue: names a job may use as base_model / instruct_model (besides allowed paths). Tokenizer
    shortcuts (for the CLI's `--tokenizer`) are not models and are not listed."""
    entries = [entry for entry in catalogue(settings).values() if entry.kind == "model"]
    return ModelsPublic(data=[ModelPublic(id=e.name, source=e.source) for e in entries])  # type: ignore[arg-type]
