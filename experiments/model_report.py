"""A short quality report of a local model on the default task: what `cotune model build` prints.

Why: a user building or swapping the embedded model should see at once whether it parses DSPy's format
and whether it leaves headroom (right only sometimes, better when sampling, better with demos).
"""

from __future__ import annotations

import dspy

from programs.tasks import last_digit
from rl.policy import Policy


def evaluate_default_task(path, n: int = 500) -> list[str]:
    """Lines describing greedy, sampled and few-shot accuracy on ``n`` held-out questions."""
    policy = Policy.from_pretrained(path)
    rows = []
    for label, temperature, demos in (("greedy", 0.0, 0), ("sampled T=1", 1.0, 0), ("greedy + 3 demos", 0.0, 3)):
        program = last_digit.predict_program()
        if demos:
            program.demos = [dspy.Example(question=e.question, answer=e.answer)
                             for e in last_digit.load("train", demos, seed=9)]
        lm = policy.lm(temperature=temperature, max_tokens=48, cache=False)
        rows.append(f"Predict {label:17s} {last_digit.measure(program, lm, n)}")
    cot = last_digit.measure(last_digit.cot_program(), policy.lm(temperature=0.0, max_tokens=64, cache=False), n)
    rows.append(f"ChainOfThought greedy     {cot}")
    return rows
