"""What ``optimize()`` returns and leaves on disk: stage records, the result, save / load / export.

A saved bundle is a plain folder that outlives cotune's Python objects::

    manifest.json        base model + fingerprint, schedule, budget and spend, val score per stage, versions, seed,
                         where each stage setting came from (user / model file / rule) and the budget plan
    program.json         the optimized program's DSPy state (instructions, demos): ``program.load(...)``
    adapter/             a standard PEFT folder (adapter_config.json + adapter_model.safetensors)
    merged/              (export --merged only) the adapter merged into full weights, a plain HF model folder

The adapter folder loads unchanged with ``peft.PeftModel.from_pretrained(base, "adapter")`` and with vLLM::

    vllm serve BASE_MODEL --enable-lora --max-lora-rank R --lora-modules cotune=BUNDLE/adapter
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dspy

from metrics.references import reference_name
from optimizers.errors import CorruptRunError, ExportTargetError, LoadError
from rl.atomic import atomic_dir, jsonable, write_json  # the one JSON writer and sanitiser

if TYPE_CHECKING:
    from rl.policy import Policy

MANIFEST = "manifest.json"
PROGRAM = "program.json"
ADAPTER = "adapter"
LIBRARIES = ("cotune", "dspy", "torch", "transformers", "peft", "trl", "optuna", "mlflow")
BUNDLE_FORMAT = "cotune-bundle/1"

@dataclass
class RunInfo:
    """What callbacks learn about a run: its configuration, where it writes, and which rubric components are LM
    judges (``judges``: tracking logs their scores as ``LLM_JUDGE`` assessments)."""

    params: dict[str, Any]
    output_dir: Path | None
    stages: tuple[str, ...]
    arm: str
    seed: int
    judges: tuple[str, ...] = ()


@dataclass
class StageRecord:
    """One stage of a run and its evaluation on the valset.

    Attributes:
        index: 0 for the untuned baseline, then 1..n in schedule order.
        stage: ``"baseline"`` or the letter of a stage kind (``optimizers.stages.KINDS``).
        name: ``"0-baseline"``, ``"1-p"``, ``"2-w"``...
        val_score: mean rubric value on the valset (0..1).
        val_components: mean of each rubric component on the valset.
        gold_score: mean gold metric on the valset (when a gold metric was given).
        spend: rollouts and LM calls this stage spent; ``total_spend`` is cumulative after it.
        adapter_version: the policy's adapter version after the stage.
        details: stage-specific results (optimizer, weight-stage history, kept traces...).
        events: reward-hacking / guard alerts raised during or after the stage.
    """

    index: int
    stage: str
    name: str
    val_score: float
    val_components: dict[str, float] = field(default_factory=dict)
    gold_score: float | None = None
    val_errors: int = 0
    spend: dict[str, int] = field(default_factory=dict)
    total_spend: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    adapter_version: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


@dataclass
class OptimizeResult:
    """The outcome of ``optimize()``.

    Attributes:
        program: the best program (by val score), bound to the policy LM at temperature 0 and with the best
            adapter loaded into ``policy``.
        policy: the :class:`rl.Policy` (holding the best adapter after the run).
        history: one :class:`StageRecord` for the baseline, then one per stage.
        best_index: index into ``history`` of the best stage.
        last_program: the program after the last stage (its adapter is ``output_dir/last/adapter``).
        params: the run's full configuration (what the manifest records).
        output_dir: the run folder (``None`` when run without one).
    """

    program: dspy.Module
    policy: Policy
    history: list[StageRecord]
    best_index: int
    last_program: dspy.Module
    params: dict[str, Any]
    output_dir: Path | None = None

    @property
    def best(self) -> StageRecord:
        return self.history[self.best_index]

    @property
    def val_score(self) -> float:
        """The best val score (what the returned ``program`` scores)."""
        return self.best.val_score

    @property
    def spend(self) -> dict[str, int]:
        return dict(self.history[-1].total_spend)

    def manifest(self) -> dict[str, Any]:
        return build_manifest(self.params, self.history, self.best_index, self.policy)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the best program + adapter + manifest as a bundle (see the module docstring).

        ``overwrite=True`` replaces ``path`` only when it is a cotune bundle (see :func:`export`).

        Raises:
            ExportTargetError: ``path`` is a file, a non-empty folder (without ``overwrite``), a folder that is not
                a bundle, or the run folder (or a folder holding it).
        """
        out = Path(path)
        _check_target(out, sources=[self.output_dir] if self.output_dir is not None else [], overwrite=overwrite)
        with atomic_dir(out) as tmp:
            save_program(self.program, tmp / PROGRAM)
            self.policy.save_adapter(tmp / ADAPTER)
            write_json(tmp / MANIFEST, self.manifest())
        return out


