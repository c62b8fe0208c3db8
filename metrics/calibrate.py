"""Calibrate a rubric to human and gold labels: fitted weights and gates, LM-proposed criteria, labels as gold.

Why this module exists: a rubric's weights are a guess, and an optimiser exploits every wrong guess (a length
component that rewards rambling, a format check that outweighs correctness). People who review rollouts (in the
MLflow UI, or ``cotune review``) say which ones are right; gold answers say the same for free. This module turns
those judgements into a better rubric and keeps the evidence:

* :class:`Label`: one judged rollout: the rubric's component values for it (``Score.components``), the verdict
  (pass/fail or a score), its source (``"HUMAN"`` or ``"GOLD"``, as MLflow's ``AssessmentSource`` types), an id
  (e.g. the MLflow trace id), a rationale, and optionally the example, the prediction and a corrected answer.
* :func:`calibrate`: a logistic fit of the verdicts on the component values, weights constrained to be >= 0
  (a :class:`~metrics.rubric.Rubric` cannot hold negative weights: a component the labels reject falls to 0,
  i.e. logged-only), with the L2 strength and optional extra gates chosen by cross-validation *inside* the fit
  portion. Agreement before (the rubric's current weights) and after is measured on held-out labels the fit
  never saw. The result, a :class:`Calibration`, is saved as a small versioned JSON file that
  :func:`load_calibrated` applies to a rubric with the same components.
* :func:`propose_criteria` / :func:`calibrate_with_candidates`: a proposer LM drafts new
  :class:`~metrics.judge.LMJudge` criteria from labelled rollouts; calibration keeps only those that raise
  cross-validated agreement.
* :func:`labels_as_gold`: human labels as the gold metric of a :class:`~metrics.guards.GoldGuard`.
* :func:`corrected_examples`: a reviewer's corrected answer becomes a training example that records where it
  came from.

Agreement is the *concordance* of the rubric's total with the labels: over every pair of labels where one is
better than the other, the fraction the rubric orders the same way (ties count half). For pass/fail labels this
is the ROC AUC; for graded labels, Harrell's C. Accuracy at a threshold chosen on the fit portion is reported too.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy
import numpy as np
import pydantic

from metrics.base import MISSING, coerce_result, get_field, input_items, short_repr
from metrics.errors import ComponentError, MetricError
from metrics.judge import LMJudge
from metrics.parsing import normalize_text
from metrics.rubric import Rubric

__all__ = [
    "FORMAT_VERSION",
    "Agreement",
    "CalibrationError",
    "CalibrationFileError",
    "CandidateReport",
    "Calibration",
    "ComponentMismatchError",
    "Label",
    "LabelError",
    "LabelGold",
    "NoSignalError",
    "NotEnoughLabelsError",
    "ProposeCriteria",
    "ProposedCriterion",
    "SingleClassError",
    "UnlabelledExampleError",
    "agreement",
    "calibrate",
    "calibrate_with_candidates",
    "corrected_examples",
    "labels_as_gold",
    "load_calibrated",
    "propose_criteria",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the calibrated-rubric JSON file; :func:`load_calibrated` refuses other versions."""

_FORMAT_NAME = "cotune.calibrated_rubric"
_SOURCES = ("HUMAN", "GOLD")
_L2_GRID = (0.01, 0.1, 1.0, 10.0)
_PASS_WORDS = {"pass": 1.0, "passed": 1.0, "yes": 1.0, "true": 1.0, "correct": 1.0, "good": 1.0,
               "fail": 0.0, "failed": 0.0, "no": 0.0, "false": 0.0, "incorrect": 0.0, "bad": 0.0}


# --------------------------------------------------------------------------------------------------- errors
class CalibrationError(MetricError):
    """Base class of the calibration errors below (a :class:`~metrics.errors.MetricError`, so the CLI reports it)."""


class LabelError(CalibrationError):
    """A label is malformed (value not pass/fail or in ``[0, 1]``, an unknown source, bad component values), or
    lacks what an operation needs (the example and prediction to score a candidate criterion)."""


class NotEnoughLabelsError(CalibrationError):
    """Too few labels (or too few of one class) to fit on one part and measure agreement on another."""


class SingleClassError(CalibrationError):
    """Every label has the same verdict: nothing tells a good rollout from a bad one."""


class ComponentMismatchError(CalibrationError):
    """Component names differ between the rubric and the labels, or between the rubric and a calibrated file."""


class CalibrationFileError(CalibrationError):
    """A calibrated-rubric file cannot be read: not JSON, not a cotune calibration, or another format version."""


class NoSignalError(CalibrationError):
    """The fit put weight 0 on every component: none of them agrees with the labels."""


class UnlabelledExampleError(CalibrationError):
    """:class:`LabelGold` was asked about an example id (or answer) no label covers, and has no default."""


# --------------------------------------------------------------------------------------------------- labels
@dataclass(frozen=True)
class Label:
    """One judged rollout: the rubric's component values for it and what a reviewer (or the gold answer) said.

    Why a record of its own: the fit needs only the component values and the verdict, so labels read back from
    MLflow assessments can be calibrated without re-running the program; the optional example and prediction let
    new criteria be scored on the same rollouts, and the corrected answer becomes training data.

    Args:
        id: Identifies the rollout, e.g. the MLflow trace id.
        components: ``{component name: value in [0, 1]}``, as ``Score.components`` gives them.
        value: The verdict: ``True``/``False`` (pass/fail), a score in ``[0, 1]``, or a word such as ``"pass"`` /
            ``"fail"`` / ``"yes"`` / ``"no"``; stored as a float.
        source: ``"HUMAN"`` or ``"GOLD"`` (MLflow ``AssessmentSourceType``; an ``AssessmentSource`` works too);
            ``"CODE"``/``"LLM_JUDGE"`` are the rubric's own scores, and calibrating a rubric to itself is circular,
            so they are refused.
        rationale: The reviewer's reason, if any.
        corrected: A corrected answer: a value for the answer field, or ``{output field: value}``.
        example: The example (inputs and gold), needed to score candidate criteria and to build corrected examples.
        prediction: The program's prediction, needed to score candidate criteria and by :func:`labels_as_gold`.

    Raises:
        LabelError: For a value that is not a verdict, an unknown source, or component values outside ``[0, 1]``.

    Example:
        >>> Label("tr-1", {"exact_match": 1.0, "length": 0.2}, "pass").value
        1.0
        >>> Label("tr-2", {"exact_match": 1.0}, 0.25, source="gold").source
        'GOLD'
    """

    id: str
    components: Mapping[str, float]
    value: float | bool | str
    source: str = "HUMAN"
    rationale: str = ""
    corrected: Any = None
    example: Any = field(default=None, compare=False, repr=False)
    prediction: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", str(self.id))
        object.__setattr__(self, "value", _verdict(self.value, self.id))
        source = str(getattr(self.source, "source_type", self.source)).upper()  # a str or an AssessmentSource
        if source not in _SOURCES:
            raise LabelError(f"label {self.id!r} has source {self.source!r}; calibration uses HUMAN or GOLD labels "
                             "(CODE and LLM_JUDGE assessments are the rubric's own scores): filter them out first")
        object.__setattr__(self, "source", source)
        values = {}
        for name, v in dict(self.components).items():
            try:
                v = float(v)
            except (TypeError, ValueError):
                v = math.nan
            if not (math.isfinite(v) and -1e-9 <= v <= 1 + 1e-9):
                raise LabelError(f"label {self.id!r}: component {name!r} is {self.components[name]!r}; component "
                                 "values must be numbers in [0, 1] (pass Score.components)")
            values[str(name)] = min(1.0, max(0.0, v))
        object.__setattr__(self, "components", values)
        object.__setattr__(self, "rationale", "" if self.rationale is None else str(self.rationale))

    @property
    def passed(self) -> bool:
        """The verdict as pass/fail: a score counts as a pass from 0.5 up."""
        return self.value >= 0.5


