"""Embedded models: small LMs built by our own recipes from task data, shipped as safetensors with the package.

Why a package of their own: a model recipe needs both task data (``programs``) and the policy (``rl``), while
``programs`` must run on any ``dspy.LM`` and import nothing from ``rl``. So the arrows are ``embedded -> rl`` and
``embedded -> programs``; nothing below imports ``embedded``. The builder that trains a model from scratch
(``embedded.tiny_model``) lives here too: it serves only these models.

- ``embedded.tiny``: the last-digit model, the default for tests, ``make demo`` and the quickstart.
- ``embedded.agent``: the ReAct agent model of ``react_tools`` (whole episodes, an imperfect teacher).

Example:
    >>> from embedded import tiny_model_path
    >>> tiny_model_path().name
    'tiny-last-digit'
"""

from embedded.agent import (
    AGENT_NAME,
    AgentMeasurement,
    agent_band_problems,
    agent_model_path,
    agent_policy,
    measure_agent,
    measure_agent_band,
    ship_agent_model,
    shipped_agent_model_path,
)
from embedded.shipped import INFO_FILE, SETTINGS_FILE, EmbeddedModelError
from embedded.tiny import (
    BAND_ARMS,
    SHIPPED_DIR,
    SHIPPED_SEED,
    TINY_NAME,
    band_problems,
    measure_band,
    recipe_build_dir,
    ship_tiny_model,
    shipped_tiny_model_path,
    tiny_model_path,
    tiny_policy,
)

MODELS = {"tiny": (TINY_NAME, tiny_model_path), "agent": (AGENT_NAME, agent_model_path)}  # an experiment's `model:`

__all__ = [
    "MODELS", "AGENT_NAME", "AgentMeasurement", "agent_band_problems", "agent_model_path", "agent_policy", "measure_agent",
    "measure_agent_band", "ship_agent_model", "shipped_agent_model_path",
    "BAND_ARMS", "INFO_FILE", "SETTINGS_FILE", "SHIPPED_DIR", "SHIPPED_SEED", "TINY_NAME", "EmbeddedModelError",
    "band_problems", "measure_band", "recipe_build_dir", "ship_tiny_model", "shipped_tiny_model_path",
    "tiny_model_path", "tiny_policy",
]
