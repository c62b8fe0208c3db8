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

Why a plan and a minibatch: scoring every candidate on a 300-example valset spends a 400-rollout share on one
candidate and a half. :func:`plan_prompt_stage` works out, before anything runs, what the share buys (candidates x
val examples each) and refuses a share that cannot buy one useful candidate (:class:`PromptBudgetError`, naming the
smallest share that would). Candidates are scored on a fixed random subsample of the valset of that size; the full
valset is for the stage's record, which the outer loop scores after the stage.

Why failure-tolerant: a candidate whose demos make the model skip a field fails to parse on many examples, and
DSPy's ``Evaluate`` cancels the whole search past ``max_errors`` (10) with a bare "Execution cancelled". Inside a
stage every program run that fails to parse or raises is a failed example, scored ``format_failure_score`` and
counted (:attr:`PromptStageResult.failures`); nothing is cancelled. A run the budget refuses
(:class:`~optimizers.errors.BudgetExhausted`) is counted apart: it means the share is spent.

BootstrapFewShotWithRandomSearch is run candidate by candidate here, from DSPy's own pieces (``LabeledFewShot``,
``BootstrapFewShot``, ``Evaluate``), in DSPy's order: the program as it is, labelled demos only, bootstrapped demos
(trainset order), then bootstrapped demos from seed-shuffled trainsets. When the budget wall is hit mid-search the
best candidate scored before it is returned, not the program the stage started from. When the first demo candidates
all score below the program as it is (``PromptStageConfig.patience``), the search ends there and keeps the program:
the share it did not spend passes to the next stages, where a weight stage can use it.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy
from dspy.utils.callback import BaseCallback

from metrics import Rubric, as_rubric
from optimizers.errors import BudgetExhausted, PromptBudgetError
from rl import dspy_seam
from rl.errors import StageConfigError

__all__ = ["OPTIMIZERS", "PromptBudgetError", "PromptPlan", "PromptStageConfig", "PromptStageError",
           "PromptStageResult", "plan_prompt_stage", "prompt_stage", "run_prompt_stage"]

logger = logging.getLogger(__name__)
NO_CANCEL = 10**9  # max_errors inside a stage: a failed example is scored, never a reason to cancel

OPTIMIZERS = ("bootstrap_rs", "mipro", "gepa", "simba", "random_demos")
AUTO_PRESETS = ("light", "medium", "heavy")


