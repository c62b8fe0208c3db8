"""The stage configs share one convention: where they live, how they refuse a bad value, how they explain a field."""

from __future__ import annotations

import dataclasses

import pytest

import rl
import rl.self_train
from optimizers.prompt_stage import PromptStageConfig, PromptStageError
from rl.config import SelfTrainConfig, UpdaterSettings, WeightStageConfig, config_help
from rl.errors import StageConfigError


def test_rl_stage_configs_live_in_rl_config():
    assert WeightStageConfig.__module__ == SelfTrainConfig.__module__ == "rl.config"
    assert rl.SelfTrainConfig is SelfTrainConfig
    assert SelfTrainConfig(num_samples=4, max_rollouts=64).to_dict()["num_samples"] == 4


@pytest.mark.parametrize("cls, kwargs, message", [
    (WeightStageConfig, {"num_generations": 1}, r"num_generations \(G\) must be >= 2"),
    (WeightStageConfig, {"num_iterations": 0}, "num_iterations must be >= 1, got 0"),
    (WeightStageConfig, {"epsilon": -0.1}, "epsilon must be >= 0, got -0.1"),
    (WeightStageConfig, {"scale_rewards": "all"}, r"scale_rewards must be one of \('group', 'batch', 'none'\)"),
    (WeightStageConfig, {"max_rollouts": 3}, "max_rollouts must be >= 64"),
    (WeightStageConfig, {"loss_type": "ppo"}, r"loss_type must be one of \('dapo', 'grpo', 'dr_grpo', 'bnpo'"),
    (SelfTrainConfig, {"epochs": 0}, "epochs must be >= 1, got 0"),
    (SelfTrainConfig, {"temperature": -1.0}, "temperature must be >= 0"),
    (SelfTrainConfig, {"max_rollouts": 2}, "max_rollouts must be >= num_samples=4"),
    (PromptStageConfig, {"optimizer": "adam"}, "unknown optimizer 'adam'; expected one of"),
    (PromptStageConfig, {"num_threads": 0}, "num_threads must be >= 1"),
])
def test_every_stage_config_refuses_a_bad_value_with_one_error(cls, kwargs, message):
    with pytest.raises(StageConfigError, match=message) as caught:
        cls(**kwargs)
    assert isinstance(caught.value, ValueError)  # callers catching ValueError keep working


def test_prompt_stage_error_is_a_stage_config_error():
    assert issubclass(PromptStageError, StageConfigError) and rl.StageConfigError is StageConfigError


@pytest.mark.parametrize("cls", [WeightStageConfig, SelfTrainConfig, PromptStageConfig])
def test_every_stage_config_field_has_help_and_config_help_renders_it(cls):
    names = [f.name for f in dataclasses.fields(cls) if f.metadata.get("help")]
    assert names == [f.name for f in dataclasses.fields(cls)], "a field without metadata={'help': ...}"
    lines = config_help(cls).splitlines()
    assert len(lines) == len(names) and all(": " in line for line in lines)
    assert "num_threads (int, " in config_help(cls)


def test_updater_settings_defaults_are_the_weight_stage_defaults():
    defaults = UpdaterSettings(learning_rate=WeightStageConfig.learning_rate,
                               micro_batch_size=WeightStageConfig.micro_batch_size)
    assert defaults == WeightStageConfig().updater_settings()
