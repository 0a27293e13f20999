"""Where things live in the artifact store: everything a team owns is under `teams/<team id>/`."""

from __future__ import annotations


def team_prefix(team_id: str) -> str:
    return f"teams/{team_id}/"


def file_prefix(team_id: str, file_id: str) -> str:
    return f"{team_prefix(team_id)}files/{file_id}/"


def file_key(team_id: str, file_id: str, suffix: str) -> str:
    return f"{file_prefix(team_id, file_id)}corpus{suffix}"


def job_prefix(team_id: str, job_id: str) -> str:
    """Holds `artifacts/<stage>/<file>`, the job's `manifest.json` and an interrupted CPT's `checkpoints/`."""
    return f"{team_prefix(team_id)}jobs/{job_id}/"
