"""cotune's rubrics: one weighted, gated set of named components that scores a DSPy prediction.

Why this package exists: cotune optimises prompts (DSPy optimizers) and LoRA weights (GRPO) against one
objective. A :class:`Rubric` is that objective, with adapters for every consumer (DSPy metric, GEPA
feedback metric, per-rollout reward) and guards that watch for reward hacking. This is the lowest
package of the project: it imports only the standard library, numpy and dspy.

Example:
    >>> from metrics import ExactMatch, FormatValidity, Rubric
    >>> rubric = Rubric([ExactMatch("answer"), FormatValidity(["answer"])], gates={"exact_match": "format"})
    >>> rubric({"answer": "4"}, {"answer": "4"}).value
    1.0
"""

from metrics.adapters import DspyMetric, GepaMetric
from metrics.base import ERROR_KEY, Component, ComponentResult, Score
from metrics.call import call_metric
from metrics.components import (
    AnswerType,
    Contains,
    Custom,
    ExactMatch,
    FormatValidity,
    LengthPenalty,
    NumericMatch,
    Regex,
)
from metrics.errors import (
    ComponentError,
    JudgeError,
    MetricError,
    RewardHackingError,
    RewardHackingWarning,
    RubricConfigError,
)
from metrics.guards import ComponentTrends, DegeneracyMonitor, GoldGuard, GuardEvent
from metrics.judge import JudgeSignature, LMJudge
from metrics.parsing import normalize_text, parse_number, validate_json_schema
from metrics.rubric import Gate, Rubric, as_rubric

__all__ = [
    "ERROR_KEY",
    "AnswerType",
    "Component",
    "ComponentError",
    "ComponentResult",
    "ComponentTrends",
    "Contains",
    "Custom",
    "DegeneracyMonitor",
    "DspyMetric",
    "ExactMatch",
    "FormatValidity",
    "Gate",
    "GepaMetric",
    "GoldGuard",
    "GuardEvent",
    "JudgeError",
    "JudgeSignature",
    "LMJudge",
    "LengthPenalty",
    "MetricError",
    "NumericMatch",
    "Regex",
    "RewardHackingError",
    "RewardHackingWarning",
    "Rubric",
    "RubricConfigError",
    "Score",
    "as_rubric",
    "call_metric",
    "normalize_text",
    "parse_number",
    "validate_json_schema",
]
