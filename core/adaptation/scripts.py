"""Writing systems of text, from Unicode character names (CYRILLIC, LATIN, GREEK, ARABIC, CJK, ...): a target
language's script is measured on its corpus, never assumed, so nothing here knows about Russian in particular."""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from langadapt.core.adaptation.errors import AdaptationInputError


@dataclass(frozen=True)
class ScriptProfile:
    script: str
    share: float


@lru_cache(maxsize=65536)
def char_script(ch: str) -> str | None:
    """The script of a letter as the first word of its Unicode name (CYRILLIC, LATIN, CJK, ...); None otherwise."""
    if not ch.isalpha():
        return None
    name = unicodedata.name(ch, "")
    return name.split(" ", 1)[0] if name else "UNKNOWN"


def script_counts(texts: Iterable[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for text in texts:
        for ch, n in Counter(text).items():
            script = char_script(ch)
            if script is not None:
                counts[script] += n
    return counts


def script_profile(texts: Iterable[str]) -> ScriptProfile:
    """The dominant script of `texts` and the share of their letters written in it."""
    counts = script_counts(texts)
    total = sum(counts.values())
    if not total:
        raise AdaptationInputError("the corpus has no letters: cannot tell its script")
    script, n = counts.most_common(1)[0]
    return ScriptProfile(script, n / total)


def script_share(text: str, script: str) -> float | None:
    """The share of the letters of `text` in `script`; None when it has no letters."""
    counts = script_counts([text])
    total = sum(counts.values())
    return counts[script] / total if total else None