class PromptStageError(StageConfigError):
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
        num_candidate_programs: bootstrap_rs: seed-shuffled bootstraps tried besides the program as it is,
            labelled demos and the unshuffled bootstrap (fewer when the share cannot pay for them); MIPROv2's
            ``num_candidates`` when ``auto`` is None; SIMBA's candidates per step.
        auto: MIPROv2 / GEPA budget preset (``"light"``, ``"medium"``, ``"heavy"``); None uses ``num_trials``
            (mipro) or ``max_metric_calls`` (gepa).
        num_trials: MIPROv2 Bayesian-optimisation trials (required for mipro when ``auto`` is None).
        max_metric_calls: GEPA's metric-call budget (required for gepa when ``auto`` is None).
        max_steps: SIMBA optimisation steps.
        minibatch_size: The fewest val examples a candidate is scored on (the whole valset when smaller):
            bootstrap_rs scores each candidate on more when the share pays for it; MIPROv2 and GEPA get a valset
            subsample of this size; SIMBA's batch size (clamped to the trainset).
        num_threads: Parallel program calls (the policy engine micro-batches them).
        format_failure_score: Score of a candidate's run that fails to parse or raises (bootstrap_rs, GEPA;
            MIPROv2 and SIMBA score such runs 0.0, DSPy's fixed failure score, which is this default).
        seed: Seed of the optimizer's own sampling and of the trainset order it sees (runs with different
            seeds bootstrap from different examples; BootstrapFewShotWithRandomSearch's own candidate seeds
            are fixed, so without the shuffle every seed would pick the same demos).
        patience: bootstrap_rs: end the search when this many demo candidates in a row scored below the program
            as it is, before any has beaten it (None: score every planned candidate). Demos that hurt the first
            three times rarely help the fourth (a model warm-started without them, a program whose fields the
            demos make it skip), and the rollouts not spent here pass to the next stages of the schedule.
    """

    optimizer: str = field(default="bootstrap_rs", metadata={"help": "bootstrap_rs, mipro, gepa, simba, or random_demos "
                                                                     "(the control arm: random labelled demos, no search)"})
    max_bootstrapped_demos: int = field(default=3, metadata={"help": "demos bootstrapped from the program's own "
                                                                     "successful traces, per predictor"})
    max_labeled_demos: int = field(default=3, metadata={"help": "demos taken straight from the trainset labels "
                                                                "(bootstrap_rs, mipro)"})
    num_candidate_programs: int = field(default=4, metadata={"help": "bootstrap_rs: shuffled bootstraps tried; mipro "
                                                                     "(auto=None): candidates; simba: per step"})
    auto: str | None = field(default="light", metadata={"help": "mipro / gepa budget preset: light, medium, heavy; "
                                                                "None uses num_trials / max_metric_calls"})
    num_trials: int | None = field(default=None, metadata={"help": "mipro's optimisation trials (needed when "
                                                                    "auto is None)"})
    max_metric_calls: int | None = field(default=None, metadata={"help": "gepa's metric-call budget (needed when "
                                                                          "auto is None)"})
    max_steps: int = field(default=4, metadata={"help": "simba optimisation steps"})
    minibatch_size: int = field(default=32, metadata={"help": "fewest val examples a candidate is scored on "
                                                              "(simba: its batch size)"})
    num_threads: int = field(default=8, metadata={"help": "parallel program calls (the engine micro-batches them)"})
    format_failure_score: float = field(default=0.0, metadata={"help": "score of a run that fails to parse or "
                                                                       "raises (bootstrap_rs, gepa)"})
    seed: int = field(default=0, metadata={"help": "seed of the optimizer's sampling and of the trainset order"})
    patience: int | None = field(default=3, metadata={"help": "bootstrap_rs: stop after this many demo candidates "
                                                              "in a row below the program as it is (None: never)"})

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise PromptStageError(f"unknown optimizer {self.optimizer!r}; expected one of {OPTIMIZERS} "
                                   f"(or pass any DSPy teleprompter instance as teleprompter=)")
        if self.auto is not None and self.auto not in AUTO_PRESETS:
            raise PromptStageError(f"auto must be one of {AUTO_PRESETS} or None, got {self.auto!r}")
        for name in ("max_bootstrapped_demos", "max_labeled_demos"):
            if getattr(self, name) < 0:
                raise PromptStageError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.patience is not None and self.patience < 1:
            raise PromptStageError(f"patience must be >= 1 or None (score every candidate), got {self.patience}")
        for name in ("num_candidate_programs", "max_steps", "minibatch_size", "num_threads"):
            if getattr(self, name) < 1:
                raise PromptStageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.auto is None and self.optimizer == "mipro" and not self.num_trials:
            raise PromptStageError("mipro with auto=None needs num_trials (e.g. num_trials=8), or set auto='light'")
        if self.auto is None and self.optimizer == "gepa" and not self.max_metric_calls:
            raise PromptStageError("gepa with auto=None needs max_metric_calls (e.g. 64), or set auto='light'")


@dataclass(frozen=True)
class PromptPlan:
    """What a prompt stage's share buys, worked out before anything runs (:func:`plan_prompt_stage`).

    Attributes:
        optimizer: the optimizer's name (or the teleprompter's class name).
        rollouts: the stage's share in program runs (None: no limit).
        candidates: candidate programs to score (bootstrap_rs: the program as it is included; MIPROv2: trials;
            GEPA: an estimate; SIMBA: steps x candidates; 0 when unknown).
        val_examples: val examples each candidate is scored on (a fixed random subsample of the valset).
        bootstrap: program runs at most spent bootstrapping demos (all candidates together).
        cost: program runs the plan spends at most (None when unknown); never more than ``rollouts``.
        config: the optimizer's own knobs, sized to the share.
        candidate_names: bootstrap_rs only: the candidates in the order they are built and scored.
    """

    optimizer: str
    rollouts: int | None
    candidates: int
    val_examples: int
    bootstrap: int
    cost: int | None
    config: PromptStageConfig
    candidate_names: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for the budget plan, e.g. ``bootstrap_rs: 7 candidates x 48 val examples + bootstrapping <= 60
        = <= 396 rollouts``."""
        cost = "no limit" if self.cost is None else f"<= {self.cost} rollouts"
        if self.optimizer == "random_demos":
            k = max(self.config.max_bootstrapped_demos, self.config.max_labeled_demos)
            return f"random_demos: {k} labelled demos drawn at random, no search = 0 rollouts"
        if self.optimizer not in OPTIMIZERS:
            return f"{self.optimizer} (your teleprompter): its own settings decide; the meter stops it at " + (
                f"{self.rollouts} rollouts" if self.rollouts is not None else "no limit")
        if self.optimizer == "simba":
            return (f"simba: {self.config.max_steps} steps x {self.config.num_candidate_programs} candidates on "
                    f"batches of {self.val_examples} train examples = {cost}")
        what = {"bootstrap_rs": "candidates", "mipro": "trials", "gepa": "candidates (about)"}[self.optimizer]
        boot = f" + bootstrapping <= {self.bootstrap}" if self.bootstrap else ""
        return f"{self.optimizer}: {self.candidates} {what} x {self.val_examples} val examples{boot} = {cost}"


