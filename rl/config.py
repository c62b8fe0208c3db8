"""The typed configs of the rl stages: ``WeightStageConfig`` (``w``, mapped onto TRL's ``GRPOConfig`` for the loss)
and ``SelfTrainConfig`` (``s``); ``optimizers.prompt_stage.PromptStageConfig`` (``p``) follows the same convention.

Why one dataclass per stage: the same object feeds the Python API, the experiment YAML, Optuna's search space and
MLflow's params (``asdict``), as TRL's own ``<method>_config.py`` does. The budget is in *rollouts*
(program executions), the currency shared with prompt stages, so arms compare at equal cost.

Why model-aware defaults live here too: no single learning rate suits every model (2e-5 is right for a 0.5B
model and moves the 0.9M-parameter embedded model not at all), so a model folder may carry its recommended stage
settings in ``cotune.json`` (:func:`read_model_settings`), as ``generation_config.json`` carries generation
defaults, and a model without one gets :func:`lora_learning_rate` from its width. ``optimizers.optimize`` merges
them under whatever the user sets.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from rl.errors import StageConfigError

MODEL_SETTINGS_FILE = "cotune.json"
MODEL_SETTINGS_SECTIONS = ("weights", "self_training", "prompt", "engine")
ENGINE_SETTINGS = ("torch_threads",)  # the in-process engine's settings a model folder may recommend
IMPORTANCE_SAMPLING_MODES = ("sequence_mask", "sequence_truncate", "token_mask", "token_truncate", "none")
SCALE_REWARDS = ("group", "batch", "none")
# TRL's GRPO loss aggregations (checked against TRL 1.16 in tests/rl/test_trl_seam.py): token-normalised dapo, bnpo,
# cispo, vespo; row-mean grpo, sapo, dr_grpo, luspo (rl.trl_seam.ROW_MEAN_LOSSES).
LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo")


class ModelSettingsError(ValueError):
    """A model folder's ``cotune.json`` is not valid JSON, has an unknown section or setting, or a bad value."""


