"""Weights side of cotune: the local policy engine that serves DSPy, and GRPO on its LoRA adapter.

Public API:
    Policy, LoraSettings: a local causal LM + LoRA adapter, served to DSPy via ``policy.lm()``.
    LMCall, recording: what every generation recorded (exact token ids) and how to collect it.
    train_weights, WeightStageConfig, WeightStageResult: the GRPO weight stage (``w``) for a whole DSPy program.
    SelfTrainConfig, SelfTrainResult: fine-tuning on the program's own successful traces (``s``); the function is
        ``rl.self_train.self_train`` (not re-exported here: the name would hide the module ``rl.self_train``).
    VLLMServer, VLLMEngine: generation on a vLLM server (``Policy.from_pretrained(..., engine="vllm")``); vllm
        itself runs in its own process and is never imported here.

Importing ``rl`` makes the tracebacks DSPy shows an LM for a failed tool call name files relative to their
``sys.path`` entry, so prompts do not depend on the install folder (``rl/dspy_seam.py``).
"""

from rl import dspy_seam
from rl.checkpoint import CheckpointError, CheckpointsExistError
from rl.config import SelfTrainConfig, WeightStageConfig
from rl.errors import CotuneRLError, EngineError, ModelNotFoundError, StageConfigError, UnsafeModelError
from rl.policy import LoraSettings, Policy, PolicyLM
from rl.rollouts import Rollout, run_rollouts
from rl.self_train import SelfTrainResult
from rl.trace import LMCall, recording
from rl.vllm_engine import TokenizationMismatchError, VLLMEngine
from rl.vllm_server import VLLMNotInstalledError, VLLMServer, VLLMServerError
from rl.weight_stage import TrainsetError, WeightStageResult, train_weights

__all__ = [
    "CheckpointError",
    "CheckpointsExistError",
    "CotuneRLError",
    "EngineError",
    "LMCall",
    "LoraSettings",
    "ModelNotFoundError",
    "Policy",
    "PolicyLM",
    "Rollout",
    "SelfTrainConfig",
    "SelfTrainResult",
    "StageConfigError",
    "TokenizationMismatchError",
    "TrainsetError",
    "WeightStageConfig",
    "WeightStageResult",
    "UnsafeModelError",
    "VLLMEngine",
    "VLLMNotInstalledError",
    "VLLMServer",
    "VLLMServerError",
    "recording",
    "run_rollouts",
    "train_weights",
]

dspy_seam.install()  # tool-error tracebacks shown to the LM name no install folder (rl/dspy_seam.py)
