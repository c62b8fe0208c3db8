"""Every use of TRL's, transformers' ``Trainer``'s, accelerate's and DeepSpeed's internals, in one small module.

Why: :class:`rl.grpo.GRPOUpdater` drives ``GRPOTrainer`` one step at a time on rows we generated, outside
``trainer.train()``, so it depends on parts of these libraries that they do not promise to keep: private methods, the
attributes their loss reads and the batch dict their loss consumes. A minor release may rename or change any of them,
and what we train would change with no error. Each such use is a function here, so ``rl/grpo.py`` reads as our logic
and an upgrade has one file to check.

Checked against trl 1.16.0, transformers 5.24.0, accelerate 1.15.0, peft 0.21.2 and torch 2.13.0; ``pyproject.toml``
pins trl to 1.16.x. The contract test is tests/rl/test_grpo.py: each private name used here exists with the
parameters we pass, the micro-batch split leaves the update unchanged, ``beta=0`` with zero advantages moves nothing,
and the KL reference is the adapter as it was when the stage started; tests/rl/test_trl_seam.py checks the
``Trainer``, accelerate and DeepSpeed state set here (one test per function, named after it). To upgrade TRL: widen
the pin, run both files, and update the versions above and :data:`CHECKED_TRL`.

What we rely on:

- ``GRPOTrainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, batch_size)``
  returns ``(logps, entropies, aux_loss)`` at the trainer's temperature: ``GRPOTrainer.__init__`` patches the policy's
  base model with a fused LM head (``trl.trainer.utils.add_fused_lm_head``; never undone, each new trainer wraps the
  last) that only a ``fused_lm_head=True`` call uses, so the engine's plain forward, and its generation, are unchanged.
- ``GRPOTrainer.compute_loss(model, inputs)`` takes the dict ``_generate_and_score_completions`` returns:
  ``prompt_ids``, ``prompt_mask``, ``completion_ids``, ``completion_mask``, ``advantages``, ``num_items_in_batch`` and,
  when present, ``old_per_token_logps``, ``ref_per_token_logps`` and ``importance_sampling_ratio`` (:data:`IS_RATIO`).
- The loss divides by ``current_gradient_accumulation_steps`` (and, for dapo, by ``num_items_in_batch`` times it over
  ``args.steps_per_generation`` and the number of processes), reads ``beta`` (not ``args.beta``), multiplies by the
  importance ratio when ``use_vllm`` and ``vllm_importance_sampling_correction`` are both set, appends its metrics to
  ``_metrics["train"]`` and reads ``accelerator.sync_gradients``.
- With ``beta > 0`` on a PEFT model, TRL's ``__init__`` copies the "default" adapter into a frozen :data:`REF_ADAPTER`
  and the reference log-probs are taken under it (``trl.trainer.utils.use_adapter``).
- ``Trainer._clip_grad_norm(model)`` (transformers) clips to ``args.max_grad_norm`` and returns the norm before
  clipping.
- ``GradientState._set_sync_gradients(flag)`` (accelerate) and ``DistributedDataParallel._remove_autograd_hooks()``
  (torch).
- The ``Trainer`` attributes we set because we prepare the model and step outside ``Trainer.train()``:
  ``model_wrapped`` and ``deepspeed`` (:func:`set_wrapped_model`), ``lr_scheduler`` (``create_scheduler`` builds one
  only while it is ``None``: :func:`rebuild_scheduler`) and ``state.global_step`` (:func:`advance_global_step`).
- accelerate builds the DeepSpeed engine from the live dict ``accelerator.state.deepspeed_plugin.deepspeed_config``
  (:func:`deepspeed_config`); its optimizer wrapper keeps the optimizer it wraps as ``.optimizer``, and so do
  DeepSpeed's engine (the ZeRO optimizer) and ZeRO optimizers (the torch optimizer); a ZeRO optimizer's
  ``load_state_dict(state_dict_list)`` takes every rank's partition and loads its own (:func:`zero_torch_optimizer`,
  :func:`load_zero_partitions`; DeepSpeed 0.19.8).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from rl.policy import gathered_lora

if TYPE_CHECKING:
    from accelerate import Accelerator
    from trl import GRPOTrainer

CHECKED_TRL = "1.16"  # the TRL minor version this module (and the pin in pyproject.toml) was checked against
REF_ADAPTER = "ref"  # the name TRL gives its frozen copy of the "default" adapter (the KL reference)
IS_RATIO = "importance_sampling_ratio"  # batch key TRL's loss multiplies the per-token loss by
# Loss types that average over the rows of a micro-batch: a padding row would dilute that mean. Token-normalised types
# (dapo, bnpo, cispo, vespo) are unaffected by padding rows.
ROW_MEAN_LOSSES = frozenset({"grpo", "sapo", "dr_grpo", "luspo"})


def pad(tensors: Sequence[torch.Tensor], padding_value: float, padding_side: Literal["left", "right"]) -> torch.Tensor:
    """Stack 1-D tensors into one ``(B, T)`` tensor, padded as TRL pads its own batches."""
    from trl.trainer.utils import pad as trl_pad

    return trl_pad(list(tensors), padding_value, padding_side)


def without_gradient_checkpointing(trainer: GRPOTrainer, model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Gradient checkpointing off for extra no-grad forward passes, as TRL does around its own."""
    from trl.models.utils import disable_gradient_checkpointing

    return disable_gradient_checkpointing(model, trainer.args.gradient_checkpointing_kwargs)


