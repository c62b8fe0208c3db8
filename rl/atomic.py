"""Write a folder atomically: build it under a temporary name beside the target, then rename it into place.

Why: checkpoints, run stages, bundles and model builds are trusted by later runs (resume, cache hits). A crash
mid-write must leave either the previous folder or nothing, never a half-written one that looks complete.

Two more promises live here because every folder we write goes through :func:`atomic_dir`:

* Normal permissions. ``tempfile.mkdtemp`` makes 0700 folders and safetensors writes 0600 files; a vLLM server
  running as another user could not read such an adapter. The finished folder gets the permissions of an ordinary
  ``mkdir`` / ``open`` under the process umask (0755 folders, 0644 files with the usual umask 022).
* Recognisable leftovers. A crash (kill -9) mid-write leaves the temporary folder behind, named
  ``.<name>.cotune-tmp-<random>``; :func:`remove_stale_temps` clears them (and puts back a folder whose
  replacement was cut between its two renames) when the owner of the tree starts or resumes.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)
TMP_MARK = ".cotune-tmp-"  # the folder being written
OLD_MARK = ".cotune-old-"  # the folder being replaced, between the two renames
_LEGACY_TMP = re.compile(r"^\..+\.[a-z0-9_]{8}$")  # tempfile.mkdtemp(prefix=".<name>.") of earlier versions


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``final``, on error it is removed.

    The folder and everything written into it get normal permissions (see the module docstring).

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> with atomic_dir(root / "ckpt") as tmp:
        ...     _ = (tmp / "state.json").write_text("{}")
        >>> sorted(p.name for p in (root / "ckpt").iterdir())
        ['state.json']
        >>> oct((root / "ckpt").stat().st_mode & 0o777) == oct(0o777 & ~current_umask())
        True
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}{TMP_MARK}{secrets.token_hex(4)}"
    tmp.mkdir()  # mode 0o777 less the umask, unlike mkdtemp's 0o700
    try:
        yield tmp
        normalize_permissions(tmp)
        if final.exists():  # rename the old folder away first: at no moment is there a half-deleted ``final``
            old = final.parent / f".{final.name}{OLD_MARK}{secrets.token_hex(4)}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it, a race)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def normalize_permissions(root: str | os.PathLike) -> None:
    """Give ``root`` and everything below it the permissions of a plain mkdir / open under the umask.

    Executable files keep their execute bits; links are left alone.
    """
    umask = current_umask()
    dir_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    root = Path(root)
    os.chmod(root, dir_mode)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, dir_mode)
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            mode = os.stat(path).st_mode
            executable = mode & stat.S_IXUSR
            os.chmod(path, dir_mode if executable else file_mode)


def remove_stale_temps(root: str | os.PathLike) -> list[Path]:
    """Clear what interrupted :func:`atomic_dir` writes left anywhere under ``root``; return what was removed.

    Only call it on a tree no other process is writing (e.g. a run folder under its run lock): a temporary folder
    of a live writer looks exactly like a stale one. A folder cut between its two renames (the new one never
    arrived, the old one still renamed away) is put back under its name instead of being removed.
    """
    removed: list[Path] = []
    root = Path(root)
    if not root.is_dir():
        return removed
    for folder, dirs, files in os.walk(root):
        for name in list(dirs) + files:
            path = Path(folder) / name
            if OLD_MARK in name:
                original = path.with_name(name[1 : name.index(OLD_MARK)])
                if not original.exists():
                    os.replace(path, original)
                    logger.warning("restored %s (a replacement of it was interrupted)", original)
                    continue
            elif not (TMP_MARK in name or (name in dirs and _LEGACY_TMP.match(name))
                      or (name.endswith(".json.tmp") and name in files)):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        dirs[:] = [d for d in dirs if Path(folder) / d not in removed]
    if removed:
        logger.warning("removed %d unfinished temporary file(s) from an interrupted write under %s: %s",
                       len(removed), root, ", ".join(str(p.relative_to(root)) for p in removed))
    return removed
