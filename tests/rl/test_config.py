"""The stage configs share one convention: where they live, how they refuse a bad value, how they explain a field."""

from __future__ import annotations

import rl
import rl.self_train
from rl.config import SelfTrainConfig, WeightStageConfig


def test_rl_stage_configs_live_in_rl_config():
    assert WeightStageConfig.__module__ == SelfTrainConfig.__module__ == "rl.config"
    assert rl.SelfTrainConfig is rl.self_train.SelfTrainConfig is SelfTrainConfig  # old import path still works
    assert SelfTrainConfig(num_samples=4, max_rollouts=64).to_dict()["num_samples"] == 4