def _verdict(value: Any, label_id: str) -> float:
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _PASS_WORDS:
            return _PASS_WORDS[word]
        try:
            value = float(word)
        except ValueError:
            raise LabelError(f"label {label_id!r} has verdict {value!r}; use pass/fail, yes/no, true/false or a "
                             "score in [0, 1]") from None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LabelError(f"label {label_id!r} has verdict {value!r} of type {type(value).__name__}; use a bool or a "
                         "score in [0, 1]") from None
    if not (math.isfinite(number) and 0.0 <= number <= 1.0):
        raise LabelError(f"label {label_id!r} has verdict {number!r}; scores must be in [0, 1] (rescale a 1..5 "
                         "rating to (r - 1) / 4)")
    return number


# --------------------------------------------------------------------------------------------------- agreement
@dataclass(frozen=True)
class Agreement:
    """How well a rubric's totals agree with a set of labels.

    Attributes:
        concordance: Over pairs of labels where one is better, the fraction the totals order the same way (ties
            count half): the ROC AUC for pass/fail labels. 0.5 is chance, 1.0 perfect.
        accuracy: Fraction of labels on the right side of ``threshold`` (a pass is a verdict >= 0.5).
        threshold: The total from which the rubric calls a rollout a pass (chosen on the fit labels).
        n: Number of labels measured.
    """

    concordance: float
    accuracy: float
    threshold: float
    n: int

    def as_dict(self) -> dict[str, float]:
        """The fields as a plain dict (for JSON and MLflow metrics)."""
        return {"concordance": self.concordance, "accuracy": self.accuracy, "threshold": self.threshold,
                "n": self.n}


def _concordance(scores: np.ndarray, y: np.ndarray) -> float:
    """Harrell's C of ``scores`` against ``y`` (the AUC for 0/1 ``y``); NaN when no pair differs in ``y``."""
    s = np.round(np.asarray(scores, float), 12)
    y = np.asarray(y, float)
    right = ties = pairs = 0.0
    for start in range(0, len(y), 1024):  # rows in blocks: memory stays O(1024 n) for many labels
        better = y[start:start + 1024, None] > y[None, :]
        ds = s[start:start + 1024, None] - s[None, :]
        pairs += better.sum()
        right += ((ds > 0) & better).sum()
        ties += ((ds == 0) & better).sum()
    return float((right + 0.5 * ties) / pairs) if pairs else math.nan


