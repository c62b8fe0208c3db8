"""Resumable checkpoints of a weight stage: adapter, optimizer, scheduler, RNG, step and data cursor.

Why: a weight stage is minutes to hours of compute, and "nothing lost on crash" is a promise. Each
checkpoint is written into a hidden temporary folder and renamed into place, so a crash mid-write never
leaves a checkpoint that a resume would trust. The adapter is a standard PEFT folder (safetensors); the
optimizer and scheduler are ``torch.save``d dicts loaded back with ``weights_only=True``.

Layout::

    <root>/step-000012/
        adapter/            adapter_config.json + adapter_model.safetensors
        trainer.pt          optimizer, scheduler, global step
        rng.pt              torch CPU RNG state
        state.json          step, data cursor, metric history, adapter version, python RNG state
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from rl.atomic import atomic_dir

STATE_FILE = "state.json"


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def save_checkpoint(root: str | os.PathLike, step: int, policy, updater, state: dict[str, Any], keep: int = 2,
                    trainer_state: dict[str, Any] | None = None) -> Path:
    """Write checkpoint ``step`` atomically; keep the ``keep`` most recent ones.

    Args:
        root: the checkpoints folder.
        step: number of optimizer steps completed.
        policy: the policy whose adapter is saved.
        updater: the :class:`rl.grpo.GRPOUpdater` (optimizer + scheduler state).
        state: JSON-serialisable loop state (cursor, history, ...); ``step`` and RNG are added here.
        keep: how many recent checkpoints to keep.
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
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The most recent complete checkpoint under ``root`` (or ``None``)."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = [p for p in sorted(root.glob("step-*")) if (p / STATE_FILE).exists()]
    return done[-1] if done else None


def load_checkpoint(path: str | os.PathLike, policy, updater) -> dict[str, Any]:
    """Restore adapter weights, optimizer, scheduler and RNG from ``path``; return the loop state."""
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    policy.load_adapter(path / "adapter", version=state["adapter_version"])
    with torch.serialization.safe_globals(_deepspeed_globals()):  # weights_only: no arbitrary code from a pickle
        updater.load_state_dict(torch.load(path / "trainer.pt", weights_only=True))
    torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["torch"])
    random.setstate(_tupled(state["python_rng"]))
    return state


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
