"""Seconds per GRPO step: plain TRL ``GRPOTrainer`` vs our weight stage, on equal work first.

Why this shape: a ratio of two timings means something only when both sides do the same work, timed over the same
scope, under the same machine noise. So the sides train the *same rows*, their timers cover the same kind of work,
they alternate round by round, and every line prints the work done and the spread of the timings.

(1) EQUAL WORK, the update. The rollouts of every step are sampled once, before any timing, by our engine running
    the ``dspy.Predict("question -> answer")`` program (8 prompts x G=8 per step). Both sides then train on exactly
    these rows: the same prompt and completion token ids, the same rewards, the same advantages, all 64 rows.
    (a) TRL: ``GRPOTrainer.train()`` with TRL's ``rollout_func`` returning the sampled rows instead of generating,
        and a reward function returning their rewards; TRL computes the advantages (group mean and std), the loss,
        the backward pass and the optimizer step as it always does.
    (b) ours: ``rl.grpo.GRPOUpdater`` (what the weight stage runs after its rollouts) on all the rows, zero-variance
        groups included with advantage 0, computed as TRL does (``rl.advantages`` drops those groups and has no
        switch to keep them, so the benchmark builds the rows itself).
    Timed scope on both sides: from scored rollouts to updated weights (advantages, batch tensors, forward, backward,
    clipping, optimizer and scheduler step), logging excluded: TRL from its ``on_step_begin`` to its ``on_step_end``
    callback (its step logging runs after ``on_step_end``), ours around ``to_batch`` + ``step`` + the version bump
    (the step metrics, callbacks and progress bar of ``train_weights`` run outside). TRL's in-step metric
    bookkeeping (reward and length statistics) is inside its timer; ours (TRL's own loss metrics) is inside ours.
(2) NOT EQUAL WORK, our real configuration: (c) the same updater on the same rollouts, with the rows of
    zero-variance groups dropped before the backward pass (``rl.advantages.compute_advantages``), against (a).
(3) NOT EQUAL WORK, the full step: (d) TRL generating its own completions (``model.generate``) of the same prompts
    (the ChatAdapter-rendered messages the program sends), scoring them with the same metric, and training on all
    of them, against (e) ``rl.train_weights`` running the program (DSPy formatting and parsing, our engine's
    batching, zero-variance groups dropped). Each side samples its own completions: the rows and tokens differ.

Same tiny model, LoRA r16/alpha32 on all linear layers, 8 prompts x G=8, max new tokens, lr, beta=0, loss "dapo",
one micro-batch per step. Each round runs every side once (``--steps`` steps each, the order reversed every other
round) after a warm-up round that is not counted. Printed per side: the work done (rows, prompt tokens, tokens
generated inside the timer, tokens trained) and s/step as median [min..max] and IQR over every measured step; per
line, the ratio of the medians and its range over the rounds (ratio of the per-round medians). The target is on the
equal-work line: (b)/(a) <= 1.15 (printed beside it, never asserted).

    python benchmarks/grpo_overhead.py [--steps 4] [--rounds 8] [--threads 1] [--no-full-step]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import dspy
import torch
from transformers import TrainerCallback

from programs.tasks import last_digit
from rl import LoraSettings, Policy, WeightStageConfig, run_rollouts, train_weights
from rl.advantages import Row, compute_advantages, predictor_namer
from rl.grpo import GRPOUpdater
from rl.rollouts import Rollout
from rl.weight_stage import ADVANTAGE_EPS

PROMPTS, G, MAX_TOKENS, LR = 8, 8, 24, 1e-3
LORA = LoraSettings(r=16, alpha=32)
TRL_STD_EPS = 1e-4  # TRL's advantages: (reward - group mean) / (group std, unbiased + 1e-4)


@dataclass
class Side:
    """One side of a comparison: its per-step seconds (per round) and the work it did in the measured rounds."""

    label: str
    run: Callable[[], list[float]] | None = None  # trains one round, returns the seconds of each step
    rounds: list[list[float]] = field(default_factory=list)
    work: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    counting: bool = False  # work is counted in measured rounds only

    def count(self, **amounts: int) -> None:
        if self.counting:
            for key, value in amounts.items():
                self.work[key] += value


def _trainer_args(steps: int):
    import torch
    from trl import GRPOConfig

    # TRL runs where our policy runs (the GPU when there is one): both sides on the same device
    return GRPOConfig(output_dir="/tmp/cotune-bench-trl", report_to="none", use_cpu=not torch.cuda.is_available(),
                      bf16=False,
                      activation_checkpointing=False, per_device_train_batch_size=PROMPTS * G, num_generations=G,
                      max_completion_length=MAX_TOKENS, learning_rate=LR, beta=0.0, temperature=1.0, loss_type="dapo",
                      max_steps=steps, logging_steps=1, save_strategy="no", lr_scheduler_type="constant",
                      disable_dropout=True, disable_tqdm=True, shuffle_dataset=False, seed=0)


class StepClock(TrainerCallback):
    """Seconds from TRL's ``on_step_begin`` to its ``on_step_end`` (TRL logs the step after ``on_step_end``)."""

    def __init__(self) -> None:
        self.start, self.seconds = 0.0, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.start)

    def take(self) -> list[float]:
        out, self.seconds = self.seconds, []
        return out


