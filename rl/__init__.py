"""Weights side of cotune: the local policy engine that serves DSPy, and (soon) GRPO on its LoRA adapter.

Public API:
    Policy, LoraSettings: a local causal LM + LoRA adapter, served to DSPy via ``policy.lm()``.
    LMCall, recording: what every generation recorded (exact token ids) and how to collect it.
"""

from rl.errors import CotuneRLError, EngineError, ModelNotFoundError, UnsafeModelError
from rl.policy import LoraSettings, Policy, PolicyLM
from rl.trace import LMCall, recording

__all__ = [
    "CotuneRLError",
    "EngineError",
    "LMCall",
    "LoraSettings",
    "ModelNotFoundError",
    "Policy",
    "PolicyLM",
    "UnsafeModelError",
    "recording",
]
