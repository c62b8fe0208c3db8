"""Write a folder or a JSON file atomically: build it under a temporary name beside the target, then rename it
into place.

Why: checkpoints, run stages, bundles, model builds and the small JSON files of a run (``run.json``,
``experiment.json``, ``mlflow.json``, manifests) are trusted by later runs (resume, cache hits). A crash mid-write
must leave either the previous version or nothing, never a half-written one that looks complete. This is the one
atomic JSON writer (:func:`write_json`) and the one JSON sanitiser (:func:`jsonable`): it sits in ``rl`` because
``rl``, ``optimizers`` and ``experiments`` all write such files and may all import ``rl``.

Two more promises live here because every folder and JSON file we write goes through this module:

* Normal permissions. ``tempfile.mkdtemp`` makes 0700 folders and safetensors writes 0600 files; a vLLM server
  running as another user could not read such an adapter. The finished folder gets the permissions of an ordinary
  ``mkdir`` / ``open`` under the process umask (0755 folders, 0644 files with the usual umask 022).
* Recognisable leftovers. A crash (kill -9) mid-write leaves the temporary folder behind, named
  ``.<name>.cotune-tmp-<random>`` (a JSON file's temporary file is named the same way);
  :func:`remove_stale_temps` clears them (and puts back a folder whose replacement was cut between its two
  renames) when the owner of the tree starts or resumes. It also clears the leftovers of earlier cotune versions
  (``.<name>.<8 random characters>`` folders of ``tempfile.mkdtemp``, ``<name>.json.tmp`` files), so that a run
  folder interrupted by an older version can still be resumed cleanly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
TMP_MARK = ".cotune-tmp-"  # the folder being written
OLD_MARK = ".cotune-old-"  # the folder being replaced, between the two renames
# The temporary folders of earlier versions (``tempfile.mkdtemp(prefix=".<name>.")``): a run folder an older cotune
# left interrupted still holds them, and its resume must clear them (tests/optimizers/test_reliability.py).
_LEGACY_TMP = re.compile(r"^\..+\.[a-z0-9_]{8}$")


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


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2) -> None:
    """Write :func:`jsonable` ``(data)`` to ``path`` atomically: a temporary file beside it, then a rename.

    The file gets the permissions of a plain ``open`` under the umask (0644 with the usual umask 022), so other
    users (a vLLM server, a colleague reading a run) can read it; a crash leaves the old file, or none, and a
    temporary file that :func:`remove_stale_temps` recognises.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.json"
        >>> write_json(path, {"score": float("nan"), "folder": pathlib.Path("runs"), 1: (2, 3)})
        >>> json.loads(path.read_text())
        {'score': None, 'folder': 'runs', '1': [2, 3]}
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{secrets.token_hex(4)}")
    text = json.dumps(jsonable(data), indent=indent)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 less the umask, unlike mkstemp's 0o600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types, for a file any JSON reader (not only Python's) can read.

    NaN and infinities become ``None`` (JSON has neither), mapping keys strings, tuples lists, paths strings, and
    any other object its ``repr``.

    Example:
        >>> jsonable({"loss": float("inf"), "shape": (2, 3), "ok": True, "what": object})
        {'loss': None, 'shape': [2, 3], 'ok': True, 'what': "<class 'object'>"}
    """
    return plain_tree(value, _json_leaf)


def _json_leaf(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return repr(value)


def plain_tree(value: Any, leaf: Callable[[Any], Any] = lambda v: v) -> Any:
    """``value`` with mappings as dicts with string keys, tuples as lists and paths as strings; every other value
    (a leaf) goes through ``leaf``, unchanged by default.

    Why one walk for every serialiser: the containers are the same in JSON and YAML; only what a leaf may be
    differs (:func:`jsonable` drops NaN, which YAML keeps as ``.nan``).

    Example:
        >>> plain_tree({1: (Path("runs"), float("nan"))})
        {'1': ['runs', nan]}
    """
    if isinstance(value, dict):
        return {str(k): plain_tree(v, leaf) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_tree(v, leaf) for v in value]
    if isinstance(value, Path):
        return str(value)
    return leaf(value)


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