def _messages(example) -> list[dict]:
    return dspy.ChatAdapter().format(last_digit.predict_program().signature, [], {"question": example.question})


def trl_trainer(model_dir, examples, steps: int, reward_func, rollout_func=None):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import GRPOTrainer

    clock = StepClock()
    data = Dataset.from_dict({"prompt": [_messages(ex) for ex in examples], "answer": [ex.answer for ex in examples]})
    torch.manual_seed(0)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir),
                          processing_class=AutoTokenizer.from_pretrained(model_dir), reward_funcs=reward_func,
                          args=_trainer_args(steps), train_dataset=data, peft_config=LORA.to_peft(),
                          callbacks=[clock], rollout_func=rollout_func)
    trainer.remove_callback(PrinterCallback)  # TRL still logs every step (after on_step_end), without printing it
    return trainer, clock


def trl_on_rows(model_dir, examples, sampled: list[list[Rollout]], side: Side):
    """(a): TRL trains on the sampled rows, fed through its ``rollout_func`` (it never generates)."""
    groups = {json.dumps(_messages(ex)): [(r.calls[0], r.reward) for r in step[i * G : (i + 1) * G]]
              for step, chunk in zip(sampled, _chunks(examples, len(sampled))) for i, ex in enumerate(chunk)}

    def rollout_func(prompts, trainer):
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": None, "cotune_reward": []}
        taken: dict[str, int] = defaultdict(int)
        for prompt in prompts:  # each prompt G times in a row (TRL's sampler): the G sampled completions in order
            key = json.dumps(prompt)
            call, reward = groups[key][taken[key]]
            taken[key] += 1
            out["prompt_ids"].append(list(call.prompt_ids))
            out["completion_ids"].append(list(call.completion_ids))
            out["cotune_reward"].append(reward)
        side.count(rows=len(prompts), prompt_tokens=sum(map(len, out["prompt_ids"])),
                   tokens_trained=sum(map(len, out["completion_ids"])))
        return out

    def reward(completions, cotune_reward, **kwargs):
        return list(cotune_reward)

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental in TRL
    trainer, clock = trl_trainer(model_dir, examples, len(sampled), reward, rollout_func)

    def run() -> list[float]:
        trainer.train()
        return clock.take()

    return run


def trl_generating(model_dir, examples, steps: int, side: Side):
    """(d): plain TRL, generating and scoring its own completions of the same prompts."""
    adapter = dspy.ChatAdapter()
    signature = last_digit.predict_program().signature

    def reward(completions, answer, completion_ids, **kwargs):
        out = []
        for completion, gold in zip(completions, answer):
            text = completion[0]["content"] if isinstance(completion, list) else completion
            try:
                out.append(float(adapter.parse(signature, text)["answer"].strip() == gold))
            except Exception:  # noqa: BLE001 - unparsable output scores 0, as in our stage
                out.append(0.0)
        tokens = sum(map(len, completion_ids))
        side.count(rows=len(completions), tokens_generated=tokens, tokens_trained=tokens)
        return out

    trainer, clock = trl_trainer(model_dir, examples, steps, reward)

    def run() -> list[float]:
        trainer.train()  # a fresh state every call: num_input_tokens_seen is this round's prompt + completion tokens
        side.count(prompt_and_completion_tokens=int(trainer.state.num_input_tokens_seen))
        return clock.take()

    return run


def _chunks(examples, steps: int) -> list[list]:
    return [examples[i * PROMPTS : (i + 1) * PROMPTS] for i in range(steps)]


