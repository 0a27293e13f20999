"""Query parameters shared by list endpoints."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

from langadapt.jobs.errors import Invalid

Limit = Annotated[int, Query(ge=1, le=100, description="page size")]


def parse_labels(values: list[str]) -> list[tuple[str, str]]:
    """`key:value` strings -> pairs; a value may itself contain ':'."""
    pairs = []
    for value in values:
        key, sep, rest = value.partition(":")
        if not sep or not key:
            raise Invalid(f"label filter {value!r} must be key:value", param="label")
        pairs.append((key, rest))
    return pairs
