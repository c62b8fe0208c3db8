"""Reward-hacking guards: watch a gold metric, completion degeneracy and component trends during optimisation.

Why this module exists: an optimiser (prompt search or GRPO) maximises whatever the rubric measures,
including its loopholes. These guards are cheap observers the training loops call once per stage or
step; they never change the reward, they only report :class:`GuardEvent`\\ s (and can stop a run):

* :class:`GoldGuard`: keeps a gold metric the optimiser never sees; flags "reward up, gold down".
* :class:`DegeneracyMonitor`: flags completions that grow long or repetitive.
* :class:`ComponentTrends`: flags a reward rise driven by one (cheap) component while correctness is
  flat, and canary components (logged-only checks that should never move) that move.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from metrics.base import GuardEvent  # defined in base so errors.RewardHackingError can carry one
from metrics.errors import RewardHackingError, RewardHackingWarning, RubricConfigError

__all__ = ["ComponentTrends", "DegeneracyMonitor", "GoldGuard", "GuardEvent"]

logger = logging.getLogger(__name__)

_EPS = 1e-9


class GoldGuard:
    """Alert when the rubric reward rises while a held-out gold metric falls.

    The gold metric is for this guard only: never hand it to an optimiser. After each stage, call
    :meth:`check` with the stage's mean rubric reward and mean gold score (use :meth:`gold_score` to
    compute gold per example). An event is emitted when, against the reference observation, the reward
    went up and gold went down by more than ``tolerance``.

    Args:
        gold_metric: A metric ``(example, pred, trace=None)`` (or a Rubric) giving the gold score.
        tolerance: How far gold may fall before it counts (absolute, on the ``[0, 1]`` scale).
        action: ``"warn"``: ``warnings.warn`` (:class:`~metrics.errors.RewardHackingWarning`) and log;
            ``"stop"``: record the event, then raise :class:`~metrics.errors.RewardHackingError`.
        compare_to: Reference observation: ``"previous"`` (default) or ``"first"``.

    Example:
        >>> guard = GoldGuard(lambda ex, pred, trace=None: 1.0, tolerance=0.02)
        >>> guard.check("p1", reward=0.50, gold=0.60) is None
        True
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     guard.check("w1", reward=0.70, gold=0.50).kind
        'gold_divergence'
    """

    def __init__(self, gold_metric: Callable[..., Any], tolerance: float = 0.02,
                 action: Literal["warn", "stop"] = "warn", compare_to: Literal["previous", "first"] = "previous"
                 ) -> None:
        if action not in ("warn", "stop"):
            raise RubricConfigError(f"GoldGuard action must be 'warn' or 'stop', got {action!r}")
        if compare_to not in ("previous", "first"):
            raise RubricConfigError(f"GoldGuard compare_to must be 'previous' or 'first', got {compare_to!r}")
        if tolerance < 0:
            raise RubricConfigError(f"GoldGuard tolerance must be >= 0, got {tolerance}")
        from metrics.rubric import as_rubric  # local: rubric.py is a sibling, imported lazily to stay light

        self._gold = as_rubric(gold_metric, name="gold")
        self.tolerance = float(tolerance)
        self.action = action
        self.compare_to = compare_to
        self.history: list[tuple[int | str, float, float]] = []
        self.events: list[GuardEvent] = []

    def gold_score(self, example: Any, prediction: Any, trace: Any = None) -> float:
        """The gold metric's value for one prediction."""
        return self._gold(example, prediction, trace).value

    def check(self, stage: int | str, reward: float, gold: float) -> GuardEvent | None:
        """Record one observation; return a ``"gold_divergence"`` event when reward rose and gold fell.

        Raises:
            RewardHackingError: With ``action="stop"``, after recording the event.
        """
        reward, gold = float(reward), float(gold)
        ref = None
        if self.history:
            ref = self.history[-1] if self.compare_to == "previous" else self.history[0]
        self.history.append((stage, reward, gold))
        if ref is None:
            return None
        d_reward, d_gold = reward - ref[1], gold - ref[2]
        if not (d_reward > _EPS and d_gold < -self.tolerance - _EPS):  # _EPS: 0.58 - 0.6 is -0.0200...02
            return None
        event = GuardEvent(
            "gold_divergence", stage,
            f"Possible reward hacking at {stage!r}: rubric reward rose {ref[1]:.3f} -> {reward:.3f} while the gold "
            f"metric fell {ref[2]:.3f} -> {gold:.3f} (tolerance {self.tolerance:g}, compared to {ref[0]!r}).",
            {"reward": reward, "gold": gold, "ref_step": ref[0], "ref_reward": ref[1], "ref_gold": ref[2],
             "reward_delta": d_reward, "gold_delta": d_gold},
        )
        self.events.append(event)
        logger.warning(event.message)
        if self.action == "stop":
            raise RewardHackingError(event)
        warnings.warn(event.message, RewardHackingWarning, stacklevel=2)
        return event


