"""Evaluation of a program on the valset after every stage (threads, batched by the engine), and the up-front
check that the model can produce the program's fields at all.

Why not ``dspy.Evaluate``: it returns one float per example, turns a metric that raises into a silent 0, and leaves
batching to a timing window (see :func:`evaluate`). We need the rubric's per-component means (for logging), the gold
metric on the *same* predictions (for the reward-hacking guard), and a clear error when the metric is broken rather
than a quietly low score.

Why the parse check (:func:`check_parses`): a model that never produces a program's output fields (the embedded
tiny model only knows ``question -> answer``: ``Predict("text -> digit")`` parses 0 of 100) makes every stage
spend its budget on runs that all fail alike, from which neither a prompt optimizer nor GRPO can learn. A dozen
runs tell that before any budget is spent.
"""

from __future__ import annotations

import statistics
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy

from metrics import MetricError, Rubric, Score, call_metric
from rl.rollouts import run_rollouts


@dataclass
class Evaluation:
    score: float
    components: dict[str, float]
    gold: float | None
    errors: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    results: list[tuple[dspy.Example, Any, Any]] = field(default_factory=list)  # (example, prediction, Score|None)


@dataclass
class ParseCheck:
    """How many of ``tried`` program runs returned without an error (a parse failure or any exception)."""

    parsed: int
    tried: int
    first_error: str

    @property
    def rate(self) -> float:
        return self.parsed / max(1, self.tried)


def check_parses(program: dspy.Module, examples: Sequence[dspy.Example], lm: dspy.LM, *,
                 num_threads: int = 8) -> ParseCheck:
    """Run ``program`` once on each example at the LM's settings and count the runs that did not raise.

    The outputs are not scored: this only asks whether the model produces the program's fields.
    """
    from dspy.utils.parallelizer import ParallelExecutor

    errors: list[str] = []
    lock = threading.Lock()

    def run(example: dspy.Example) -> bool:
        try:
            program(**example.inputs())
        except Exception as exc:  # noqa: BLE001 - any failure is a run that did not parse; the first is reported
            with lock:
                errors.append(f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:400])
            return False
        return True

    examples = list(examples)
    executor = ParallelExecutor(num_threads=num_threads, max_errors=len(examples) + 1, disable_progress_bar=True)
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        results = executor.execute(run, examples)
    return ParseCheck(parsed=sum(r is True for r in results), tried=len(examples),
                      first_error=errors[0] if errors else "")


def evaluate(program: dspy.Module, valset: Sequence[dspy.Example], rubric: Rubric, lm: dspy.LM, *,
             gold_metric: Callable[..., Any] | None = None, num_threads: int = 16) -> Evaluation:
    """Score ``program`` on ``valset`` with ``rubric`` at the LM's settings (temperature 0 for the outer loop).

    A run that fails to parse scores 0 and is counted in ``errors``; a metric that raises or returns NaN raises
    :class:`MetricError`.

    The runs go through :func:`rl.run_rollouts` (one per example), not ``dspy.Evaluate``: its worker threads are
    declared to a batching engine, so the valset is generated in the same batches in every run on every machine.
    Under ``dspy.Evaluate`` a timing window decides which calls share a batch, and a different padding width can
    flip a greedy token, so the same adapter scored differently from run to run and the best stage could change.
    """
    problems: list[str] = []
    lock = threading.Lock()

    def metric(example: dspy.Example, prediction: dspy.Prediction, trace: Any = None) -> Any:
        try:
            return call_metric(rubric, example, prediction, trace)
        except MetricError as exc:  # reported below, after the whole valset, with the count
            with lock:
                problems.append(str(exc))
            return 0.0

    runs = run_rollouts(program, list(valset), lm, metric, 1, num_threads=num_threads, tag="evaluate")
    if problems:
        raise MetricError(f"the metric failed on {len(problems)} of {len(valset)} valset examples, first: "
                          f"{problems[0]}; fix the metric (it must return a finite number or a Score)")

    components: dict[str, list[float]] = defaultdict(list)
    values, gold_values, rows, errors, results = [], [], [], 0, []
    for run in runs:
        example, prediction = run.example, run.prediction
        score = None if run.error is not None else Score(run.reward, run.components, run.feedback)
        results.append((example, prediction, score))
        if score is None:  # the program raised (e.g. a parse failure)
            errors += 1
            values.append(0.0)
        else:
            values.append(float(score.value))
            for name, value in score.components.items():
                components[name].append(float(value))
        if gold_metric is not None:
            gold_values.append(float(gold_metric(example, prediction, None)) if score is not None else 0.0)
        rows.append({"inputs": dict(example.inputs()), "outputs": dict(prediction.items()) if prediction else {},
                     "score": values[-1]})
    return Evaluation(score=statistics.fmean(values), components={k: statistics.fmean(v) for k, v in components.items()},
                      gold=statistics.fmean(gold_values) if gold_values else None, errors=errors, rows=rows,
                      results=results)
