"""Seconds per GRPO update on agent rows: one padding width per step vs length-grouped micro-batches.

Why: an agent's rows differ in length far more than a one-call program's (an early ``react`` step has a short
trajectory; a degenerate sample can grow its trajectory to the 1,024-token context), and prompts are left-padded. With
one width per step, a step with a single 1,000-token row made every micro-batch forward 1,000 tokens per row.
``rl.grpo.GRPOUpdater.step`` now takes the rows in order of prompt length and drops, per micro-batch, the prompt
columns that are padding in all of its rows.

EQUAL WORK: the rollouts are sampled once, before any timing (the ``react_tools`` program on the embedded agent model,
``--questions`` train questions x G=4 per step at T=1, max 64 new tokens, the weight stage's default settings from
the model's ``cotune.json``); their rows get the weight stage's advantages (zero-variance groups dropped). Both sides
then train on exactly these rows, in the same order, from the same fresh adapter, with the same settings:
    (a) one width per step: the update as it was, restored here by replacing ``rl.grpo.by_prompt_length`` (row
        order) and ``rl.grpo.without_shared_padding`` (trimming) with no-ops;
    (b) length-grouped: ``GRPOUpdater`` as it is.
Timed scope: ``to_batch`` + ``step`` per step. A run's time is the sum over its steps, and the cost of padding sits in
the few steps with one long row, so the ratio is of totals: per side, the seconds of a round (every step once), median
over rounds. Printed per side: rows, real (unpadded) tokens and tokens forwarded (padding included) per step, the
longest prompt per step, s/step median [min..max] and the seconds per round; last line, the speed-up (a)/(b) of the
median round (target >= 1.3; printed, never asserted). Sides alternate each round, the order reversed every other
round, after one warm-up round.

    python benchmarks/grpo_padding.py [--steps 24] [--rounds 3] [--questions 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import time
import warnings

import dspy
import torch

import rl.grpo
from embedded import agent_policy
from programs.registry import get_task
from rl import Policy
from rl.advantages import compute_advantages, predictor_namer
from rl.config import WeightStageConfig
from rl.grpo import GRPOUpdater
from rl.rollouts import run_rollouts

G = 4


@contextlib.contextmanager
def one_width_per_step():
    """(a): rows in the order given and no per-micro-batch trimming (the update before length grouping)."""
    order, trim = rl.grpo.by_prompt_length, rl.grpo.without_shared_padding
    rl.grpo.by_prompt_length = lambda batch: torch.arange(batch["prompt_mask"].size(0))
    rl.grpo.without_shared_padding = lambda micro: micro
    try:
        yield
    finally:
        rl.grpo.by_prompt_length, rl.grpo.without_shared_padding = order, trim


def forwarded(rows, mbs: int, grouped: bool) -> int:
    """Prompt + completion tokens the micro-batches forward, padding included."""
    if grouped:
        rows = sorted(rows, key=lambda r: len(r.prompt_ids))
    width = max(len(r.completion_ids) for r in rows)
    prompt = max(len(r.prompt_ids) for r in rows)
    total = 0
    for s in range(0, len(rows), mbs):
        micro = rows[s : s + mbs]
        total += len(micro) * ((max(len(r.prompt_ids) for r in micro) if grouped else prompt) + width)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24, help="updates per side per round")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (after one warm-up round)")
    parser.add_argument("--questions", type=int, default=4, help="train questions (GRPO groups) per step")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("dspy").setLevel(logging.CRITICAL)
    dspy.configure_cache(enable_disk_cache=False)

    task = get_task("react_tools")
    program, metric = task.program(), task.rubric()
    sampler = agent_policy()
    settings = sampler.recommended_settings()["weights"]
    config = WeightStageConfig(**settings, max_rollouts=10**6)
    examples = task.load("train", args.questions * args.steps, seed=3)
    lm = sampler.lm(temperature=1.0, max_tokens=config.max_tokens, cache=False)
    name_of = predictor_namer(program)
    steps = []
    for i in range(args.steps):
        chunk = examples[i * args.questions : (i + 1) * args.questions]
        rollouts = run_rollouts(program, chunk, lm, metric, G, tag=("bench", i))
        rows, _ = compute_advantages(rollouts, name_of, config.scale_rewards)
        if rows:
            steps.append(rows)
    mbs = config.micro_batch_size

    def side(grouped: bool):
        policy = Policy.from_pretrained(sampler.base_path, name=f"bench-{grouped}")
        updater = GRPOUpdater(policy, config, len(steps) * (args.rounds + 1))

        def run() -> list[float]:
            seconds = []
            with contextlib.nullcontext() if grouped else one_width_per_step():
                for rows in steps:
                    start = time.perf_counter()
                    updater.step(updater.to_batch(rows))
                    seconds.append(time.perf_counter() - start)
            return seconds

        return run

    sides = {"(a) one width per step": side(False), "(b) length-grouped": side(True)}
    times: dict[str, list[float]] = {name: [] for name in sides}
    rounds: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(args.rounds + 1):
        for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
            seconds = sides[name]()
            if r:  # round 0 warms up
                times[name] += seconds
                rounds[name].append(sum(seconds))
        if r:
            print(f"round {r}: " + " | ".join(f"{n} {rounds[n][-1]:.1f} s" for n in sides))

    n_rows = sum(len(rows) for rows in steps) / len(steps)
    longest = [max(len(r.prompt_ids) for r in rows) for rows in steps]
    real = sum(len(r.prompt_ids) + len(r.completion_ids) for rows in steps for r in rows) / len(steps)
    print(f"\nwork per step (both sides): {n_rows:.1f} rows, {real:.0f} real prompt+completion tokens "
          f"({len(steps)} steps, micro-batches of {mbs} rows; longest prompt per step: median "
          f"{statistics.median(longest):.0f}, max {max(longest)}, over 512 tokens in {sum(x > 512 for x in longest)})")
    for (name, values), grouped in zip(times.items(), (False, True)):
        fwd = sum(forwarded(rows, mbs, grouped) for rows in steps) / len(steps)
        print(f"{name:<26} {fwd:7.0f} tokens forwarded/step | {statistics.median(values):.2f} s/step "
              f"[{min(values):.2f}..{max(values):.2f}] | {statistics.median(rounds[name]):.1f} s per round")
    a, b = (statistics.median(v) for v in rounds.values())
    per_round = ", ".join(f"{x / y:.2f}" for x, y in zip(*rounds.values()))
    print(f"speed-up (a)/(b) = {a / b:.2f}   (per round: {per_round})   (target >= 1.3)")


if __name__ == "__main__":
    main()
