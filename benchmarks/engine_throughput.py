"""Throughput of the policy engine under DSPy vs a raw batched ``model.generate`` loop, side by side.

(a) raw: the same prompts (ChatAdapter-rendered, chat template applied), left-padded batches of
    ``--batch`` rows, ``model.generate`` greedy, written here with no cotune code in the loop;
(b) engine: a ``dspy.Predict`` program over the same questions with ``dspy.Evaluate(num_threads=--batch)``
    through ``policy.lm()`` (DSPy formatting + parsing + our micro-batching included).

Both generate greedily on the same model with at most ``--max-tokens`` new tokens; tokens are counted up
to and including EOS. Rounds alternate a/b to share the machine's noise. The last line is the ratio
(b)/(a) of tokens per second (target >= 0.7).

    python benchmarks/engine_throughput.py [--n 64] [--batch 8] [--max-tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import dspy
import torch
from transformers import GenerationConfig

from programs.embedded import tiny_policy
from programs.tasks import last_digit
from rl import recording


def raw_generate(policy, prompts: list[list[int]], batch: int, max_tokens: int) -> tuple[int, float]:
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
    return tokens, time.perf_counter() - start


def engine_generate(policy, questions, batch: int, max_tokens: int) -> tuple[int, float]:
    devset = [dspy.Example(question=q).with_inputs("question") for q in questions]
    program = last_digit.predict_program()
    lm = policy.lm(temperature=0.0, max_tokens=max_tokens, cache=False)
    start = time.perf_counter()
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)), recording() as calls:
        dspy.Evaluate(devset=devset, num_threads=batch, display_progress=False, max_errors=len(devset) + 1,
                      provide_traceback=False)(program, metric=lambda *a: 0.0)
    elapsed = time.perf_counter() - start
    return sum(len(c.completion_ids) for c in calls), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    policy = tiny_policy()
    questions = [ex.question for ex in last_digit.load("test", args.n)]
    adapter = dspy.ChatAdapter()
    signature = last_digit.predict_program().signature
    prompts = [policy.encode_messages(adapter.format(signature, [], {"question": q})) for q in questions]

    raw_generate(policy, prompts[: args.batch], args.batch, args.max_tokens)  # warm-up
    engine_generate(policy, questions[: args.batch], args.batch, args.max_tokens)
    raw_rates, engine_rates = [], []
    for r in range(args.rounds):
        tokens_a, secs_a = raw_generate(policy, prompts, args.batch, args.max_tokens)
        tokens_b, secs_b = engine_generate(policy, questions, args.batch, args.max_tokens)
        raw_rates.append(tokens_a / secs_a)
        engine_rates.append(tokens_b / secs_b)
        print(f"round {r}: raw {tokens_a} tok in {secs_a:.2f}s = {raw_rates[-1]:.0f} tok/s | "
              f"engine {tokens_b} tok in {secs_b:.2f}s = {engine_rates[-1]:.0f} tok/s")
    a, b = statistics.median(raw_rates), statistics.median(engine_rates)
    print(f"n={args.n} batch/threads={args.batch} max_tokens={args.max_tokens} mean engine batch="
          f"{policy.engine.stats()['mean_batch']:.1f}")
    print(f"(a) raw generate: {a:.0f} tok/s  (b) engine via dspy.Evaluate: {b:.0f} tok/s")
    print(f"ratio (b)/(a) = {b / a:.2f}")


if __name__ == "__main__":
    main()
