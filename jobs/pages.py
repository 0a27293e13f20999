"""Cursor pagination: fetch one row more than the page to know whether another page follows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

Row = TypeVar("Row")
Cursor = TypeVar("Cursor")


def page(rows: Sequence[Row], limit: int, cursor: Callable[[Row], Cursor]) -> tuple[list[Row], Cursor | None]:
    """`rows` fetched with LIMIT limit + 1 -> (the page, the cursor of its last row if more rows follow)."""
    kept = list(rows[:limit])
    return kept, (cursor(kept[-1]) if len(rows) > limit else None)