def _repetition(words: Sequence[str], n: int) -> float | None:
    """Fraction of word n-grams that repeat an earlier n-gram of the same text (None if no n-gram)."""
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return None
    return 1.0 - len(set(grams)) / len(grams)


class DegeneracyMonitor:
    """Flag completions that get long or repetitive, a common way GRPO games a rubric.

    Each :meth:`observe` computes, over a batch of completion strings: ``mean_chars``, ``mean_words``
    (whitespace words), ``repetition_rate`` (mean over completions of the fraction of repeated word
    ``ngram``\\ s, i.e. ``1 - distinct-n``; completions shorter than ``ngram`` words are skipped) and
    ``duplicate_rate`` (fraction of completions identical to another in the batch; logged only).

    Args:
        max_mean_chars: Emit ``"length"`` when the mean length exceeds this (``None``: off).
        max_repetition: Emit ``"repetition"`` when ``repetition_rate`` exceeds this.
        growth_factor: Emit ``"length_growth"`` when the mean length exceeds this factor times the first
            observation's (``None``: off).
        ngram: n of the word n-grams.

    Example:
        >>> monitor = DegeneracyMonitor(max_repetition=0.5)
        >>> stats, events = monitor.observe(0, ["the cat sat on the mat", "yes yes yes yes yes yes"])
        >>> round(stats["repetition_rate"], 2), [e.kind for e in events]
        (0.38, [])
    """

    def __init__(self, max_mean_chars: float | None = None, max_repetition: float = 0.5,
                 growth_factor: float | None = 3.0, ngram: int = 3) -> None:
        if ngram < 1:
            raise RubricConfigError(f"DegeneracyMonitor ngram must be >= 1, got {ngram}")
        if growth_factor is not None and growth_factor <= 1:
            raise RubricConfigError(f"DegeneracyMonitor growth_factor must be > 1 (or None), got {growth_factor}")
        self.max_mean_chars = max_mean_chars
        self.max_repetition = max_repetition
        self.growth_factor = growth_factor
        self.ngram = ngram
        self.first_mean_chars: float | None = None
        self.history: list[tuple[int | str, dict[str, float]]] = []
        self.events: list[GuardEvent] = []

    def observe(self, step: int | str, completions: Iterable[str]) -> tuple[dict[str, float], list[GuardEvent]]:
        """Compute the batch's statistics and return them with any events (also kept in :attr:`events`)."""
        texts = [str(c) for c in completions]
        if not texts:
            return {"n": 0, "mean_chars": 0.0, "mean_words": 0.0, "repetition_rate": 0.0, "duplicate_rate": 0.0}, []
        words = [t.split() for t in texts]
        reps = [r for r in (_repetition(w, self.ngram) for w in words) if r is not None]
        stats = {
            "n": len(texts),
            "mean_chars": float(np.mean([len(t) for t in texts])),
            "mean_words": float(np.mean([len(w) for w in words])),
            "repetition_rate": float(np.mean(reps)) if reps else 0.0,
            "duplicate_rate": 1.0 - len(set(texts)) / len(texts) if len(texts) > 1 else 0.0,
        }
        events = []
        if self.max_mean_chars is not None and stats["mean_chars"] > self.max_mean_chars:
            events.append(GuardEvent("length", step, f"Mean completion length {stats['mean_chars']:.0f} chars exceeds "
                                     f"{self.max_mean_chars:g} at step {step!r}.", dict(stats)))
        if stats["repetition_rate"] > self.max_repetition:
            events.append(GuardEvent("repetition", step, f"Completions are repetitive at step {step!r}: "
                                     f"{stats['repetition_rate']:.0%} of word {self.ngram}-grams repeat "
                                     f"(limit {self.max_repetition:.0%}).", dict(stats)))
        if self.first_mean_chars is None:
            if stats["mean_chars"] > 0:
                self.first_mean_chars = stats["mean_chars"]
        elif self.growth_factor is not None and stats["mean_chars"] > self.growth_factor * self.first_mean_chars:
            events.append(GuardEvent("length_growth", step, f"Mean completion length grew "
                                     f"{stats['mean_chars'] / self.first_mean_chars:.1f}x since the first "
                                     f"observation ({self.first_mean_chars:.0f} -> {stats['mean_chars']:.0f} chars) "
                                     f"at step {step!r}.", {**stats, "first_mean_chars": self.first_mean_chars}))
        self.history.append((step, stats))
        self.events.extend(events)
        for e in events:
            logger.warning(e.message)
        return stats, events


