"""The prompt stage (``p``) of cotune's outer loop: one small interface over DSPy's own prompt optimizers.

Why this module exists: ``optimize(schedule="p -> w -> p")`` alternates prompt stages with weight stages, and a
prompt stage must not care which DSPy optimizer does the work. DSPy's optimizers differ in what they need: the
metric signature (GEPA wants the 5-argument feedback metric, the others a float/bool metric), which extra LM
they use (MIPROv2's ``prompt_model``, SIMBA's ``prompt_model``, GEPA's ``reflection_lm``), whether ``compile``
takes a ``valset`` (SIMBA's does not) and how their budgets are set. ``run_prompt_stage`` hides these
differences; it never re-implements an optimizer. Every program call runs on the policy ``lm`` passed in
explicitly (no global ``dspy.configure``), with a ChatAdapter that does not silently fall back to JSON.

No optimizer strictly requires a valset: BootstrapFewShotWithRandomSearch and GEPA score on the trainset when
it is missing, MIPROv2 splits the trainset (it then needs at least 2 examples), SIMBA never uses one.
"""

from __future__ import annotations

import copy
import inspect
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dspy

from metrics import Rubric, as_rubric

__all__ = ["OPTIMIZERS", "PromptStageConfig", "PromptStageError", "run_prompt_stage"]

OPTIMIZERS = ("bootstrap_rs", "mipro", "gepa", "simba", "random_demos")
AUTO_PRESETS = ("light", "medium", "heavy")


class PromptStageError(ValueError):
    """A prompt stage cannot run with the inputs it was given (the message says what to change)."""


@dataclass
class PromptStageConfig:
    """Settings of one prompt stage; the named optimizer's own defaults apply to everything not listed here.

    Attributes:
        optimizer: ``"bootstrap_rs"`` (BootstrapFewShotWithRandomSearch), ``"mipro"`` (MIPROv2), ``"gepa"``,
            ``"simba"``, or ``"random_demos"``: the control arm, ``max(max_bootstrapped_demos,
            max_labeled_demos)`` labelled demos drawn at random from the trainset (as many demos as bootstrap_rs
            puts in a prompt, no search, no rollouts), so that a prompt stage's lift can be told apart from
            "any demos help".
        max_bootstrapped_demos: Demos bootstrapped from the program's own successful traces (per predictor;
            SIMBA's ``max_demos``).
        max_labeled_demos: Demos taken straight from the trainset labels (bootstrap_rs, mipro).
        num_candidate_programs: Candidate programs tried by bootstrap_rs; MIPROv2's ``num_candidates`` when
            ``auto`` is None; SIMBA's candidates per step.
        auto: MIPROv2 / GEPA budget preset (``"light"``, ``"medium"``, ``"heavy"``); None uses ``num_trials``
            (mipro) or ``max_metric_calls`` (gepa).
        num_trials: MIPROv2 Bayesian-optimisation trials (required for mipro when ``auto`` is None).
        max_metric_calls: GEPA's metric-call budget (required for gepa when ``auto`` is None).
        max_steps: SIMBA optimisation steps.
        minibatch_size: MIPROv2 minibatch / SIMBA batch size (clamped to the data available).
        num_threads: Parallel program calls (the policy engine micro-batches them).
        seed: Seed of the optimizer's own sampling and of the trainset order it sees (runs with different
            seeds bootstrap from different examples; BootstrapFewShotWithRandomSearch's own candidate seeds
            are fixed, so without the shuffle every seed would pick the same demos).
    """

    optimizer: str = "bootstrap_rs"
    max_bootstrapped_demos: int = 3
    max_labeled_demos: int = 3
    num_candidate_programs: int = 4
    auto: str | None = "light"
    num_trials: int | None = None
    max_metric_calls: int | None = None
    max_steps: int = 4
    minibatch_size: int = 32
    num_threads: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise PromptStageError(f"unknown optimizer {self.optimizer!r}; expected one of {OPTIMIZERS} "
                                   f"(or pass any DSPy teleprompter instance as teleprompter=)")
        if self.auto is not None and self.auto not in AUTO_PRESETS:
            raise PromptStageError(f"auto must be one of {AUTO_PRESETS} or None, got {self.auto!r}")
        for name in ("max_bootstrapped_demos", "max_labeled_demos"):
            if getattr(self, name) < 0:
                raise PromptStageError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("num_candidate_programs", "max_steps", "minibatch_size", "num_threads"):
            if getattr(self, name) < 1:
                raise PromptStageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.auto is None and self.optimizer == "mipro" and not self.num_trials:
            raise PromptStageError("mipro with auto=None needs num_trials (e.g. num_trials=8), or set auto='light'")
        if self.auto is None and self.optimizer == "gepa" and not self.max_metric_calls:
            raise PromptStageError("gepa with auto=None needs max_metric_calls (e.g. 64), or set auto='light'")