def _config(steps: int) -> WeightStageConfig:
    return WeightStageConfig(num_generations=G, examples_per_step=PROMPTS, max_tokens=MAX_TOKENS, learning_rate=LR,
                             micro_batch_size=PROMPTS * G, max_rollouts=PROMPTS * G * steps)


def rows_like_trl(rollouts: list[Rollout]) -> list[Row]:
    """Every call's row, zero-variance groups kept (advantage 0), with TRL's advantages: identical rows to (a)'s."""
    by_example: dict[int, list[float]] = defaultdict(list)
    for r in rollouts:
        by_example[r.example_index].append(r.reward)
    rows = []
    for r in rollouts:
        rewards = by_example[r.example_index]
        advantage = (r.reward - statistics.fmean(rewards)) / (statistics.stdev(rewards) + TRL_STD_EPS)
        for call in r.calls:
            rows.append(Row(call.prompt_ids, call.completion_ids, advantage, r.reward, (r.example_index, "predict"),
                            call.finish_reason == "length"))
    return rows


def ours_on_rows(model_dir, sampled: list[list[Rollout]], keep_all: bool, side: Side):
    """(b) / (c): our updater on the sampled rows: all of them, or without the zero-variance groups."""
    policy = Policy.from_pretrained(model_dir, lora=LORA)
    updater = GRPOUpdater(policy, _config(len(sampled)), len(sampled))  # built once per stage, as train_weights does
    name_of = predictor_namer(last_digit.predict_program())

    def run() -> list[float]:
        seconds = []
        for rollouts in sampled:
            start = time.perf_counter()
            if keep_all:
                rows = rows_like_trl(rollouts)
            else:
                rows, _ = compute_advantages(rollouts, name_of, "group", eps=ADVANTAGE_EPS)
            if rows:  # as train_weights: no update when every group had zero variance
                with policy.lock:
                    batch = updater.to_batch(rows)
                    updater.step(batch)
                policy.bump_version()
            seconds.append(time.perf_counter() - start)
            side.count(rows=len(rows), prompt_tokens=sum(len(r.prompt_ids) for r in rows),
                       tokens_trained=sum(len(r.completion_ids) for r in rows))
        return seconds

    return run


def ours_full_step(model_dir, examples, steps: int, side: Side):
    """(e): ``rl.train_weights`` on the program, our real configuration (zero-variance groups dropped)."""
    policy = Policy.from_pretrained(model_dir, lora=LORA)
    program = last_digit.predict_program()
    name_of = predictor_namer(program)

    def monitor(step, rollouts):  # runs after the step's timer: the work of the step
        rows, _ = compute_advantages(rollouts, name_of, "group", eps=ADVANTAGE_EPS)
        calls = [c for r in rollouts for c in r.calls]
        side.count(rows=len(rows), prompt_tokens=sum(len(c.prompt_ids) for c in calls),
                   tokens_generated=sum(len(c.completion_ids) for c in calls),
                   tokens_trained=sum(len(r.completion_ids) for r in rows))

    def run() -> list[float]:
        result = train_weights(program, examples, last_digit.correct, policy, _config(steps), progress=False,
                               monitors=[monitor])
        return [h["seconds_rollout"] + h["seconds_update"] for h in result.history]

    return run


def sample_rollouts(model_dir, examples, steps: int) -> list[list[Rollout]]:
    """Each step's rollouts, sampled once by our engine from the fresh adapter: what (a), (b) and (c) train on."""
    policy = Policy.from_pretrained(model_dir, lora=LORA)
    lm = policy.lm(temperature=1.0, max_tokens=MAX_TOKENS, cache=False)
    program = last_digit.predict_program()
    sampled = [run_rollouts(program, chunk, lm, last_digit.correct, G, tag=("bench", i))
               for i, chunk in enumerate(_chunks(examples, steps))]
    assert all(len(r.calls) == 1 for step in sampled for r in step), "one LM call per rollout expected"
    return sampled


def _spread(values: list[float]) -> str:
    q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return (f"{statistics.median(values):7.3f} s/step [{min(values):.3f}..{max(values):.3f}] "
            f"IQR {q1:.3f}..{q3:.3f}")


def _work(side: Side, steps: int) -> str:
    w = side.work
    prompt = w.get("prompt_tokens", w.get("prompt_and_completion_tokens", 0) - w.get("tokens_trained", 0))
    return (f"{w['rows'] / steps:6.1f} rows  {prompt / steps:7.0f} prompt tok  "
            f"{w.get('tokens_generated', 0) / steps:6.0f} tok generated  {w['tokens_trained'] / steps:6.0f} tok trained")


