"""Throughput of whole ReAct episodes through the policy engine vs raw batched ``generate`` of the same calls.

An agent's episode is a chain of LM calls (every ``react`` step, then ``extract``), each one waiting for the tool
observation of the one before, so the engine can only batch calls of *different* episodes that happen to be
waiting at the same time. This measures what that costs:

(b) engine: the ``react_tools`` program (``dspy.ReAct`` with lookup, calculator and unit conversion) over
    ``--n`` test questions with :func:`rl.run_rollouts` (``--batch`` workers, each declared to the engine: how the
    weight stage and the outer loop's evaluation run episodes) through ``policy.lm()``, greedy: DSPy's
    formatting, parsing, the tools and our micro-batching all included. Every call is recorded.
(c) the same episodes with ``dspy.Evaluate(num_threads=--batch)``, whose threads cannot be declared (a timing
    window batches them): what a user's own ``dspy.Evaluate`` over the policy gets.
(a) raw: the recorded calls' prompts (exactly the tokens the engine sent), in recorded order, left-padded batches
    of ``--batch`` rows, ``model.generate`` greedy, on the engine's torch thread count, written here with no
    cotune code in the loop: the best a batching loop could do with the calls known up front.

Both sides generate greedily on the same model with at most ``--max-tokens`` new tokens; tokens are counted up to
and including EOS. Rounds alternate a/b (b/a every other round) after a warm-up. Printed per side: the work of a
round (rows, prompt tokens, tokens generated; greedy on both, so they agree up to padding-dependent rounding) and
tokens/s as median [min..max]; the last lines are the ratios (b)/(a) (target >= 0.7) and (c)/(a) of the median
tokens per second. ``--threads N`` generates on N torch threads on every side (default: the model's ``cotune.json``).

    python benchmarks/agent_rollouts.py [--n 32] [--batch 8] [--max-tokens 96] [--rounds 5] [--threads N] [--model DIR]
"""

from __future__ import annotations

import argparse
import logging
import time

import dspy
from engine_throughput import (  # the one-call benchmark's loop (run as a script)
    alternate,
    evaluate_recorded,
    raw_generate,
    report,
)

from programs.registry import get_task
from rl import Policy, recording, run_rollouts


def engine_episodes(policy, program: dspy.Module, devset: list, batch: int, max_tokens: int
                    ) -> tuple[dict[str, int], float, list[list[int]]]:
    """The episodes on ``batch`` declared rollout workers: work (with the episode count), seconds, and the prompt ids
    of every call."""
    lm = policy.lm(temperature=0.0, max_tokens=max_tokens, cache=False)
    start = time.perf_counter()
    with recording() as calls:
        run_rollouts(program, devset, lm, lambda *a: 0.0, 1, num_threads=batch, tag="bench")
    elapsed = time.perf_counter() - start
    work = {"episodes": len(devset), "rows": len(calls), "prompt_tokens": sum(len(c.prompt_ids) for c in calls),
            "tokens_generated": sum(len(c.completion_ids) for c in calls)}
    return work, elapsed, [list(c.prompt_ids) for c in calls]


def evaluate_episodes(policy, program: dspy.Module, devset: list, batch: int, max_tokens: int
                      ) -> tuple[dict[str, int], float]:
    """The same episodes under ``dspy.Evaluate``: work and seconds."""
    work, elapsed, _ = evaluate_recorded(policy, program, devset, batch, max_tokens)
    return {"episodes": len(devset), **work}, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32, help="episodes (test questions) per round")
    parser.add_argument("--batch", type=int, default=8, help="threads on the engine side, rows per raw batch")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads of every side (default: the model's cotune.json)")
    parser.add_argument("--model", help="base model folder (default: the embedded agent model)")
    args = parser.parse_args()
    logging.getLogger("dspy.evaluate.evaluate").setLevel(logging.WARNING)

    if args.model:
        policy = Policy.from_pretrained(args.model, name="bench", torch_threads=args.threads)
    else:
        from embedded import agent_policy

        policy = agent_policy(torch_threads=args.threads)
    task = get_task("react_tools")
    program = task.programs[task.default_program]()
    devset = task.load("test", args.n)

    _, _, prompts = engine_episodes(policy, program, devset[: args.batch], args.batch, args.max_tokens)  # warm-up
    raw_generate(policy, prompts, args.batch, args.max_tokens)
    _, _, prompts = engine_episodes(policy, program, devset, args.batch, args.max_tokens)  # the calls to replay
    sides = {"raw": lambda: raw_generate(policy, prompts, args.batch, args.max_tokens),
             "engine": lambda: engine_episodes(policy, program, devset, args.batch, args.max_tokens)[:2],
             "evaluate": lambda: evaluate_episodes(policy, program, devset, args.batch, args.max_tokens)}
    rates, work = alternate(sides, args.rounds)
    print(f"n={args.n} episodes, batch/threads={args.batch}, max_tokens={args.max_tokens}, torch threads="
          f"{policy.engine.torch_threads or 'process default'}, {args.rounds} rounds (+ warm-up), order a/b/c then "
          "c/b/a")
    report(rates, work, args.rounds, {"raw": "(a) raw generate, same calls", "engine": "(b) run_rollouts, episodes",
                                      "evaluate": "(c) dspy.Evaluate, episodes"}, target="; target >= 0.7")

if __name__ == "__main__":
    main()
