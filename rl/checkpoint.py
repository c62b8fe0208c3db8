"""Resumable checkpoints of a weight stage: adapter, optimizer, scheduler, RNG, step and data cursor.

Why: a weight stage is minutes to hours of compute, and "nothing lost on crash" is a promise. Each
checkpoint is written into a hidden temporary folder and renamed into place, so a crash mid-write never
leaves a checkpoint that a resume would trust. The adapter is a standard PEFT folder (safetensors); the
optimizer and scheduler are ``torch.save``d dicts loaded back with ``weights_only=True``.

A checkpoint can still go bad after it was written (a full disk, a copy cut short, a bad sector): every file's
sha256 is written beside it at save time (``checksums.json``) and verified before the checkpoint is trusted.
:func:`latest_checkpoint` skips a bad one with a warning that names it, so a resume falls back to the previous
good checkpoint (two are kept), or starts the stage over when none is good. Nothing is applied to the policy or
the optimizer before every file of the checkpoint was read.

Layout::

    <root>/step-000012/
        adapter/            adapter_config.json + adapter_model.safetensors
        trainer.pt          optimizer, scheduler, global step
        rng.pt              torch CPU RNG state
        state.json          step, data cursor, metric history, adapter version, python RNG state
        checksums.json      sha256 of every other file (written last)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from rl.atomic import atomic_dir
from rl.errors import CotuneRLError

STATE_FILE = "state.json"
CHECKSUMS = "checksums.json"
REQUIRED = (STATE_FILE, "trainer.pt", "rng.pt", "adapter/adapter_model.safetensors")
logger = logging.getLogger(__name__)


class CheckpointError(CotuneRLError, ValueError):
    """A checkpoint is incomplete or corrupt (a file is missing, truncated or does not match its checksum)."""


class CheckpointsExistError(CotuneRLError, FileExistsError):
    """A weight stage that does not resume was given a folder holding an earlier run's checkpoints.

    Why refuse: the new run would write its own ``step-*`` beside them, and pruning keeps only the highest step
    numbers, so the new checkpoints would be deleted as they are written (or the old ones replaced), and a later
    resume would continue whichever run happens to hold the highest step.
    """


def refuse_earlier_checkpoints(root: str | os.PathLike) -> None:
    """Raise :class:`CheckpointsExistError` when ``root`` holds checkpoints; nothing there is read or changed."""
    root = Path(root)
    earlier = sorted(p.name for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []
    if earlier:
        raise CheckpointsExistError(
            f"{str(root)!r} already holds {len(earlier)} checkpoint(s) of an earlier run (latest {earlier[-1]}): "
            "pass resume=True to continue that run, or another output_dir to start a new one; nothing there was "
            "changed")


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def save_checkpoint(root: str | os.PathLike, step: int, policy, updater, state: dict[str, Any], keep: int = 2,
                    trainer_state: dict[str, Any] | None = None) -> Path:
    """Write checkpoint ``step`` atomically, with the checksum of every file; keep the ``keep`` most recent ones.

    Args:
        root: the checkpoints folder.
        step: number of optimizer steps completed.
        policy: the policy whose adapter is saved.
        updater: the :class:`rl.grpo.GRPOUpdater` (optimizer + scheduler state).
        state: JSON-serialisable loop state (cursor, history, ...); ``step`` and RNG are added here.
        keep: how many recent checkpoints to keep (2 or more lets a resume fall back when the last one is bad).
        trainer_state: ``updater.state_dict()`` taken already (under DeepSpeed ZeRO it is a collective: every rank
            takes it, one rank writes the checkpoint).
    """
    root = Path(root)
    final = _step_dir(root, step)
    with atomic_dir(final) as tmp:
        policy.save_adapter(tmp / "adapter")
        torch.save(trainer_state if trainer_state is not None else updater.state_dict(), tmp / "trainer.pt")
        torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
        full = {**state, "step": step, "adapter_version": policy.version,
                "python_rng": _jsonable(random.getstate())}
        (tmp / STATE_FILE).write_text(json.dumps(full, indent=1))
        sums = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1))
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` naming the first missing or damaged file of checkpoint ``path``.

    With ``checksums.json`` every listed file must match its sha256. A checkpoint written before checksums existed
    is checked by reading every file of it.
    """
    path = Path(path)
    sums_file = path / CHECKSUMS
    if sums_file.exists():
        try:
            sums = json.loads(sums_file.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{sums_file}: unreadable ({exc})") from exc
        for name in REQUIRED:
            if name not in sums:
                raise CheckpointError(f"{path / name}: not listed in {CHECKSUMS}")
        for name, digest in sums.items():
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"{file}: missing")
            if _sha256(file) != digest:
                raise CheckpointError(f"{file}: damaged or truncated (its sha256 differs from the one written "
                                      "at save time)")
        return
    _read(path)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The most recent good checkpoint under ``root`` (or ``None``).

    A checkpoint that fails :func:`verify_checkpoint` is skipped with a warning naming the bad file, so the
    previous one is used; when checkpoints exist but none is good, a warning says the stage starts over.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = [p for p in sorted(root.glob("step-*"), reverse=True) if p.is_dir()]
    for path in candidates:
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            logger.warning("checkpoint %s is not usable, trying the previous one: %s", path, exc)
            continue
        return path
    if candidates:
        logger.warning("no usable checkpoint under %s (%d damaged); the weight stage starts over from step 0",
                       root, len(candidates))
    return None


def load_checkpoint(path: str | os.PathLike, policy, updater) -> dict[str, Any]:
    """Restore adapter weights, optimizer, scheduler and RNG from ``path``; return the loop state.

    Every file is read before anything is applied: a checkpoint that cannot be read raises
    :class:`CheckpointError` (naming the file) and leaves ``policy`` and ``updater`` untouched.
    """
    path = Path(path)
    state, adapter, trainer, rng = _read(path)
    policy.load_adapter_state(adapter, version=state["adapter_version"], source=str(path / "adapter"))
    updater.load_state_dict(trainer)
    torch.set_rng_state(rng)
    random.setstate(_tupled(state["python_rng"]))
    return state


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any], torch.Tensor]:
    """Every file of a checkpoint: (state, adapter weights, trainer state, torch RNG state)."""
    from safetensors.torch import load_file

    file = path / STATE_FILE
    try:
        state = json.loads(file.read_text())
        missing = {"step", "adapter_version", "python_rng"} - set(state)
        if missing:
            raise KeyError(f"no {sorted(missing)}")
        file = path / "adapter" / "adapter_model.safetensors"
        adapter = load_file(file)
        file = path / "trainer.pt"
        with torch.serialization.safe_globals(_deepspeed_globals()):  # weights_only: no arbitrary code from a pickle
            trainer = torch.load(file, weights_only=True)
        file = path / "rng.pt"
        rng = torch.load(file, weights_only=True)["torch"]
    except Exception as exc:  # noqa: BLE001 - whatever the reader raises, the file is what the user must know
        raise CheckpointError(f"{file}: cannot be read ({type(exc).__name__}: {exc})") from exc
    return state, adapter, trainer, rng


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _deepspeed_globals() -> list[Any]:
    """The plain DeepSpeed classes a ZeRO optimizer's state holds (loss scaler, stage, fragment addresses)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def _tupled(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tupled(v) for v in value)
    return value
