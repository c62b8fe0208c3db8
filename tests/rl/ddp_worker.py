"""Worker of tests/rl/test_distributed.py: a short GRPO weight stage under `accelerate launch`, and its replay.

``train OUT MODEL``: run by every rank. Three steps of ``train_weights`` on ``last_digit`` (two steps, a checkpoint,
then a resume for the third, so that a second DDP wrap in the same process is covered too), recording per rank: the
questions of each step, the step-1 rollouts and the exact rows the update consumed, the gradient of the first update
(after DDP's all-reduce), the adapter after step 1 and at the end, and the metric history. At the first update rank 1 trains on one row fewer than it computed, so that the
ranks bring different row counts whatever was sampled (the padding path). ``replay OUT MODEL``: one process, a fresh
policy, one update on the union of the rows the ranks trained on at step 1: what DDP must have computed.
``vllm OUT MODEL URL``: two steps with every rank generating on one shared vLLM server (under DDP or ZeRO-3).

ZeRO-3 (weights partitioned over the ranks): the in-process engine cannot generate there, so the rows are sampled
first, in one process (``rows OUT MODEL``); ``zero3 OUT MODEL`` (every rank) trains ``ZERO3_STEPS`` updates on them,
each rank on its own uneven share, and records the gathered gradient of the first update and the gathered adapter;
``zero3-replay OUT MODEL`` makes the same updates in one process on all the rows.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from programs.tasks import last_digit
from rl import Policy, WeightStageConfig, distributed, run_rollouts, train_weights
from rl.advantages import Row, compute_advantages, predictor_namer
from rl.grpo import GRPOUpdater
from rl.policy import zero3_lora_params

# 3 examples over 2 ranks: uneven shards (2 + 1); micro-batches of 2 rows: several per step (no_sync, then sync)
CONFIG = WeightStageConfig(num_generations=4, examples_per_step=3, max_tokens=16, learning_rate=1e-3,
                           micro_batch_size=2, max_rollouts=12 * 3, checkpoint_every=1, scale_rewards="batch")
TRAIN_SIZE = 64
ZERO3_STEPS = 2  # two updates: the second one runs on the partitioned optimizer state the first one left


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _capture_first_gradient(out: Path, name: str) -> None:
    """Save the gradient of the first update (after DDP's all-reduce, before clipping) to ``out/<name>-grad``."""
    step = GRPOUpdater.step

    def capturing(self, batch):
        path = out / f"{name}-grad.safetensors"
        if self.zero_stage is not None and not hasattr(self.model, "_cotune_capture"):
            # DeepSpeed: the engine steps (and zeroes the gradients) inside the last backward; take ZeRO's full,
            # rank-averaged gradient just before (safe_get_full_grad is a collective: every rank takes it)
            from deepspeed.utils import safe_get_full_grad

            engine, engine_step = self.model, self.model.step

            def capture_step(*args, **kwargs):
                if not path.exists() and not engine._cotune_capture:
                    grads = {n: safe_get_full_grad(p).detach().clone() for n, p in self.policy.model.named_parameters()
                             if p.requires_grad}
                    engine._cotune_capture = True
                    save_file(grads, str(path))
                return engine_step(*args, **kwargs)

            engine._cotune_capture = False
            engine.step = capture_step
        clip = self.trainer._clip_grad_norm

        def capture(model):
            if not path.exists() and self.zero_stage is None:
                save_file({n: p.grad.detach().clone() for n, p in self.policy.model.named_parameters()
                           if p.grad is not None}, str(out / f"{name}-grad.safetensors"))
            return clip(model)

        self.trainer._clip_grad_norm = capture
        return step(self, batch)

    GRPOUpdater.step = capturing


def train(out: Path, model_dir: str) -> None:
    torch.set_num_threads(1)
    policy = Policy.from_pretrained(model_dir, name="ddp", device="cpu")
    program, trainset = last_digit.predict_program(), last_digit.load("train", TRAIN_SIZE)
    batches: list[list] = []  # rows of every update, as the updater received them
    original = GRPOUpdater.to_batch

    def to_batch(self, rows):
        if not batches and distributed.rank() == 1:
            rows = rows[:-1]  # step 1: one row fewer on rank 1, so that the ranks' row counts differ (padding)
        batches.append([list(r.__dict__.values()) for r in rows])
        return original(self, rows)

    GRPOUpdater.to_batch = to_batch
    _capture_first_gradient(out, f"rank{distributed.rank()}")
    seen: dict[int, list[str]] = {}
    record: dict = {}

    def monitor(step, rollouts):
        seen[step] = list(dict.fromkeys(r.example.question for r in rollouts))
        record.setdefault("updates", {})[step] = len(batches)
        if step == 1:
            record["rollouts"] = [[r.example_index, r.sample, r.reward] for r in rollouts]
            record["rows"] = batches[-1] if batches else []
            save_file(policy.adapter_state(), str(out / f"rank{distributed.rank()}-step1.safetensors"))

    first = train_weights(program, trainset, last_digit.correct, policy, CONFIG, output_dir=out / "run",
                          monitors=[monitor], progress=False, stop_after_steps=2)
    second = train_weights(program, trainset, last_digit.correct, policy, CONFIG, output_dir=out / "run",
                           resume=True, monitors=[monitor], progress=False)
    rank = distributed.rank()
    save_file(policy.adapter_state(), str(out / f"rank{rank}-final.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps(_clean({
        "rank": rank, "world": distributed.world_size(), "seen": seen, "step1": record,
        "history": first.history + second.history[2:], "resumed_from": second.resumed_from,
        "rollouts": second.rollouts, "version": policy.version})))


