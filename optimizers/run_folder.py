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
  sibling ``<folder>.old-YYYYmmdd-HHMMSS`` (``overwrite=True``), or refused with both choices named. This policy
  is :func:`decide`, on what :func:`read_folder` found; ``cotune run`` checks every folder of its plan with the
  same two functions before its first run starts (``experiments/runner.py``), adding only its own settings
  record and the choice to skip a completed run.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimizers.errors import CorruptRunError, OutputDirError, RunLockedError
from optimizers.result import read_json
from rl.atomic import jsonable, remove_stale_temps, write_json

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
    state = read_folder(root)
    if resume and state.holds_run:
        remove_stale_temps(root)
    same = state.run is not None and state.run.get("params_hash") == params_hash(params)
    action = decide(state, resume=resume, overwrite=overwrite, same_settings=same)
    run_file = root / RUN_FILE
    if action == "new":
        set_status(root, "running", params, [])
        return set()
    if action == "foreign":
        if overwrite:
            raise OutputDirError(f"{str(root)!r} is not empty and is not a cotune run; refusing to touch its "
                                 "files even with overwrite=True; choose another output_dir")
        raise OutputDirError(f"{str(root)!r} is not empty and is not a cotune run; choose another output_dir")
    if action == "damaged":
        hint = "pass overwrite=True to move this run aside and start over"
        read_json(run_file, hint=hint)  # raises the CorruptRunError naming the file and what is wrong with it
        raise CorruptRunError(f"{str(run_file)!r} is damaged ({state.damaged}); {hint}", path=run_file)
    if action == "other-settings":
        changed = params_diff(state.run["params"], params) if isinstance(state.run.get("params"), dict) else []
        what = f" ({'; '.join(changed)})" if changed else ""
        raise OutputDirError(f"{str(root)!r} holds a run with different settings{what}; resume needs the same "
                             "arguments; pass overwrite=True to move that run aside and start over, or choose "
                             "another output_dir")
    if action == "completed":
        raise OutputDirError(f"{str(root)!r} holds a completed run; nothing to resume (load it with "
                             "optimizers.load, or pass overwrite=True to move it aside and run again)")
    if action == "resume":
        done = finished_stages(root, stages)
        lost = sorted(set(state.finished) - done)
        if lost:
            logger.warning("resume %s: stage(s) %s are listed as finished but their folders are missing or "
                           "incomplete; they run again", root, lost)
        logger.info("resuming %s: stages %s already finished", root, sorted(done))
        return done
    if action == "exists":
        status = (state.run or {}).get("status", "unreadable")
        raise OutputDirError(f"{str(root)!r} already holds a run (status {status}); pass resume=True (--resume) "
                             "to continue it, or overwrite=True (--overwrite) to move it aside into a timestamped "
                             "folder and start over")
    moved = move_aside(root)  # "overwrite"
    logger.warning("output_dir %s held a run: moved it aside to %s (nothing was deleted)", root, moved)
    set_status(root, "running", params, [])
    return set()


# --- what a folder holds, and what to do with it: the one policy of optimize() and `cotune run` ----------


def is_bookkeeping(name: str) -> bool:
    """A file of ours that does not make a folder hold anything: the run lock, a writability probe."""
    return name == LOCK_FILE or name.startswith(PROBE_PREFIX)


@dataclass
class FolderState:
    """What a run folder holds: nothing (``files`` empty), files that are no run (no ``run.json``), or a run.

    Attributes:
        root: the folder.
        files: the names it holds, sorted, lock and probe files aside.
        run: its ``run.json`` when it holds a run and that file is a readable JSON object.
        damaged: why ``run.json`` could not be read (empty when it could, or when there is none).
    """

    root: Path
    files: tuple[str, ...] = ()
    run: dict[str, Any] | None = None
    damaged: str = ""

    @property
    def empty(self) -> bool:
        return not self.files

    @property
    def holds_run(self) -> bool:
        return RUN_FILE in self.files

    @property
    def status(self) -> str | None:
        """``None`` when it holds no run, ``"damaged"`` when its ``run.json`` is unreadable, else the run's status."""
        if not self.holds_run:
            return None
        return "damaged" if self.run is None else str(self.run.get("status"))

    @property
    def finished(self) -> tuple[int, ...]:
        return tuple((self.run or {}).get("finished") or ())

    def describe(self) -> str:
        if self.damaged:
            return f"a run whose {RUN_FILE} is damaged ({self.damaged})"
        if self.status == "completed":
            return "a completed run"
        done = f", stages {list(self.finished)} finished" if self.finished else ""
        return f"an interrupted run (status {self.status!r}{done})"


def read_folder(root: Path) -> FolderState:
    """What ``root`` holds (a missing folder holds nothing); reading changes nothing, and takes no lock."""
    if not root.is_dir():
        return FolderState(root)
    files = tuple(sorted(c.name for c in root.iterdir() if not is_bookkeeping(c.name)))
    if RUN_FILE not in files:
        return FolderState(root, files)
    try:
        run = json.loads((root / RUN_FILE).read_text())  # every failure but OSError is a ValueError (JSON, UTF-8)
        if not isinstance(run, dict):
            raise ValueError(f"{root / RUN_FILE} holds {type(run).__name__}, not a JSON object")
    except (OSError, ValueError) as exc:
        return FolderState(root, files, damaged=str(exc) or type(exc).__name__)
    return FolderState(root, files, run=run)


ACTIONS = ("new", "resume", "overwrite", "skip")
REFUSALS = ("foreign", "exists", "damaged", "other-settings", "completed", "unverifiable")


def decide(state: FolderState, *, resume: bool, overwrite: bool, same_settings: bool | None,
           skip_completed: bool = False) -> str:
    """What to do with the folder ``state`` describes; ``optimize()`` and ``cotune run`` both follow this.

    Nothing is deleted implicitly, and a run is continued only with the settings it started with. Returns one of
    :data:`ACTIONS` -- ``"new"`` (it holds nothing), ``"resume"`` (continue its interrupted run), ``"overwrite"``
    (move its run aside, start over), ``"skip"`` (only with ``skip_completed``: its completed run had these
    settings, keep it) -- or one of :data:`REFUSALS`, which each caller words for its own flags: ``"foreign"``
    (files that are no run, refused even with ``overwrite``), ``"exists"`` (a run, and neither ``resume`` nor
    ``overwrite``), ``"damaged"`` (``resume``, but ``run.json`` is unreadable), ``"other-settings"``,
    ``"completed"`` (``resume`` of a completed run without ``skip_completed``: nothing to resume) and
    ``"unverifiable"`` (``skip_completed``, but the completed run's settings were not recorded).

    Args:
        state: what the folder holds (:func:`read_folder`).
        resume, overwrite: what the caller was asked (``resume`` wins when both are set).
        same_settings: whether the run there has the caller's settings; ``None``: not recorded, so an interrupted
            run is resumed and ``optimize()``'s own settings check decides.
        skip_completed: a completed run with the same settings is kept (``cotune run --resume``), not refused.

    Example:
        >>> decide(FolderState(Path("run"), ("run.json",), {"status": "failed"}), resume=True, overwrite=False,
        ...        same_settings=True)
        'resume'
    """
    if state.empty:
        return "new"
    if not state.holds_run:
        return "foreign"
    if resume:
        if state.run is None:
            return "damaged"
        if same_settings is False:
            return "other-settings"
        if state.status == "completed":
            if not skip_completed:
                return "completed"
            return "skip" if same_settings else "unverifiable"
        return "resume"
    return "overwrite" if overwrite else "exists"


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
    a, b = _flat(jsonable(old)), _flat(jsonable(new))
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
