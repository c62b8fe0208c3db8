"""Rollout throughput through cotune's vLLM engine vs plain vLLM generation of the same prompts, side by side.

(a) plain: the rollout prompts (ChatAdapter-rendered, chat template applied, G copies per example) sent to the
    same vLLM server as ONE ``/v1/completions`` request with token-id prompts: vLLM's best case, no cotune code;
(b) plain chat: the same prompts as concurrent ``/v1/chat/completions`` requests (``--threads`` at a time), the way
    any OpenAI client would send them;
(c) rollouts: ``rl.run_rollouts`` of a ``dspy.Predict`` program through ``VLLMEngine`` (DSPy formatting, parsing,
    metric, per-call trace with token ids checked against the trainer's tokenizer, ``--threads`` at a time);
(d) for context, the same rollouts on the in-process engine (``model.generate`` micro-batches; ``--no-local`` skips).

All sample at temperature 1 with at most ``--max-tokens`` new tokens, from the same adapter; tokens are the
completion tokens including EOS. Rounds alternate a/b/c to share the machine's noise. The last line is the
ratio (c)/(a) of tokens per second.

    python benchmarks/vllm_rollouts.py [--examples 16] [--generations 8] [--max-tokens 24] [--rounds 3]
    python benchmarks/vllm_rollouts.py --model /models/Qwen2.5-0.5B-Instruct --url http://127.0.0.1:8000  # GPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import dspy

from programs.tasks import last_digit
from rl import Policy, VLLMServer, recording, run_rollouts
from rl.vllm_server import find_vllm_python, install_vllm_venv


def plain_batch(server: VLLMServer, adapter: str, prompts: list[list[int]], max_tokens: int) -> tuple[int, float]:
    start = time.perf_counter()
    body = server.completions({"model": adapter, "prompt": prompts, "max_tokens": max_tokens, "temperature": 1.0,
                               "seed": 0, "return_token_ids": True})
    elapsed = time.perf_counter() - start
    return sum(len(c["token_ids"]) for c in body["choices"]), elapsed


def plain_chat(server: VLLMServer, adapter: str, messages: list[list[dict]], max_tokens: int, threads: int
               ) -> tuple[int, float]:
    def one(job):
        i, msgs = job
        body = server.chat({"model": adapter, "messages": msgs, "max_tokens": max_tokens, "temperature": 1.0,
                            "seed": i, "return_token_ids": True})
        return len(body["choices"][0]["token_ids"])

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        tokens = sum(pool.map(one, enumerate(messages)))
    return tokens, time.perf_counter() - start


def rollouts(policy: Policy, examples, generations: int, max_tokens: int, threads: int) -> tuple[int, float]:
    lm = policy.lm(temperature=1.0, max_tokens=max_tokens, cache=False)
    start = time.perf_counter()
    with recording() as calls:
        run_rollouts(last_digit.predict_program(), examples, lm, last_digit.correct, generations,
                     num_threads=threads, tag="bench")
    elapsed = time.perf_counter() - start
    return sum(len(c.completion_ids) for c in calls), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="base model folder (default: the embedded tiny model)")
    parser.add_argument("--url", help="a running vLLM server with runtime LoRA loading (default: start one)")
    parser.add_argument("--dtype", default="float32", help="dtype of a started server (match the trainer)")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-local", action="store_true", help="skip (d), the in-process engine")
    args = parser.parse_args()

    if args.model is None:
        from programs.embedded import tiny_model_path

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
        for _ in range(args.rounds):
            for name, run in runs.items():
                tokens, seconds = run()
                rates[name].append(tokens / seconds)
        print(f"{len(prompts)} completions per round ({args.examples} examples x {args.generations}), "
              f"max {args.max_tokens} new tokens, T=1, {threads} threads, {args.rounds} rounds, server {server.url}")
        labels = {"plain": "(a) plain vLLM, one batched /v1/completions",
                  "chat": "(b) plain vLLM, concurrent /v1/chat/completions",
                  "rollouts": "(c) cotune rollouts via VLLMEngine (DSPy + trace)",
                  "local": "(d) cotune rollouts, in-process engine (context)"}
        for name in rates:
            label = labels[name]
            print(f"{label:<52} {statistics.median(rates[name]):9.1f} tok/s  (rounds: "
                  + ", ".join(f"{r:.0f}" for r in rates[name]) + ")")
        print(f"ratio rollouts/plain (c)/(a): {statistics.median(rates['rollouts']) / statistics.median(rates['plain']):.2f}"
              f"   (c)/(b): {statistics.median(rates['rollouts']) / statistics.median(rates['chat']):.2f}")
    finally:
        policy.close()
        server.close()


if __name__ == "__main__":
    main()