# --- writing --------------------------------------------------------------------------------------


def read_json(path: Path, hint: str = "") -> Any:
    """Read a JSON file of a run or bundle; a missing or damaged file is a :class:`CorruptRunError` naming it.

    Args:
        path: the file.
        hint: what the user can do about it, appended to the message.
    """
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise CorruptRunError(f"{str(path)!r} is missing" + (f"; {hint}" if hint else ""), path=Path(path)) from exc
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError and UnicodeDecodeError (binary garbage)
        raise CorruptRunError(f"{str(path)!r} is damaged or truncated ({type(exc).__name__}: {exc})"
                              + (f"; {hint}" if hint else ""), path=Path(path)) from exc


def save_program(program: dspy.Module, path: Path) -> None:
    """The program's DSPy state as JSON, without the (unserializable) policy LM bound to its predictors."""
    _unbound(program).save(str(path))


def program_state(program: dspy.Module) -> dict[str, Any]:
    """The program's DSPy state (instructions, demos) as plain data, without the LMs bound to its predictors."""
    return _unbound(program).dump_state()


def program_with_state(program: dspy.Module, state: dict[str, Any]) -> dspy.Module:
    """A copy of ``program`` with a saved :func:`program_state` (instructions, demos) loaded."""
    program = copy.deepcopy(program)
    program.load_state(state)
    return program


def _unbound(program: dspy.Module) -> dspy.Module:
    unbound = copy.deepcopy(program)
    for _, predictor in unbound.named_predictors():
        predictor.lm = None
    return unbound


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def build_manifest(params: dict[str, Any], history: list[StageRecord], best_index: int, policy: Policy) -> dict[str, Any]:
    last = history[-1]
    return jsonable({
        "format": BUNDLE_FORMAT,
        "base_model": str(policy.base_path),
        "base_fingerprint": policy.base_fingerprint,
        "lora": asdict(policy.lora),
        "schedule": params.get("schedule"),
        "arm": params.get("arm"),
        "seed": params.get("seed"),
        "budget": params.get("budget"),
        "spent": last.total_spend,
        "best_stage": history[best_index].name,
        "val_scores": {r.name: r.val_score for r in history},
        "gold_scores": {r.name: r.gold_score for r in history if r.gold_score is not None},
        "program_class": params.get("program_class"),
        "settings_sources": params.get("settings_sources"),  # user / model (cotune.json) / rule, per setting
        "model_settings_file": params.get("model_settings_file"),
        "plan": params.get("plan"),  # what each stage's share was planned to buy
        "params": params,
        "versions": library_versions(),
    })


# --- reading --------------------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """(bundle folder, manifest) for a bundle, or for a run folder (its ``best/`` bundle)."""
    root = Path(path)
    if not root.exists():
        raise LoadError(f"{str(root)!r} does not exist")
    for candidate in (root, root / "best"):
        if (candidate / MANIFEST).is_file():
            manifest = read_json(candidate / MANIFEST, hint="export the bundle again from its run")
            if not isinstance(manifest, dict) or "base_model" not in manifest:
                raise CorruptRunError(f"{str(candidate / MANIFEST)!r} is not a cotune manifest (no base_model)",
                                      path=candidate / MANIFEST)
            return candidate, manifest
    raise LoadError(f"{str(root)!r} holds no {MANIFEST}: not a cotune bundle or finished run "
                    "(an interrupted run can be continued with optimize(..., resume=True))")