def plan_prompt_stage(config: PromptStageConfig, rollouts: int | None, n_train: int, n_val: int, *,
                      teleprompter: Any | None = None) -> PromptPlan:
    """Work out what a share of ``rollouts`` program runs buys, before anything runs.

    A candidate is scored on ``val_examples`` val examples, at least ``min(minibatch_size, n_val)``. bootstrap_rs
    tries the program as it is, labelled demos, bootstrapped demos and ``num_candidate_programs`` seed-shuffled
    bootstraps (each bootstrap runs the program on at most ``4 x max_bootstrapped_demos`` train examples); when the
    share cannot pay for all of them at the minimum it drops candidates, and when it pays for more it scores each
    on more val examples (up to the whole valset). MIPROv2 gets ``(share - bootstrapping - one evaluation) /
    val_examples`` trials, GEPA the share as ``max_metric_calls``, SIMBA as many steps as fit.

    Args:
        config: the stage's settings (the caps: candidates, trials, steps, metric calls).
        rollouts: the stage's share (None: no limit; candidates are then scored on the whole valset).
        n_train, n_val: examples available (``n_val``: the valset, or the trainset when there is none).
        teleprompter: a user teleprompter, which sizes itself (the plan only records the share).

    Raises:
        PromptBudgetError: the share cannot buy one useful candidate (the program and one other, each scored on
            the minimum); ``min_rollouts`` is the smallest share that would.

    Example:
        >>> plan = plan_prompt_stage(PromptStageConfig(), 400, n_train=200, n_val=300)
        >>> plan.describe()
        'bootstrap_rs: 7 candidates x 48 val examples + bootstrapping <= 60 = <= 396 rollouts'
    """
    c = dataclasses.replace(config)
    n_train, n_val = max(1, n_train), max(1, n_val)
    low = min(n_val, c.minibatch_size)
    k = c.max_bootstrapped_demos
    per_boot = min(n_train, 4 * k) if k else 0
    if teleprompter is not None:
        return PromptPlan(type(teleprompter).__name__, rollouts, 0, n_val, 0, rollouts, c)
    if c.optimizer == "random_demos":
        return PromptPlan("random_demos", rollouts, 1, 0, 0, 0, c)

    def refuse(need: int, what: str) -> PromptBudgetError:
        reason = f"{c.optimizer} needs at least {need} rollouts to {what}"
        return PromptBudgetError(
            f"a prompt stage share of {rollouts} rollouts cannot buy one useful candidate: {reason}. Raise the "
            f"share to {need}, or lower minibatch_size (now {c.minibatch_size}: the fewest val examples a candidate "
            "is scored on)", min_rollouts=need, reason=reason)

    if c.optimizer == "bootstrap_rs":
        fixed = ("current",) + (("labeled",) if c.max_labeled_demos else ())
        boots = ("bootstrap",) + tuple(f"bootstrap-{s}" for s in range(c.num_candidate_programs)) if k else ()
        if len(fixed) + len(boots) < 2:
            raise PromptStageError("bootstrap_rs with max_bootstrapped_demos=0 and max_labeled_demos=0 has no "
                                   "candidate besides the program itself; allow some demos")
        if rollouts is None:
            names = fixed + boots
            return PromptPlan("bootstrap_rs", None, len(names), n_val, len(boots) * per_boot, None, c, names)
        for b in range(len(boots), -1, -1):
            names = fixed + boots[:b]
            if len(names) < 2:
                break
            val = (rollouts - b * per_boot) // len(names)
            if val >= low:
                val = min(val, n_val)
                c.num_candidate_programs = max(1, b - 1)
                return PromptPlan("bootstrap_rs", rollouts, len(names), val, b * per_boot,
                                  len(names) * val + b * per_boot, c, names)
        raise refuse(2 * low + (0 if c.max_labeled_demos else per_boot),
                     f"score the program and one candidate on {low} val examples each")
    if c.optimizer == "mipro":
        boot = c.num_candidate_programs * per_boot
        if rollouts is None:
            return PromptPlan("mipro", None, c.num_trials or 0, n_val, boot, None, c)
        trials = (rollouts - boot - low) // low  # the default program is scored once, then one candidate per trial
        if trials < 1:
            raise refuse(boot + 2 * low, f"bootstrap {c.num_candidate_programs} demo sets and score the program and "
                                         f"one trial on {low} val examples each")
        c.auto, c.num_trials = None, min(c.num_trials or trials, trials)
        return PromptPlan("mipro", rollouts, c.num_trials, low, boot, boot + (1 + c.num_trials) * low, c)
    if c.optimizer == "gepa":
        if rollouts is None:
            return PromptPlan("gepa", None, 0, n_val, 0, None, c)
        reflection = 3  # GEPA's reflection minibatch: each proposal runs on 3 train examples before the valset
        if rollouts < 2 * low + 2 * reflection:
            raise refuse(2 * low + 2 * reflection, f"score the program and one proposal on {low} val examples each")
        c.auto, c.max_metric_calls = None, min(c.max_metric_calls or rollouts, rollouts)
        candidates = max(1, (c.max_metric_calls - low) // (low + 2 * reflection))
        return PromptPlan("gepa", rollouts, candidates, low, 0, c.max_metric_calls, c)
    bsize = min(c.minibatch_size, n_train)  # simba: bsize x (candidates + 1) runs per step
    per_step = bsize * (c.num_candidate_programs + 1)
    if rollouts is not None:
        if rollouts < per_step:
            raise refuse(per_step, f"run one step ({c.num_candidate_programs} candidates on {bsize} examples)")
        c.max_steps = max(1, min(c.max_steps, rollouts // per_step))
    return PromptPlan("simba", rollouts, c.max_steps * c.num_candidate_programs, bsize, 0,
                      None if rollouts is None else c.max_steps * per_step, c)


def program_shape(module: Any) -> tuple:
    """A module's class and its predictors' names and signature fields: what candidates of one program share."""
    if not isinstance(module, dspy.Module):
        return (type(module).__name__,)
    predictors = tuple((name, tuple(p.signature.fields)) for name, p in module.named_predictors())
    return (type(module).__name__, predictors)


class _RunCounter(BaseCallback):
    """Counts a stage's program runs (top-level calls of a module shaped like the program) by how they ended."""

    def __init__(self, shape: tuple) -> None:
        self.shape = shape
        self.runs = self.failures = self.refused = 0
        self.first_failure = ""
        self._ours: set[str] = set()
        self._lock = threading.Lock()

    def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        if not dspy_seam.in_module_call() and program_shape(instance) == self.shape:
            with self._lock:
                self._ours.add(call_id)
                self.runs += 1

    def on_module_end(self, call_id: str, outputs: Any | None, exception: BaseException | None = None) -> None:
        with self._lock:
            if call_id not in self._ours:
                return
            self._ours.discard(call_id)
            if isinstance(exception, BudgetExhausted):
                self.refused += 1
            elif exception is not None:
                self.failures += 1
                self.first_failure = self.first_failure or f"{type(exception).__name__}: {exception}"[:300]


def _build(config: PromptStageConfig, rubric: Rubric, lm: dspy.LM, prompt_lm: dspy.LM | None,
           reflection_lm: dspy.LM | None, n_train: int) -> Any:
    """The named DSPy optimizer (MIPROv2, GEPA, SIMBA, LabeledFewShot), configured from ``config``."""
    c = config
    if c.optimizer == "random_demos":
        return dspy.LabeledFewShot(k=max(c.max_bootstrapped_demos, c.max_labeled_demos))
    if c.optimizer == "mipro":
        budget = {"auto": c.auto} if c.auto else {"auto": None, "num_candidates": c.num_candidate_programs}
        return dspy.MIPROv2(metric=rubric.as_dspy_metric(), prompt_model=prompt_lm or lm, task_model=lm,
                            max_bootstrapped_demos=c.max_bootstrapped_demos, max_labeled_demos=c.max_labeled_demos,
                            num_threads=c.num_threads, seed=c.seed, verbose=False, max_errors=NO_CANCEL, **budget)
    if c.optimizer == "gepa":
        budget = {"auto": c.auto} if c.auto else {"max_metric_calls": c.max_metric_calls}
        return dspy.GEPA(metric=rubric.as_gepa_metric(), reflection_lm=reflection_lm or lm, track_stats=True,
                         num_threads=c.num_threads, seed=c.seed, failure_score=c.format_failure_score,
                         **budget)  # track_stats (detailed_results): every candidate
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


# --- bootstrap_rs, candidate by candidate --------------------------------------------------------------------


def _candidate(name: str, student: dspy.Module, trainset: list, rubric: Rubric, config: PromptStageConfig
               ) -> dspy.Module:
    """One of BootstrapFewShotWithRandomSearch's candidates, built with DSPy's own optimizer for it."""
    if name == "current":
        return copy.deepcopy(student)
    if name == "labeled":
        return dspy.LabeledFewShot(k=config.max_labeled_demos).compile(student, trainset=trainset, sample=True)
    k = config.max_bootstrapped_demos
    pool, size = list(trainset), k
    if name != "bootstrap":  # "bootstrap-<seed>": a seed-shuffled trainset and 1..k demos, as DSPy draws them
        seed = int(name.rsplit("-", 1)[1])
        random.Random(seed).shuffle(pool)
        size = random.Random(seed).randint(1, k)
    optimizer = dspy.BootstrapFewShot(metric=rubric.as_dspy_metric(), max_bootstrapped_demos=size,
                                      max_labeled_demos=config.max_labeled_demos, max_rounds=1, max_errors=NO_CANCEL)
    return optimizer.compile(student, trainset=pool[: min(len(pool), 4 * k)])


def _random_search(student: dspy.Module, trainset: list, scoring: list, rubric: Rubric, config: PromptStageConfig,
                   plan: PromptPlan, counter: _RunCounter) -> tuple[dspy.Module, list[dict[str, Any]], str]:
    """Build and score ``plan.candidate_names`` in order. Returns the best scored one, every score, and why the
    search ended before the plan did: ``"wall"`` (the budget; a candidate the wall cut short is not scored, its
    score would not be comparable), ``"patience"`` (``config.patience`` demo candidates in a row scored below the
    program as it is, none above it) or ``""``."""
    evaluate = dspy.Evaluate(devset=scoring, metric=rubric.as_dspy_metric(), num_threads=config.num_threads,
                             max_errors=NO_CANCEL, failure_score=config.format_failure_score,
                             display_progress=False, provide_traceback=False)
    best, best_score, scored = student, None, []
    current_score, worse_in_a_row = None, 0
    for name in plan.candidate_names:
        refused = counter.refused
        program = _candidate(name, student, trainset, rubric, config)
        if counter.refused > refused:
            return best, scored, "wall"
        score = evaluate(program).score / 100.0
        if counter.refused > refused:
            return best, scored, "wall"
        scored.append({"candidate": name, "score": score, "demos": sum(len(p.demos) for p in program.predictors())})
        logger.info("prompt stage: candidate %s scored %.3f on %d val examples", name, score, len(scoring))
        if best_score is None or score > best_score:
            best, best_score = program, score
        if name == "current":
            current_score = score
        elif current_score is not None and best_score <= current_score:
            worse_in_a_row += score < current_score
            if config.patience is not None and worse_in_a_row >= config.patience:
                return best, scored, "patience"
    return best, scored, ""


# --- the stage ------------------------------------------------------------------------------------------------


@dataclass
class PromptStageResult:
    """What a prompt stage did.

    Attributes:
        program: the optimized program (a new module).
        plan: what the share was planned to buy.
        candidates: bootstrap_rs: every candidate scored, in order (``candidate``, ``score``, ``demos``).
        runs: program runs the stage started (refused ones included).
        failures: runs that failed to parse or raised, each scored ``format_failure_score``.
        refused: runs the budget refused (the share was spent).
        first_failure: the first failure's exception, for the record.
        note: what went differently from the plan ("" when nothing did).
    """

    program: dspy.Module
    plan: PromptPlan
    candidates: list[dict[str, Any]] = field(default_factory=list)
    runs: int = 0
    failures: int = 0
    refused: int = 0
    first_failure: str = ""
    note: str = ""

    def details(self) -> dict[str, Any]:
        """The stage record's details (JSON types)."""
        return {"plan": self.plan.describe(), "val_examples_per_candidate": self.plan.val_examples,
                "candidates": self.candidates, "runs": self.runs, "failures": self.failures,
                "refused": self.refused, "first_failure": self.first_failure}


def prompt_stage(program: dspy.Module, trainset: Sequence[dspy.Example], valset: Sequence[dspy.Example] | None,
                 metric: Rubric | Callable[..., Any], *, lm: dspy.LM, config: PromptStageConfig | None = None,
                 rollouts: int | None = None, teleprompter: Any | None = None, prompt_lm: dspy.LM | None = None,
                 reflection_lm: dspy.LM | None = None, adapter: dspy.Adapter | None = None) -> PromptStageResult:
    """Optimise the prompts of ``program`` within a share of ``rollouts`` program runs; see :func:`run_prompt_stage`.

    ``rollouts`` sizes the search (:func:`plan_prompt_stage`); a :class:`optimizers.budget.Meter` around the call
    enforces it. Returns the program and what the stage did (:class:`PromptStageResult`).

    Raises:
        PromptStageError: empty trainset / valset, or too few examples for the optimizer.
        PromptBudgetError: ``rollouts`` cannot buy one useful candidate (raised before anything runs).
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
    pool = valset if valset is not None else trainset
    plan = plan_prompt_stage(config, rollouts, len(trainset), len(pool), teleprompter=teleprompter)
    rng = random.Random(config.seed)
    rng.shuffle(trainset)  # the seed decides which examples the optimizer sees first
    scoring = rng.sample(pool, plan.val_examples) if 0 < plan.val_examples < len(pool) else pool
    student = copy.deepcopy(program)
    dspy_seam.mark_uncompiled(student)  # a program an earlier stage compiled is this stage's uncompiled student
    counter = _RunCounter(program_shape(student))
    callbacks = list(dspy.settings.get("callbacks") or []) + [counter]
    result = PromptStageResult(program=program, plan=plan)
    ended = ""
    with dspy.context(lm=lm, adapter=adapter or dspy.ChatAdapter(use_json_adapter_fallback=False),
                      max_errors=NO_CANCEL, callbacks=callbacks):
        try:
            if teleprompter is not None:
                result.program = _call_compile(teleprompter, student, trainset, None if valset is None else scoring)
            elif config.optimizer == "bootstrap_rs":
                result.program, result.candidates, ended = _random_search(student, trainset, scoring, as_rubric(metric),
                                                                         config, plan, counter)
            else:
                optimizer = _build(plan.config, as_rubric(metric), lm, prompt_lm, reflection_lm, len(trainset))
                result.program = optimizer.compile(student, trainset=trainset, **_compile_kwargs(
                    plan.config, None if valset is None else scoring))
        except Exception as exc:  # noqa: BLE001 - only the budget wall is absorbed; anything else re-raises
            if not counter.refused:
                raise
            result.note = (f"budget share spent inside the optimizer ({type(exc).__name__}: {str(exc)[:200]}); "
                           "kept the program the stage started from")
    result.runs, result.failures, result.refused = counter.runs, counter.failures, counter.refused
    result.first_failure = counter.first_failure
    if ended == "patience":
        result.note = (f"ended the search after {len(result.candidates)} of {plan.candidates} candidates: "
                       f"{config.patience} demo candidates in a row scored below the program as it is; kept it, and "
                       "the unspent share passes to the next stages")
    if not result.note and (ended == "wall" or counter.refused):
        if config.optimizer == "bootstrap_rs" and teleprompter is None:
            best = max(result.candidates, key=lambda c: c["score"], default=None)
            result.note = (f"budget share spent after {len(result.candidates)} of {plan.candidates} candidates; "
                           + (f"kept the best scored before it ({best['candidate']}, {best['score']:.3f})" if best
                              else "none was scored: kept the program the stage started from"))
        else:
            result.note = (f"budget share spent inside the optimizer ({counter.refused} program runs refused, scored "
                           "as failures); kept the optimizer's best candidate")
    if result.note:
        logger.warning("prompt stage: %s", result.note)
    return result


def run_prompt_stage(program: dspy.Module, trainset: Sequence[dspy.Example], valset: Sequence[dspy.Example] | None,
                     metric: Rubric | Callable[..., Any], *, lm: dspy.LM, config: PromptStageConfig | None = None,
                     teleprompter: Any | None = None, prompt_lm: dspy.LM | None = None,
                     reflection_lm: dspy.LM | None = None, adapter: dspy.Adapter | None = None,
                     rollouts: int | None = None) -> dspy.Module:
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
        rollouts: The program runs the stage may spend (sizes the search and the val subsample candidates are
            scored on); None: the optimizer's own settings, candidates scored on the whole valset.

    Returns:
        The optimized program, a new module. :func:`prompt_stage` also returns what the stage did.

    Raises:
        PromptStageError: Empty trainset, or a trainset too small for the chosen optimizer.
        PromptBudgetError: ``rollouts`` cannot buy one useful candidate.

    Example:
        >>> from embedded import tiny_policy
        >>> from programs.tasks import last_digit
        >>> compiled = run_prompt_stage(  # doctest: +SKIP
        ...     last_digit.predict_program(), last_digit.load("train", 12), last_digit.load("val", 16),
        ...     last_digit.correct, lm=tiny_policy().lm(temperature=0.0),
        ...     config=PromptStageConfig("bootstrap_rs", num_candidate_programs=2))
        >>> len(compiled.demos) > 0  # doctest: +SKIP
        True
    """
    return prompt_stage(program, trainset, valset, metric, lm=lm, config=config, rollouts=rollouts,
                        teleprompter=teleprompter, prompt_lm=prompt_lm, reflection_lm=reflection_lm,
                        adapter=adapter).program