def vllm(out: Path, model_dir: str, url: str) -> None:
    """Two steps with every rank generating on one shared vLLM server: only rank 0 may load adapters into it."""
    torch.set_num_threads(1)
    policy = Policy.from_pretrained(model_dir, name="ddp", device="cpu", engine=url)
    models: dict[int, list[str]] = {}

    def monitor(step, rollouts):
        models[step] = sorted({c.model for r in rollouts for c in r.calls})

    # beta > 0: the frozen "ref" adapter too (under ZeRO-3 rebuilt from the gathered weights), a KL term in the loss
    config = WeightStageConfig(**{**CONFIG.to_dict(), "max_rollouts": 12 * 2, "checkpoint_every": 0, "beta": 0.04})
    result = train_weights(last_digit.predict_program(), last_digit.load("train", TRAIN_SIZE), last_digit.correct,
                           policy, config, monitors=[monitor], progress=False)
    rank, engine = distributed.rank(), policy.engine
    record = {"models": models, "swaps": engine.swaps, "name": engine.adapter_name(), "version": policy.version,
              "partitioned": bool(zero3_lora_params(policy.model)),
              "updates": sum(h["updated"] for h in result.history),
              "kl": [h.get("kl") for h in result.history if h["updated"]]}
    distributed.barrier()  # every rank is done generating before rank 0 unloads its adapters
    policy.close()
    (out / f"vllm-rank{rank}.json").write_text(json.dumps(record))


def _rows(records: list) -> list[Row]:
    """Rows back from their JSON form (``list(row.__dict__.values())``)."""
    return [Row(tuple(prompt), tuple(completion), advantage, reward, tuple(group), truncated,
                tuple(sampled) if sampled is not None else None)
            for prompt, completion, advantage, reward, group, truncated, sampled in records]


def replay(out: Path, model_dir: str) -> None:
    torch.set_num_threads(1)
    policy = Policy.from_pretrained(model_dir, name="ddp", device="cpu")
    save_file(policy.adapter_state(), str(out / "initial.safetensors"))
    rows = []
    for rank in (0, 1):
        rows += _rows(json.loads((out / f"rank{rank}.json").read_text())["step1"]["rows"])
    _capture_first_gradient(out, "replay")
    updater = GRPOUpdater(policy, CONFIG, CONFIG.max_steps)
    metrics = updater.step(updater.to_batch(rows))
    updater.close()
    save_file(policy.adapter_state(), str(out / "replay-step1.safetensors"))
    (out / "replay.json").write_text(json.dumps(_clean(metrics)))


