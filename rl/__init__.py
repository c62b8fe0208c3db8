"""Weights side of cotune: the local policy engine that serves DSPy, and GRPO on its LoRA adapter.

Public API:
    Policy, LoraSettings: a local causal LM + LoRA adapter, served to DSPy via ``policy.lm()``.
    LMCall, recording: what every generation recorded (exact token ids) and how to collect it.
    train_weights, WeightStageConfig: the GRPO weight stage for a whole DSPy program.
"""

from rl.config import WeightStageConfig
from rl.errors import CotuneRLError, EngineError, ModelNotFoundError, UnsafeModelError
from rl.policy import LoraSettings, Policy, PolicyLM
from rl.rollouts import RewardError, Rollout, run_rollouts
from rl.trace import LMCall, recording
from rl.weight_stage import TrainsetError, WeightStageResult, train_weights

__all__ = [
    "CotuneRLError",
    "EngineError",
    "LMCall",
    "LoraSettings",
    "ModelNotFoundError",
    "Policy",
    "PolicyLM",
    "RewardError",
    "Rollout",
    "TrainsetError",
    "WeightStageConfig",
    "WeightStageResult",
    "UnsafeModelError",
    "recording",
    "run_rollouts",
    "train_weights",
]