def is_bundle(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a cotune bundle's manifest (what ``overwrite=True`` may replace)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == BUNDLE_FORMAT


ProgramClasses = Sequence[type] | Mapping[str, type]


def _program_for(manifest: dict[str, Any], program: dspy.Module | None, allowed_classes: ProgramClasses | None
                 ) -> dspy.Module:
    """The module to load the bundle's state into: a copy of ``program``, or an allowed class built without
    arguments. Nothing named by the bundle is ever imported: a bundle is data, and a module shipped beside it
    (or a ``program_class`` such as ``"os:abort"``) must not run."""
    if program is not None:
        return copy.deepcopy(program)
    named = manifest.get("program_class")
    if allowed_classes is None:
        raise LoadError(f"the bundle names its program class {named!r}, but load() never imports code a bundle "
                        "names; pass program=YourProgram(...) (an instance of that class) or "
                        "allowed_classes=[YourProgram]")
    if isinstance(allowed_classes, Mapping):
        candidates = dict(allowed_classes)
    else:
        candidates = {reference_name(cls): cls for cls in allowed_classes}
    cls = candidates.get(named) if isinstance(named, str) else None
    if cls is None:
        raise LoadError(f"the bundle's program class {named!r} is not among allowed_classes {sorted(candidates)}; "
                        "pass program=YourProgram(...) or add the class to allowed_classes")
    try:
        return cls()
    except Exception as exc:  # noqa: BLE001 - any failure means: the user must build the program
        raise LoadError(f"cannot build {named!r} without arguments ({type(exc).__name__}: {exc}); pass "
                        "program=YourProgram(...)") from exc


def load(path: str | os.PathLike, *, program: dspy.Module | None = None,
         allowed_classes: ProgramClasses | None = None, base_model: str | os.PathLike | None = None,
         temperature: float = 0.0, max_tokens: int | None = None, **policy_kwargs: Any) -> dspy.Module:
    """A runnable program from a bundle or run folder: base model + adapter + optimized prompts.

    A bundle is data: ``load`` never imports or calls code that the bundle names (its manifest's
    ``program_class``). The program comes from you.

    Args:
        path: a bundle written by :meth:`OptimizeResult.save` / ``cotune export``, or a run's ``output_dir``.
        program: an instance of the program's class (its state is loaded into a copy).
        allowed_classes: instead of ``program``, classes you trust to be built without arguments, as a list
            (matched by ``module:qualname`` against the manifest's ``program_class``) or a dict
            ``{"module:qualname": cls}``.
        base_model: the base model folder, when it moved since the run (the fingerprint is checked).
        temperature, max_tokens: settings of the LM bound to the program's predictors.
        policy_kwargs: passed to :meth:`rl.Policy.from_pretrained` (device, dtype, ...).

    Returns:
        The program with every predictor bound to the policy LM (``program.policy`` holds the policy).

    Raises:
        LoadError: not a bundle; neither ``program`` nor a matching ``allowed_classes`` entry; another base model.
        CorruptRunError: ``manifest.json`` or ``program.json`` is damaged (the file is named).

    Example:
        >>> from optimizers import load                                                   # doctest: +SKIP
        >>> from programs.tasks import last_digit
        >>> program = load("runs/quickstart/best", program=last_digit.predict_program())  # doctest: +SKIP
        >>> program(question="What is the last digit of 120344?").answer                  # doctest: +SKIP
        '4'
    """
    from rl.policy import Policy

    bundle, manifest = read_manifest(path)
    module = _program_for(manifest, program, allowed_classes)
    state = read_json(bundle / PROGRAM, hint="export the bundle again from its run")
    base = Path(base_model) if base_model is not None else Path(manifest["base_model"])
    policy = Policy.from_pretrained(base, adapter=bundle / ADAPTER, **policy_kwargs)
    if policy.base_fingerprint != manifest.get("base_fingerprint"):
        raise LoadError(f"base model {str(base)!r} is not the one the adapter was trained on "
                        f"(fingerprint {policy.base_fingerprint[:12]} != {str(manifest.get('base_fingerprint'))[:12]})")
    try:
        module.load_state(state)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise LoadError(f"{str(bundle / PROGRAM)!r} does not fit the program passed ({type(exc).__name__}: {exc}); "
                        f"the bundle was saved from {manifest.get('program_class')!r}") from exc
    lm_kwargs: dict[str, Any] = {"temperature": temperature, "cache": False}
    if max_tokens is not None:
        lm_kwargs["max_tokens"] = max_tokens
    module.set_lm(policy.lm(**lm_kwargs))
    module.policy = policy
    return module


def _check_target(out: Path, sources: Sequence[Path], overwrite: bool) -> None:
    """Refuse a bundle target that is a file, a non-empty folder (without ``overwrite``), or, with ``overwrite``,
    anything but a cotune bundle outside the source: never the source run, a folder inside it or one holding it."""
    if out.exists() and not out.is_dir():
        raise ExportTargetError(f"{str(out)!r} is a file; the bundle is a folder: choose a folder path")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ExportTargetError(f"{str(out)!r} is not empty; pass overwrite=True (--overwrite) to replace it "
                                "(only a cotune bundle is replaced)")
    target = out.resolve()
    for source in sources:
        source = Path(source).resolve()
        if target == source or target in source.parents or source in target.parents:
            raise ExportTargetError(f"{str(out)!r} is the source {str(source)!r}, inside it or holds it; "
                                    "overwrite=True never replaces the source: choose another folder")
    if not is_bundle(out):
        raise ExportTargetError(f"{str(out)!r} is not a cotune bundle (no {MANIFEST} of ours); overwrite=True "
                                "replaces only a bundle: choose an empty or new folder")


def export(path: str | os.PathLike, out: str | os.PathLike, *, merged: bool = False, overwrite: bool = False) -> Path:
    """Write a stand-alone bundle from a run or bundle; ``merged=True`` adds the adapter merged into full weights.

    The merged folder is a plain HF model (safetensors + tokenizer) that needs neither peft nor cotune.

    Raises:
        ExportTargetError: ``out`` is a file; or it is a non-empty folder and ``overwrite`` is not set; or, with
            ``overwrite``, it is not a cotune bundle, or it is the source (run or bundle), inside it or holds it.
        LoadError: ``path`` is not a bundle or run (:class:`CorruptRunError` when its manifest is damaged).
    """
    bundle, manifest = read_manifest(path)
    out = Path(out)
    _check_target(out, sources=[Path(path), bundle], overwrite=overwrite)
    with atomic_dir(out) as tmp:
        shutil.copytree(bundle / ADAPTER, tmp / ADAPTER)
        shutil.copy2(bundle / PROGRAM, tmp / PROGRAM)
        write_json(tmp / MANIFEST, {**manifest, "format": BUNDLE_FORMAT, "merged": "merged" if merged else None})
        if merged:
            _write_merged(Path(manifest["base_model"]), bundle / ADAPTER, tmp / "merged")
        (tmp / "README.md").write_text(_bundle_readme(manifest, merged))
    return out


def _write_merged(base: Path, adapter: Path, out: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not base.exists():
        raise LoadError(f"base model {str(base)!r} (from the manifest) does not exist; cannot merge")
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True, local_files_only=True)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base, local_files_only=True).save_pretrained(out)


def _bundle_readme(manifest: dict[str, Any], merged: bool) -> str:
    rank = manifest.get("lora", {}).get("r", 16)
    lines = [
        "# cotune bundle", "",
        f"Base model: `{manifest['base_model']}` (fingerprint `{str(manifest.get('base_fingerprint'))[:12]}`)",
        f"Schedule: `{manifest.get('schedule')}`; best stage `{manifest.get('best_stage')}`; "
        f"val scores {manifest.get('val_scores')}", "",
        "Load in Python:", "```python",
        "from optimizers import load",
        "program = load('.', program=YourProgram())", "```", "",
        "Load the adapter with PEFT:", "```python",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base_model, 'adapter')", "```", "",
        "Serve with vLLM (the DSPy program then uses `dspy.LM('openai/cotune', api_base=...)`):", "```",
        f"vllm serve {manifest['base_model']} --enable-lora --max-lora-rank {rank} --lora-modules cotune=adapter",
        "```",
    ]
    if merged:
        lines += ["", "`merged/` is a plain HF model folder with the adapter merged in: `vllm serve merged`."]
    return "\n".join(lines) + "\n"
