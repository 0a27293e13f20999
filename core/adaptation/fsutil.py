"""Atomic output directories: write into a temporary sibling, rename into place only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from langadapt.core.adaptation.errors import AdaptationInputError


@contextlib.contextmanager
def atomic_output_dir(out_dir: str, *, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory beside `out_dir`; on success it replaces `out_dir` in one rename.

    On any exception the temporary directory is removed, so no half-written output is ever left behind.
    Out-of-disk (ENOSPC) becomes an `AdaptationInputError` naming the target.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite and os.listdir(out_dir):
        raise AdaptationInputError(f"output directory already exists and is not empty: {out_dir}")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == 28:  # ENOSPC
            raise AdaptationInputError(f"out of disk space while writing {out_dir}") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
