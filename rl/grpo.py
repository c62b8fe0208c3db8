"""The seam to TRL: one optimizer step of TRL's GRPO loss on rows that *we* generated.

Why this seam: our rollouts are whole DSPy programs run on our engine, with one row per LM call and an
advantage per (example, predictor) group, so TRL must not generate or score. ``GRPOTrainer`` is built once
(it owns the loss, clipping, KL against a frozen reference, token-level normalisation and metrics); we
turn rows into the batch dict its ``compute_loss`` consumes, accumulate gradients over micro-batches,
and step its optimizer and scheduler. Our loop (``rl.weight_stage``) owns the schedule and checkpoints;
``trainer.train()`` is never called.

Every use of TRL's (and transformers', accelerate's and DeepSpeed's) internals goes through :mod:`rl.trl_seam`, which
says which versions it was checked against (the ``Trainer`` state we keep ourselves is checked by
tests/rl/test_trl_seam.py); its contract test is tests/rl/test_grpo.py: the micro-batch split does not change the update
(``loss_type`` dapo or grpo); with ``beta=0`` and zero advantages nothing moves; with ``beta>0`` the reference is
TRL's own choice for a PEFT model, a frozen copy ("ref" adapter) of the adapter as it was when the updater was built,
i.e. when the stage started (identical to the base model only while that adapter is still the fresh, identity one).

Data parallel (``accelerate launch``, several processes; see tests/rl/test_distributed.py): the model is wrapped in
DDP and the optimizer prepared through the trainer's own ``accelerator``; gradients are all-reduced once per step
(``no_sync`` on all but the last micro-batch); the policy keeps generating from the unwrapped model, whose
parameters DDP shares. Each rank brings its own rows. TRL's loss makes collective calls (metrics gathered over
ranks) once per micro-batch, with tensors of the micro-batch's size, so every rank must run the same micro-batches:
a rank with fewer rows is padded with rows whose completion mask is 0 (they add nothing to any loss or metric). The
dapo normaliser is TRL's: ``num_items_in_batch`` is the token count over *all* ranks and TRL divides it by the
number of processes, so after DDP's mean the gradient is that of the token mean over the whole step, as in one
process on the union of the rows. In one process none of this runs: the path is exactly the single-process one.

Off-policy correction (rows sampled by a vLLM server): vLLM's kernels, dtype and batching make its sampling
distribution differ from the trainer's, which biases the policy gradient (TRL turns its own correction on by default
for this reason). Rows that carry the sampler's token log-probs get TRL's truncated importance sampling: the trainer's
log-probs of the rows are computed once, before the update, the ratio pi_trainer / pi_vllm is masked or clipped at
``importance_sampling_cap`` (``importance_sampling`` picks TRL's mode), and TRL's loss multiplies each token's loss by
it (``importance_sampling_ratio``). Rows from the in-process engine were sampled by the trainer's own weights: ratio 1,
no extra forward pass.

Micro-batches are length-grouped: ``step`` (and the extra log-prob passes of ``to_batch``) take the rows in order of
prompt length, and each micro-batch drops the prompt columns that are padding in all of its rows. Prompts are
left-padded to the longest in the step, and one degenerate rollout (a trajectory grown to the context) made every row
of its step pay for ~1,000 tokens: on 24 sampled steps of the agent model 60% of the tokens forwarded were padding, 88%
in a step with such a row (benchmarks/grpo_padding.py). Token-normalised losses (dapo, the default) are sums over
tokens, so the order changes nothing but float rounding; row-mean losses (grpo, ...) average within micro-batches of
other rows, as any split does. Padding columns are masked out of attention, and rotary positions are relative.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from rl import distributed, trl_seam
from rl.advantages import Row
from rl.config import UpdaterSettings
from rl.errors import CotuneRLError
from rl.policy import zero3_lora_params
from rl.trl_seam import IS_RATIO, ROW_MEAN_LOSSES

_REAL = "cotune_real_rows"  # batch key (not TRL's): which rows are real, not padding for the other ranks


class UnsupportedDistributedError(CotuneRLError, RuntimeError):
    """The accelerate setup is one the weight stage cannot train under (supported: DDP, DeepSpeed ZeRO-2/3)."""


def _launched_with() -> str | None:
    """``"deepspeed"`` / ``"fsdp"`` when ``accelerate launch`` asked for that backend, else ``None``.

    Read from the launcher's environment before the trainer exists: on CPU accelerate's ``cpu=True`` would silently
    drop DeepSpeed (and it never enables FSDP on CPU), so the trainer must be built knowing what was asked for.
    """
    import os

    for backend in ("deepspeed", "fsdp"):
        if os.environ.get(f"ACCELERATE_USE_{backend.upper()}", "false").lower() == "true":
            return backend
    return None


def _dummy_reward(completions, **kwargs):  # TRL requires a reward source; ours never runs through TRL
    return [0.0] * len(completions)


class GRPOUpdater:
    """TRL's GRPO loss + optimizer + scheduler over the policy's PEFT model.

    Args:
        policy: the :class:`rl.policy.Policy` whose LoRA adapter is trained in place.
        config: the :class:`rl.config.UpdaterSettings` (lr, beta, epsilon, loss type, micro-batch size, ...), or a
            stage config that produces them (``WeightStageConfig``, ``SelfTrainConfig``: its ``updater_settings()``).
        total_steps: optimizer steps planned (for the lr schedule).
    """

    def __init__(self, policy, config: Any, total_steps: int) -> None:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer

        self.policy = policy
        self.config = config = config if isinstance(config, UpdaterSettings) else config.updater_settings()
        backend = _launched_with()
        if backend == "fsdp":
            raise UnsupportedDistributedError(
                "the weight stage does not train under FSDP: launch with DeepSpeed ZeRO-3 to shard the weights "
                "(docs/accelerate/deepspeed_zero3.yaml) or with DDP (docs/accelerate/multi_gpu.yaml)")
        on_cpu = policy.device.type == "cpu"
        self._workdir = tempfile.TemporaryDirectory(prefix="cotune-grpo-")
        args = GRPOConfig(
            output_dir=self._workdir.name,
            report_to="none",
            use_cpu=on_cpu and backend is None,  # DeepSpeed on CPU: cpu=False and gloo, else accelerate drops it
            ddp_backend="gloo" if on_cpu and backend == "deepspeed" else None,
            bf16=False,
            fp16=False,
            activation_checkpointing=False,
            per_device_train_batch_size=config.micro_batch_size,
            num_generations=2,  # TRL's own sampling is unused; 2 satisfies its batch-size checks
            gradient_accumulation_steps=1,
            num_iterations=config.num_iterations,
            learning_rate=config.learning_rate,
            beta=config.beta,
            epsilon=config.epsilon,
            loss_type=config.loss_type,
            temperature=config.temperature,  # TRL scales logits by it in the loss: must match the sampler
            max_grad_norm=config.max_grad_norm,
            weight_decay=config.weight_decay,
            warmup_steps=config.warmup_steps,
            lr_scheduler_type=config.lr_scheduler_type,
            disable_dropout=True,
            save_strategy="no",
            logging_steps=1,
            seed=config.seed,
        )
        # ZeRO-3 partitioned the policy in an earlier stage: TRL would copy the partitioned "default" adapter into its
        # "ref" adapter with plain tensor ops; build without the reference and add it from the gathered adapter
        repartition = config.beta != 0.0 and bool(zero3_lora_params(policy.model))
        if repartition:
            args.beta = 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.trainer = GRPOTrainer(
                model=policy.model,
                processing_class=policy.tokenizer,
                reward_funcs=_dummy_reward,
                args=args,
                train_dataset=Dataset.from_dict({"prompt": ["unused"] * max(4, config.micro_batch_size)}),
            )
        if self.trainer.model is not policy.model:
            raise RuntimeError("TRL replaced the policy model; the engine would keep generating from stale weights")
        if repartition:
            trl_seam.set_beta(self.trainer, config.beta)
            trl_seam.add_reference_adapter_zero3(policy.model)
        self._total_steps = max(1, total_steps)
        self.trainer.create_optimizer_and_scheduler(num_training_steps=self._total_steps)
        self.zero_stage: int | None = None  # DeepSpeed's ZeRO stage, when launched with DeepSpeed
        if config.importance_sampling != "none":
            trl_seam.enable_importance_sampling(self.trainer)
        self._corrected = False
        self.accelerator = self.trainer.accelerator
        self.distributed = distributed.is_distributed()  # the one answer to "am I data-parallel?"
        if self.accelerator.num_processes != distributed.world_size():
            raise UnsupportedDistributedError(
                f"accelerate runs {self.accelerator.num_processes} process(es) but this is one of "
                f"{distributed.world_size()} (WORLD_SIZE / the process group); launch with `accelerate launch` or "
                "`torchrun`, which set both")
        self.model = self.trainer.model  # what the loss runs through: the DDP wrapper under several processes
        if self.distributed:
            self._prepare_data_parallel()

    def _prepare_data_parallel(self) -> None:
        """Wrap the model in DDP and prepare the optimizer, as ``Trainer`` does before its first step.

        The scheduler stays unprepared (as in ``Trainer``): accelerate's scheduler wrapper steps the schedule once
        per process per call, because it assumes a dataloader sharded over processes; ours is stepped once per
        optimizer step on every rank, which keeps every rank's learning rate equal to a single process's.
        """
        from accelerate.utils import DistributedType

        kind = self.accelerator.distributed_type
        if kind == DistributedType.DEEPSPEED:
            return self._prepare_deepspeed()
        if not str(kind.value).startswith("MULTI_"):
            raise UnsupportedDistributedError(
                f"the weight stage trains data-parallel with DDP (accelerate's MULTI_GPU / MULTI_CPU) or DeepSpeed "
                f"ZeRO-2/3, not under {kind.value}; launch with docs/accelerate/multi_gpu.yaml or "
                "deepspeed_zero2.yaml / deepspeed_zero3.yaml (see docs/cluster.md)")
        trainer = self.trainer
        self.model, trainer.optimizer = self.accelerator.prepare(trainer.model, trainer.optimizer)
        trl_seam.set_wrapped_model(trainer, self.model)
        if self.model is trainer.model or self.model.module is not self.policy.model:
            raise RuntimeError("accelerate did not wrap the policy model in DDP; gradients would not be averaged")

    def _prepare_deepspeed(self) -> None:
        """Hand the model and optimizer to a DeepSpeed engine (ZeRO stage 2 or 3).

        The engine owns backward and the optimizer step: ``accelerator.backward`` runs ``engine.backward`` on every
        micro-batch and ``engine.step`` (clip, step, zero grads) on the one where gradients sync, the step's last
        (``_sync_on`` sets it, so the number of micro-batches may change from step to step). The engine runs with one
        accumulation step, so it never rescales TRL's loss (already the step's token mean), and its gradients are the
        mean over ranks, as DDP's. The lr schedule stays ours, rebuilt on the torch optimizer ZeRO wraps (ZeRO drops
        empty parameter groups). Under ZeRO-3 every forward pass is a collective over ranks: the in-process engine,
        which generates a different amount on every rank, cannot run on it; generate on a vLLM server.
        """
        accelerator, trainer, config = self.accelerator, self.trainer, self.config
        ds = trl_seam.deepspeed_config(accelerator)  # the live dict: what is set below is what the engine is built with
        if "optimizer" in ds or "scheduler" in ds:
            raise UnsupportedDistributedError(
                "the DeepSpeed config names an optimizer or scheduler: remove them; the weight stage brings its own "
                "(AdamW and the configured lr schedule)")
        param_dtype = next(self.policy.model.parameters()).dtype
        for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            if ds.get(key, {}).get("enabled") is True and param_dtype != dtype:
                raise UnsupportedDistributedError(
                    f"DeepSpeed {key} would cast the policy's {param_dtype} weights (which the engine generates from) "
                    f"to {dtype}: launch with mixed_precision 'no' and load the policy in the dtype to train in")
        self.zero_stage = int(ds.get("zero_optimization", {}).get("stage", 0))
        if self.zero_stage == 3 and getattr(self.policy.engine, "sync", None) is None:
            raise UnsupportedDistributedError(
                "ZeRO-3 partitions the weights across ranks, so the in-process engine cannot generate from them (each "
                "rank's forward passes would wait on the others'); generate on a vLLM server "
                "(Policy.from_pretrained(..., engine='http://host:port'), or engine: in the experiment file), "
                "or train with ZeRO-2 / DDP")
        ds["train_micro_batch_size_per_gpu"] = config.micro_batch_size
        ds["gradient_accumulation_steps"] = 1
        ds["train_batch_size"] = config.micro_batch_size * accelerator.num_processes
        ds["gradient_clipping"] = float(config.max_grad_norm)  # the engine clips (0: no clipping)
        self.model, trainer.optimizer = accelerator.prepare(trainer.model, trainer.optimizer)
        trl_seam.set_wrapped_model(trainer, self.model, deepspeed_engine=True)
        if getattr(self.model, "module", None) is not self.policy.model:
            raise RuntimeError("accelerate did not hand the policy model to a DeepSpeed engine")
        trl_seam.rebuild_scheduler(trainer, self._total_steps, trl_seam.zero_torch_optimizer(self.model))

    def close(self) -> None:
        """Drop TRL's frozen reference adapter so the policy holds only its own adapter again.

        Under several processes, also detach DDP from the policy's parameters: its gradient hooks would otherwise
        outlive this updater and all-reduce the gradients of whatever trains the policy next.
        """
        if self.distributed and self.model is not self.trainer.model:
            if self.zero_stage is None:  # DDP
                trl_seam.remove_ddp_hooks(self.model)
            else:  # a DeepSpeed engine: drop ZeRO's gradient hooks (ZeRO-3 leaves the weights partitioned)
                self.model.destroy()
            self.accelerator.free_memory()
            self.model = self.trainer.model
            trl_seam.set_wrapped_model(self.trainer, self.trainer.model)
        trl_seam.drop_reference_adapter(self.policy.model)
        self._workdir.cleanup()

    # --- rows -> TRL batch ----------------------------------------------------------------------

    @torch.no_grad()
    def to_batch(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        """The dict ``GRPOTrainer.compute_loss`` consumes: left-padded prompts, right-padded completions.

        Under several processes this is a collective call (every rank calls it once per update, possibly with no
        rows): the rows are padded to the largest rank's count and ``num_items_in_batch`` counts every rank's tokens.
        """
        trainer = self.trainer
        device = trainer.accelerator.device
        pad_id = self.policy.tokenizer.pad_token_id
        prompts = [torch.tensor(r.prompt_ids, dtype=torch.long) for r in rows]
        completions = [torch.tensor(r.completion_ids, dtype=torch.long) for r in rows]
        n_pad = int(distributed.all_reduce([len(rows)], "max")[0]) - len(rows) if self.distributed else 0
        # a padding row: one attended prompt token (a fully masked row could give NaN logits) and a masked completion
        prompts += [torch.tensor([pad_id], dtype=torch.long)] * n_pad
        completions += [torch.tensor([pad_id], dtype=torch.long)] * n_pad
        real = torch.tensor([True] * len(rows) + [False] * n_pad)
        completion_mask = trl_seam.pad([torch.ones_like(t) for t in completions], 0, "right")
        completion_mask[~real] = 0
        if self.config.mask_truncated_completions:
            truncated = torch.tensor([r.truncated for r in rows] + [False] * n_pad)
            completion_mask[truncated] = 0
        batch = {
            "prompt_ids": trl_seam.pad(prompts, pad_id, "left").to(device),
            "prompt_mask": trl_seam.pad([torch.ones_like(t) for t in prompts], 0, "left").to(device),
            "completion_ids": trl_seam.pad(completions, pad_id, "right").to(device),
            "completion_mask": completion_mask.to(device),
            "advantages": torch.tensor([float(r.advantage) for r in rows] + [0.0] * n_pad, device=device),
        }
        batch["num_items_in_batch"] = batch["completion_mask"].sum()
        if self.distributed:  # TRL's own convention (see _generate_and_score_completions): tokens over all ranks
            batch[_REAL] = real.to(device)
            total = distributed.all_reduce([float(batch["num_items_in_batch"])], "sum")[0]
            batch["num_items_in_batch"] = torch.tensor(total, device=device)
        mbs = self.config.micro_batch_size
        model = trainer.model  # the unwrapped model: no gradients here, nothing to synchronise
        sampled = [r.sampling_logprobs for r in rows]
        correct = self.config.importance_sampling != "none" and any(s is not None for s in sampled)
        if self.distributed:  # agreed by every rank: under ZeRO-3 each forward below is a collective, and a rank whose
            # rows all came from an uncorrected source (or that has padding rows only) must still take part
            correct = bool(distributed.all_reduce([float(correct)], "max")[0])
        self._corrected = correct  # for the step's metrics
        with trl_seam.without_gradient_checkpointing(trainer, model):
            if self.config.num_iterations > 1 or correct:  # the batch is reused / the sampler was not the trainer
                model.eval()
                batch["old_per_token_logps"] = _by_micro_batch(trl_seam.per_token_logps, trainer, model, batch, mbs)
            if self.config.beta != 0.0:  # the beta TRL's loss reads (trl_seam.set_beta keeps them equal)
                batch["ref_per_token_logps"] = _by_micro_batch(trl_seam.reference_logps, trainer, model, batch, mbs)
        if self.config.importance_sampling != "none":
            if correct:
                nan = float("nan")  # a row or token the sampler did not score gets ratio 1, as in TRL
                logps = [torch.tensor(s if s is not None else [nan] * len(r.completion_ids), dtype=torch.float32)
                         for s, r in zip(sampled, rows)] + [torch.tensor([nan])] * n_pad
                sampler_logps = trl_seam.pad(logps, nan, "right").to(device)
                batch[IS_RATIO] = importance_ratio(batch["old_per_token_logps"], sampler_logps,
                                                   batch["completion_mask"], self.config.importance_sampling,
                                                   self.config.importance_sampling_cap)
                if self.config.num_iterations == 1:  # TRL then takes the current log-probs (detached) as "old"
                    del batch["old_per_token_logps"]
            else:
                batch[IS_RATIO] = torch.ones(len(prompts), 1, device=device)
        return batch

    # --- one optimizer step ---------------------------------------------------------------------

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """One optimizer step on ``batch`` (gradients accumulated over micro-batches); returns TRL's metrics."""
        trainer = self.trainer
        model = self.model
        model.train()
        n_rows = batch["advantages"].size(0)
        mbs = self.config.micro_batch_size
        n_micro = len(range(0, n_rows, mbs))
        n_items = trl_seam.split_into(trainer, n_micro, batch["num_items_in_batch"])  # the update ignores the split
        real = batch.get(_REAL)
        keys = [k for k in batch if k not in ("num_items_in_batch", _REAL)]
        total = 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            for j, (rows, micro) in enumerate(_length_grouped(batch, keys, mbs)):
                micro["num_items_in_batch"] = n_items
                last = j == n_micro - 1
                with self._sync_on(last):
                    loss = trl_seam.loss(trainer, model, micro)
                    if real is not None and self.config.loss_type in ROW_MEAN_LOSSES:  # rescale to the real rows
                        n_real = int(real[rows].sum())
                        loss = loss * (len(micro["advantages"]) / n_real if n_real else 0.0)
                    trainer.accelerator.backward(loss)
                total += loss.item()
        if self.distributed:  # the mean over ranks is the loss DDP's averaged gradient belongs to
            total = distributed.all_reduce([total], "sum")[0] / self.accelerator.num_processes
        grad_norm = trl_seam.clip_grad_norm(trainer, model)
        trainer.optimizer.step()  # under DeepSpeed a no-op: the engine stepped in the last backward
        trainer.lr_scheduler.step()
        self.policy.model.zero_grad(set_to_none=True)
        model.eval()
        trl_seam.advance_global_step(trainer)
        metrics = trl_seam.pop_metrics(trainer)
        metrics.update(loss=total, grad_norm=grad_norm if grad_norm is not None else float("nan"),
                       lr=float(trainer.lr_scheduler.get_last_lr()[0]))
        metrics.update(self._importance_metrics(batch))
        return metrics

    def _importance_metrics(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean importance ratio per row and the share of rows masked, over every rank's rows that were corrected.

        Collective under several processes (every rank's batch has a ratio whenever the correction is on).
        """
        ratio = batch.get(IS_RATIO)
        if ratio is None:
            return {}
        mask = batch["completion_mask"]
        rows = (mask.sum(-1) > 0) & batch.get(_REAL, torch.ones_like(mask[:, 0], dtype=torch.bool))
        per_row = ratio[:, 0] if ratio.size(1) == 1 else (ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        per_row = per_row[rows] if self._corrected else per_row[:0]
        counts = [float(per_row.sum()), float((per_row == 0).sum()), float(per_row.numel())]
        if self.distributed:
            counts = distributed.all_reduce(counts)
        total, masked, n = counts
        return {"is_ratio_mean": total / n, "is_masked_rows": masked / n} if n else {}

    def _sync_on(self, last: bool):
        """Under DDP, all-reduce gradients only on the step's last backward (``no_sync`` before), as ``Trainer`` does."""
        if not self.distributed:
            return contextlib.nullcontext()
        trl_seam.set_sync_gradients(self.accelerator, last)  # what TRL's loss and the optimizer wrapper read
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)

    # --- checkpoint state -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Optimizer + scheduler state. Under ZeRO every rank holds its own optimizer partition: this is then a
        collective (every rank calls it) whose result holds every rank's partition, in rank order."""
        optimizer = self.trainer.optimizer.state_dict()
        if self.zero_stage is not None:
            optimizer = {"zero_partitions": distributed.gather_objects(optimizer)}
        return {"optimizer": optimizer, "scheduler": self.trainer.lr_scheduler.state_dict(),
                "global_step": trl_seam.global_step(self.trainer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        optimizer = state["optimizer"]
        if "zero_partitions" in optimizer:
            parts = optimizer["zero_partitions"]
            if self.zero_stage is None or len(parts) != self.accelerator.num_processes:
                raise UnsupportedDistributedError(
                    f"the checkpoint holds the ZeRO optimizer partitions of {len(parts)} ranks: resume under DeepSpeed "
                    f"with {len(parts)} processes (this is {self.accelerator.num_processes}, "
                    f"{'DeepSpeed' if self.zero_stage is not None else 'not DeepSpeed'})")
            trl_seam.load_zero_partitions(self.trainer, parts)  # ZeRO takes the list and picks its own rank's
        else:
            self.trainer.optimizer.load_state_dict(optimizer)
        self.trainer.lr_scheduler.load_state_dict(state["scheduler"])
        trl_seam.set_global_step(self.trainer, int(state["global_step"]))


def without_shared_padding(micro: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``micro`` without the prompt columns that are padding in every one of its rows (prompts are left-padded).

    Example:
        >>> m = without_shared_padding({"prompt_ids": torch.tensor([[0, 0, 5], [0, 7, 5]]),
        ...                             "prompt_mask": torch.tensor([[0, 0, 1], [0, 1, 1]])})
        >>> m["prompt_ids"].tolist(), m["prompt_mask"].tolist()
        ([[0, 5], [7, 5]], [[0, 1], [1, 1]])
    """
    used = micro["prompt_mask"].any(0).nonzero()
    first = int(used[0]) if len(used) else micro["prompt_mask"].size(1) - 1  # keep one column (a padding-only rank)
    if first == 0:
        return micro
    return {**micro, "prompt_ids": micro["prompt_ids"][:, first:], "prompt_mask": micro["prompt_mask"][:, first:]}


def by_prompt_length(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's row indices, shortest prompt first (ties keep their order): the order micro-batches take rows in.

    Example:
        >>> by_prompt_length({"prompt_mask": torch.tensor([[0, 1, 1], [0, 0, 1], [1, 1, 1]])}).tolist()
        [1, 0, 2]
    """
    return batch["prompt_mask"].sum(1).argsort(stable=True)


def _by_micro_batch(logps, trainer, model, batch: dict[str, torch.Tensor], mbs: int) -> torch.Tensor:
    """``logps`` (:func:`rl.trl_seam.per_token_logps` or ``reference_logps``) of the batch's completions, in the
    batch's row order, computed one length-grouped micro-batch at a time without its shared padding. Every rank makes
    the same number of calls (ZeRO-3 needs that: each forward gathers the parameters): the ranks' batches are padded
    to one size."""
    width, out = batch["completion_ids"].size(1), None
    keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
    for rows, micro in _length_grouped(batch, keys, mbs):
        ids = torch.cat([micro["prompt_ids"], micro["completion_ids"]], 1)
        mask = torch.cat([micro["prompt_mask"], micro["completion_mask"]], 1)
        chunk = logps(trainer, model, ids, mask, width, mbs)
        if out is None:
            out = chunk.new_empty((batch["completion_ids"].size(0), width))
        out[rows] = chunk
    return out


def _length_grouped(batch: dict[str, torch.Tensor], keys, mbs: int):
    """``(rows, micro)`` per micro-batch of ``mbs`` rows taken in :func:`by_prompt_length` order: the row indices and
    the batch's ``keys`` at those rows, :func:`without_shared_padding`."""
    order = by_prompt_length(batch)
    for s in range(0, len(order), mbs):
        rows = order[s : s + mbs]
        yield rows, without_shared_padding({k: batch[k][rows] for k in keys})


def importance_ratio(trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, mode: str,
                     cap: float) -> torch.Tensor:
    """TRL's vLLM importance-sampling ratio (``GRPOTrainer._generate_and_score_completions``, trl 1.16).

    ``exp(trainer - sampler)`` per token (``token_*``, shape ``(B, T)``) or per sequence (``sequence_*``, the sum over
    the completion, shape ``(B, 1)``); ``*_truncate`` clips it at ``cap``, ``*_mask`` sets ratios above ``cap`` to 0.
    Tokens the sampler did not score (NaN) count as a ratio of 1. TRL computes this inline while it generates; we
    generate ourselves, so the few lines are repeated here, with TRL's defaults (no lower bound).

    Example:
        >>> t = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]]); s = torch.tensor([[-1.0, -1.0], [-3.0, -1.0]])
        >>> importance_ratio(t, s, torch.ones(2, 2), "sequence_mask", 3.0).flatten().tolist()
        [1.0, 0.0]
    """
    diff = torch.nan_to_num((trainer_logps - sampler_logps) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return ratio.clamp(max=cap)
    return ratio.masked_fill(ratio > cap, 0.0)
