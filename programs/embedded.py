"""The embedded default model: the tiny LM warm-started on our default task, built locally and cached.

Why here: the model's warm-start corpus *is* task data (``programs.tasks.last_digit``), rendered by DSPy's
ChatAdapter; the generic builder lives in ``rl.tiny_model``. This is a test and demo model, not a useful LM.

Example:
    >>> from programs.embedded import tiny_model_path, tiny_policy
    >>> policy = tiny_policy()          # builds once (~4 min on 2 cores), then loads from the cache
    >>> import dspy; dspy.configure(lm=policy.lm())
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from programs.tasks import last_digit
from rl.tiny_model import TinyModelRecipe, build_or_load

TINY_NAME = "tiny-last-digit"
WARMSTART_EXAMPLES = 20_000


def tiny_model_path(
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
    force: bool = False,
) -> Path:
    """Build (or reuse from ``$COTUNE_CACHE``) the tiny model and return its HF folder."""
    recipe = TinyModelRecipe(seed=seed)
    warm = last_digit.WarmStartRecipe()
    return build_or_load(
        TINY_NAME,
        lambda: last_digit.warmstart_messages(WARMSTART_EXAMPLES, seed=seed, recipe=warm),
        recipe=recipe,
        extra_key={"warmstart": asdict(warm), "examples": WARMSTART_EXAMPLES, "seed": seed,
                   "generator": last_digit.WARMSTART_VERSION},
        progress=progress,
        force=force,
    )


def tiny_policy(seed: int = 0, **policy_kwargs):
    """A :class:`rl.Policy` on the tiny model (built first if needed)."""
    from rl.policy import Policy

    return Policy.from_pretrained(tiny_model_path(seed=seed), name=TINY_NAME, **policy_kwargs)