def report(title: str, sides: list[Side], base: Side, steps_measured: int, target: str = "") -> None:
    print(f"\n{title}")
    print(f"  {'side':<52} {'work per step (mean over measured steps)':<64} time")
    for side in sides:
        flat = [s for r in side.rounds for s in r]
        print(f"  {side.label:<52} {_work(side, steps_measured):<64} {_spread(flat)}")
    for side in sides:
        if side is base:
            continue
        per_round = [statistics.median(o) / statistics.median(b) for o, b in zip(side.rounds, base.rounds)]
        total = statistics.median([s for r in side.rounds for s in r]) / statistics.median(
            [s for r in base.rounds for s in r])
        print(f"  ratio {side.label[:3]}/{base.label[:3]} = {total:.2f}   "
              f"(per round: {', '.join(f'{x:.2f}' for x in per_round)}){target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="steps per side per round")
    parser.add_argument("--rounds", type=int, default=8, help="measured rounds (after one warm-up round)")
    parser.add_argument("--model", help="base model folder (default: the embedded tiny model)")
    parser.add_argument("--no-full-step", action="store_true", help="skip line (3), the full steps with generation")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for every side (default 1: on 2 cores, OpenMP spinning against "
                             "the rollout threads slows tiny-model ops by orders of magnitude)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    dspy.configure_cache(enable_disk_cache=False)
    if args.model is None:
        from embedded import tiny_model_path

        args.model = str(tiny_model_path())
    examples = last_digit.load("train", PROMPTS * args.steps, seed=2)
    assert len({ex.question for ex in examples}) == len(examples), "(a) finds each prompt's rows by its text"
    sampled = sample_rollouts(args.model, examples, args.steps)

    sides = {"a": Side("(a) TRL GRPOTrainer, rows fed by rollout_func"),
             "b": Side("(b) cotune GRPOUpdater, all rows"),
             "c": Side("(c) cotune GRPOUpdater, zero-variance rows dropped")}
    sides["a"].run = trl_on_rows(args.model, examples, sampled, sides["a"])
    sides["b"].run = ours_on_rows(args.model, sampled, True, sides["b"])
    sides["c"].run = ours_on_rows(args.model, sampled, False, sides["c"])
    if not args.no_full_step:
        sides["d"] = Side("(d) TRL GRPOTrainer, generating (model.generate)")
        sides["e"] = Side("(e) cotune train_weights, DSPy program")
        sides["d"].run = trl_generating(args.model, examples, args.steps, sides["d"])
        sides["e"].run = ours_full_step(args.model, examples, args.steps, sides["e"])
    order = list(sides.values())
    for side in order:  # warm-up round, not counted
        side.run()
    for r in range(args.rounds):
        for side in order if r % 2 == 0 else order[::-1]:
            side.counting = True
            side.rounds.append(side.run())
            side.counting = False
            assert len(side.rounds[-1]) == args.steps, (side.label, len(side.rounds[-1]))

    measured = args.steps * args.rounds
    print(f"GRPO steps on {args.model}: {PROMPTS} prompts x G={G} per step, max_new_tokens={MAX_TOKENS}, lr={LR}, "
          f"beta=0, loss dapo, LoRA r{LORA.r}/alpha{LORA.alpha} all-linear, torch threads={args.threads}")
    print(f"{args.rounds} measured rounds (+1 warm-up) x {args.steps} steps per side, sides alternated "
          f"({' '.join(sides)}, reversed every other round); time: median [min..max] IQR over {measured} steps")
    sampled_tokens = sum(len(c.completion_ids) for step in sampled for r in step for c in r.calls)
    print(f"(1) and (2) train the rows cotune's engine sampled once before timing ({sampled_tokens} tokens for "
          f"{args.steps} steps): no generation inside their timers")
    report("(1) EQUAL WORK: the update on the same rows (prompts, completions, advantages)",
           [sides["a"], sides["b"]], sides["a"], measured, target="   target <= 1.15")
    report("(2) NOT EQUAL WORK: our real configuration drops the rows of zero-variance groups before the backward pass",
           [sides["a"], sides["c"]], sides["a"], measured)
    if not args.no_full_step:
        report("(3) NOT EQUAL WORK: full step, each side samples its own completions; ours drops zero-variance rows",
               [sides["d"], sides["e"]], sides["d"], measured)


if __name__ == "__main__":
    main()
