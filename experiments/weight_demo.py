"""The demo `make demo` runs today: the embedded model before and after a GRPO weight stage.

Why: until the full `optimize()` quickstart lands, this shows the core loop end to end on a fresh machine in
about two minutes: a DSPy program on the local policy, rollouts, rubric rewards, TRL's GRPO loss on LoRA,
and the held-out accuracy it moves. Run: ``python -m experiments.weight_demo``.
"""

from __future__ import annotations

import argparse
import time

import dspy

from metrics import ExactMatch, FormatValidity, Rubric
from programs.embedded import tiny_policy
from programs.tasks import last_digit
from rl import WeightStageConfig, train_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--out", default="runs/weight-demo", help="checkpoints and the final adapter go here")
    args = parser.parse_args(argv)
    dspy.configure_cache(enable_disk_cache=False)

    policy = tiny_policy()
    program = last_digit.predict_program()
    rubric = Rubric([ExactMatch("answer"), FormatValidity(["answer"])], weights={"exact_match": 1, "format": 0},
                    gates={"exact_match": "format"})
    greedy = policy.lm(temperature=0.0, cache=False)
    before = last_digit.measure(program, greedy, args.eval_size)
    config = WeightStageConfig(num_generations=8, examples_per_step=8, max_tokens=24, learning_rate=1e-3,
                               micro_batch_size=64, max_rollouts=64 * args.steps, checkpoint_every=10)
    start = time.time()
    result = train_weights(program, last_digit.load("train", 4000, seed=1), rubric, policy, config,
                           output_dir=args.out)
    after = last_digit.measure(program, greedy, args.eval_size)
    adapter = policy.save_adapter(f"{args.out}/adapter")
    print(f"\nuntuned (greedy)       {before}")
    print(f"after GRPO ({result.steps} steps) {after}   [{time.time() - start:.0f}s, {result.rollouts} rollouts]")
    print(f"adapter (PEFT folder): {adapter}")
    print("Note: the tiny model's warm-start planted this weakness on purpose; RL sharpening it tests the machinery.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
