"""Stage settings for one ``optimize()`` run: what the user set, else what the model recommends, else a rule.

Why: a constant default cannot suit every model (LoRA GRPO at lr 2e-5 is right for a 0.5B model and moves the
embedded 0.9M-parameter model not at all), and a user should get a run that learns without hand-tuning. So each
setting of a stage config comes from, in order:

1. ``user``: the dict the user passed (``weights={"learning_rate": 1e-3}``); a config *object*
   (``WeightStageConfig(...)``) is taken whole, every field as the user's;
2. ``model``: the model folder's ``cotune.json`` (:func:`rl.config.read_model_settings`);
3. ``rule``: :func:`rl.config.lora_learning_rate` from the model's hidden size (the weight stage's learning rate);
4. the config class's own default.

:func:`resolve_settings` returns the configs and, per stage kind, where every setting that is not the class default
came from; ``optimize()`` records that in the run's params (run.json, the manifest, MLflow).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizers.errors import OptimizeError
from optimizers.stages import sections
from rl.config import MODEL_SETTINGS_FILE, ModelSettingsError, lora_learning_rate

if TYPE_CHECKING:
    from rl.policy import Policy

USER, MODEL, RULE = "user", "model", "rule"
_NOT_FROM_MODEL = ("seed",)  # a run's seed is the user's, never a model's


@dataclasses.dataclass
class Settings:
    """The stage configs of a run and where their settings came from.

    Attributes:
        configs: ``{section: config}`` for every registered stage kind (``prompt``, ``weights``, ``self_training``
            and any added kind); each is also an attribute (``settings.weights``).
        sources: ``{"weights": {"learning_rate": "model", ...}, ...}``: ``user``, ``model`` or ``rule`` for every
            setting given by one of them (settings at the class default are not listed).
        model_file: the model's ``cotune.json`` when it has one.
    """

    configs: dict[str, Any]
    sources: dict[str, dict[str, str]]
    model_file: str | None

    def __getattr__(self, section: str) -> Any:
        configs = self.__dict__.get("configs") or {}
        if section in configs:
            return configs[section]
        raise AttributeError(section)


def rule_settings(hidden_size: int | None) -> dict[str, dict[str, Any]]:
    """The settings the size rule gives a model without them in ``cotune.json`` (``{}`` when its size is unknown)."""
    if not hidden_size:
        return {}
    return {"weights": {"learning_rate": lora_learning_rate(int(hidden_size))}}


def resolve_settings(policy: Policy, *, seed: int, **given: Any) -> Settings:
    """The run's stage configs from the user's values, the model's ``cotune.json`` and the size rule.

    Args:
        policy: the run's :class:`rl.Policy` (its ``base_path`` holds the model's file, ``hidden_size`` sizes the
            rule); anything without ``recommended_settings`` gets neither.
        seed: the run's seed, the configs' ``seed`` unless the user set one.
        **given: what the user passed per stage section (``prompt=``, ``weights=``, ``self_training=``...):
            ``None``, a dict of fields, or a config object. Sections not given get ``None``.

    Raises:
        OptimizeError: an unknown section or setting, a bad value or a config of the wrong type (the argument is
            named).
        rl.config.ModelSettingsError: the model's ``cotune.json`` is unreadable, names an unknown setting or gives a
            bad value (the file is named).
    """
    known = sections()
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise OptimizeError(f"unknown stage settings section(s) {unknown}; the stage kinds' sections are "
                            f"{sorted(known)}")
    recommended = policy.recommended_settings() if hasattr(policy, "recommended_settings") else {}
    model_file = str(Path(policy.base_path) / MODEL_SETTINGS_FILE) if recommended else None
    rule = rule_settings(getattr(policy, "hidden_size", None))
    configs, sources = {}, {}
    for name, cls in known.items():
        configs[name], sources[name] = _resolve(name, cls, given.get(name), recommended.get(name, {}),
                                                rule.get(name, {}), model_file, seed)
    return Settings(configs=configs, sources={k: v for k, v in sources.items() if v}, model_file=model_file)


def _resolve(name: str, cls: type, value: Any, model: dict[str, Any], rule: dict[str, Any], model_file: str | None,
             seed: int) -> tuple[Any, dict[str, str]]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if value is not None and not isinstance(value, (dict, cls)):
        raise OptimizeError(f"{name} must be a {cls.__name__} or a dict of its fields, got {type(value).__name__}")
    if isinstance(value, cls):  # a config object: every field is the user's
        return value, {k: USER for k, f in fields.items() if k != "seed" and getattr(value, k) != _default(f)}
    user = dict(value or {})
    unknown = set(user) - set(fields)
    if unknown:
        raise OptimizeError(f"{name}: unknown setting(s) {sorted(unknown)}; {cls.__name__} has {sorted(fields)}")
    bad = sorted(set(model) - (set(fields) - set(_NOT_FROM_MODEL)))
    if bad:
        raise ModelSettingsError(f"{model_file!r}: section {name!r} has unknown or disallowed setting(s) {bad}; "
                                 f"{cls.__name__} has {sorted(set(fields) - set(_NOT_FROM_MODEL))}")
    merged, source = {"seed": seed}, {}
    for layer, label in ((rule, RULE), (model, MODEL), (user, USER)):  # later layers win
        for key, val in layer.items():
            merged[key], source[key] = val, label
    try:
        config = cls(**merged)
    except (TypeError, ValueError) as exc:
        from_model = sorted(k for k, v in source.items() if v == MODEL)
        if from_model:
            try:
                cls(**{k: v for k, v in merged.items() if source.get(k) != MODEL})
            except (TypeError, ValueError):
                pass
            else:
                raise ModelSettingsError(f"{model_file!r}: section {name!r}: {exc}") from exc
        raise OptimizeError(f"{name}: {exc}") from exc
    return config, source


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING
