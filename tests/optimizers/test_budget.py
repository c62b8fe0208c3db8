"""Budget plans: what a prompt stage's share buys (candidates x val examples), refusals before anything is spent,
and the plan of a whole schedule. Pure arithmetic: no model is loaded."""

from __future__ import annotations

import pytest

from optimizers import Budget, PromptBudgetError, plan_prompt_stage, plan_run
from optimizers.budget import describe_plan
from optimizers.prompt_stage import PromptStageConfig
from rl import WeightStageConfig
from rl.config import SelfTrainConfig


def test_bootstrap_rs_scores_every_candidate_on_a_val_subsample_sized_to_the_share():
    plan = plan_prompt_stage(PromptStageConfig(), 400, n_train=200, n_val=300)
    # the program as it is, labelled demos, bootstrapped demos, 4 seed-shuffled bootstraps (12 runs each at most)
    assert plan.candidate_names == ("current", "labeled", "bootstrap") + tuple(f"bootstrap-{s}" for s in range(4))
    assert (plan.candidates, plan.val_examples, plan.bootstrap) == (7, 48, 60)
    assert plan.cost == 7 * 48 + 60 <= 400
    # a larger share scores on more val examples, never more than the valset
    assert plan_prompt_stage(PromptStageConfig(), 5000, n_train=200, n_val=300).val_examples == 300


def test_a_small_share_drops_candidates_before_it_scores_below_the_minibatch():
    # 100 runs: a bootstrapped candidate (12 runs + its scoring) would push every score below 32 val examples
    plan = plan_prompt_stage(PromptStageConfig(), 100, n_train=200, n_val=300)
    assert plan.candidate_names == ("current", "labeled") and plan.val_examples == 50 and plan.cost == 100
    plan = plan_prompt_stage(PromptStageConfig(), 140, n_train=200, n_val=300)
    assert plan.candidate_names == ("current", "labeled", "bootstrap") and plan.val_examples == 42


def test_a_share_that_cannot_buy_one_candidate_is_refused_with_the_smallest_share_that_would():
    with pytest.raises(PromptBudgetError, match="needs at least 64") as err:
        plan_prompt_stage(PromptStageConfig(), 50, n_train=200, n_val=300)
    assert err.value.min_rollouts == 64
    assert plan_prompt_stage(PromptStageConfig(), 64, n_train=200, n_val=300).candidates == 2
    # a smaller minibatch buys it (the message says so)
    assert plan_prompt_stage(PromptStageConfig(minibatch_size=16), 50, n_train=200, n_val=300).val_examples >= 16


@pytest.mark.parametrize("optimizer, extra", [("mipro", {}), ("gepa", {}), ("simba", {"minibatch_size": 8})])
def test_other_optimizers_are_sized_to_the_share_and_refuse_a_share_too_small(optimizer, extra):
    config = PromptStageConfig(optimizer, **extra)
    plan = plan_prompt_stage(config, 400, n_train=200, n_val=300)
    assert plan.cost is not None and 0 < plan.cost <= 400 and plan.candidates >= 1
    assert plan.val_examples <= 32  # MIPROv2 / GEPA get a valset subsample, SIMBA batches of the trainset
    with pytest.raises(PromptBudgetError):
        plan_prompt_stage(config, 10, n_train=200, n_val=300)


def test_random_demos_and_no_budget_plans():
    assert plan_prompt_stage(PromptStageConfig("random_demos"), 400, 200, 300).cost == 0
    plan = plan_prompt_stage(PromptStageConfig(), None, n_train=200, n_val=300)
    assert plan.val_examples == 300 and plan.cost is None  # no share: candidates scored on the whole valset


def _plan(schedule, budget, **weights):
    return plan_run(schedule, Budget(rollouts=budget), prompt=PromptStageConfig(),
                    weights=WeightStageConfig(**{"num_generations": 4, "examples_per_step": 4, **weights}),
                    self_training=SelfTrainConfig(), n_train=200, n_val=300)


def test_the_run_plan_gives_each_stage_its_share_and_says_what_it_buys():
    plans = _plan(("p", "w"), 800)
    assert [p.share for p in plans] == [400, 800 - plans[0].rollouts]  # what p is planned not to spend goes to w
    assert plans[0].text.startswith("p: bootstrap_rs: 7 candidates x 48 val examples")
    assert plans[1].text.startswith(f"w: {plans[1].share // 16} GRPO steps x 16 rollouts")
    text = describe_plan(plans, Budget(rollouts=800))
    assert text.splitlines()[0] == "budget 800 rollouts:" and "1. p: " in text and "2. w: " in text


def test_the_run_plan_names_the_smallest_budget_that_buys_a_prompt_candidate():
    with pytest.raises(PromptBudgetError, match="smallest budget for p -> w that buys it is 128") as err:
        _plan(("p", "w"), 100)
    assert err.value.min_rollouts == 128
