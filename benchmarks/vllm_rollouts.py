"""Rollout throughput through cotune's vLLM engine vs plain vLLM generation of the same prompts, side by side.

(a) plain: the rollout prompts (ChatAdapter-rendered, chat template applied, G copies per example) sent to the
    same vLLM server as ONE ``/v1/completions`` request with token-id prompts: vLLM's best case, no cotune code;
(b) plain chat: the same prompts as concurrent ``/v1/chat/completions`` requests (``--threads`` at a time), the way
    any OpenAI client would send them;
(c) rollouts: ``rl.run_rollouts`` of a ``dspy.Predict`` program through ``VLLMEngine`` (DSPy formatting, parsing,
    metric, per-call trace with token ids checked against the trainer's tokenizer, ``--threads`` at a time);
(d) for context, the same rollouts on the in-process engine (``model.generate`` micro-batches; ``--no-local`` skips).

All sample at temperature 1 with at most ``--max-tokens`` new tokens, from the same adapter; tokens are the
completion tokens including EOS. Rounds alternate a/b/c(/d) (the order reversed every other round) after a warm-up,
to share the machine's noise. Printed per side: the work of a round (rows, prompt tokens, tokens generated: each
side samples its own completions, so the generated counts differ a little) and tokens/s as median [min..max] over
the rounds; the last line is the ratio (c)/(a) of the median tokens per second and its range over the rounds.

    python benchmarks/vllm_rollouts.py [--examples 16] [--generations 8] [--max-tokens 24] [--rounds 5]
    python benchmarks/vllm_rollouts.py --model /models/Qwen2.5-0.5B-Instruct --url http://127.0.0.1:8000  # GPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import dspy

from programs.tasks import last_digit
from rl import Policy, VLLMServer, recording, run_rollouts
from rl.vllm_server import find_vllm_python, install_vllm_venv

Work = dict[str, int]  # rows, prompt_tokens, tokens_generated of one round


def plain_batch(server: VLLMServer, adapter: str, prompts: list[list[int]], max_tokens: int) -> tuple[Work, float]:
    start = time.perf_counter()
    body = server.completions({"model": adapter, "prompt": prompts, "max_tokens": max_tokens, "temperature": 1.0,
                               "seed": 0, "return_token_ids": True})
    elapsed = time.perf_counter() - start
    return {"rows": len(body["choices"]), "prompt_tokens": sum(map(len, prompts)),
            "tokens_generated": sum(len(c["token_ids"]) for c in body["choices"])}, elapsed


def plain_chat(server: VLLMServer, adapter: str, messages: list[list[dict]], max_tokens: int, threads: int
               ) -> tuple[Work, float]:
    def one(job):
        i, msgs = job
        body = server.chat({"model": adapter, "messages": msgs, "max_tokens": max_tokens, "temperature": 1.0,
                            "seed": i, "return_token_ids": True})
        prompt = body.get("usage", {}).get("prompt_tokens") or len(body.get("prompt_token_ids") or ())
        return Counter(rows=1, prompt_tokens=prompt, tokens_generated=len(body["choices"][0]["token_ids"]))

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        work = sum(pool.map(one, enumerate(messages)), Counter())
    return dict(work), time.perf_counter() - start


def rollouts(policy: Policy, examples, generations: int, max_tokens: int, threads: int) -> tuple[Work, float]:
    lm = policy.lm(temperature=1.0, max_tokens=max_tokens, cache=False)
    start = time.perf_counter()
    with recording() as calls:
        run_rollouts(last_digit.predict_program(), examples, lm, last_digit.correct, generations,
                     num_threads=threads, tag="bench")
    elapsed = time.perf_counter() - start
    return {"rows": len(calls), "prompt_tokens": sum(len(c.prompt_ids) for c in calls),
            "tokens_generated": sum(len(c.completion_ids) for c in calls)}, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="base model folder (default: the embedded tiny model)")
    parser.add_argument("--url", help="a running vLLM server with runtime LoRA loading (default: start one)")
    parser.add_argument("--dtype", default="float32", help="dtype of a started server (match the trainer)")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-local", action="store_true", help="skip (d), the in-process engine")
    args = parser.parse_args()

    if args.model is None:
        from embedded import tiny_model_path

        args.model = str(tiny_model_path())
    policy = Policy.from_pretrained(args.model, name="bench")
    if args.url:
        server = VLLMServer.attach(args.url)
    else:
        server = VLLMServer.start(args.model, python=find_vllm_python() or install_vllm_venv(), dtype=args.dtype,
                                  max_lora_rank=policy.lora.r)
    try:
        engine = policy.use_vllm(server=server)
        adapter = engine.adapter_name()
        examples = last_digit.load("test", args.examples)
        signature = last_digit.predict_program().signature
        chat = dspy.ChatAdapter()
        messages = [chat.format(signature, [], ex.inputs()) for ex in examples for _ in range(args.generations)]
        prompts = [policy.encode_messages(m) for m in messages]
        threads = min(args.threads, len(prompts))

        plain_batch(server, adapter, prompts[:8], args.max_tokens)  # warm-up
        rollouts(policy, examples[:1], 2, args.max_tokens, threads)
        runs = {"plain": lambda: plain_batch(server, adapter, prompts, args.max_tokens),
                "chat": lambda: plain_chat(server, adapter, messages, args.max_tokens, threads),
                "rollouts": lambda: rollouts(policy, examples, args.generations, args.max_tokens, threads)}
        if not args.no_local:
            local = Policy.from_pretrained(args.model, name="bench-local")
            runs["local"] = lambda: rollouts(local, examples, args.generations, args.max_tokens, threads)
            rollouts(local, examples[:1], 2, args.max_tokens, threads)
        rates: dict[str, list[float]] = {name: [] for name in runs}
        work: dict[str, Counter] = {name: Counter() for name in runs}
        for r in range(args.rounds):
            for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
                done, seconds = runs[name]()
                rates[name].append(done["tokens_generated"] / seconds)
                work[name].update(done)
        print(f"{len(prompts)} completions per round ({args.examples} examples x {args.generations}), "
              f"max {args.max_tokens} new tokens, T=1, {threads} threads, {args.rounds} rounds (+ warm-up, order "
              f"reversed every other round), server {server.url}")
        labels = {"plain": "(a) plain vLLM, one batched /v1/completions",
                  "chat": "(b) plain vLLM, concurrent /v1/chat/completions",
                  "rollouts": "(c) cotune rollouts via VLLMEngine (DSPy + trace)",
                  "local": "(d) cotune rollouts, in-process engine (context)"}
        for name in rates:
            w, values = {k: v / args.rounds for k, v in work[name].items()}, rates[name]
            print(f"{labels[name]:<52} work per round: {w['rows']:.0f} rows, {w['prompt_tokens']:.0f} prompt tok, "
                  f"{w['tokens_generated']:.0f} tok generated | {statistics.median(values):7.1f} tok/s "
                  f"[{min(values):.0f}..{max(values):.0f}]")
        for other, tag in (("plain", "(a)"), ("chat", "(b)")):
            per_round = [c / o for c, o in zip(rates["rollouts"], rates[other])]
            ratio = statistics.median(rates["rollouts"]) / statistics.median(rates[other])
            print(f"ratio rollouts/{other} (c)/{tag} = {ratio:.2f}   "
                  f"(per round: {', '.join(f'{x:.2f}' for x in per_round)})")
    finally:
        policy.close()
        server.close()


if __name__ == "__main__":
    main()
