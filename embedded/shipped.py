"""Shipped weights: the sha256 check on load and the copy into the package, shared by every embedded model.

Why: an embedded model's numbers (its band, the README's tables) hold for the exact files that were measured, so a
changed or missing file must be an error naming the file, never a silently different model; and shipping a build
records what it was built on (builds differ across CPUs).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

INFO_FILE = "build_info.json"
SETTINGS_FILE = "cotune.json"  # recommended stage settings (rl.policy reads it), measured on the shipped weights


class EmbeddedModelError(RuntimeError):
    """The shipped model files are missing or differ from the hashes recorded when they were built."""


def sha256(path: Path) -> str:
    """The file's sha256 (hex)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verified(folder: Path, model: str) -> Path:
    """``folder`` after checking every file against the sha256 in its ``build_info.json``.

    Raises:
        EmbeddedModelError: a file is missing or was changed (the message says how to rebuild ``model``).
    """
    info_path = folder / INFO_FILE
    # Restore, never rebuild over it: a rebuild trains other floats on another CPU, and --ship would overwrite the
    # shipped weights (and their recorded hashes) with that build.
    fix = (f"restore the shipped files (in a source checkout: `git checkout -- {folder}`; installed: `pip install "
           f"--force-reinstall --no-deps cotune`); `cotune model build {model}` (without --ship) builds a copy into "
           "the cache instead")
    if not info_path.exists():
        raise EmbeddedModelError(f"the shipped {model} model is missing ({info_path} not found); {fix}")
    for name, digest in json.loads(info_path.read_text())["sha256"].items():
        path = folder / name
        if not path.exists() or sha256(path) != digest:
            raise EmbeddedModelError(f"{path} is missing or differs from the sha256 recorded in {info_path}; {fix}")
    return folder


def ship(build: str | Path, dest: str | Path, shipped: Path, extra: dict[str, Any] | None = None) -> Path:
    """Copy a recipe build into the package (``dest``) with the sha256 of every file in its ``build_info.json``.

    The ``cotune.json`` of the weights shipped now (``shipped``) is carried over when the build has none; re-measure
    it after shipping new weights. ``extra`` goes into ``build_info.json`` too (e.g. the measured band).
    """
    build, dest = Path(build), Path(dest)
    sources = {p.name: p for p in build.iterdir() if p.is_file() and p.name != INFO_FILE}
    if SETTINGS_FILE not in sources and (shipped / SETTINGS_FILE).exists():
        sources[SETTINGS_FILE] = shipped / SETTINGS_FILE
    info = json.loads((build / INFO_FILE).read_text()) if (build / INFO_FILE).exists() else {}
    info.update(extra or {})
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, source in sources.items():
        shutil.copyfile(source, tmp / name)
    info["sha256"] = {name: sha256(tmp / name) for name in sorted(sources)}
    info["built_on"] = machine()
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def machine() -> dict[str, str]:
    """Where a build ran: the CPU model and the library versions (builds differ across CPUs)."""
    import platform

    import dspy
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "platform": platform.platform(), "torch": torch.__version__,
            "transformers": transformers.__version__, "dspy": dspy.__version__}