def _best_threshold(scores: np.ndarray, passed: np.ndarray) -> float:
    scores = np.round(scores, 12)
    levels = np.unique(scores)
    cuts = np.concatenate([levels[:1], (levels[:-1] + levels[1:]) / 2])  # "nothing passes" is not a rubric
    acc = np.array([((scores >= c) == passed).mean() for c in cuts])
    best = np.flatnonzero(acc >= acc.max() - 1e-12)
    return float(min(1.0, max(0.0, cuts[best[len(best) // 2]])))


def agreement(totals: Sequence[float], labels: Sequence[Label], threshold: float = 0.5) -> Agreement:
    """Agreement of rubric totals with labels: concordance (AUC) and accuracy at ``threshold``.

    Why: one number to compare rubrics on the same labels, with no threshold to tune for the concordance.

    Example:
        >>> labels = [Label("a", {}, "pass"), Label("b", {}, "fail"), Label("c", {}, "fail")]
        >>> agreement([0.9, 0.2, 0.9], labels)
        Agreement(concordance=0.75, accuracy=0.6666666666666666, threshold=0.5, n=3)
    """
    totals = np.asarray(totals, float)
    y = np.array([lab.value for lab in labels], float)
    passed = y >= 0.5
    return Agreement(_concordance(totals, y), float(((totals >= threshold) == passed).mean()), float(threshold),
                     len(labels))


# --------------------------------------------------------------------------------------------------- fitting
def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, iters: int = 100) -> tuple[np.ndarray, float]:
    """Weights >= 0 and a free intercept minimising the mean log loss of ``y`` on ``x`` plus ``l2 / 2 * |w|^2``.

    A projected Newton loop with backtracking: the problem has a handful of variables, so each step is a tiny
    linear solve, about a hundred times faster than a general optimiser (calibration fits hundreds of models).
    """
    n, k = x.shape
    a = np.hstack([x, np.ones((n, 1))])
    reg = np.r_[np.full(k, float(l2)), 0.0]

    def loss(t: np.ndarray) -> float:
        z = a @ t
        return float(np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(reg * t * t))

    theta = np.zeros(k + 1)
    value = loss(theta)
    for _ in range(iters):
        p = 0.5 * (1.0 + np.tanh(0.5 * (a @ theta)))  # the logistic function, without overflow
        grad = a.T @ (p - y) / n + reg * theta
        free = np.ones(k + 1, bool)
        free[:k] = ~((theta[:k] <= 0.0) & (grad[:k] > 0.0))  # at the bound and pushing out of it: held at 0
        if np.abs(grad[free]).max(initial=0.0) < 1e-9:
            break
        af = a[:, free]
        hess = (af.T * (p * (1.0 - p))) @ af / n + np.diag(reg[free]) + 1e-9 * np.eye(int(free.sum()))
        step = np.zeros(k + 1)
        step[free] = np.linalg.solve(hess, grad[free])
        t = 1.0
        while True:
            cand = theta - t * step
            cand[:k] = np.maximum(cand[:k], 0.0)
            new_value = loss(cand)
            if new_value <= value - 1e-4 * grad @ (theta - cand) or t < 1e-6:
                break
            t *= 0.5
        if new_value >= value - 1e-12:
            break
        theta, value = cand, new_value
    return theta[:k].copy(), float(theta[k])


def _folds(passed: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    fold = np.empty(len(passed), int)
    for cls in (True, False):
        idx = rng.permutation(np.flatnonzero(passed == cls))
        fold[idx] = np.arange(len(idx)) % k
    return fold


def _cv_score(x: np.ndarray, y: np.ndarray, fold: np.ndarray, l2: float) -> float:
    scores = []
    for f in np.unique(fold):
        train, test = fold != f, fold == f
        w, _ = _fit_logistic(x[train], y[train], l2)
        c = _concordance(x[test] @ w, y[test])
        if not math.isnan(c):
            scores.append(c)
    return float(np.mean(scores)) if scores else math.nan


def _select(x: np.ndarray, y: np.ndarray, fold: np.ndarray, grid: Sequence[float]) -> tuple[float, float]:
    """The L2 strength with the best cross-validated concordance (ties: the stronger one) and that concordance."""
    best = (-1.0, max(grid))
    for l2 in sorted(grid, reverse=True):
        score = _cv_score(x, y, fold, l2)
        if score > best[0] + 1e-9:
            best = (score, l2)
    return best[1], best[0]


def _apply_gates(x: np.ndarray, names: Sequence[str], gates: Mapping[str, tuple[str, float]]) -> np.ndarray:
    """Component values with extra gates applied (values already carry the rubric's own gates)."""
    x = x.copy()
    col = {n: i for i, n in enumerate(names)}
    for _ in range(len(gates)):  # gates may chain: one pass per gate reaches a fixed point (gates only close)
        for gated, (requires, threshold) in gates.items():
            x[:, col[gated]] = np.where(x[:, col[requires]] >= threshold - 1e-9, x[:, col[gated]], 0.0)
    return x


def _gate_chain(gates: Mapping[str, tuple[str, float]], start: str) -> set[str]:
    seen = set()
    while start in gates and start not in seen:
        seen.add(start)
        start = gates[start][0]
    return seen | {start}


# --------------------------------------------------------------------------------------------------- result
@dataclass(frozen=True)
class CandidateReport:
    """What calibration found for one proposed component: cross-validated concordance without and with it."""

    criterion: str
    without: float
    with_it: float
    kept: bool


@dataclass(frozen=True)
class Calibration:
    """The outcome of :func:`calibrate`: new weights and gates, with the evidence that they agree better.

    Attributes:
        rubric_name: Name of the calibrated rubric.
        names: Component names of the calibrated rubric (the original ones, then any added criteria).
        old_weights: The rubric's effective weights before (0 for added criteria).
        weights: The fitted weights, summing to 1 (0 = logged-only: the labels did not support it).
        old_gates: The rubric's gates before; ``gates``: after (the old ones plus any the fit added).
        threshold: The total from which the calibrated rubric calls a rollout a pass (for ``as_dspy_metric``).
        before: Agreement of the old weights with the held-out labels.
        after: Agreement of the new weights with the same held-out labels, which the fit never saw.
        fit_ids: Ids of the labels the fit used; ``heldout_ids``: of those it did not.
        sources: How many labels came from each source (``{"HUMAN": n, "GOLD": m}``).
        l2: The L2 strength chosen by cross-validation on the fit labels.
        seed: Seed of the split and the folds.
        created: ISO date and time of the calibration (UTC).
        added: Components added by :func:`calibrate_with_candidates` (``{name: component}``).
        candidates: What happened to each proposed component.

    Example:
        >>> import os, tempfile
        >>> from metrics import Custom
        >>> rubric = Rubric([Custom(lambda e, p: p["ok"], name="ok"), Custom(lambda e, p: p["long"], name="long")])
        >>> labels = [Label(f"t{i}", {"ok": i % 2, "long": i % 3 == 0}, i % 2 == 1 and i % 3 != 0)
        ...           for i in range(30)]
        >>> cal = calibrate(rubric, labels)
        >>> path = cal.save(os.path.join(tempfile.mkdtemp(), "calibrated.json"))
        >>> load_calibrated(path, rubric).effective_weights == cal.to_rubric().effective_weights
        True
    """

    rubric_name: str
    names: tuple[str, ...]
    old_weights: dict[str, float]
    weights: dict[str, float]
    old_gates: dict[str, tuple[str, float]]
    gates: dict[str, tuple[str, float]]
    threshold: float
    before: Agreement
    after: Agreement
    fit_ids: tuple[str, ...]
    heldout_ids: tuple[str, ...]
    sources: dict[str, int]
    l2: float
    seed: int
    created: str
    added: dict[str, Any] = field(default_factory=dict, repr=False)
    candidates: dict[str, CandidateReport] = field(default_factory=dict)
    base: Rubric | None = field(default=None, repr=False, compare=False)

    @property
    def n_fit(self) -> int:
        """Number of labels the fit used."""
        return len(self.fit_ids)

    @property
    def n_heldout(self) -> int:
        """Number of labels agreement was measured on."""
        return len(self.heldout_ids)

    def to_rubric(self, rubric: Rubric | None = None) -> Rubric:
        """The calibrated rubric: the same components (plus added criteria), fitted weights and gates.

        Args:
            rubric: The rubric to apply the weights to; default: the one that was calibrated.

        Raises:
            ComponentMismatchError: When ``rubric``'s components are not the calibrated ones.
        """
        base = rubric if rubric is not None else self.base
        if base is None:
            raise CalibrationError("this Calibration has no rubric attached: pass to_rubric(rubric)")
        return _build(base, self.names, self.weights, self.gates, self.added, where="this calibration")

    def evidence(self) -> dict[str, Any]:
        """The evidence as a JSON-ready dict (what :meth:`save` writes and what to log to MLflow)."""
        return {
            "before": self.before.as_dict(), "after": self.after.as_dict(),
            "labels": {"fit": self.n_fit, "heldout": self.n_heldout, "sources": dict(self.sources)},
            "heldout_ids": list(self.heldout_ids), "l2": self.l2, "seed": self.seed,
            "old_weights": dict(self.old_weights), "old_gates": {g: list(v) for g, v in self.old_gates.items()},
            "candidates": {n: dataclasses.asdict(c) for n, c in self.candidates.items()},
        }

    def summary(self) -> str:
        """A few lines for a terminal: agreement before -> after on held-out labels, and every weight's change."""
        b, a = self.before, self.after
        lines = [f"rubric {self.rubric_name!r}: {self.n_fit} labels fitted, {self.n_heldout} held out "
                 f"(seed {self.seed})",
                 f"held-out concordance {b.concordance:.3f} -> {a.concordance:.3f}, "
                 f"accuracy {b.accuracy:.3f} -> {a.accuracy:.3f} (pass from total {a.threshold:.3f})"]
        for n in self.names:
            gate = f"  gated by {self.gates[n][0]}" if n in self.gates else ""
            new = " (added)" if n in self.added else ""
            lines.append(f"  {n}: {self.old_weights.get(n, 0.0):.3f} -> {self.weights[n]:.3f}{gate}{new}")
        for n, c in self.candidates.items():
            lines.append(f"  candidate {n}: cv {c.without:.3f} -> {c.with_it:.3f}, {'kept' if c.kept else 'dropped'}")
        return "\n".join(lines)

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the calibrated rubric as a small versioned JSON file an experiment can name (``extra``: more
        top-level fields, e.g. how the experiment names the base rubric).

        Why JSON: a reviewer can read and diff it, and it holds only names and numbers (plus the criterion text of
        added LM judges), so it never executes anything when loaded. Apply it with :func:`load_calibrated`.
        """
        added = {}
        for n, comp in self.added.items():
            if not isinstance(comp, LMJudge):
                raise CalibrationError(f"added component {n!r} is a {type(comp).__name__}; only LMJudge criteria "
                                       "can be saved (add other components to the rubric itself)")
            added[n] = {"kind": "LMJudge", "criterion": comp.criterion, "field": comp.field,
                        "input_fields": comp.input_fields, "scale": list(comp.scale)}
        data = {
            "format": _FORMAT_NAME, "version": FORMAT_VERSION, "rubric": self.rubric_name,
            "components": list(self.names), "weights": dict(self.weights),
            "gates": {g: list(v) for g, v in self.gates.items()}, "threshold": self.threshold, "added": added,
            "evidence": self.evidence(), "created": self.created, **(extra or {}),
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        return path


def _build(base: Rubric, names: Sequence[str], weights: Mapping[str, float], gates: Mapping[str, tuple[str, float]],
           added: Mapping[str, Any], where: str) -> Rubric:
    components = base.components
    for n, comp in added.items():
        components.setdefault(n, comp)
    if set(components) != set(names):
        missing, extra = sorted(set(names) - set(components)), sorted(set(components) - set(names))
        raise ComponentMismatchError(
            f"{where} was fitted for components {list(names)}, but the rubric {base.name!r} has {list(base.names)} "
            f"(missing: {missing}, not fitted: {extra}). Apply it to a rubric with the same components, or run "
            "calibrate() again for this rubric.")
    components = {n: components[n] for n in names}
    if list(names) == list(base.names) and dict(gates) == base.gates:
        return base.with_weights(dict(weights))
    return Rubric(components, dict(weights), normalize=base.normalize, gates=dict(gates), on_error=base.on_error,
                  name=base.name)


# --------------------------------------------------------------------------------------------------- calibrate
def _split(labels: Sequence[Label], holdout: float | Sequence[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    passed = np.array([lab.passed for lab in labels])
    if not isinstance(holdout, (int, float)):
        wanted = {str(i) for i in holdout}
        unknown = wanted - {lab.id for lab in labels}
        if unknown:
            raise LabelError(f"holdout names {len(unknown)} ids no label has (e.g. {sorted(unknown)[:3]})")
        held = np.array([lab.id in wanted for lab in labels])
    else:
        if not 0.0 < holdout < 1.0:
            raise CalibrationError(f"holdout must be a fraction in (0, 1) or a list of label ids, got {holdout!r}")
        rng = np.random.default_rng(seed)
        held = np.zeros(len(labels), bool)
        for cls in (True, False):
            idx = rng.permutation(np.flatnonzero(passed == cls))
            k = min(max(1, round(holdout * len(idx))), len(idx) - 2)
            held[idx[:k]] = True
    for part, mask in (("held-out", held), ("fit", ~held)):
        for cls, word in ((True, "pass"), (False, "fail")):
            need = 1 if part == "held-out" else 2
            if (passed[mask] == cls).sum() < need:
                raise NotEnoughLabelsError(f"the {part} labels have fewer than {need} {word} verdict(s); label more "
                                           "rollouts of that kind or change holdout")
    return np.flatnonzero(~held), np.flatnonzero(held)


def _check_labels(labels: Sequence[Label], min_labels: int) -> None:
    if len(labels) < min_labels:
        raise NotEnoughLabelsError(f"{len(labels)} labels; calibration needs at least {min_labels} (some to fit, some "
                                   "to measure agreement on): review more rollouts or lower min_labels")
    passed = [lab.passed for lab in labels]
    if all(passed) or not any(passed):
        raise SingleClassError(f"all {len(labels)} labels are {'passes' if passed[0] else 'fails'}; calibration needs "
                               "both passes and fails to learn what separates them: label some of the other kind")
    minority = min(sum(passed), len(passed) - sum(passed))
    if minority < 3:
        raise NotEnoughLabelsError(f"only {minority} label(s) of the rarer verdict; calibration needs at least 3 "
                                   "(2 to fit, 1 to hold out): label more rollouts of that kind")
    ids = [lab.id for lab in labels]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:3]
        raise LabelError(f"label ids repeat (e.g. {dup}); keep one label per rollout (the latest review)")


def _matrix(labels: Sequence[Label], names: Sequence[str], rubric_name: str) -> np.ndarray:
    for lab in labels:
        missing = [n for n in names if n not in lab.components]
        if missing:
            raise ComponentMismatchError(
                f"label {lab.id!r} has no value for components {missing} of rubric {rubric_name!r} (it has "
                f"{sorted(lab.components)}); score its rollout with this rubric (Score.components) before calibrating")
    return np.array([[lab.components[n] for n in names] for lab in labels], float).reshape(len(labels), len(names))


def _search_gates(x: np.ndarray, y: np.ndarray, fold: np.ndarray, names: Sequence[str],
                  gates: dict[str, tuple[str, float]], grid: Sequence[float], min_gain: float,
                  score: float) -> tuple[dict[str, tuple[str, float]], float]:
    """Greedily add the gate ``gated requires other >= 1`` that most raises cross-validated concordance."""
    gates = dict(gates)
    while True:
        best: tuple[float, str, str] | None = None
        for g in names:
            if g in gates:
                continue
            for r in names:
                if r == g or g in _gate_chain(gates, r):
                    continue
                trial = {**gates, g: (r, 1.0)}
                xt = _apply_gates(x, names, trial)
                if np.array_equal(xt, _apply_gates(x, names, gates)):
                    continue
                s = _select(xt, y, fold, grid)[1]
                if s > score + min_gain and (best is None or s > best[0] + 1e-12):
                    best = (s, g, r)
        if best is None:
            return gates, score
        score, g, r = best
        gates[g] = (r, 1.0)


def _calibrate(rubric: Rubric, labels: Sequence[Label], names: Sequence[str], added: Mapping[str, Any], *,
               holdout: float | Sequence[str], seed: int, fit_gates: bool, l2_grid: Sequence[float],
               min_gain: float, candidates: Mapping[str, CandidateReport] | None = None,
               split: tuple[np.ndarray, np.ndarray] | None = None) -> Calibration:
    x = _matrix(labels, names, rubric.name)
    y = np.array([lab.value for lab in labels], float)
    fit, held = split if split is not None else _split(labels, holdout, seed)
    fold = _folds(y[fit] >= 0.5, min(5, int(min((y[fit] >= 0.5).sum(), (y[fit] < 0.5).sum()))),
                  np.random.default_rng([seed, 1]))
    gates = rubric.gates
    l2, score = _select(x[fit], y[fit], fold, l2_grid)
    if fit_gates:
        gates, _ = _search_gates(x[fit], y[fit], fold, names, gates, l2_grid, min_gain, score)
        l2, score = _select(_apply_gates(x[fit], names, gates), y[fit], fold, l2_grid)
    xg = _apply_gates(x, names, gates)
    w, _ = _fit_logistic(xg[fit], y[fit], l2)
    if w.sum() <= 0:
        raise NoSignalError(f"the fit put weight 0 on every component of {rubric.name!r}: none agrees with the "
                            f"{len(fit)} fit labels. Check the labels, or add components that capture what reviewers "
                            "judge (propose_criteria)")
    w = np.where(w > 1e-9 * w.max(), w, 0.0)
    w = w / w.sum()
    old = np.array([rubric.effective_weights.get(n, 0.0) for n in names])
    held_labels = [labels[i] for i in held]
    t_old = _best_threshold(x[fit] @ old, y[fit] >= 0.5)
    t_new = _best_threshold(xg[fit] @ w, y[fit] >= 0.5)
    before = agreement(x[held] @ old, held_labels, t_old)
    after = agreement(xg[held] @ w, held_labels, t_new)
    sources = {s: sum(lab.source == s for lab in labels) for s in _SOURCES}
    return Calibration(
        rubric_name=rubric.name, names=tuple(names), old_weights=dict(zip(names, old.tolist())),
        weights=dict(zip(names, w.tolist())), old_gates=rubric.gates, gates=dict(gates), threshold=t_new,
        before=before, after=after, fit_ids=tuple(labels[i].id for i in fit),
        heldout_ids=tuple(lab.id for lab in held_labels),
        sources=sources, l2=float(l2), seed=int(seed), created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        added=dict(added), candidates=dict(candidates or {}), base=rubric)


def calibrate(rubric: Rubric, labels: Sequence[Label], *, holdout: float | Sequence[str] = 0.3, seed: int = 0,
              fit_gates: bool = True, min_labels: int = 10, l2_grid: Sequence[float] = _L2_GRID,
              min_gain: float = 0.01) -> Calibration:
    """Fit the rubric's weights (and extra gates) so its total agrees with human and gold labels.

    Why: hand-set weights drift from what people mean, and an optimiser finds the gap. A logistic fit of the
    verdicts on the component values, with weights kept >= 0 (a component the labels reject becomes logged-only)
    and the L2 strength picked by cross-validation on the fit labels, gives weights the labels support. A gate
    ``A requires B >= 1`` is added only when it raises cross-validated concordance by more than ``min_gain``.
    Agreement before and after is measured on ``holdout`` labels the fit never saw.

    Args:
        rubric: The rubric to calibrate; every label must carry a value for each of its components.
        labels: HUMAN and GOLD :class:`Label`\\ s (one per rollout).
        holdout: Fraction of labels held out (stratified by verdict), or the ids of the labels to hold out.
        seed: Seed of the split and of the cross-validation folds; the result is deterministic given it.
        fit_gates: Also search for gates that raise agreement.
        min_labels: Fewest labels accepted.
        l2_grid: L2 strengths to choose from.
        min_gain: Smallest rise of cross-validated concordance that justifies an extra gate.

    Returns:
        A :class:`Calibration`; ``.to_rubric()`` is the calibrated rubric, ``.save(path)`` writes it.

    Raises:
        NotEnoughLabelsError: Fewer than ``min_labels`` labels, or fewer than 3 of the rarer verdict.
        SingleClassError: All labels pass, or all fail.
        ComponentMismatchError: A label lacks one of the rubric's components.
        NoSignalError: No component agrees with the labels at all.

    Example:
        >>> from metrics import Custom
        >>> rubric = Rubric([Custom(lambda e, p: p["ok"], name="ok"), Custom(lambda e, p: p["long"], name="long")])
        >>> labels = [Label(f"t{i}", {"ok": i % 2, "long": i % 3 == 0}, i % 2 == 1 and i % 3 != 0)
        ...           for i in range(30)]
        >>> cal = calibrate(rubric, labels, seed=0)
        >>> cal.weights["long"], cal.after.concordance > cal.before.concordance, cal.n_fit + cal.n_heldout
        (0.0, True, 30)
    """
    labels = list(labels)
    _check_labels(labels, min_labels)
    return _calibrate(rubric, labels, rubric.names, {}, holdout=holdout, seed=seed, fit_gates=fit_gates,
                      l2_grid=l2_grid, min_gain=min_gain)


# --------------------------------------------------------------------------------------------------- file
def load_calibrated(path: str | Path, rubric: Rubric, *, judge_lm: Any = None) -> Rubric:
    """Apply a calibrated-rubric file (from :meth:`Calibration.save`) to ``rubric``.

    Why refuse mismatches: weights fitted for other components mean nothing for these; applying them silently
    would train against a rubric nobody calibrated.

    Args:
        path: The JSON file.
        rubric: A rubric with the components the file was fitted for. Criteria the calibration added (LM judges)
            are rebuilt from the file when the rubric lacks them.
        judge_lm: The ``dspy.LM`` for rebuilt LM judges (``None``: ``dspy.settings.lm`` at call time).

    Raises:
        CalibrationFileError: Not a readable cotune calibration of this format version.
        ComponentMismatchError: The rubric's component names are not those in the file.

    Example:
        >>> import tempfile, os
        >>> from metrics import ExactMatch, LengthPenalty
        >>> rubric = Rubric([ExactMatch("answer"), LengthPenalty("answer", 20)])
        >>> path = os.path.join(tempfile.mkdtemp(), "r.json")
        >>> _ = Path(path).write_text(json.dumps({"format": "cotune.calibrated_rubric", "version": 1,
        ...     "rubric": "rubric", "components": ["exact_match", "length"], "weights": {"exact_match": 1.0,
        ...     "length": 0.0}, "gates": {}}))
        >>> load_calibrated(path, rubric).effective_weights
        {'exact_match': 1.0, 'length': 0.0}
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CalibrationFileError(f"cannot read calibrated rubric {path}: {e}; pass the file Calibration.save "
                                   "wrote") from e
    if not isinstance(data, dict) or data.get("format") != _FORMAT_NAME:
        raise CalibrationFileError(f"{path} is not a cotune calibrated rubric (no \"format\": \"{_FORMAT_NAME}\")")
    if data.get("version") != FORMAT_VERSION:
        raise CalibrationFileError(f"{path} has format version {data.get('version')!r}; this cotune reads version "
                                   f"{FORMAT_VERSION}: re-run the calibration with this version")
    try:
        names = [str(n) for n in data["components"]]
        weights = {str(k): float(v) for k, v in data["weights"].items()}
        gates = {str(g): (str(v[0]), float(v[1])) for g, v in data.get("gates", {}).items()}
        added = {}
        for n, spec in (data.get("added") or {}).items():
            if n in rubric.names:
                continue
            if spec.get("kind") != "LMJudge":
                raise CalibrationFileError(f"{path}: added component {n!r} has unknown kind {spec.get('kind')!r}")
            added[n] = LMJudge(spec["criterion"], lm=judge_lm, name=n, input_fields=spec.get("input_fields"),
                               field=spec.get("field", "answer"), scale=tuple(spec.get("scale", (0.0, 1.0))))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise CalibrationFileError(f"{path} is a damaged calibrated rubric ({type(e).__name__}: {e}); re-run the "
                                   "calibration") from e
    if data.get("rubric") != rubric.name:
        logger.info("applying calibration of rubric %r from %s to rubric %r", data.get("rubric"), path, rubric.name)
    return _build(rubric, names, weights, gates, added, where=str(path))


# --------------------------------------------------------------------------------------------------- proposals
class ProposedCriterion(pydantic.BaseModel):
    """One drafted criterion: a short snake_case name and the criterion text an LM judge grades against."""

    name: str
    criterion: str


class ProposeCriteria(dspy.Signature):
    """Reviewers judged responses to a task as PASS or FAIL. Propose grading criteria for a strict LM judge that
    separate the PASS responses from the FAIL ones, especially where the existing rubric components disagree with
    the reviewers. Each criterion checks one quality, can be judged from the task inputs and the response alone
    (no gold answer), and says what a good response does. Give each a short snake_case name."""

    task_description: str = dspy.InputField(desc="what the program is for")
    existing_components: str = dspy.InputField(desc="the rubric's current components, one per line")
    labelled_examples: str = dspy.InputField(desc="judged responses: verdict, inputs, response, reviewer rationale")
    n: int = dspy.InputField(desc="how many criteria to propose")
    criteria: list[ProposedCriterion] = dspy.OutputField(desc="the proposed criteria")


def _slug(text: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[^a-z0-9]+", "_", text.lower())).strip("_")[:40]


def _render(labels: Sequence[Label], field_name: str | None, limit: int) -> str:
    passes = [lab for lab in labels if lab.passed]
    fails = [lab for lab in labels if not lab.passed]
    chosen: list[Label] = []
    while len(chosen) < limit and (passes or fails):  # alternate verdicts so both kinds are shown
        for pool in (fails, passes):
            if pool and len(chosen) < limit:
                chosen.append(pool.pop(0))
    blocks = []
    for i, lab in enumerate(chosen, 1):
        inputs = "; ".join(f"{k}: {v}" for k, v in input_items(lab.example).items()) or "(not recorded)"
        if lab.prediction is None:
            response = "(not recorded)"
        elif field_name is not None and get_field(lab.prediction, field_name) is not MISSING:
            response = str(get_field(lab.prediction, field_name))
        else:
            response = "; ".join(f"{k}: {v}" for k, v in input_items(lab.prediction).items())
        response = response if len(response) <= 600 else response[:597] + "..."
        verdict = ("PASS" if lab.passed else "FAIL") + (f" ({lab.value:.2f})" if 0 < lab.value < 1 else "")
        comps = ", ".join(f"{k}={v:.2f}" for k, v in lab.components.items())
        blocks.append(f"#{i} {verdict}\ninputs: {inputs}\nresponse: {response}\nrubric components: {comps}"
                      + (f"\nreviewer: {lab.rationale}" if lab.rationale else ""))
    return "\n\n".join(blocks)


def propose_criteria(task_description: str, labelled_examples: Sequence[Label], proposer_lm: Any, n: int = 3, *,
                     judge_lm: Any = None, existing: Rubric | Sequence[str] = (), field: str | None = "answer",
                     max_examples: int = 20) -> list[LMJudge]:
    """Ask a proposer LM to draft new :class:`~metrics.judge.LMJudge` components from labelled rollouts.

    Why: when no component captures what reviewers judge (e.g. they fail rambling answers and the rubric only has
    correctness and format), weights alone cannot fix the rubric. A strong LM that reads judged rollouts can name
    the missing quality; :func:`calibrate_with_candidates` then keeps a criterion only if it raises agreement.

    Args:
        task_description: What the program is for, in a sentence or two.
        labelled_examples: Labels with their example and prediction (verdicts of both kinds are shown, alternating).
        proposer_lm: The ``dspy.LM`` that drafts the criteria (an API model works best).
        n: How many criteria to ask for.
        judge_lm: The ``dspy.LM`` the drafted judges grade with (``None``: ``dspy.settings.lm`` at call time).
        existing: The rubric (or its component names); new names never collide with these.
        field: Prediction field the judges grade (``None``: all output fields).
        max_examples: Most labelled rollouts shown to the proposer.

    Returns:
        Up to ``n`` judges named after the proposals (snake_case, unique among themselves and ``existing``).

    Example:
        >>> from dspy.utils import DummyLM
        >>> lm = DummyLM([{"criteria": [{"name": "Concise", "criterion": "The answer is one short phrase."}]}])
        >>> labels = [Label("t1", {"exact_match": 1}, "pass", example={"question": "Capital of France?"},
        ...                 prediction={"answer": "Paris"})]
        >>> [(j.name, j.criterion) for j in propose_criteria("Answer geography questions.", labels, lm, n=1)]
        [('concise', 'The answer is one short phrase.')]
    """
    if isinstance(existing, Rubric):
        described = {name: getattr(c, "criterion", None) or repr(c) for name, c in existing.components.items()}
    else:
        described = {str(name): "" for name in existing}
    names = set(described)
    listing = "\n".join(f"- {name}: {text}" if text else f"- {name}" for name, text in described.items()) or "(none)"
    out = dspy.Predict(ProposeCriteria)(
        task_description=task_description, existing_components=listing,
        labelled_examples=_render(list(labelled_examples), field, max_examples), n=int(n), lm=proposer_lm)
    judges: list[LMJudge] = []
    for i, prop in enumerate(list(get_field(out, "criteria", None) or [])[:n], 1):
        criterion = str(get_field(prop, "criterion", "") or "").strip()
        if not criterion:
            continue
        name = _slug(str(get_field(prop, "name", "") or "")) or f"criterion_{i}"
        base, k = name, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.add(name)
        judges.append(LMJudge(criterion, lm=judge_lm, name=name, field=field))
    return judges


def _score_candidate(comp: Any, labels: Sequence[Label]) -> list[float]:
    values = []
    for lab in labels:
        if lab.example is None or lab.prediction is None:
            raise LabelError(f"label {lab.id!r} has no example or prediction, so candidate {comp.name!r} cannot score "
                             "it: build the labels with example= and prediction= (the trace's inputs and outputs)")
        try:
            v = coerce_result(comp(lab.example, lab.prediction)).value
        except Exception as e:  # noqa: BLE001 - any failure of the candidate is reported the same way
            raise ComponentError(comp.name, short_repr(lab.example), f"raised {type(e).__name__}: {e}") from e
        if not (math.isfinite(v) and -1e-9 <= v <= 1 + 1e-9):
            raise ComponentError(comp.name, short_repr(lab.example), f"returned {v!r}, outside [0, 1]")
        values.append(min(1.0, max(0.0, v)))
    return values


def calibrate_with_candidates(rubric: Rubric, labels: Sequence[Label], candidates: Sequence[Any], *,
                              holdout: float | Sequence[str] = 0.3, seed: int = 0, fit_gates: bool = True,
                              min_labels: int = 10, l2_grid: Sequence[float] = _L2_GRID,
                              min_gain: float = 0.01) -> Calibration:
    """Calibrate, adding each candidate component (e.g. from :func:`propose_criteria`) only if it raises agreement.

    Why: a proposed criterion costs judge calls on every future rollout; it earns its place only if the labels say it
    helps. Candidates are scored on every label's rollout, then added greedily (best first) while one raises the
    cross-validated concordance on the *fit* labels by more than ``min_gain``. The held-out labels take no part in
    that choice, so agreement before/after stays an honest estimate. Arguments as in :func:`calibrate`.

    Returns:
        A :class:`Calibration` whose ``added`` holds the kept candidates and ``candidates`` reports every one
        (``without``/``with_it``: cross-validated concordance of the chosen set before and with it, last round).

    Raises:
        LabelError: A label lacks the example or prediction a candidate needs.
        ComponentError: A candidate failed on a rollout.
        ComponentMismatchError: A candidate's name is already a component of the rubric.

    Example:
        >>> from metrics import Custom
        >>> rubric = Rubric([Custom(lambda e, p: p["ok"], name="ok")])
        >>> labels = [Label(f"t{i}", {"ok": i % 2}, i % 2 == 1 and i % 3 != 0, example={},
        ...                 prediction={"ok": i % 2, "short": i % 3 != 0}) for i in range(30)]
        >>> candidates = [Custom(lambda e, p: p["short"], name="short"), Custom(lambda e, p: 0.5, name="flat")]
        >>> cal = calibrate_with_candidates(rubric, labels, candidates)
        >>> cal.names, cal.candidates["flat"].kept, cal.after.concordance > cal.before.concordance
        (('ok', 'short'), False, True)
    """
    labels = list(labels)
    _check_labels(labels, min_labels)
    clash = [c.name for c in candidates if c.name in rubric.names]
    if clash or len({c.name for c in candidates}) != len(candidates):
        raise ComponentMismatchError(f"candidate names {clash or [c.name for c in candidates]} repeat or are already "
                                     f"components of {rubric.name!r}; give each candidate a unique new name")
    scored = {c.name: _score_candidate(c, labels) for c in candidates}
    labels = [dataclasses.replace(lab, components={**lab.components, **{n: v[i] for n, v in scored.items()}})
              for i, lab in enumerate(labels)]
    split = _split(labels, holdout, seed)
    fit = split[0]
    y = np.array([lab.value for lab in labels], float)[fit]
    fold = _folds(y >= 0.5, min(5, int(min((y >= 0.5).sum(), (y < 0.5).sum()))), np.random.default_rng([seed, 1]))
    names = list(rubric.names)
    current = _select(_matrix([labels[i] for i in fit], names, rubric.name), y, fold, l2_grid)[1]
    remaining = {c.name: c for c in candidates}
    reports: dict[str, CandidateReport] = {}
    while remaining:
        trials = {n: _select(_matrix([labels[i] for i in fit], [*names, n], rubric.name), y, fold, l2_grid)[1]
                  for n in remaining}
        best = max(trials, key=lambda n: trials[n])
        for n, s in trials.items():
            reports[n] = CandidateReport(getattr(remaining[n], "criterion", repr(remaining[n])), current, s, False)
        if trials[best] <= current + min_gain:
            break
        reports[best] = dataclasses.replace(reports[best], kept=True)
        names.append(best)
        current = trials[best]
        del remaining[best]
    added = {n: c for c in candidates for n in [c.name] if n in names}
    return _calibrate(rubric, labels, names, added, holdout=holdout, seed=seed, fit_gates=fit_gates, l2_grid=l2_grid,
                      min_gain=min_gain, candidates={c.name: reports[c.name] for c in candidates}, split=split)


# --------------------------------------------------------------------------------------------------- labels as gold
class LabelGold:
    """Human and gold labels as a gold metric ``(example, prediction, trace=None) -> float`` for :class:`GoldGuard`.

    For the example's id, a prediction scores the verdict of the label on the same answer (normalised as in
    SQuAD); otherwise 1.0 if it matches a corrected answer or a passed answer of that example, 0.0 if the example
    has such an accepted answer and this is not it. An answer no label covers scores ``default`` (or raises
    :class:`UnlabelledExampleError` when ``default`` is ``None``). Build it with :func:`labels_as_gold`.
    """

    def __init__(self, labels: Sequence[Label], *, id_field: str = "id", field: str = "answer",
                 default: float | None = None, name: str = "human_gold") -> None:
        self.id_field = id_field
        self.field = field
        self.default = default
        self.name = name
        self.verdicts: dict[str, dict[str, float]] = {}
        self.accepted: dict[str, set[str]] = {}
        for lab in labels:
            key = self._example_id(lab.example) if lab.example is not None else lab.id
            answer = self._answer(lab.prediction)
            if answer is not None:
                self.verdicts.setdefault(key, {})[answer] = lab.value
                if lab.passed:
                    self.accepted.setdefault(key, set()).add(answer)
            corrected = lab.corrected.get(field) if isinstance(lab.corrected, Mapping) else lab.corrected
            if corrected is not None:
                self.accepted.setdefault(key, set()).add(normalize_text(corrected))
        if not self.verdicts and not self.accepted:
            raise LabelError(f"no label has a prediction with field {field!r} or a corrected answer: LabelGold has "
                             "nothing to compare with")

    def _example_id(self, example: Any) -> str:
        value = get_field(example, self.id_field)
        if value is MISSING or value is None:
            raise LabelError(f"example {short_repr(example)} has no id field {self.id_field!r}; give examples ids "
                             "(dspy.Example(..., id=...)) or pass id_field=")
        return str(value)

    def _answer(self, prediction: Any) -> str | None:
        value = get_field(prediction, self.field, None) if prediction is not None else None
        return None if value is None else normalize_text(value)

    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> float:
        key = self._example_id(example)
        answer = self._answer(prediction)
        if answer is not None and answer in self.verdicts.get(key, {}):
            return self.verdicts[key][answer]
        if self.accepted.get(key):
            return 1.0 if answer in self.accepted[key] else 0.0
        if self.default is not None:
            return float(self.default)
        raise UnlabelledExampleError(f"no label covers example id {key!r} with answer {answer!r}: label it, limit "
                                     "the guard to labelled examples, or pass labels_as_gold(..., default=...)")

    def __repr__(self) -> str:
        return f"LabelGold({len(set(self.verdicts) | set(self.accepted))} examples, field={self.field!r})"


def labels_as_gold(labels: Sequence[Label], *, id_field: str = "id", field: str = "answer",
                   default: float | None = None) -> LabelGold:
    """Human labels keyed by example id as the gold metric of a :class:`~metrics.guards.GoldGuard`.

    Why: where no gold answers exist, what reviewers accepted is the best gold there is, and the guard needs a
    metric the optimiser never sees. Labels need ``example`` (with an id field) and ``prediction`` or ``corrected``.

    Example:
        >>> from metrics import GoldGuard
        >>> labels = [Label("tr-1", {}, "fail", example={"id": "q1"}, prediction={"answer": "Lyon"},
        ...                 corrected="Paris")]
        >>> guard = GoldGuard(labels_as_gold(labels))
        >>> guard.gold_score({"id": "q1"}, {"answer": "paris"}), guard.gold_score({"id": "q1"}, {"answer": "Lyon"})
        (1.0, 0.0)
    """
    return LabelGold(labels, id_field=id_field, field=field, default=default)


# --------------------------------------------------------------------------------------------------- corrections
def corrected_examples(labels: Sequence[Label], *, field: str = "answer",
                       input_keys: Sequence[str] | None = None) -> list[dspy.Example]:
    """Reviewers' corrected answers as training examples, each carrying a ``provenance`` field.

    Why: a correction is the most direct label there is; as an example it can train the program (demos, GRPO), and
    its provenance (source, label id, rationale) lets anyone trace a training example back to the review.

    Args:
        labels: Labels; those without ``corrected`` are skipped.
        field: Output field a plain corrected value goes to (a mapping gives all output fields itself).
        input_keys: Input fields of the example; default: ``example.inputs()`` of a ``dspy.Example`` with marked
            inputs.

    Raises:
        LabelError: A corrected label has no example, or its inputs are unknown (pass ``input_keys``).

    Example:
        >>> import dspy
        >>> ex = dspy.Example(question="Capital of France?", answer="Lyon").with_inputs("question")
        >>> [new] = corrected_examples([Label("tr-9", {}, "fail", rationale="wrong city", corrected="Paris",
        ...                                   example=ex)])
        >>> new.answer, new.inputs().keys(), new.provenance["label_id"]
        ('Paris', ['question'], 'tr-9')
    """
    out = []
    for lab in labels:
        if lab.corrected is None:
            continue
        if lab.example is None:
            raise LabelError(f"label {lab.id!r} has a corrected answer but no example: build it with example= "
                             "(the trace's inputs)")
        if input_keys is not None:
            inputs = {k: get_field(lab.example, k) for k in input_keys}
            if any(v is MISSING for v in inputs.values()):
                raise LabelError(f"label {lab.id!r}: example lacks input fields "
                                 f"{[k for k, v in inputs.items() if v is MISSING]}")
        elif isinstance(lab.example, dspy.Example) and lab.example._input_keys:
            inputs = dict(lab.example.inputs().items())
        else:
            raise LabelError(f"label {lab.id!r}: cannot tell the example's inputs; pass a dspy.Example with "
                             "with_inputs(...) or input_keys=[...]")
        outputs = dict(lab.corrected) if isinstance(lab.corrected, Mapping) else {field: lab.corrected}
        provenance = {"source": lab.source, "label_id": lab.id, "rationale": lab.rationale, "verdict": lab.value}
        extra = {}
        example_id = get_field(lab.example, "id", None)
        if example_id is not None:
            extra["id"] = example_id
        out.append(dspy.Example(**inputs, **outputs, **extra, provenance=provenance).with_inputs(*inputs))
    return out

