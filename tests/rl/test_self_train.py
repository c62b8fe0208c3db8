"""The ``s`` stage trains through the GRPO updater on settings of its own (no stand-in weight-stage config)."""

from __future__ import annotations

import pytest

import rl.self_train
from programs.tasks import last_digit
from rl.config import SelfTrainConfig, UpdaterSettings, WeightStageConfig
from rl.self_train import self_train


def test_self_train_gives_the_updater_what_its_old_stand_in_weight_config_gave():
    config = SelfTrainConfig(learning_rate=3e-4, micro_batch_size=8, seed=5)
    stand_in = WeightStageConfig(num_generations=2, examples_per_step=1, max_rollouts=2, temperature=1.0,
                                 learning_rate=3e-4, micro_batch_size=8, loss_type="dapo", seed=5,
                                 importance_sampling="none")
    assert config.updater_settings() == stand_in.updater_settings()


def test_self_train_imitates_its_kept_runs_without_importance_weights():
    """A vLLM sampler's log-probs at the sampling temperature (0.7) against the trainer's at 1 would mask or
    down-weight kept successes under TRL's off-policy correction; supervised fine-tuning wants every row whole."""
    assert SelfTrainConfig(temperature=0.7).updater_settings().importance_sampling == "none"
    assert WeightStageConfig().updater_settings().importance_sampling == "sequence_mask"  # GRPO keeps the correction


@pytest.mark.slow  # ~25 s on 2 cores
def test_self_train_builds_its_updater_from_its_own_settings(fresh_policy, monkeypatch):
    built = []
    original = rl.self_train.GRPOUpdater

    def spy(policy, settings, total_steps):
        built.append(settings)
        return original(policy, settings, total_steps)

    monkeypatch.setattr(rl.self_train, "GRPOUpdater", spy)
    config = SelfTrainConfig(num_samples=2, max_rollouts=8, epochs=1, batch_size=4, micro_batch_size=4,
                             max_tokens=16, learning_rate=1e-3, success_threshold=0.0, num_threads=4)
    result = self_train(last_digit.predict_program(), last_digit.load("train", 8), lambda e, p, t=None: 1.0,
                        fresh_policy, config, progress=False)
    assert built == [config.updater_settings()] and isinstance(built[0], UpdaterSettings)
    assert result.rollouts == 8 and result.steps >= 1 and result.adapter_version == 1