def per_token_logps(trainer: GRPOTrainer, model: torch.nn.Module, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, logits_to_keep: int, batch_size: int) -> torch.Tensor:
    """Log-probs ``(B, logits_to_keep)`` of the last ``logits_to_keep`` tokens, in chunks of ``batch_size`` rows."""
    return trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                       batch_size=batch_size)[0]


def reference_logps(trainer: GRPOTrainer, model: torch.nn.Module, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, logits_to_keep: int, batch_size: int) -> torch.Tensor:
    """:func:`per_token_logps` under the KL reference: TRL's frozen :data:`REF_ADAPTER` (the adapter as it was when
    the trainer was built), or the adapter-free base model when there is none (as TRL chooses)."""
    from trl.trainer.utils import use_adapter

    unwrapped = trainer.accelerator.unwrap_model(model)
    with use_adapter(unwrapped, adapter_name=REF_ADAPTER if REF_ADAPTER in unwrapped.peft_config else None):
        return per_token_logps(trainer, model, input_ids, attention_mask, logits_to_keep, batch_size)


def set_beta(trainer: GRPOTrainer, beta: float) -> None:
    """The KL coefficient the loss uses (TRL copies ``args.beta`` to ``trainer.beta`` at init; the loss reads that)."""
    trainer.beta = trainer.args.beta = beta


def enable_importance_sampling(trainer: GRPOTrainer) -> None:
    """Make TRL's loss multiply each token's loss by the batch's :data:`IS_RATIO`.

    TRL applies the ratio in its loss under these two flags; its generation code, which they also switch, is never
    called (we generate), so this turns on exactly the loss-side correction.
    """
    trainer.use_vllm = True
    trainer.vllm_importance_sampling_correction = True


def split_into(trainer: GRPOTrainer, micro_batches: int, num_items_in_batch: torch.Tensor) -> torch.Tensor:
    """Prepare TRL's loss normalisers for a step of ``micro_batches`` backward passes; returns the
    ``num_items_in_batch`` to give every micro-batch.

    TRL divides each micro-batch loss by ``num_items_in_batch * accumulation / steps_per_generation`` (dapo) or by the
    accumulation steps (grpo, ...). Setting both so that the sum over micro-batches is the step's token mean makes the
    update independent of how the rows are split.
    """
    trainer.current_gradient_accumulation_steps = micro_batches
    return num_items_in_batch * trainer.args.steps_per_generation / micro_batches


