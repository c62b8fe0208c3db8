"""The run folder of ``optimize()``: its lock, what happens to a folder that is already there, and ``run.json``.

Why a module of its own: the run folder is where a user's compute is kept, and every way of losing it goes
through here. The rules:

* **One process per folder.** ``optimize()`` holds an exclusive lock for the whole run (:class:`RunLock`:
  ``fcntl.flock`` on ``.cotune.lock`` inside the folder, with the holder's pid and host written in it). A second
  process gets :class:`RunLockedError` naming the holder. The kernel drops the lock when its process ends,
  however it ends (kill -9 included), so a lock file left behind is stale by construction: it is taken over with
  a warning naming the process that left it.
* **Nothing is deleted implicitly.** A folder with files that are not a cotune run is refused, even with
  ``overwrite=True``. A folder holding a run is resumed (``resume=True``, same settings), moved aside into the
  sibling ``<folder>.old-YYYYmmdd-HHMMSS`` (``overwrite=True``), or refused with both choices named.
* **Resume checks what it resumes.** The settings are compared (their hash, and the differing keys are named);
  a completed run is not resumed. A stage is finished when its folder holds ``record.json`` (stage folders are
  written atomically); ``run.json``'s ``finished`` list is a summary that only ever grows.
* **Leftovers are cleared under the lock.** Temporary folders of writes that a crash cut short are removed on
  resume (:func:`rl.atomic.remove_stale_temps`).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from optimizers.errors import OutputDirError, RunLockedError
from optimizers.result import _jsonable, read_json, write_json
from rl.atomic import remove_stale_temps

logger = logging.getLogger(__name__)
RUN_FILE = "run.json"
LOCK_FILE = ".cotune.lock"
PROBE_PREFIX = ".cotune-write-test-"
STAGES = "stages"


class RunLock:
    """An exclusive lock on a run folder, held from :meth:`acquire` to :meth:`release` (or the process's end).

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> with RunLock(root):
        ...     RunLock(root).acquire()
        Traceback (most recent call last):
        optimizers.errors.RunLockedError: ... is in use by another cotune process (pid ...
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunLockedError`; a stale lock is taken over with a warning."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputDirError(f"cannot create the run lock {str(self.path)!r}: {exc.strerror}; "
                                     "output_dir must be a writable folder") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLockedError(self._locked_message(holder), path=self.root, pid=holder.get("pid"),
                                     host=holder.get("host")) from None
            except OSError as exc:  # a filesystem without locks: run, but say that nothing guards the folder
                logger.warning("cannot lock %s (%s): nothing stops another process from using this run folder "
                               "at the same time", self.root, exc.strerror)
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder released (and removed) the file between our open and our lock: retry
        previous = _read_holder(fd)
        if previous:
            logger.warning("took over the stale run lock of %s left by pid %s on host %s (started %s): that process "
                           "ended without releasing it (killed?)", self.root, previous.get("pid"),
                           previous.get("host"), previous.get("started"))
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (nothing when it is not held)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # still locked: a process that opened it meanwhile re-checks and retries
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _locked_message(self, holder: dict[str, Any]) -> str:
        pid, host = holder.get("pid"), holder.get("host")
        who = f"pid {pid} on host {host}, since {holder.get('started')}" if pid else "a process that wrote no pid yet"
        message = (f"{str(self.root)!r} is in use by another cotune process ({who}); wait for it to end or stop it, "
                   "or choose another output_dir")
        if host == socket.gethostname() and isinstance(pid, int) and not process_alive(pid):
            message += f" (pid {pid} is gone, but a process it started still holds {LOCK_FILE}: stop that one)"
        return message


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# --- opening a run folder ---------------------------------------------------------------------------


def stage_dir(root: Path, index: int, stage: str) -> Path:
    """The folder of stage ``index`` (``0`` is the baseline) of a run."""
    return root / STAGES / f"{index}-{stage}"


def open_run_folder(root: Path, lock: RunLock, params: dict[str, Any], stages: Sequence[str], *, resume: bool,
                    overwrite: bool) -> set[int]:
    """Lock ``root`` and make it ready for this run; return the indexes of the stages a resume reloads.

    The caller releases ``lock`` when the run ends (it is released here when this raises).

    Raises:
        RunLockedError: another process holds the folder.
        OutputDirError: ``root`` is a file or not writable; it holds other files; it holds a run and neither
            ``resume`` nor ``overwrite`` was passed; on resume, the run had other settings or is completed.
        CorruptRunError: on resume, ``run.json`` is unreadable.
    """
    _check_writable(root)
    lock.acquire()
    try:
        return _prepare(root, params, stages, resume=resume, overwrite=overwrite)
    except BaseException:
        lock.release()
        raise


def _check_writable(root: Path) -> None:
    """A folder we can write into (created when missing), or a clear :class:`OutputDirError`."""
    if root.exists() and not root.is_dir():
        raise OutputDirError(f"output_dir {str(root)!r} is a file, not a folder; choose a folder path")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise OutputDirError(f"cannot create output_dir {str(root)!r}: a part of that path is a file") from exc
    except OSError as exc:
        raise OutputDirError(f"cannot create output_dir {str(root)!r}: {exc.strerror}; choose a writable "
                             "location") from exc
    probe = root / f"{PROBE_PREFIX}{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        probe.unlink()
    except OSError as exc:
        reason = "read-only" if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else exc.strerror
        raise OutputDirError(f"output_dir {str(root)!r} is not writable ({reason}: {exc.strerror}); make it "
                             "writable or choose another output_dir") from exc


def _prepare(root: Path, params: dict[str, Any], stages: Sequence[str], *, resume: bool, overwrite: bool) -> set[int]:
    if not any(p.name != LOCK_FILE and not p.name.startswith(PROBE_PREFIX) for p in root.iterdir()):
        set_status(root, "running", params, [])
        return set()
    run_file = root / RUN_FILE
    if not run_file.exists():
        if overwrite:
            raise OutputDirError(f"{str(root)!r} is not empty and is not a cotune run; refusing to touch its "
                                 "files even with overwrite=True; choose another output_dir")
        raise OutputDirError(f"{str(root)!r} is not empty and is not a cotune run; choose another output_dir")
    if resume:
        remove_stale_temps(root)
        state = read_json(run_file, hint="pass overwrite=True to move this run aside and start over")
        if state.get("params_hash") != params_hash(params):
            changed = params_diff(state["params"], params) if isinstance(state.get("params"), dict) else []
            what = f" ({'; '.join(changed)})" if changed else ""
            raise OutputDirError(f"{str(root)!r} holds a run with different settings{what}; resume needs the same "
                                 "arguments; pass overwrite=True to move that run aside and start over, or choose "
                                 "another output_dir")
        if state.get("status") == "completed":
            raise OutputDirError(f"{str(root)!r} holds a completed run; nothing to resume (load it with "
                                 "optimizers.load, or pass overwrite=True to move it aside and run again)")
        done = finished_stages(root, stages)
        lost = sorted(set(state.get("finished", [])) - done)
        if lost:
            logger.warning("resume %s: stage(s) %s are listed as finished but their folders are missing or "
                           "incomplete; they run again", root, lost)
        logger.info("resuming %s: stages %s already finished", root, sorted(done))
        return done
    if not overwrite:
        status = _peek(run_file).get("status", "unreadable")
        raise OutputDirError(f"{str(root)!r} already holds a run (status {status}); pass resume=True (--resume) "
                             "to continue it, or overwrite=True (--overwrite) to move it aside into a timestamped "
                             "folder and start over")
    moved = move_aside(root)
    logger.warning("output_dir %s held a run: moved it aside to %s (nothing was deleted)", root, moved)
    set_status(root, "running", params, [])
    return set()


def finished_stages(root: Path, stages: Sequence[str]) -> set[int]:
    """Indexes of the stages finished in ``root``: the longest prefix of the schedule whose folders hold a record."""
    done: set[int] = set()
    for index, stage in enumerate(("baseline", *stages)):
        if not (stage_dir(root, index, stage) / "record.json").is_file():
            break
        done.add(index)
    return done


def move_aside(root: Path) -> Path:
    """Move everything in ``root`` (but the lock) into a new sibling ``<root>.old-YYYYmmdd-HHMMSS``; return it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        target = root.with_name(f"{root.name}.old-{stamp}" + (f"-{n}" if n else ""))
        try:
            target.mkdir()
            break
        except FileExistsError:
            continue
    else:
        raise OutputDirError(f"cannot find a free name beside {str(root)!r} to move the old run to")
    for child in root.iterdir():
        if child.name != LOCK_FILE:
            os.replace(child, target / child.name)
    return target


# --- run.json -----------------------------------------------------------------------------------------


def params_hash(params: dict[str, Any]) -> str:
    """A short hash of a run's settings (the ``params`` of ``optimize()``)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def params_diff(old: dict[str, Any], new: dict[str, Any], limit: int = 8) -> list[str]:
    """``"key.sub: old -> new"`` for each setting that differs (dotted keys, at most ``limit`` of them)."""
    a, b = _flat(_jsonable(old)), _flat(_jsonable(new))
    missing = object()
    changed = [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in sorted(set(a) | set(b))
               if a.get(k, missing) != b.get(k, missing)]
    return changed[:limit] + ([f"and {len(changed) - limit} more"] if len(changed) > limit else [])


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, sub in value.items():
        out.update(_flat(sub, f"{prefix}.{key}" if prefix else str(key)))
    return out


def set_status(root: Path, status: str, params: dict[str, Any], finished: Sequence[int],
               error: str | None = None) -> None:
    """Write ``run.json``; the ``finished`` list keeps every stage an earlier write of the same run listed.

    Keys that others added to the same run's ``run.json`` (e.g. tracking run ids) are kept.
    """
    if not root.is_dir():
        return
    run_file = root / RUN_FILE
    digest = params_hash(params)
    old = _peek(run_file)
    same_run = old.get("params_hash") == digest
    merged = set(finished) | (set(old.get("finished", [])) if same_run else set())
    write_json(run_file, {**(old if same_run else {}), "status": status, "finished": sorted(merged),
                          "params_hash": digest, "params": params, "error": error, "updated": time.time()})


def _peek(run_file: Path) -> dict[str, Any]:
    """``run.json`` as a dict, or ``{}`` when it is missing or unreadable (for messages and merges only)."""
    try:
        state = json.loads(run_file.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}
