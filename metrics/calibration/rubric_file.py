"""The outcome of a calibration (:class:`Calibration`) and the calibrated-rubric file it is saved as and loaded from.

Why one module for the record and its file: the file is the record written out (names, weights, gates, threshold,
added LM judges, evidence), so the writer (:meth:`Calibration.save`), the reader (:func:`load_calibrated`) and the
version number (:data:`FORMAT_VERSION`) change together. The file is JSON: a reviewer can read and diff it, and it
holds only names and numbers (plus the criterion text of added LM judges), so loading it never executes anything.
Both the record and the file refuse a rubric whose components are not the ones calibrated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metrics.calibration.agreement import Agreement
from metrics.calibration.errors import CalibrationError, CalibrationFileError, ComponentMismatchError
from metrics.judge import LMJudge
from metrics.rubric import Rubric

__all__ = ["FORMAT_VERSION", "CandidateReport", "Calibration", "load_calibrated"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the calibrated-rubric JSON file; :func:`load_calibrated` refuses other versions."""

FORMAT_NAME = "cotune.calibrated_rubric"
"""The ``format`` field of a calibrated-rubric file."""


@dataclass(frozen=True)
class CandidateReport:
    """What calibration found for one proposed component: cross-validated concordance without and with it."""

    criterion: str
    without: float
    with_it: float
    kept: bool


@dataclass(frozen=True)
class Calibration:
    """The outcome of :func:`~metrics.calibration.calibrate`: new weights and gates, with the evidence that they agree
    better.

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
        added: Components added by :func:`~metrics.calibration.calibrate_with_candidates` (``{name: component}``).
        candidates: What happened to each proposed component.

    Example:
        >>> import os, tempfile
        >>> from metrics import Custom
        >>> from metrics.calibration import Label, calibrate
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
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "rubric": self.rubric_name,
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
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise CalibrationFileError(f"{path} is not a cotune calibrated rubric (no \"format\": \"{FORMAT_NAME}\")")
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
