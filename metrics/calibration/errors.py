"""The calibration errors, one class per way a calibration can fail.

Why a module of its own: every other calibration module raises them (labels, the fit, the file reader, the gold
metric), and a caller (the CLI, ``cotune calibrate``) catches :class:`CalibrationError`, a
:class:`~metrics.errors.MetricError`, whichever part failed.
"""

from __future__ import annotations

from metrics.errors import MetricError

__all__ = [
    "CalibrationError",
    "CalibrationFileError",
    "ComponentMismatchError",
    "LabelError",
    "NoSignalError",
    "NotEnoughLabelsError",
    "SingleClassError",
    "UnlabelledExampleError",
]


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
    """:class:`~metrics.calibration.LabelGold` was asked about an example id (or answer) no label covers, and has no
    default."""
