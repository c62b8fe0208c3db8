"""Calibrate a rubric to human and gold labels: fitted weights and gates, LM-proposed criteria, labels as gold.

Why this package exists: a rubric's weights are a guess, and an optimiser exploits every wrong guess (a length
component that rewards rambling, a format check that outweighs correctness). People who review rollouts (in the
MLflow UI, or ``cotune review``) say which ones are right; gold answers say the same for free. This package turns
those judgements into a better rubric and keeps the evidence. One module per concern:

* :mod:`~metrics.calibration.labels`: :class:`Label`, one judged rollout: the rubric's component values for it
  (``Score.components``), the verdict (pass/fail or a score), its source (``"HUMAN"`` or ``"GOLD"``, as MLflow's
  ``AssessmentSource`` types), an id (e.g. the MLflow trace id), a rationale, and optionally the example, the
  prediction and a corrected answer.
* :mod:`~metrics.calibration.agreement`: :func:`agreement`, the *concordance* of the rubric's total with the labels:
  over every pair of labels where one is better than the other, the fraction the rubric orders the same way (ties
  count half). For pass/fail labels this is the ROC AUC; for graded labels, Harrell's C. Accuracy at a threshold
  chosen on the fit portion is reported too.
* :mod:`~metrics.calibration.logistic`: the numeric core: a logistic fit with weights >= 0, folds, cross-validation,
  gates.
* :mod:`~metrics.calibration.fit`: :func:`calibrate`: the logistic fit of the verdicts on the component values, with
  the L2 strength and optional extra gates chosen by cross-validation *inside* the fit portion; agreement before (the
  rubric's current weights) and after is measured on held-out labels the fit never saw.
  :func:`calibrate_with_candidates` also keeps proposed criteria that raise cross-validated agreement.
* :mod:`~metrics.calibration.rubric_file`: the result, a :class:`Calibration`, saved as a small versioned JSON file
  that :func:`load_calibrated` applies to a rubric with the same components.
* :mod:`~metrics.calibration.criteria`: :func:`propose_criteria`: a proposer LM drafts new
  :class:`~metrics.judge.LMJudge` criteria from labelled rollouts.
* :mod:`~metrics.calibration.gold`: :func:`labels_as_gold`: human labels as the gold metric of a
  :class:`~metrics.guards.GoldGuard`.
* :mod:`~metrics.calibration.corrections`: :func:`corrected_examples`: a reviewer's corrected answer becomes a
  training example that records where it came from.
* :mod:`~metrics.calibration.errors`: one error class per way calibration fails, all :class:`CalibrationError`.

Example:
    >>> from metrics import Custom, Rubric
    >>> from metrics.calibration import Label, calibrate
    >>> rubric = Rubric([Custom(lambda e, p: p["ok"], name="ok"), Custom(lambda e, p: p["long"], name="long")])
    >>> labels = [Label(f"t{i}", {"ok": i % 2, "long": i % 3 == 0}, i % 2 == 1 and i % 3 != 0) for i in range(30)]
    >>> calibrate(rubric, labels).weights["long"]
    0.0
"""

from metrics.calibration.agreement import Agreement, agreement
from metrics.calibration.corrections import corrected_examples
from metrics.calibration.criteria import ProposeCriteria, ProposedCriterion, propose_criteria
from metrics.calibration.errors import (
    CalibrationError,
    CalibrationFileError,
    ComponentMismatchError,
    LabelError,
    NoSignalError,
    NotEnoughLabelsError,
    SingleClassError,
    UnlabelledExampleError,
)
from metrics.calibration.fit import calibrate, calibrate_with_candidates
from metrics.calibration.gold import LabelGold, labels_as_gold
from metrics.calibration.labels import Label
from metrics.calibration.rubric_file import FORMAT_VERSION, Calibration, CandidateReport, load_calibrated

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
