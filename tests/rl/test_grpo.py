"""The contract of the TRL seam (``rl/grpo.py`` through ``rl/trl_seam.py``), on the real tiny model.

A TRL, transformers or accelerate upgrade that changes what we train must fail here, by name: every private name the
seam uses exists with the parameters we pass; the micro-batch split leaves the update unchanged; ``beta=0`` with zero
advantages moves nothing; the KL reference is the adapter as it was when the stage (the updater) started.
"""

from __future__ import annotations

import importlib
import inspect
import re
import tomllib
from pathlib import Path

import pytest
import torch

from rl import Policy, WeightStageConfig, trl_seam
from rl.advantages import Row
from rl.grpo import GRPOUpdater

SMALL = dict(num_generations=4, examples_per_step=2, max_tokens=24, max_rollouts=64, temperature=1.0)
NUMBERS = (123, 4567, 89, 42, 1000001, 7)  # prompts and completions of different lengths: padding on both sides


def _rows(policy, advantages) -> list[Row]:
    tok = policy.tokenizer
    rows = []
    for i, (n, advantage) in enumerate(zip(NUMBERS, advantages)):
        prompt, completion = tok.encode(f"What is the last digit of {n}?"), tok.encode(f"Answer: {n % 10}" + "!" * i)
        rows.append(Row(tuple(prompt), tuple(completion), float(advantage), 0.0, (i // 2, "p"), False))
    return rows


def _policy(tiny_model_dir, seed: int = 1) -> Policy:
    """A policy whose adapter is not the identity (a fresh LoRA B is 0): every LoRA weight gets a gradient, and the
    adapter differs from the base model, so "the adapter at the start" and "the base model" are told apart."""
    policy = Policy.from_pretrained(tiny_model_dir, name="tiny-grpo")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(policy.model.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return policy


def _lora(policy) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in policy.model.named_parameters() if ".default." in n}


def _capture_gradients(updater: GRPOUpdater) -> dict[str, torch.Tensor]:
    """The LoRA gradients the updater's next optimizer step applies (through torch's public step hook)."""
    captured: dict[str, torch.Tensor] = {}
    params = {id(p): n for n, p in updater.policy.model.named_parameters()}
    inner = getattr(updater.trainer.optimizer, "optimizer", updater.trainer.optimizer)  # accelerate may wrap it

    def hook(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    captured[params[id(p)]] = p.grad.detach().clone()

    inner.register_step_pre_hook(hook)
    return captured


def _logps(policy, rows: list[Row], adapter: bool = True) -> list[torch.Tensor]:
    """Each row's per-token completion log-probs at temperature 1, computed without TRL (row by row, no padding)."""
    out = []
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([list(r.prompt_ids) + list(r.completion_ids)], device=policy.device)
            if adapter:
                logits = policy.model(input_ids=ids).logits
            else:
                with policy.model.disable_adapter():
                    logits = policy.model(input_ids=ids).logits
            logits = logits[0, len(r.prompt_ids) - 1 : -1].float()
            out.append(logits.log_softmax(-1).gather(-1, ids[0, len(r.prompt_ids) :, None])[:, 0].cpu())
    return out


def _unpad(per_token: torch.Tensor, rows: list[Row]) -> list[torch.Tensor]:
    return [per_token[i, : len(r.completion_ids)].cpu() for i, r in enumerate(rows)]


def _max_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


# --- every private name the seam uses exists, with the parameters we pass ------------------------------------------


# "module:qualified.name" -> the leading parameters rl/trl_seam.py passes (resolved in the test, not at collection, so a
# name TRL dropped fails its own test)
PRIVATE_API = {
    "trl:GRPOTrainer._get_per_token_logps_and_entropies":
        ["self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size"],
    "trl:GRPOTrainer.compute_loss": ["self", "model", "inputs"],
    "trl:GRPOTrainer._compute_loss": ["self", "model", "inputs"],
    "trl:GRPOTrainer.compute_loss_context_manager": ["self"],
    "trl:GRPOTrainer._clip_grad_norm": ["self", "model"],
    "transformers:Trainer._clip_grad_norm": ["self", "model"],
    "accelerate.state:GradientState._set_sync_gradients": ["self", "sync_gradients"],
    "torch.nn.parallel:DistributedDataParallel._remove_autograd_hooks": ["self"],
    "trl.trainer.utils:pad": ["tensors", "padding_value", "padding_side"],
    "trl.trainer.utils:use_adapter": ["model", "adapter_name"],
    "trl.models.utils:disable_gradient_checkpointing": ["model", "gradient_checkpointing_kwargs"],
}


@pytest.mark.parametrize("name", list(PRIVATE_API))
def test_private_api_the_seam_calls_has_the_parameters_we_pass(name):
    """Each private callable exists and takes, in this order, the parameters the seam passes it."""
    module, _, path = name.partition(":")
    func = importlib.import_module(module)
    for attr in path.split("."):
        func = getattr(func, attr, None)
        assert func is not None, f"{name} is gone: rl/trl_seam.py calls it"
    params, expected = list(inspect.signature(func).parameters), PRIVATE_API[name]
    assert params[: len(expected)] == expected, f"{name}{inspect.signature(func)}: rl/trl_seam.py passes {expected}"


# what TRL's loss (GRPOTrainer._compute_loss) must read for the seam's switches and batch keys to mean what we think
LOSS_READS = {
    "current_gradient_accumulation_steps (split_into)": "self.current_gradient_accumulation_steps",
    "steps_per_generation (split_into)": "self.args.steps_per_generation",
    "num_items_in_batch (split_into)": 'inputs["num_items_in_batch"]',
    "use_vllm and vllm_importance_sampling_correction (enable_importance_sampling)":
        "self.use_vllm and self.vllm_importance_sampling_correction",
    "importance_sampling_ratio (IS_RATIO)": f'inputs["{trl_seam.IS_RATIO}"]',
    "beta, not args.beta (set_beta)": "if self.beta != 0.0",
    "ref_per_token_logps (reference_logps)": 'inputs["ref_per_token_logps"]',
    "old_per_token_logps (per_token_logps)": 'inputs.get("old_per_token_logps")',
    "_metrics (pop_metrics)": "self._metrics[mode]",
    "accelerator.sync_gradients (set_sync_gradients)": "self.accelerator.sync_gradients",
}


@pytest.mark.parametrize("what", list(LOSS_READS))
def test_trl_loss_reads_what_the_seam_sets(what):
    from trl import GRPOTrainer

    assert LOSS_READS[what] in inspect.getsource(GRPOTrainer._compute_loss), (
        f"GRPOTrainer._compute_loss no longer reads {LOSS_READS[what]!r}: re-check rl/trl_seam.py against this TRL")


def test_trainer_instance_has_the_attributes_the_seam_uses(tiny_model_dir):
    updater = GRPOUpdater(Policy.from_pretrained(tiny_model_dir, name="tiny-grpo"),
                          WeightStageConfig(**SMALL, beta=0.1), 1)
    try:
        trainer = updater.trainer
        assert isinstance(trainer._metrics["train"], dict)
        assert trainer.args.steps_per_generation >= 1
        assert trainer.beta == trainer.args.beta == 0.1
        assert isinstance(trainer.use_vllm, bool) and trainer.vllm_importance_sampling_correction  # set by the seam
        assert hasattr(updater.accelerator.gradient_state, "sync_gradients")
        assert trl_seam.REF_ADAPTER in updater.policy.model.peft_config  # TRL's frozen copy, under the name we drop
    finally:
        updater.close()
    assert list(updater.policy.model.peft_config) == ["default"]


def test_installed_trl_is_the_checked_minor_and_pinned():
    """An upgrade must re-run this file and then move ``CHECKED_TRL`` (and the docstring) with the pin."""
    import trl

    assert re.match(rf"{re.escape(trl_seam.CHECKED_TRL)}\.", trl.__version__), (
        f"trl {trl.__version__} is installed; rl/trl_seam.py was checked against {trl_seam.CHECKED_TRL}")
    deps = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["dependencies"]
    major, minor = map(int, trl_seam.CHECKED_TRL.split("."))
    assert f"trl>={major}.{minor},<{major}.{minor + 1}" in deps


# --- the update ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_micro_batch_split_leaves_the_update_unchanged(tiny_model_dir, loss_type):
    """Micro-batches of 2 rows and one micro-batch of all 6: the same gradients, loss and adapter after a step.

    (2, not 1: TRL refuses an odd ``per_device_train_batch_size`` with its ``num_generations=2``.)
    """
    policies = [_policy(tiny_model_dir), _policy(tiny_model_dir)]
    advantages = [1.0, -1.0, 0.5, -0.5, 2.0, -2.0]
    updaters = [GRPOUpdater(p, WeightStageConfig(**SMALL, learning_rate=1e-3, micro_batch_size=mbs,
                                                 loss_type=loss_type, importance_sampling="none"), 1)
                for p, mbs in zip(policies, (2, len(NUMBERS)))]
    grads = [_capture_gradients(u) for u in updaters]
    metrics = [u.step(u.to_batch(_rows(u.policy, advantages))) for u in updaters]
    for u in updaters:
        u.close()
    split, whole = grads
    assert split.keys() == whole.keys() and len(split) == len(_lora(policies[0]))
    assert all(g.abs().max() > 1e-4 for g in whole.values())  # every LoRA weight is pushed
    for name in whole:
        # |g| up to ~0.1; float32 rounding of micro-batches with different padding widths (a wrong split is off by x3)
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)
    assert abs(metrics[0]["loss"] - metrics[1]["loss"]) < 1e-5
    assert abs(metrics[0]["grad_norm"] - metrics[1]["grad_norm"]) < 1e-5 * metrics[1]["grad_norm"]
    # Adam's first step moves each weight by ~lr * g / (|g| + eps): where a gradient is ~1e-9, below eps, the float
    # rounding of the two splits (different rows share a micro-batch's padding width) moves a weight by a few % of a
    # step (lr 1e-3). Where the gradient is clear of that noise the adapters agree to 1% of a step.
    after = [_lora(p) for p in policies]
    for name in after[1]:
        torch.testing.assert_close(after[0][name], after[1][name], rtol=0, atol=1e-4, msg=name)
        clear = whole[name].abs() > 1e-7
        torch.testing.assert_close(after[0][name][clear], after[1][name][clear], rtol=0, atol=1e-5, msg=name)


def test_beta_zero_with_zero_advantages_moves_nothing(tiny_model_dir):
    """No advantage and no KL term: the step's loss and gradients are 0 and the adapter stays bit for bit the same."""
    policy = _policy(tiny_model_dir)
    before = _lora(policy)
    updater = GRPOUpdater(policy, WeightStageConfig(**SMALL, learning_rate=1e-2, micro_batch_size=4, beta=0.0), 1)
    grads = _capture_gradients(updater)
    metrics = updater.step(updater.to_batch(_rows(policy, [0.0] * len(NUMBERS))))
    updater.close()
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads.values())
    assert metrics["loss"] == 0.0 and metrics["grad_norm"] == 0.0
    after = _lora(policy)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_kl_reference_is_the_adapter_when_the_stage_started(tiny_model_dir):
    """``beta > 0``: the reference log-probs are the adapter's at the updater's start (TRL's frozen "ref" copy), not
    the adapter-free base model's and not the adapter's after it trained; the copy is dropped by ``close()``."""
    policy = _policy(tiny_model_dir)
    rows = _rows(policy, [1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    at_start, base = _logps(policy, rows), _logps(policy, rows, adapter=False)
    assert _max_gap(at_start, base) > 1e-2  # the test tells the two apart
    updater = GRPOUpdater(policy, WeightStageConfig(**SMALL, learning_rate=1e-2, micro_batch_size=4, beta=0.1), 3)
    try:
        batch = updater.to_batch(rows)
        gap = _max_gap(_unpad(batch["ref_per_token_logps"], rows), at_start)
        assert gap < 1e-4, f"the reference is not the adapter at the start (log-probs off by {gap:.3g})"
        first = updater.step(batch)
        assert first["kl"] < 1e-6  # the policy is its own reference on the first step

        moved = _logps(policy, rows)
        assert _max_gap(moved, at_start) > 1e-2  # the adapter trained...
        batch = updater.to_batch(rows)
        gap = _max_gap(_unpad(batch["ref_per_token_logps"], rows), at_start)
        assert gap < 1e-4, f"the reference moved with the adapter (log-probs off by {gap:.3g})"  # ...the reference not
        assert updater.step(batch)["kl"] > 1e-4
    finally:
        updater.close()
    assert trl_seam.REF_ADAPTER not in policy.model.peft_config
