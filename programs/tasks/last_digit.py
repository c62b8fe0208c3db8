"""The embedded default task: "What is the last digit of N?".

Why this task: the tiny CPU model can learn it in minutes, and its warm-start data
plants *input-dependent* unreliability on purpose (README, "The embedded tiny model"), so
that both optimizers have real headroom:

* short numbers (3-4 digits) are always labelled correctly -> the model is reliable there;
* long numbers (>= 5 digits) without demos are labelled with the *second-to-last* digit
  75% of the time -> greedy decoding is usually wrong, sampling is right ~25% of the time,
  which is exactly what GRPO can sharpen;
* long numbers *with* few-shot demos in the prompt are labelled correctly 90% of the time
  -> adding demos (a prompt stage) helps, and that is measurable.

This is a test and demo task: RL here sharpens a bias the warm-start created deliberately.
It says nothing about learning new skills, and the README says so.

Splits are fixed by a hash of N (not by sampling order), so train, val and test numbers are
disjoint whatever the sizes and seeds asked for.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import dspy

QUESTION = "What is the last digit of {n}?"
MIN_DIGITS, MAX_DIGITS = 3, 8
LONG_DIGITS = 5  # numbers with at least this many digits are the "unreliable" ones
SPLITS = ("train", "val", "test")
WARMSTART_VERSION = 1  # bump when the warm-start corpus generator below changes what it produces


def split_of(n: int) -> str:
    """The split a number belongs to: a stable hash bucket (80% train, 10% val, 10% test)."""
    bucket = int(hashlib.sha256(str(n).encode()).hexdigest()[:8], 16) % 10
    return "train" if bucket < 8 else ("val" if bucket == 8 else "test")


def _numbers(split: str, count: int, seed: int, min_digits: int = MIN_DIGITS, max_digits: int = MAX_DIGITS
             ) -> list[int]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got min_digits={min_digits}, max_digits={max_digits}")
    rng = random.Random(f"last_digit/{split}/{seed}")
    seen: set[int] = set()
    out: list[int] = []
    while len(out) < count:
        digits = rng.randint(min_digits, max_digits)
        n = rng.randint(10 ** (digits - 1), 10**digits - 1)
        if n not in seen and split_of(n) == split:
            seen.add(n)
            out.append(n)
    return out


def make_example(n: int) -> dspy.Example:
    """One task example with ``question`` as input and the correct ``answer`` as label."""
    return dspy.Example(question=QUESTION.format(n=n), answer=str(n % 10), number=n).with_inputs("question")


def load(split: str, count: int, seed: int = 0, min_digits: int = MIN_DIGITS, max_digits: int = MAX_DIGITS
         ) -> list[dspy.Example]:
    """Deterministic examples of one split (numbers of ``min_digits`` to ``max_digits`` digits; the defaults
    are the warm-start's range, and only they reproduce the examples the model was warm-started around).

    Example:
        >>> from programs.tasks import last_digit
        >>> train = last_digit.load("train", 200, seed=0)
        >>> train[0].question.startswith("What is the last digit of")
        True
    """
    return [make_example(n) for n in _numbers(split, count, seed, min_digits, max_digits)]


def is_long(example: dspy.Example) -> bool:
    """True for the numbers the warm-start made the model unreliable on."""
    return len(str(example.number)) >= LONG_DIGITS


def correct(example: dspy.Example, pred: dspy.Prediction, trace=None) -> float:
    """Exact match of the answer's first digit-like token against the gold last digit."""
    answer = str(getattr(pred, "answer", "") or "").strip()
    return float(answer == example.answer)


def predict_program() -> dspy.Module:
    """The default single-predictor program."""
    return dspy.Predict("question -> answer")


def cot_program() -> dspy.Module:
    """The same task with a reasoning field first."""
    return dspy.ChainOfThought("question -> answer")


# --- warm-start corpus for the embedded tiny model -------------------------------------------


@dataclass(frozen=True)
class WarmStartRecipe:
    """Knobs of the warm-start corpus; part of the tiny model's cache key."""

    p_wrong_long: float = 0.75  # long numbers without demos: label is the second-to-last digit
    p_wrong_long_demos: float = 0.10  # long numbers with demos in the prompt
    p_demos: float = 0.3  # share of examples rendered with 1-3 demos
    p_cot: float = 0.15  # share of examples rendered as ChainOfThought


def _noisy_label(n: int, p_wrong: float, rng: random.Random) -> str:
    if len(str(n)) >= LONG_DIGITS and rng.random() < p_wrong:
        return str((n // 10) % 10)
    return str(n % 10)


def _outputs(n: int, answer: str, cot: bool) -> dict[str, str]:
    if cot:
        return {"reasoning": f"{n} ends in {answer}.", "answer": answer}
    return {"answer": answer}


def warmstart_messages(count: int, seed: int, recipe: WarmStartRecipe = WarmStartRecipe()) -> list[list[dict]]:
    """Chat conversations (system, user, [demo turns], assistant) rendered by DSPy's own ChatAdapter.

    The final assistant message is the training target. Rendering goes through
    ``ChatAdapter.format_finetune_data`` so the model is trained on exactly the text it sees at
    inference time; we never re-implement DSPy's format.
    """
    adapter = dspy.ChatAdapter()
    signatures = {False: predict_program().signature, True: cot_program().predict.signature}
    rng = random.Random(f"warmstart/{seed}")
    numbers = _numbers("train", count, seed)
    pool = _numbers("train", 512, seed + 1)
    conversations = []
    for n in numbers:
        cot = rng.random() < recipe.p_cot
        demos = []
        if rng.random() < recipe.p_demos:
            for d in rng.sample(pool, rng.randint(1, 3)):
                demos.append({"question": QUESTION.format(n=d), **_outputs(d, str(d % 10), cot)})
        answer = _noisy_label(n, recipe.p_wrong_long_demos if demos else recipe.p_wrong_long, rng)
        data = adapter.format_finetune_data(
            signature=signatures[cot],
            demos=demos,
            inputs={"question": QUESTION.format(n=n)},
            outputs=_outputs(n, answer, cot),
        )
        conversations.append(data["messages"])
    return conversations


# --- measuring a program on the held-out split -----------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """Parse rate and accuracy on held-out questions, split by the part the model is unreliable on."""

    n: int
    parse_rate: float
    accuracy: float
    accuracy_short: float
    accuracy_long: float

    def __str__(self) -> str:
        return (f"n={self.n} parse={self.parse_rate:.1%} acc={self.accuracy:.1%} "
                f"(short {self.accuracy_short:.1%}, long {self.accuracy_long:.1%})")


def measure(program: dspy.Module, lm: dspy.LM, n: int = 500, split: str = "test", num_threads: int = 8) -> Measurement:
    """Run ``program`` on ``n`` held-out questions with ``dspy.Evaluate`` and a fallback-free ChatAdapter.

    A parse failure counts as wrong and as unparsed (it is not retried through the JSON adapter).
    """
    data = load(split, n)
    adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)
    with dspy.context(lm=lm, adapter=adapter):
        result = dspy.Evaluate(devset=data, metric=correct, num_threads=num_threads, display_progress=False,
                               max_errors=n + 1, provide_traceback=False)(program)
    parsed = [pred is not None and pred.get("answer") is not None for _, pred, _ in result.results]
    scores = [float(s) for _, _, s in result.results]
    long_scores = [s for (ex, _, _), s in zip(result.results, scores) if is_long(ex)]
    short_scores = [s for (ex, _, _), s in zip(result.results, scores) if not is_long(ex)]

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else 0.0

    return Measurement(n, mean([float(p) for p in parsed]), mean(scores), mean(short_scores), mean(long_scores))


# --- registration hook (programs.registry) ---------------------------------------------------


def rubric():
    """Correctness gated on format: a parsed, correct digit scores 1; a parsed wrong one 0.25; no parse 0."""
    from metrics import ExactMatch, FormatValidity, Rubric

    return Rubric([ExactMatch("answer", name="correct"), FormatValidity(["answer"])],
                  weights={"correct": 3, "format": 1}, gates={"correct": "format"}, name="last_digit")


def task(min_digits: int = MIN_DIGITS, max_digits: int = MAX_DIGITS):
    """The registered ``last_digit`` task; ``min_digits``/``max_digits`` set the difficulty (long = unreliable).

    The defaults give exactly :func:`load`'s examples, the distribution the tiny model was warm-started around.
    """
    from programs.registry import Task
    from programs.tasks.splits import SplitError

    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got min_digits={min_digits}, max_digits={max_digits}")
    space = 10**max_digits - 10 ** (min_digits - 1)
    share = {"train": 0.75, "val": 0.08, "test": 0.08}  # a little under the hash buckets' 80/10/10

    def loader(split: str, n: int, seed: int) -> list[dspy.Example]:
        if n > space * share[split]:
            raise SplitError(f"last_digit with {min_digits}-{max_digits} digits has only about "
                             f"{int(space * share[split])} {split} numbers; asked for {n}")
        return load(split, n, seed, min_digits=min_digits, max_digits=max_digits)

    return Task(
        name="last_digit",
        description=f"What is the last digit of N? (N of {min_digits}-{max_digits} digits; the embedded model's "
                    f"warm-start task)",
        loader=loader,
        programs={"predict": predict_program, "cot": cot_program},
        rubric_factory=rubric,
        default_program="predict",
        gold_metric=correct,
        options={"min_digits": min_digits, "max_digits": max_digits},
    )


def long_task(max_digits: int = MAX_DIGITS):
    """``last_digit`` on long numbers only: the part the warm-start made unreliable (most headroom)."""
    from dataclasses import replace

    base = task(min_digits=LONG_DIGITS, max_digits=max_digits)
    return replace(base, name="last_digit_long",
                   description=f"What is the last digit of N? (N of {LONG_DIGITS}-{max_digits} digits only: "
                               f"where the tiny model is unreliable)")
