"""Embedded models: small LMs built by our own recipes from task data, shipped as safetensors with the package.

Why a package of their own: a model recipe needs both task data (``programs``) and the builder and policy (``rl``),
while ``programs`` must run on any ``dspy.LM`` and import nothing from ``rl``. So the arrows are
``embedded -> rl`` and ``embedded -> programs``; nothing below imports ``embedded``.

- ``embedded.tiny``: the last-digit model, the default for tests, ``make demo`` and the quickstart.

Example:
    >>> from embedded import tiny_model_path
    >>> tiny_model_path().name
    'tiny-last-digit'
"""

from embedded.tiny import (
    BAND_ARMS,
    INFO_FILE,
    SETTINGS_FILE,
    SHIPPED_DIR,
    SHIPPED_SEED,
    TINY_NAME,
    EmbeddedModelError,
    band_problems,
    measure_band,
    recipe_build_dir,
    ship_tiny_model,
    shipped_tiny_model_path,
    tiny_model_path,
    tiny_policy,
)

__all__ = [
    "BAND_ARMS", "INFO_FILE", "SETTINGS_FILE", "SHIPPED_DIR", "SHIPPED_SEED", "TINY_NAME", "EmbeddedModelError",
    "band_problems", "measure_band", "recipe_build_dir", "ship_tiny_model", "shipped_tiny_model_path",
    "tiny_model_path", "tiny_policy",
]