def _build(config: PromptStageConfig, rubric: Rubric, lm: dspy.LM, prompt_lm: dspy.LM | None,
           reflection_lm: dspy.LM | None, n_train: int) -> Any:
    """The named DSPy optimizer, configured from ``config`` with the metric adapter it expects."""
    c = config
    if c.optimizer == "bootstrap_rs":
        return dspy.BootstrapFewShotWithRandomSearch(
            metric=rubric.as_dspy_metric(), max_bootstrapped_demos=c.max_bootstrapped_demos,
            max_labeled_demos=c.max_labeled_demos, num_candidate_programs=c.num_candidate_programs,
            num_threads=c.num_threads)
    if c.optimizer == "random_demos":
        return dspy.LabeledFewShot(k=max(c.max_bootstrapped_demos, c.max_labeled_demos))
    if c.optimizer == "mipro":
        budget = {"auto": c.auto} if c.auto else {"auto": None, "num_candidates": c.num_candidate_programs}
        return dspy.MIPROv2(metric=rubric.as_dspy_metric(), prompt_model=prompt_lm or lm, task_model=lm,
                            max_bootstrapped_demos=c.max_bootstrapped_demos, max_labeled_demos=c.max_labeled_demos,
                            num_threads=c.num_threads, seed=c.seed, verbose=False, **budget)
    if c.optimizer == "gepa":
        budget = {"auto": c.auto} if c.auto else {"max_metric_calls": c.max_metric_calls}
        return dspy.GEPA(metric=rubric.as_gepa_metric(), reflection_lm=reflection_lm or lm, track_stats=True,
                         num_threads=c.num_threads, seed=c.seed, **budget)  # detailed_results: every candidate
    return dspy.SIMBA(metric=rubric.as_dspy_metric(), bsize=min(c.minibatch_size, n_train),
                      num_candidates=c.num_candidate_programs, max_steps=c.max_steps,
                      max_demos=c.max_bootstrapped_demos, prompt_model=prompt_lm or lm, num_threads=c.num_threads)


def _compile_kwargs(config: PromptStageConfig, valset: list | None) -> dict[str, Any]:
    if config.optimizer == "random_demos":
        return {"sample": True}  # LabeledFewShot draws k of the (seed-shuffled) trainset
    if config.optimizer == "simba":
        return {"seed": config.seed}  # SIMBA.compile takes no valset
    kwargs: dict[str, Any] = {"valset": valset}
    if config.optimizer == "mipro":
        n_val = len(valset) if valset else 1
        kwargs.update(seed=config.seed, minibatch_size=min(config.minibatch_size, n_val))
        if config.auto is None:
            kwargs.update(num_trials=config.num_trials, minibatch=n_val > config.minibatch_size)
    return kwargs


def _call_compile(teleprompter: Any, program: dspy.Module, trainset: list, valset: list | None) -> dspy.Module:
    """``teleprompter.compile`` with the arguments its signature accepts (``valset`` only where accepted)."""
    compile_fn: Callable[..., dspy.Module] = teleprompter.compile
    params = inspect.signature(compile_fn).parameters
    accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs: dict[str, Any] = {"trainset": trainset}
    if valset is not None and ("valset" in params or accepts_kwargs):
        kwargs["valset"] = valset
    return compile_fn(program, **kwargs)


