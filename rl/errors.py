"""Exceptions of the rl package: each says what went wrong and what to do about it."""

from __future__ import annotations


class StageConfigError(ValueError):
    """A stage config (``WeightStageConfig``, ``SelfTrainConfig``, ``PromptStageConfig``) was given a value its field
    does not allow; the message names the field and the values it allows.

    Shared by every stage kind (``p``, ``w``, ``s``), so it is a plain ``ValueError``, not a :class:`CotuneRLError`
    (``optimizers.prompt_stage.PromptStageError`` subclasses it).
    """


class CotuneRLError(Exception):
    """Base class for errors raised by cotune's rl package."""


class ModelNotFoundError(CotuneRLError, FileNotFoundError):
    """A model path or name could not be resolved to local files (there is no hub access at run time)."""


class UnsafeModelError(CotuneRLError, ValueError):
    """A model folder holds only pickle weights (``.bin``/``.pt``); cotune loads safetensors only."""


class EngineError(CotuneRLError, RuntimeError):
    """Generation failed inside the policy engine; the original exception is chained."""