def sample_rows(out: Path, model_dir: str) -> None:
    """One process: sample ``ZERO3_STEPS`` steps of rows (skipping a step whose groups all had zero variance)."""
    torch.set_num_threads(1)
    policy = Policy.from_pretrained(model_dir, name="ddp", device="cpu")
    program, trainset = last_digit.predict_program(), last_digit.load("train", TRAIN_SIZE)
    lm = policy.lm(temperature=CONFIG.temperature, max_tokens=CONFIG.max_tokens, cache=False)
    steps: list[list] = []
    for start in range(0, TRAIN_SIZE, CONFIG.examples_per_step):
        batch = trainset[start : start + CONFIG.examples_per_step]
        rollouts = run_rollouts(program, batch, lm, last_digit.correct, CONFIG.num_generations, num_threads=1,
                                tag=("zero3", start))
        step_rows, _ = compute_advantages(rollouts, predictor_namer(program), CONFIG.scale_rewards)
        if len(step_rows) >= 3:  # enough rows for an uneven split with a row on each rank
            steps.append([list(r.__dict__.values()) for r in step_rows])
        if len(steps) == ZERO3_STEPS:
            break
    assert len(steps) == ZERO3_STEPS, "too few examples with a reward spread to train on"
    (out / "zero3-rows.json").write_text(json.dumps(_clean(steps)))


class _NoGeneration:
    """The policy's engine under ZeRO-3 in this worker: nothing generates here (the rows were sampled beforehand,
    by ``rows``). The updater requires an out-of-process engine under ZeRO-3, one that is told of every new adapter
    version through ``sync()``; with no server to tell, that is a no-op."""

    def sync(self) -> None:
        pass


def _share(rows: list[Row], rank: int) -> list[Row]:
    """Rank 0 takes one row more than half, rank 1 the rest: uneven counts (the padding path), together all rows."""
    cut = len(rows) // 2 + 1
    return rows[:cut] if rank == 0 else rows[cut:]


def zero3(out: Path, model_dir: str) -> None:
    """Every rank, under DeepSpeed ZeRO-3: ``ZERO3_STEPS`` updates, each rank on its share of each step's rows."""
    torch.set_num_threads(1)
    rank = distributed.rank()
    policy = Policy.from_pretrained(model_dir, name="ddp", device="cpu")
    policy.engine = _NoGeneration()
    if rank == 0:
        save_file(policy.adapter_state(), str(out / "zero3-initial.safetensors"))  # before ZeRO-3 partitions it
    steps = [_rows(step) for step in json.loads((out / "zero3-rows.json").read_text())]
    _capture_first_gradient(out, f"zero3-rank{rank}")
    updater = GRPOUpdater(policy, CONFIG, CONFIG.max_steps)
    params = zero3_lora_params(policy.model)
    held = sum(p.ds_tensor.numel() for p in params) / max(1, sum(p.ds_numel for p in params))
    metrics = []
    for step_rows in steps:
        metrics.append(updater.step(updater.to_batch(_share(step_rows, rank))))
        policy.bump_version()  # gathers the adapter (a collective), as the weight stage does after every update
    updater.close()
    save_file(policy.adapter_state(), str(out / f"zero3-rank{rank}-final.safetensors"))  # gathered: a collective
    (out / f"zero3-rank{rank}.json").write_text(json.dumps(_clean({
        "rank": rank, "world": distributed.world_size(), "zero_stage": updater.zero_stage,
        "partitioned": len(params), "held": held, "rows": [len(_share(s, rank)) for s in steps],
        "metrics": metrics})))


def zero3_replay(out: Path, model_dir: str) -> None:
    """One process, a fresh policy: the same updates on all of each step's rows."""
    torch.set_num_threads(1)
    policy = Policy.from_pretrained(model_dir, name="ddp", device="cpu")
    save_file(policy.adapter_state(), str(out / "zero3-replay-initial.safetensors"))
    steps = [_rows(step) for step in json.loads((out / "zero3-rows.json").read_text())]
    _capture_first_gradient(out, "zero3-replay")
    updater = GRPOUpdater(policy, CONFIG, CONFIG.max_steps)
    metrics = []
    for step_rows in steps:
        metrics.append(updater.step(updater.to_batch(step_rows)))
        policy.bump_version()
    updater.close()
    save_file(policy.adapter_state(), str(out / "zero3-replay-final.safetensors"))
    (out / "zero3-replay.json").write_text(json.dumps(_clean({"metrics": metrics})))


if __name__ == "__main__":
    mode, out_dir, model, *rest = sys.argv[1:]
    modes = {"train": train, "replay": replay, "vllm": vllm, "rows": sample_rows, "zero3": zero3, "zero3-replay": zero3_replay}
    modes[mode](Path(out_dir), model, *rest)
