"""Throughput of the policy engine under DSPy vs a raw batched ``model.generate`` loop, side by side.

(a) raw: the same prompts (ChatAdapter-rendered, chat template applied), left-padded batches of
    ``--batch`` rows, ``model.generate`` greedy, written here with no cotune code in the loop;
(b) engine: a ``dspy.Predict`` program over the same questions with ``dspy.Evaluate(num_threads=--batch)``
    through ``policy.lm()`` (DSPy formatting + parsing + our micro-batching included).

Both generate greedily on the same model with at most ``--max-tokens`` new tokens; tokens are counted up
to and including EOS. Rounds alternate a/b (b/a every other round) after a warm-up, to share the machine's
noise. Printed per side: the work of a round (rows, prompt tokens, tokens generated: greedy on both sides, so
they should agree up to padding-dependent rounding) and tokens/s as median [min..max] over the rounds; the last
line is the ratio (b)/(a) of the median tokens per second (target >= 0.7) and its range over the rounds.

    python benchmarks/engine_throughput.py [--n 64] [--batch 8] [--max-tokens 32] [--rounds 9] [--model DIR]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections import Counter
from contextlib import contextmanager

import dspy
import torch
from transformers import GenerationConfig

from embedded import tiny_policy
from programs.tasks import last_digit
from rl import Policy, recording


@contextmanager
def torch_threads(n: int | None):
    """Run the block on ``n`` torch threads (``None``: unchanged): the raw side runs on the engine's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def raw_generate(policy, prompts: list[list[int]], batch: int, max_tokens: int) -> tuple[dict[str, int], float]:
    """The prompts in left-padded batches of ``batch`` through ``model.generate``, greedy, on as many torch threads
    as the engine generates on (equal work: the engine's worker sets its own count)."""
    with torch_threads(getattr(policy.engine, "torch_threads", None)):
        return _raw_generate(policy, prompts, batch, max_tokens)


def _raw_generate(policy, prompts: list[list[int]], batch: int, max_tokens: int) -> tuple[dict[str, int], float]:
    tok = policy.tokenizer
    eos = set(policy.eos_token_ids)
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=policy.eos_token_ids,
                              pad_token_id=tok.pad_token_id)
    tokens = 0
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), tok.pad_token_id)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, p in enumerate(chunk):
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        with torch.inference_mode():
            out = policy.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for row in out[:, width:].tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
            tokens += cut
    elapsed = time.perf_counter() - start
    return {"rows": len(prompts), "prompt_tokens": sum(map(len, prompts)), "tokens_generated": tokens}, elapsed


def engine_generate(policy, questions, batch: int, max_tokens: int) -> tuple[dict[str, int], float]:
    devset = [dspy.Example(question=q).with_inputs("question") for q in questions]
    work, elapsed, _ = evaluate_recorded(policy, last_digit.predict_program(), devset, batch, max_tokens)
    return work, elapsed


def evaluate_recorded(policy, program: dspy.Module, devset: list, batch: int, max_tokens: int
                      ) -> tuple[dict[str, int], float, list]:
    """``program`` over ``devset`` with ``dspy.Evaluate(num_threads=batch)`` through ``policy.lm()``, greedy: the work
    done (rows = LM calls, prompt tokens, tokens generated), the seconds, and every recorded call."""
    lm = policy.lm(temperature=0.0, max_tokens=max_tokens, cache=False)
    start = time.perf_counter()
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)), recording() as calls:
        dspy.Evaluate(devset=devset, num_threads=batch, display_progress=False, max_errors=len(devset) + 1,
                      provide_traceback=False)(program, metric=lambda *a: 0.0)
    elapsed = time.perf_counter() - start
    return {"rows": len(calls), "prompt_tokens": sum(len(c.prompt_ids) for c in calls),
            "tokens_generated": sum(len(c.completion_ids) for c in calls)}, elapsed, list(calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--model", help="base model folder (default: the embedded tiny model)")
    args = parser.parse_args()
    logging.getLogger("dspy.evaluate.evaluate").setLevel(logging.WARNING)  # one line per Evaluate call otherwise

    policy = Policy.from_pretrained(args.model, name="bench") if args.model else tiny_policy()
    questions = [ex.question for ex in last_digit.load("test", args.n)]
    adapter = dspy.ChatAdapter()
    signature = last_digit.predict_program().signature
    prompts = [policy.encode_messages(adapter.format(signature, [], {"question": q})) for q in questions]

    raw_generate(policy, prompts[: args.batch], args.batch, args.max_tokens)  # warm-up
    engine_generate(policy, questions[: args.batch], args.batch, args.max_tokens)
    sides = {"raw": lambda: raw_generate(policy, prompts, args.batch, args.max_tokens),
             "engine": lambda: engine_generate(policy, questions, args.batch, args.max_tokens)}
    rates, work = alternate(sides, args.rounds)
    print(f"n={args.n} batch/threads={args.batch} max_tokens={args.max_tokens} mean engine batch="
          f"{policy.engine.stats()['mean_batch']:.1f}, {args.rounds} rounds (+ warm-up), order a/b then b/a")
    report(rates, work, args.rounds, {"raw": "(a) raw generate", "engine": "(b) engine via dspy.Evaluate"})


def alternate(sides: dict, rounds: int) -> tuple[dict[str, list[float]], dict[str, Counter]]:
    """Run each side once per round, a/b then b/a: tokens/s per round and the summed work, per side."""
    rates: dict[str, list[float]] = {name: [] for name in sides}
    work: dict[str, Counter] = {name: Counter() for name in sides}
    for r in range(rounds):
        for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
            done, seconds = sides[name]()
            rates[name].append(done["tokens_generated"] / seconds)
            work[name].update(done)
        print(f"round {r}: " + " | ".join(f"{name} {rates[name][-1]:.0f} tok/s" for name in sides))
    return rates, work


def report(rates: dict[str, list[float]], work: dict[str, Counter], rounds: int, labels: dict[str, str],
           target: str = "") -> None:
    """Per side: the work of a round and tokens/s median [min..max]; then each other side's ratio to raw."""
    for name, label in labels.items():
        w, values = {k: v / rounds for k, v in work[name].items()}, rates[name]
        print(f"{label:<30} work per round: {w['rows']:.0f} rows, {w['prompt_tokens']:.0f} prompt tok, "
              f"{w['tokens_generated']:.0f} tok generated | {statistics.median(values):.0f} tok/s "
              f"[{min(values):.0f}..{max(values):.0f}]")
    for name in labels:
        if name == "raw":
            continue
        per_round = [b / a for a, b in zip(rates["raw"], rates[name])]
        ratio = statistics.median(rates[name]) / statistics.median(rates["raw"])
        print(f"ratio {labels[name][:3]}/{labels['raw'][:3]} = {ratio:.2f}   "
              f"(per round: {', '.join(f'{x:.2f}' for x in per_round)}){target if name == 'engine' else ''}")

if __name__ == "__main__":
    main()