def loss(trainer: GRPOTrainer, model: torch.nn.Module, micro_batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """TRL's GRPO loss on one micro-batch (its metrics go to :func:`pop_metrics`); the caller runs backward."""
    with trainer.compute_loss_context_manager():
        return trainer.compute_loss(model, micro_batch)


def clip_grad_norm(trainer: GRPOTrainer, model: torch.nn.Module) -> float | None:
    """Clip the gradients to ``args.max_grad_norm`` and return their norm before clipping.

    ``None`` when clipping is off (``max_grad_norm`` 0) or the norm is not known here (a DeepSpeed engine clips in its
    own step).
    """
    if not trainer.args.max_grad_norm > 0:
        return None
    norm = trainer._clip_grad_norm(model)
    return float(norm) if norm is not None else None


def pop_metrics(trainer: GRPOTrainer) -> dict[str, float]:
    """The mean of each training metric TRL's loss logged since the last call; clears them."""
    logged = trainer._metrics["train"]
    metrics = {k: float(np.nanmean(v)) for k, v in logged.items() if len(v)}
    logged.clear()
    return metrics


def set_sync_gradients(accelerator: Accelerator, sync: bool) -> None:
    """Tell accelerate (and TRL's loss, which reads it) whether this backward pass all-reduces gradients."""
    accelerator.gradient_state._set_sync_gradients(sync)


def remove_ddp_hooks(ddp_model: torch.nn.parallel.DistributedDataParallel) -> None:
    """Detach DDP's gradient hooks from the parameters it wraps (they would outlive the wrapper otherwise)."""
    ddp_model._remove_autograd_hooks()


def add_reference_adapter_zero3(model) -> None:
    """TRL's frozen :data:`REF_ADAPTER` (a copy of "default") on a ZeRO-3-partitioned model: copied from the gathered
    default adapter (a collective), as plain tensors on every rank (it never trains)."""
    model.add_adapter(REF_ADAPTER, model.peft_config["default"])
    model.set_adapter("default")
    defaults = {n: p for n, p in model.named_parameters() if ".default." in n}
    with gathered_lora(model), torch.no_grad():  # the new "ref" weights are plain tensors: only "default" gathers
        for name, param in defaults.items():
            ref = model.get_parameter(name.replace(".default.", f".{REF_ADAPTER}."))
            ref.data = param.data.detach().clone().to(ref.device)
            ref.requires_grad_(False)


def drop_reference_adapter(model) -> None:
    """Delete TRL's :data:`REF_ADAPTER`, if any, so the policy holds only its own adapter again."""
    if REF_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REF_ADAPTER)
        model.set_adapter("default")


# --- Trainer state we keep, because we prepare the model and step outside Trainer.train() ---------------------------


def set_wrapped_model(trainer: GRPOTrainer, wrapped: torch.nn.Module, *, deepspeed_engine: bool = False) -> None:
    """Record ``wrapped`` as the trainer's outermost model, as ``Trainer`` does when it prepares the model itself.

    ``Trainer.model_wrapped`` (the DDP wrapper or DeepSpeed engine; the bare model when nothing wraps it) is what its
    save and checkpoint paths use; for a DeepSpeed engine (``deepspeed_engine``) ``Trainer.deepspeed`` is set to it too.
    """
    trainer.model_wrapped = wrapped
    if deepspeed_engine:
        trainer.deepspeed = wrapped


def deepspeed_config(accelerator: Accelerator) -> dict:
    """The DeepSpeed config dict accelerate builds the engine from at ``accelerator.prepare`` (the live dict: what is
    changed in it before ``prepare`` is what the engine gets)."""
    return accelerator.state.deepspeed_plugin.deepspeed_config


def zero_torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under a DeepSpeed engine's ZeRO optimizer (ZeRO dropped its empty parameter groups)."""
    return engine.optimizer.optimizer


def rebuild_scheduler(trainer: GRPOTrainer, num_training_steps: int, optimizer: torch.optim.Optimizer) -> None:
    """Replace the trainer's lr scheduler by a new one of its configured kind over ``optimizer``.

    ``Trainer.create_scheduler`` builds a scheduler only while ``lr_scheduler`` is ``None``: it is cleared first.
    """
    trainer.lr_scheduler = None
    trainer.create_scheduler(num_training_steps=num_training_steps, optimizer=optimizer)


def advance_global_step(trainer: GRPOTrainer) -> None:
    """Count one optimizer step in ``trainer.state.global_step``, as ``Trainer``'s own loop does after each step."""
    trainer.state.global_step += 1


def global_step(trainer: GRPOTrainer) -> int:
    """The optimizer steps counted so far (:func:`advance_global_step`; a checkpoint restores it with
    :func:`set_global_step`)."""
    return trainer.state.global_step


def set_global_step(trainer: GRPOTrainer, step: int) -> None:
    """Set ``trainer.state.global_step`` (resuming from a checkpoint)."""
    trainer.state.global_step = step


def load_zero_partitions(trainer: GRPOTrainer, partitions: list) -> None:
    """Load a ZeRO optimizer state saved as every rank's partition, in rank order: DeepSpeed's ZeRO optimizer (under
    accelerate's wrapper) takes the whole list and loads this rank's own."""
    trainer.optimizer.optimizer.load_state_dict(partitions)