class ComponentTrends:
    """Track per-step component means and flag rises that do not come from correctness.

    Call :meth:`update` once per step with the batch mean of every component (``Score.components``
    averaged). :meth:`deltas` reports each component's change since the first step; :meth:`events`
    compares the latest step with the first:

    * ``"one_component_rise"``: the weighted total rose by more than ``min_rise`` and a single
      non-correctness component contributed more than ``dominance`` of the rise, while every
      ``correctness`` component is flat or falling (delta <= ``flat_tolerance``). Without correctness
      tags, any single-component dominance is reported.
    * ``"canary_moved"``: a ``canaries`` component (a logged-only check that should never move, e.g.
      "mentions the grader") changed by more than ``canary_tolerance``.

    Args:
        weights: Component weights used to compute contributions (``Rubric.effective_weights``);
            ``None`` weighs every component 1.
        correctness: Names of components that measure correctness.
        canaries: Names of components that should stay flat.
        dominance: Share of the total rise above which one component "drives" it.
        min_rise: Minimum rise of the weighted total worth reporting.
        flat_tolerance: Largest correctness delta still considered flat.
        canary_tolerance: Largest canary delta still considered unmoved.

    Example:
        >>> trends = ComponentTrends({"correct": 0.5, "format": 0.5}, correctness=["correct"])
        >>> trends.update(0, {"correct": 0.4, "format": 0.2})
        >>> trends.update(10, {"correct": 0.4, "format": 0.9})
        >>> [e.kind for e in trends.events()], trends.deltas()["format"]
        (['one_component_rise'], 0.7)
    """

    def __init__(self, weights: Mapping[str, float] | None = None, *, correctness: Sequence[str] = (),
                 canaries: Sequence[str] = (), dominance: float = 0.7, min_rise: float = 0.01,
                 flat_tolerance: float = 0.0, canary_tolerance: float = 0.05) -> None:
        if not 0 < dominance <= 1:
            raise RubricConfigError(f"ComponentTrends dominance must be in (0, 1], got {dominance}")
        self.weights = None if weights is None else dict(weights)
        self.correctness = list(correctness)
        self.canaries = list(canaries)
        self.dominance = dominance
        self.min_rise = min_rise
        self.flat_tolerance = flat_tolerance
        self.canary_tolerance = canary_tolerance
        self.history: list[tuple[int | str, dict[str, float]]] = []

    @classmethod
    def from_rubric(cls, rubric: Any, **kwargs: Any) -> ComponentTrends:
        """Trends weighted like ``rubric`` (its ``effective_weights``); ``kwargs`` as in the constructor."""
        return cls(rubric.effective_weights, **kwargs)

    def update(self, step: int | str, components: Mapping[str, float]) -> None:
        """Record the mean value of every component at ``step``."""
        self.history.append((step, {k: float(v) for k, v in components.items()}))

    def deltas(self) -> dict[str, float]:
        """Each component's change from the first to the latest step (components seen in both)."""
        if not self.history:
            return {}
        first, last = self.history[0][1], self.history[-1][1]
        return {k: round(last[k] - first[k], 12) for k in last if k in first}

    def events(self) -> list[GuardEvent]:
        """Events for the latest step compared with the first (empty with fewer than two steps)."""
        if len(self.history) < 2:
            return []
        step = self.history[-1][0]
        deltas = self.deltas()
        weights = self.weights or dict.fromkeys(deltas, 1.0)
        contrib = {k: weights.get(k, 0.0) * d for k, d in deltas.items()}
        total = sum(contrib.values())
        out: list[GuardEvent] = []
        flat = all(deltas.get(c, 0.0) <= self.flat_tolerance for c in self.correctness)
        if total > self.min_rise and flat:
            for k, c in contrib.items():
                if k not in self.correctness and c > self.dominance * total:
                    why = (f" while correctness ({', '.join(self.correctness)}) is flat or falling"
                           if self.correctness else "")
                    out.append(GuardEvent(
                        "one_component_rise", step,
                        f"The reward rise of {total:+.3f} since step {self.history[0][0]!r} is driven by {k!r} "
                        f"({c / total:.0%} of it){why}: check that {k!r} cannot be gamed.",
                        {"component": k, "share": c / total, "total_rise": total, "deltas": deltas}))
        for k in self.canaries:
            if abs(deltas.get(k, 0.0)) > self.canary_tolerance:
                out.append(GuardEvent(
                    "canary_moved", step, f"Canary component {k!r} moved {deltas[k]:+.3f} since step "
                    f"{self.history[0][0]!r}: the policy may be exploiting what it checks.",
                    {"component": k, "delta": deltas[k], "deltas": deltas}))
        return out
