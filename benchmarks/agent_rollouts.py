"""Throughput of whole ReAct episodes through the policy engine vs raw batched ``generate`` of the same calls.

An agent's episode is a chain of LM calls (every ``react`` step, then ``extract``), each one waiting for the tool
observation of the one before, so the engine can only batch calls of *different* episodes that happen to be
waiting at the same time. This measures what that costs:

(b) engine: the ``react_tools`` program (``dspy.ReAct`` with lookup, calculator and unit conversion) over
    ``--n`` test questions with ``dspy.Evaluate(num_threads=--batch)`` through ``policy.lm()``, greedy: DSPy's
    formatting, parsing, the tools and our micro-batching all included. Every call is recorded.
(a) raw: the recorded calls' prompts (exactly the tokens the engine sent), in recorded order, left-padded batches
    of ``--batch`` rows, ``model.generate`` greedy, written here with no cotune code in the loop: the best a
    batching loop could do with the calls known up front.

Both sides generate greedily on the same model with at most ``--max-tokens`` new tokens; tokens are counted up to
and including EOS. Rounds alternate a/b (b/a every other round) after a warm-up. Printed per side: the work of a
round (rows, prompt tokens, tokens generated; greedy on both, so they agree up to padding-dependent rounding) and
tokens/s as median [min..max]; the last line is the ratio (b)/(a) of the median tokens per second (target >= 0.7).

    python benchmarks/agent_rollouts.py [--n 32] [--batch 8] [--max-tokens 96] [--rounds 5] [--model DIR]
"""

from __future__ import annotations

import argparse
import logging

import dspy
from engine_throughput import (  # the one-call benchmark's loop (run as a script)
    alternate,
    evaluate_recorded,
    raw_generate,
    report,
)

from programs.registry import get_task
from rl import Policy


def engine_episodes(policy, program: dspy.Module, devset: list, batch: int, max_tokens: int
                    ) -> tuple[dict[str, int], float, list[list[int]]]:
    """The episodes through the engine: work (with the episode count), seconds, and the prompt ids of every call."""
    work, elapsed, calls = evaluate_recorded(policy, program, devset, batch, max_tokens)
    return {"episodes": len(devset), **work}, elapsed, [list(c.prompt_ids) for c in calls]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32, help="episodes (test questions) per round")
    parser.add_argument("--batch", type=int, default=8, help="threads on the engine side, rows per raw batch")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", help="base model folder (default: the embedded agent model)")
    args = parser.parse_args()
    logging.getLogger("dspy.evaluate.evaluate").setLevel(logging.WARNING)

    if args.model:
        policy = Policy.from_pretrained(args.model, name="bench")
    else:
        from embedded import agent_policy

        policy = agent_policy()
    task = get_task("react_tools")
    program = task.programs[task.default_program]()
    devset = task.load("test", args.n)

    _, _, prompts = engine_episodes(policy, program, devset[: args.batch], args.batch, args.max_tokens)  # warm-up
    raw_generate(policy, prompts, args.batch, args.max_tokens)
    _, _, prompts = engine_episodes(policy, program, devset, args.batch, args.max_tokens)  # the calls to replay
    sides = {"raw": lambda: raw_generate(policy, prompts, args.batch, args.max_tokens),
             "engine": lambda: engine_episodes(policy, program, devset, args.batch, args.max_tokens)[:2]}
    rates, work = alternate(sides, args.rounds)
    print(f"n={args.n} episodes, batch/threads={args.batch}, max_tokens={args.max_tokens}, mean engine batch="
          f"{policy.engine.stats()['mean_batch']:.1f}, {args.rounds} rounds (+ warm-up), order a/b then b/a")
    report(rates, work, args.rounds, {"raw": "(a) raw generate, same calls", "engine": "(b) engine, ReAct episodes"},
           target="; target >= 0.7")

if __name__ == "__main__":
    main()
