"""The numeric core of calibration: a logistic fit with weights >= 0, stratified folds, cross-validation, gates.

Why a module of its own: these are arrays in, arrays out (no labels, no rubrics), so they can be read and checked on
their own. Weights must stay >= 0 because a :class:`~metrics.rubric.Rubric` cannot hold negative weights (a component
the labels reject falls to 0, i.e. logged-only); the L2 strength and any extra gate ``A requires B >= 1`` are chosen
by cross-validated concordance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from metrics.calibration.agreement import concordance

L2_GRID = (0.01, 0.1, 1.0, 10.0)
"""The L2 strengths cross-validation chooses from, by default."""


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, iters: int = 100) -> tuple[np.ndarray, float]:
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


def folds(passed: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    fold = np.empty(len(passed), int)
    for cls in (True, False):
        idx = rng.permutation(np.flatnonzero(passed == cls))
        fold[idx] = np.arange(len(idx)) % k
    return fold


def _cv_score(x: np.ndarray, y: np.ndarray, fold: np.ndarray, l2: float) -> float:
    scores = []
    for f in np.unique(fold):
        train, test = fold != f, fold == f
        w, _ = fit_logistic(x[train], y[train], l2)
        c = concordance(x[test] @ w, y[test])
        if not math.isnan(c):
            scores.append(c)
    return float(np.mean(scores)) if scores else math.nan


def select_l2(x: np.ndarray, y: np.ndarray, fold: np.ndarray, grid: Sequence[float]) -> tuple[float, float]:
    """The L2 strength with the best cross-validated concordance (ties: the stronger one) and that concordance."""
    best = (-1.0, max(grid))
    for l2 in sorted(grid, reverse=True):
        score = _cv_score(x, y, fold, l2)
        if score > best[0] + 1e-9:
            best = (score, l2)
    return best[1], best[0]


def apply_gates(x: np.ndarray, names: Sequence[str], gates: Mapping[str, tuple[str, float]]) -> np.ndarray:
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


def search_gates(x: np.ndarray, y: np.ndarray, fold: np.ndarray, names: Sequence[str],
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
                xt = apply_gates(x, names, trial)
                if np.array_equal(xt, apply_gates(x, names, gates)):
                    continue
                s = select_l2(xt, y, fold, grid)[1]
                if s > score + min_gain and (best is None or s > best[0] + 1e-12):
                    best = (s, g, r)
        if best is None:
            return gates, score
        score, g, r = best
        gates[g] = (r, 1.0)
