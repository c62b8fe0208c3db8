""":func:`calibrate`: labels in, :class:`~metrics.calibration.rubric_file.Calibration` out.

Why a module of its own: this is the procedure that keeps the evidence honest. Labels are checked (enough of each
verdict, one per rollout), split into a fit part and a held-out part (stratified by verdict, or by the ids given);
the L2 strength, extra gates and any candidate criteria (:func:`calibrate_with_candidates`) are chosen by
cross-validation *inside* the fit part only, so agreement before and after, measured on the held-out labels, is an
estimate the fit never saw.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from metrics.base import coerce_result, short_repr
from metrics.calibration.agreement import agreement, best_threshold
from metrics.calibration.errors import (
    CalibrationError,
    ComponentMismatchError,
    LabelError,
    NoSignalError,
    NotEnoughLabelsError,
    SingleClassError,
)
from metrics.calibration.labels import SOURCES, Label
from metrics.calibration.logistic import L2_GRID, apply_gates, fit_logistic, folds, search_gates, select_l2
from metrics.calibration.rubric_file import Calibration, CandidateReport
from metrics.errors import ComponentError
from metrics.rubric import Rubric

__all__ = ["calibrate", "calibrate_with_candidates"]


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


def _calibrate(rubric: Rubric, labels: Sequence[Label], names: Sequence[str], added: Mapping[str, Any], *,
               holdout: float | Sequence[str], seed: int, fit_gates: bool, l2_grid: Sequence[float],
               min_gain: float, candidates: Mapping[str, CandidateReport] | None = None,
               split: tuple[np.ndarray, np.ndarray] | None = None) -> Calibration:
    x = _matrix(labels, names, rubric.name)
    y = np.array([lab.value for lab in labels], float)
    fit, held = split if split is not None else _split(labels, holdout, seed)
    fold = folds(y[fit] >= 0.5, min(5, int(min((y[fit] >= 0.5).sum(), (y[fit] < 0.5).sum()))),
                  np.random.default_rng([seed, 1]))
    gates = rubric.gates
    l2, score = select_l2(x[fit], y[fit], fold, l2_grid)
    if fit_gates:
        gates, _ = search_gates(x[fit], y[fit], fold, names, gates, l2_grid, min_gain, score)
        l2, score = select_l2(apply_gates(x[fit], names, gates), y[fit], fold, l2_grid)
    xg = apply_gates(x, names, gates)
    w, _ = fit_logistic(xg[fit], y[fit], l2)
    if w.sum() <= 0:
        raise NoSignalError(f"the fit put weight 0 on every component of {rubric.name!r}: none agrees with the "
                            f"{len(fit)} fit labels. Check the labels, or add components that capture what reviewers "
                            "judge (propose_criteria)")
    w = np.where(w > 1e-9 * w.max(), w, 0.0)
    w = w / w.sum()
    old = np.array([rubric.effective_weights.get(n, 0.0) for n in names])
    held_labels = [labels[i] for i in held]
    t_old = best_threshold(x[fit] @ old, y[fit] >= 0.5)
    t_new = best_threshold(xg[fit] @ w, y[fit] >= 0.5)
    before = agreement(x[held] @ old, held_labels, t_old)
    after = agreement(xg[held] @ w, held_labels, t_new)
    sources = {s: sum(lab.source == s for lab in labels) for s in SOURCES}
    return Calibration(
        rubric_name=rubric.name, names=tuple(names), old_weights=dict(zip(names, old.tolist())),
        weights=dict(zip(names, w.tolist())), old_gates=rubric.gates, gates=dict(gates), threshold=t_new,
        before=before, after=after, fit_ids=tuple(labels[i].id for i in fit),
        heldout_ids=tuple(lab.id for lab in held_labels),
        sources=sources, l2=float(l2), seed=int(seed), created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        added=dict(added), candidates=dict(candidates or {}), base=rubric)


def calibrate(rubric: Rubric, labels: Sequence[Label], *, holdout: float | Sequence[str] = 0.3, seed: int = 0,
              fit_gates: bool = True, min_labels: int = 10, l2_grid: Sequence[float] = L2_GRID,
              min_gain: float = 0.01) -> Calibration:
    """Fit the rubric's weights (and extra gates) so its total agrees with human and gold labels.

    Why: hand-set weights drift from what people mean, and an optimiser finds the gap. A logistic fit of the
    verdicts on the component values, with weights kept >= 0 (a component the labels reject becomes logged-only)
    and the L2 strength picked by cross-validation on the fit labels, gives weights the labels support. A gate
    ``A requires B >= 1`` is added only when it raises cross-validated concordance by more than ``min_gain``.
    Agreement before and after is measured on ``holdout`` labels the fit never saw.

    Args:
        rubric: The rubric to calibrate; every label must carry a value for each of its components.
        labels: HUMAN and GOLD :class:`~metrics.calibration.Label`\\ s (one per rollout).
        holdout: Fraction of labels held out (stratified by verdict), or the ids of the labels to hold out.
        seed: Seed of the split and of the cross-validation folds; the result is deterministic given it.
        fit_gates: Also search for gates that raise agreement.
        min_labels: Fewest labels accepted.
        l2_grid: L2 strengths to choose from.
        min_gain: Smallest rise of cross-validated concordance that justifies an extra gate.

    Returns:
        A :class:`~metrics.calibration.Calibration`; ``.to_rubric()`` is the calibrated rubric, ``.save(path)``
        writes it.

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
                              min_labels: int = 10, l2_grid: Sequence[float] = L2_GRID,
                              min_gain: float = 0.01) -> Calibration:
    """Calibrate, adding each candidate component (e.g. from :func:`~metrics.calibration.propose_criteria`) only if
    it raises agreement.

    Why: a proposed criterion costs judge calls on every future rollout; it earns its place only if the labels say it
    helps. Candidates are scored on every label's rollout, then added greedily (best first) while one raises the
    cross-validated concordance on the *fit* labels by more than ``min_gain``. The held-out labels take no part in
    that choice, so agreement before/after stays an honest estimate. Arguments as in :func:`calibrate`.

    Returns:
        A :class:`~metrics.calibration.Calibration` whose ``added`` holds the kept candidates and ``candidates``
        reports every one (``without``/``with_it``: cross-validated concordance of the chosen set before and with it,
        last round).

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
    fold = folds(y >= 0.5, min(5, int(min((y >= 0.5).sum(), (y < 0.5).sum()))), np.random.default_rng([seed, 1]))
    names = list(rubric.names)
    current = select_l2(_matrix([labels[i] for i in fit], names, rubric.name), y, fold, l2_grid)[1]
    remaining = {c.name: c for c in candidates}
    reports: dict[str, CandidateReport] = {}
    while remaining:
        trials = {n: select_l2(_matrix([labels[i] for i in fit], [*names, n], rubric.name), y, fold, l2_grid)[1]
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