def run_prompt_stage(program: dspy.Module, trainset: Sequence[dspy.Example], valset: Sequence[dspy.Example] | None,
                     metric: Rubric | Callable[..., Any], *, lm: dspy.LM, config: PromptStageConfig | None = None,
                     teleprompter: Any | None = None, prompt_lm: dspy.LM | None = None,
                     reflection_lm: dspy.LM | None = None, adapter: dspy.Adapter | None = None) -> dspy.Module:
    """Optimise the prompts (instructions and demos) of ``program`` with a DSPy optimizer.

    Args:
        program: Any DSPy module; it is not modified (the optimizer works on a deep copy).
        trainset: Examples the optimizer bootstraps demos / reflects on (must not be empty).
        valset: Examples candidates are scored on; None lets the optimizer use (part of) the trainset.
        metric: A :class:`metrics.Rubric` or any DSPy metric ``(example, pred, trace=None)``; each optimizer
            gets the adapter it expects (``as_dspy_metric()``, or ``as_gepa_metric()`` for GEPA).
        lm: The policy LM the program runs on.
        config: Which optimizer and its budget; defaults to ``PromptStageConfig()`` (bootstrap_rs).
        teleprompter: Any DSPy teleprompter instance; used instead of ``config.optimizer`` (its own metric
            and settings apply; ``compile`` gets ``valset`` only if it accepts one).
        prompt_lm: MIPROv2 / SIMBA proposer model (an API model for real use); defaults to ``lm``.
        reflection_lm: GEPA's reflection model; defaults to ``lm``.
        adapter: Adapter for program calls; defaults to ``dspy.ChatAdapter(use_json_adapter_fallback=False)``.

    Returns:
        The optimized program, a new module.

    Raises:
        PromptStageError: Empty trainset, or a trainset too small for the chosen optimizer.

    Example:
        >>> from programs.embedded import tiny_policy
        >>> from programs.tasks import last_digit
        >>> compiled = run_prompt_stage(  # doctest: +SKIP
        ...     last_digit.predict_program(), last_digit.load("train", 12), last_digit.load("val", 16),
        ...     last_digit.correct, lm=tiny_policy().lm(temperature=0.0),
        ...     config=PromptStageConfig("bootstrap_rs", num_candidate_programs=2))
        >>> len(compiled.demos) > 0  # doctest: +SKIP
        True
    """
    config = config or PromptStageConfig()
    trainset = list(trainset)
    valset = list(valset) if valset is not None else None
    if not trainset:
        raise PromptStageError("trainset is empty: a prompt stage needs at least one example to optimise on")
    if valset is not None and not valset:
        raise PromptStageError("valset is empty: pass None to let the optimizer score on the trainset instead")
    if teleprompter is None and config.optimizer == "mipro" and valset is None and len(trainset) < 2:
        raise PromptStageError("mipro without a valset splits the trainset and needs at least 2 examples")
    if teleprompter is not None and not callable(getattr(teleprompter, "compile", None)):
        raise PromptStageError(f"teleprompter must have a compile(student, trainset=...) method, "
                               f"got {type(teleprompter).__name__}")
    random.Random(config.seed).shuffle(trainset)  # the seed decides which examples the optimizer sees first
    student = copy.deepcopy(program)
    with dspy.context(lm=lm, adapter=adapter or dspy.ChatAdapter(use_json_adapter_fallback=False)):
        if teleprompter is not None:
            return _call_compile(teleprompter, student, trainset, valset)
        rubric = as_rubric(metric)
        optimizer = _build(config, rubric, lm, prompt_lm, reflection_lm, len(trainset))
        return optimizer.compile(student, trainset=trainset, **_compile_kwargs(config, valset))
