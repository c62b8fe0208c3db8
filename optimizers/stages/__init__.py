"""The stage kinds of cotune's outer loop, one module each, and the registry everything else reads.

Built in: ``p`` (:mod:`optimizers.stages.prompt`), ``w`` (:mod:`optimizers.stages.weights`), ``s``
(:mod:`optimizers.stages.self_train`). Add a kind with :func:`register` (see :mod:`optimizers.stages.base`).

Example:
    >>> [(k.letter, k.section) for k in KINDS.values()][:3]
    [('p', 'prompt'), ('w', 'weights'), ('s', 'self_training')]
"""

# isort: off
# Importing a kind's module registers it; this order (p, w, s) is the order kinds are listed in.
from optimizers.stages import prompt  # noqa: F401
from optimizers.stages import weights  # noqa: F401
from optimizers.stages import self_train  # noqa: F401
# isort: on
from optimizers.stages.base import (
    KINDS,
    Stage,
    StageContext,
    StageKind,
    StageOutcome,
    StagePlan,
    register,
    sections,
    unregister,
)
from optimizers.stages.plan import build_stages, plan_run

__all__ = ["KINDS", "Stage", "StageContext", "StageKind", "StageOutcome", "StagePlan", "build_stages",
           "plan_run", "register", "sections", "unregister"]
