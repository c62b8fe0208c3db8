"""A short quality report of a local model on the default task: what `cotune model build` / `model eval` print.

Why: a user building or swapping the embedded model should see at once whether it parses DSPy's format, whether it
leaves headroom (right only sometimes, better on short numbers, better with demos) and whether it lands in the band
the tests and the demo rely on (``embedded.band_problems``).
"""

from __future__ import annotations

from embedded import band_problems, measure_band

LABELS = {"greedy": "Predict greedy", "sampled": "Predict sampled T=1", "demos": "Predict greedy + 3 demos",
          "cot": "ChainOfThought greedy"}


def evaluate_default_task(path, n: int = 500) -> list[str]:
    """Lines describing greedy, sampled, few-shot and ChainOfThought accuracy on ``n`` held-out questions."""
    measured = measure_band(path, n)
    rows = [f"{LABELS[arm]:25s} {m}" for arm, m in measured.items()]
    problems = band_problems(measured)
    rows.append("band: " + ("in the band" if not problems else "OUT OF BAND: " + "; ".join(problems)))
    return rows
