"""Write a folder atomically: build it under a temporary name beside the target, then rename it into place.

Why: checkpoints and model builds are trusted by later runs (resume, cache hits). A crash mid-write must
leave either the previous folder or nothing, never a half-written one that looks complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``final``, on error it is removed.

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> with atomic_dir(root / "ckpt") as tmp:
        ...     _ = (tmp / "state.json").write_text("{}")
        >>> sorted(p.name for p in (root / "ckpt").iterdir())
        ['state.json']
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
