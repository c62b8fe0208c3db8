"""Seconds per GRPO step: plain TRL ``GRPOTrainer`` on prompts vs our weight stage on the same DSPy program.

(a) TRL: ``GRPOTrainer(reward_funcs=...)`` on a dataset whose prompts are exactly the chat messages the
    ``dspy.Predict("question -> answer")`` program sends (ChatAdapter-rendered), TRL generating and scoring;
(b) ours: ``rl.train_weights`` running the program itself (DSPy formatting, parsing, our engine's batching,
    per-predictor advantages, TRL's loss through our seam).

Same tiny model, same LoRA shape (r16/alpha32, all linear layers), same batch (8 prompts x G=8), same max
new tokens, lr and beta. Each side runs K steps; the median of steps after the first is reported. The last
line is the ratio (b)/(a) (target <= 1.15).

    python benchmarks/grpo_overhead.py [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import dspy
import torch

from programs.embedded import tiny_model_path
from programs.tasks import last_digit
from rl import LoraSettings, Policy, WeightStageConfig, train_weights

PROMPTS, G, MAX_TOKENS, LR = 8, 8, 24, 1e-3
LORA = LoraSettings(r=16, alpha=32)


def trl_seconds_per_step(model_dir, examples, steps: int) -> float:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    adapter = dspy.ChatAdapter()
    signature = last_digit.predict_program().signature
    data = Dataset.from_dict({
        "prompt": [adapter.format(signature, [], {"question": ex.question}) for ex in examples],
        "answer": [ex.answer for ex in examples],
    })

    def reward(completions, answer, **kwargs):
        out = []
        for completion, gold in zip(completions, answer):
            text = completion[0]["content"] if isinstance(completion, list) else completion
            try:
                out.append(float(adapter.parse(signature, text)["answer"].strip() == gold))
            except Exception:  # noqa: BLE001 - unparsable output scores 0, as in our stage
                out.append(0.0)
        return out

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    args = GRPOConfig(output_dir="/tmp/cotune-bench-trl", report_to="none", use_cpu=True, bf16=False,
                      activation_checkpointing=False, per_device_train_batch_size=PROMPTS * G, num_generations=G,
                      max_completion_length=MAX_TOKENS, learning_rate=LR, beta=0.0, temperature=1.0,
                      max_steps=steps, logging_steps=1, save_strategy="no", lr_scheduler_type="constant",
                      disable_dropout=True, seed=0)
    torch.manual_seed(0)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir),
                          processing_class=AutoTokenizer.from_pretrained(model_dir), reward_funcs=reward, args=args,
                          train_dataset=data, peft_config=LORA.to_peft(), callbacks=[Clock()])
    start = time.perf_counter()
    trainer.train()
    times = [b - a for a, b in zip([start, *stamps[:-1]], stamps)]
    return statistics.median(times[1:])


def ours_seconds_per_step(model_dir, examples, steps: int) -> float:
    policy = Policy.from_pretrained(model_dir, lora=LORA)
    config = WeightStageConfig(num_generations=G, examples_per_step=PROMPTS, max_tokens=MAX_TOKENS, learning_rate=LR,
                               micro_batch_size=PROMPTS * G, max_rollouts=PROMPTS * G * steps)
    result = train_weights(last_digit.predict_program(), examples, last_digit.correct, policy, config, progress=False)
    times = [h["seconds_rollout"] + h["seconds_update"] for h in result.history]
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for both sides (default 1: on 2 cores, OpenMP spinning against "
                             "the rollout threads slows tiny-model ops by orders of magnitude)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    dspy.configure_cache(enable_disk_cache=False)
    model_dir = tiny_model_path()
    examples = last_digit.load("train", PROMPTS * args.steps, seed=2)
    a = trl_seconds_per_step(model_dir, examples, args.steps)
    b = ours_seconds_per_step(model_dir, examples, args.steps)
    print(f"batch {PROMPTS} prompts x G={G}, max_new_tokens={MAX_TOKENS}, {args.steps} steps each, "
          f"torch threads={args.threads}")
    print(f"(a) TRL GRPOTrainer: {a:.3f} s/step   (b) cotune weight stage: {b:.3f} s/step")
    print(f"ratio (b)/(a) = {b / a:.2f}")


if __name__ == "__main__":
    main()
