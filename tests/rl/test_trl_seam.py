"""Contract test of the ``Trainer`` / accelerate / DeepSpeed state that rl/trl_seam.py sets for ``rl/grpo.py``.

Why a file beside tests/rl/test_grpo.py (which holds the contract of TRL's loss): the updater prepares the model,
steps and checkpoints outside ``Trainer.train()``, so it keeps some of ``Trainer``'s and accelerate's bookkeeping
itself (the wrapped model, the lr scheduler, the global step, DeepSpeed's config and ZeRO's optimizer). Each seam
function for that has a test here named after it, which fails when a transformers, accelerate or DeepSpeed upgrade
renames or stops reading what the function sets. The DeepSpeed parts skip where DeepSpeed is not installed (it is an
optional extra) and fail in CI, which installs it.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect

import pytest
import torch

from rl import Policy, WeightStageConfig, trl_seam
from rl.grpo import GRPOUpdater
from tests.requires import missing


def _source(name: str) -> str:
    """The source of ``module:qualified.name``; fails naming it when it is gone."""
    module, _, path = name.partition(":")
    obj = importlib.import_module(module)
    for attr in path.split("."):
        obj = getattr(obj, attr, None)
        assert obj is not None, f"{name} is gone: rl/trl_seam.py relies on it"
    return inspect.getsource(obj.fget if isinstance(obj, property) else obj)


def _require_deepspeed() -> None:
    if importlib.util.find_spec("deepspeed") is None:
        missing("deepspeed", "DeepSpeed is not installed (pip install cotune[deepspeed])")


# "seam function: what it relies on" -> (where, what that code must contain)
LIBRARY_CODE = {
    "set_wrapped_model: Trainer keeps model_wrapped and deepspeed":
        ("transformers:Trainer.__init__", ("self.model_wrapped = model", "self.deepspeed = None")),
    "rebuild_scheduler: create_scheduler builds only while lr_scheduler is None":
        ("transformers:Trainer.create_scheduler", ("if self.lr_scheduler is None",)),
    "deepspeed_config: accelerate builds the engine from the plugin's live config dict":
        ("accelerate:Accelerator._prepare_deepspeed",
         ("self.deepspeed_config = deepspeed_plugin.deepspeed_config", "config_params=self.deepspeed_config")),
    "deepspeed_config: the accelerator's plugin is the state's":
        ("accelerate:Accelerator.deepspeed_plugin", ("self.state.deepspeed_plugin",)),
    "load_zero_partitions: accelerate's optimizer wrapper keeps what it wraps as .optimizer":
        ("accelerate.optimizer:AcceleratedOptimizer.__init__", ("self.optimizer = optimizer",)),
}

DEEPSPEED_CODE = {
    "zero_torch_optimizer: the engine's optimizer is its ZeRO optimizer":
        ("deepspeed.runtime.engine:DeepSpeedEngine._configure_optimizer",
         ("self.optimizer = self._configure_zero_optimizer(basic_optimizer)",)),
    "zero_torch_optimizer: ZeRO-1/2 keeps the torch optimizer as .optimizer":
        ("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer.__init__", ("self.optimizer = init_optimizer",)),
    "zero_torch_optimizer: ZeRO-3 keeps the torch optimizer as .optimizer":
        ("deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3.__init__", ("self.optimizer = init_optimizer",)),
}

# "module:qualified.name" -> the leading parameters rl/trl_seam.py passes
SIGNATURES = {
    "transformers:Trainer.create_scheduler": ["self", "num_training_steps", "optimizer"],
}
DEEPSPEED_SIGNATURES = {  # load_zero_partitions passes every rank's partition as the first argument
    "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer.load_state_dict": ["self", "state_dict_list"],
    "deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3.load_state_dict": ["self", "state_dict_list"],
}


@pytest.mark.parametrize("what", list(LIBRARY_CODE))
def test_library_code_does_what_the_seam_relies_on(what):
    where, needles = LIBRARY_CODE[what]
    source = _source(where)
    for needle in needles:
        assert needle in source, f"{where} no longer has {needle!r}: re-check rl.trl_seam.{what}"


@pytest.mark.parametrize("what", list(DEEPSPEED_CODE))
def test_deepspeed_code_does_what_the_seam_relies_on(what):
    _require_deepspeed()
    where, needles = DEEPSPEED_CODE[what]
    source = _source(where)
    for needle in needles:
        assert needle in source, f"{where} no longer has {needle!r}: re-check rl.trl_seam.{what}"


@pytest.mark.parametrize("name", [*SIGNATURES, *DEEPSPEED_SIGNATURES])
def test_library_calls_the_seam_makes_have_the_parameters_we_pass(name):
    if name in DEEPSPEED_SIGNATURES:
        _require_deepspeed()
    module, _, path = name.partition(":")
    func = importlib.import_module(module)
    for attr in path.split("."):
        func = getattr(func, attr, None)
        assert func is not None, f"{name} is gone: rl/trl_seam.py calls it"
    params, expected = list(inspect.signature(func).parameters), {**SIGNATURES, **DEEPSPEED_SIGNATURES}[name]
    assert params[: len(expected)] == expected, f"{name}{inspect.signature(func)}: rl/trl_seam.py passes {expected}"


def test_global_step_is_a_trainer_state_field():
    from transformers import Trainer, TrainerState

    assert "global_step" in {f.name for f in dataclasses.fields(TrainerState)}, (
        "TrainerState has no global_step: update rl.trl_seam.advance_global_step / global_step / set_global_step")
    assert "self.state = TrainerState(" in inspect.getsource(Trainer.__init__), "Trainer.state is no TrainerState"


def test_the_seam_keeps_the_trainers_state_on_a_real_updater(tiny_model_dir):
    """On a built updater: the attributes exist where the seam sets them, and each setter does what it says."""
    from transformers import TrainerState

    policy = Policy.from_pretrained(tiny_model_dir, name="tiny-trl-seam")
    updater = GRPOUpdater(policy, WeightStageConfig(num_generations=4, examples_per_step=2, max_tokens=8,
                                                    max_rollouts=16, beta=0.0, warmup_steps=2), 5)
    try:
        trainer = updater.trainer
        # set_wrapped_model: one process, nothing wraps the model; the attributes are Trainer's
        assert trainer.model_wrapped is trainer.model and trainer.deepspeed is None
        trl_seam.set_wrapped_model(trainer, trainer.model, deepspeed_engine=True)
        assert trainer.model_wrapped is trainer.deepspeed is trainer.model
        trainer.deepspeed = None
        # advance_global_step / global_step / set_global_step: Trainer's own counter
        assert isinstance(trainer.state, TrainerState) and trl_seam.global_step(trainer) == 0
        trl_seam.advance_global_step(trainer)
        assert trainer.state.global_step == trl_seam.global_step(trainer) == 1
        assert updater.state_dict()["global_step"] == 1
        trl_seam.set_global_step(trainer, 0)
        assert trainer.state.global_step == 0
        # rebuild_scheduler: a new scheduler of the configured kind over the optimizer given
        old = trainer.lr_scheduler
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        trl_seam.rebuild_scheduler(trainer, 5, inner)
        assert trainer.lr_scheduler is not old and trainer.lr_scheduler.optimizer is inner
        assert type(trainer.lr_scheduler) is type(old)
        assert trainer.lr_scheduler.get_last_lr() == old.get_last_lr()
        # load_zero_partitions loads through the wrapper's .optimizer: here the torch optimizer itself
        assert isinstance(inner, torch.optim.Optimizer)
    finally:
        updater.close()


def test_every_loss_type_a_config_accepts_is_one_trls_loss_aggregates():
    """rl.config.LOSS_TYPES is refused up front (a typo fails before any rollout): each must be a branch of TRL's
    GRPO loss, and rl.trl_seam.ROW_MEAN_LOSSES (micro-batch padding rescale) a subset of them."""
    from rl.config import LOSS_TYPES

    source = _source("trl.trainer.grpo_trainer:GRPOTrainer._compute_loss")
    missing_types = [t for t in LOSS_TYPES if f'"{t}"' not in source]
    assert not missing_types, f"TRL's GRPO loss has no branch for {missing_types}: update rl.config.LOSS_TYPES"
    assert trl_seam.ROW_MEAN_LOSSES <= set(LOSS_TYPES)