def read_model_settings(folder: str | Path) -> dict[str, dict[str, Any]]:
    """The recommended stage settings a model folder ships in ``cotune.json`` (``{}`` when it has none).

    The file is ``{"weights": {...}, "self_training": {...}, "prompt": {...}, "engine": {...}}`` (every section
    optional). The first three are dicts of the fields of ``WeightStageConfig``, ``SelfTrainConfig`` and
    ``PromptStageConfig``, checked where the configs are built (``optimizers.optimize``), which names the file in its
    error. ``engine`` holds settings of the in-process :class:`rl.engine.BatchedEngine` (:data:`ENGINE_SETTINGS`),
    checked here: ``torch_threads``, the intra-op threads generation runs on (a small model decodes fastest on one).

    Raises:
        ModelSettingsError: the file is not a JSON object of those sections, each a JSON object, or its ``engine``
            section has an unknown setting or a ``torch_threads`` that is not a positive integer.
    """
    path = Path(folder) / MODEL_SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelSettingsError(f"{str(path)!r} is not readable JSON ({exc}); fix or delete it") from exc
    if not isinstance(data, dict):
        raise ModelSettingsError(f"{str(path)!r} must hold a JSON object with sections {MODEL_SETTINGS_SECTIONS}")
    unknown = sorted(set(data) - set(MODEL_SETTINGS_SECTIONS))
    if unknown:
        raise ModelSettingsError(f"{str(path)!r} has unknown section(s) {unknown}; expected {MODEL_SETTINGS_SECTIONS}")
    for name, section in data.items():
        if not isinstance(section, dict):
            raise ModelSettingsError(f"{str(path)!r}: section {name!r} must be a JSON object of settings")
    engine = data.get("engine", {})
    unknown = sorted(set(engine) - set(ENGINE_SETTINGS))
    if unknown:
        raise ModelSettingsError(f"{str(path)!r}: section 'engine' has unknown setting(s) {unknown}; "
                                 f"expected {list(ENGINE_SETTINGS)}")
    threads = engine.get("torch_threads", 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ModelSettingsError(f"{str(path)!r}: engine.torch_threads must be a positive integer, got {threads!r}")
    return data


def lora_learning_rate(hidden_size: int) -> float:
    """The LoRA GRPO learning rate for a model without a ``cotune.json``, from its hidden size.

    Rule: ``lr = 2e-5 * (896 / hidden_size) ** 2``, clamped to ``[1e-5, 1e-3]``.

    Rationale: the two points we trust are the embedded tiny model (hidden 128), where 5e-4..1e-3 learns and
    2e-5 changes nothing in 2,368 rollouts (measured), and Qwen2.5-0.5B (hidden 896), where 2e-5 is the usual LoRA
    GRPO rate. An inverse-square law in the width passes through both (a narrow model's LoRA update moves each
    output less, so it needs a larger step). Above 0.5B the law falls below the range LoRA RL is run at (TRL's 1e-6
    is for full fine-tuning; LoRA wants about 10x more, 1e-5..5e-5), so the rate is floored at 1e-5; it is capped
    at 1e-3, the largest rate measured to train the tiny model stably.

    Values: hidden 128 (tiny) 9.8e-4; 896 (0.5B) 2e-5; 1536 (1.5B) 1e-5 (the law alone gives 6.8e-6);
    3584 (7B) 1e-5 (the law alone gives 1.25e-6).

    Example:
        >>> [f"{lora_learning_rate(h):.1e}" for h in (128, 896, 1536, 3584)]
        ['9.8e-04', '2.0e-05', '1.0e-05', '1.0e-05']
    """
    if hidden_size < 1:
        raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
    return min(1e-3, max(1e-5, 2e-5 * (896 / hidden_size) ** 2))


def config_help(cls) -> str:
    """One ``name (type, default): help`` line per field of a config dataclass, from the fields' ``help`` metadata.

    What ``cotune config SECTION`` prints: the settings an experiment YAML (or ``optimize()``'s dict) accepts for a
    stage. A field without ``help`` gets its line without the ``: help`` part.

    Example:
        >>> print(config_help(SelfTrainConfig).splitlines()[0])
        num_samples (int, 4): program runs per training example
    """
    lines = []
    for f in fields(cls):
        if f.default is not MISSING:
            default = repr(f.default)
        elif f.default_factory is not MISSING:
            default = repr(f.default_factory())
        else:
            default = "required"
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        help_text = f.metadata.get("help")
        lines.append(f"{f.name} ({kind}, {default})" + (f": {help_text}" if help_text else ""))
    return "\n".join(lines)


@dataclass(frozen=True)
class UpdaterSettings:
    """What :class:`rl.grpo.GRPOUpdater` reads: TRL's GRPO loss, its optimizer and lr schedule, the micro-batch.

    Each stage config that trains through the updater produces one (``WeightStageConfig.updater_settings()``,
    ``SelfTrainConfig.updater_settings()``), so a stage reuses the updater without posing as another stage's config.
    The defaults are ``WeightStageConfig``'s (tests/rl/test_config.py keeps them equal); the stage configs validate.
    """

    learning_rate: float
    micro_batch_size: int
    seed: int = 0
    temperature: float = 1.0  # TRL scales logits by it in the loss: the sampler's temperature
    beta: float = 0.0
    epsilon: float = 0.2
    loss_type: str = "dapo"
    num_iterations: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler_type: str = "constant"
    mask_truncated_completions: bool = False
    importance_sampling: str = "sequence_mask"
    importance_sampling_cap: float = 3.0


@dataclass
class WeightStageConfig:
    """Settings of a GRPO weight stage on the policy's LoRA adapter.

    Example:
        >>> cfg = WeightStageConfig(num_generations=8, examples_per_step=4, max_rollouts=640)
        >>> cfg.rollouts_per_step, cfg.max_steps
        (32, 20)
    """

    # sampling
    num_generations: int = field(default=8, metadata={"help": "G: rollouts of the whole program per example"})
    examples_per_step: int = field(default=8, metadata={"help": "examples (GRPO groups) per optimizer step"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of rollouts (> 0)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling of rollouts, in (0, 1]"})
    max_tokens: int = field(default=128, metadata={"help": "max new tokens per LM call"})
    num_threads: int = field(default=64, metadata={"help": "concurrent program executions during rollouts"})
    dynamic_sampling: bool = field(default=False, metadata={"help": "DAPO: replace examples whose G rollouts all "
                                                                    "scored the same by more examples (up to 2x "
                                                                    "per step); every rollout counts in the budget"})
    # reward
    format_failure_score: float = field(default=0.0, metadata={"help": "reward of a run that failed to parse/raised"})
    scale_rewards: Literal["group", "batch", "none"] = field(default="group", metadata={
        "help": "divide advantages by the reward std of the group, the batch, or not at all (none)"})
    # optimisation (TRL GRPO loss)
    learning_rate: float = field(default=2e-5, metadata={"help": "AdamW lr for the LoRA adapter (TRL's 1e-6 is for full "
                                                             "fine-tuning); optimize() defaults it from the model"})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient against the adapter as it was when the stage started (TRL's "
                                                          "frozen 'ref' copy; the base model only while that adapter is fresh)"})
    epsilon: float = field(default=0.2, metadata={"help": "PPO-style clip range"})
    loss_type: str = field(default="dapo", metadata={"help": "TRL loss aggregation: " + ", ".join(LOSS_TYPES)})
    micro_batch_size: int = field(default=16, metadata={"help": "rows per forward/backward; a step accumulates all its rows"})
    num_iterations: int = field(default=1, metadata={"help": "optimizer steps per rollout batch (>1 enables clipping)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: no clipping)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=0, metadata={"help": "lr warmup steps"})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "transformers lr schedule (constant, "
                                                                        "linear, cosine, ...)"})
    mask_truncated_completions: bool = field(default=False, metadata={"help": "drop completions cut at max_tokens "
                                                                              "from the loss"})
    # off-policy correction, for rollouts sampled by a vLLM server (TRL's vllm_importance_sampling_*)
    importance_sampling: Literal["sequence_mask", "sequence_truncate", "token_mask", "token_truncate", "none"] = field(
        default="sequence_mask", metadata={"help": "weight each vLLM-sampled completion by pi_trainer/pi_vllm: "
                                                   "*_mask drops ratios above the cap, *_truncate clips them"})
    importance_sampling_cap: float = field(default=3.0, metadata={"help": "C_max of the importance-sampling ratio"})
    # budget and bookkeeping
    max_rollouts: int = field(default=1024, metadata={"help": "budget: total program executions in this stage"})
    checkpoint_every: int = field(default=0, metadata={"help": "save a resumable checkpoint every K steps (0: off)"})
    seed: int = field(default=0, metadata={"help": "seed of example order, sampling and the trainer"})
    deterministic: bool = field(default=False, metadata={"help": "one rollout at a time (exactly reproducible; slower)"})

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise StageConfigError(f"num_generations (G) must be >= 2 for group-relative advantages, "
                                   f"got {self.num_generations}")
        for name in ("examples_per_step", "max_tokens", "micro_batch_size", "num_iterations", "num_threads"):
            if getattr(self, name) < 1:
                raise StageConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise StageConfigError(f"temperature must be > 0 (rollouts need temperature > 0 to differ), "
                                   f"got {self.temperature}")
        if self.learning_rate <= 0:
            raise StageConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("beta", "epsilon", "weight_decay", "warmup_steps"):
            if getattr(self, name) < 0:
                raise StageConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.micro_batch_size % 2:
            raise StageConfigError(f"micro_batch_size must be even, got {self.micro_batch_size}: TRL's GRPO loss "
                                   "(rl/grpo.py) is built with 2 generations per prompt and refuses an odd batch")
        if self.checkpoint_every < 0:
            raise StageConfigError(f"checkpoint_every must be >= 0 (save every K steps; 0: no checkpoints), "
                                   f"got {self.checkpoint_every}")
        if not 0 < self.top_p <= 1:
            raise StageConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.importance_sampling not in IMPORTANCE_SAMPLING_MODES:
            raise StageConfigError(f"importance_sampling must be one of {IMPORTANCE_SAMPLING_MODES}, "
                                   f"got {self.importance_sampling!r}")
        if self.importance_sampling_cap <= 1:
            raise StageConfigError(f"importance_sampling_cap must be > 1, got {self.importance_sampling_cap}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise StageConfigError(f"scale_rewards must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}")
        if self.loss_type not in LOSS_TYPES:
            raise StageConfigError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.max_rollouts < self.rollouts_per_step:
            raise StageConfigError(
                f"max_rollouts must be >= {self.rollouts_per_step}, one step's rollouts (examples_per_step="
                f"{self.examples_per_step} x num_generations={self.num_generations}), got {self.max_rollouts}: "
                "it is below one step"
            )

    @property
    def rollouts_per_step(self) -> int:
        return self.examples_per_step * self.num_generations

    @property
    def max_steps(self) -> int:
        return self.max_rollouts // self.rollouts_per_step

    def updater_settings(self) -> UpdaterSettings:
        """The GRPO updater's settings: this stage's loss, optimizer and sampling temperature."""
        return UpdaterSettings(**{f.name: getattr(self, f.name) for f in fields(UpdaterSettings)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SelfTrainConfig:
    """Settings of an ``s`` stage.

    Example:
        >>> SelfTrainConfig(num_samples=4, max_rollouts=64).examples
        16
    """

    num_samples: int = field(default=4, metadata={"help": "program runs per training example"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature of the runs"})
    success_threshold: float = field(default=1.0, metadata={"help": "a run is kept when its reward >= this"})
    epochs: int = field(default=2, metadata={"help": "passes over the kept rows"})
    batch_size: int = field(default=32, metadata={"help": "rows (LM calls) per optimizer step"})
    micro_batch_size: int = field(default=16, metadata={"help": "rows per forward/backward; a step accumulates all its rows"})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW lr for the LoRA adapter"})
    max_tokens: int = field(default=128, metadata={"help": "max new tokens per LM call"})
    num_threads: int = field(default=64, metadata={"help": "concurrent program executions while sampling"})
    max_rollouts: int = field(default=256, metadata={"help": "budget: program executions in this stage"})
    seed: int = field(default=0, metadata={"help": "seed of the example draw, sampling and row order"})

    def __post_init__(self) -> None:
        for name in ("num_samples", "epochs", "batch_size", "micro_batch_size", "max_tokens", "num_threads"):
            if getattr(self, name) < 1:
                raise StageConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise StageConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.learning_rate <= 0:
            raise StageConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.max_rollouts < self.num_samples:
            raise StageConfigError(f"max_rollouts must be >= num_samples={self.num_samples}, got {self.max_rollouts}: "
                                   "not one example can be sampled")

    @property
    def examples(self) -> int:
        """Training examples sampled within the budget."""
        return self.max_rollouts // self.num_samples

    def updater_settings(self) -> UpdaterSettings:
        """The GRPO updater's settings for supervised fine-tuning: every row's advantage is 1 and one pass per batch
        keeps clipping inactive, so TRL's dapo loss is the completions' mean token log-likelihood; temperature 1 in
        the loss, because the likelihood maximised is the model's own, not the sampler's. No importance sampling:
        the kept runs are targets to imitate, not samples of the policy gradient, and a vLLM sampler's log-probs
        (at the sampling temperature) against the trainer's (at 1) would down-weight or mask them. The rest (no KL,
        the default schedule) is the updater's defaults."""
        return UpdaterSettings(learning_rate=self.learning_rate, micro_batch_size=self.micro_batch_size,
                               seed=self.seed, temperature=1.0, loss_type="dapo", importance_sampling="none")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
