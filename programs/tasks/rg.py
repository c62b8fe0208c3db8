"""Easy skills from ``reasoning-gym``'s seeded generators: arithmetic, chain sums, letter counting, spelling backward.

Why: reasoning-gym (offline, PyPI) ships >100 procedural generators, each with its own ``score_answer``
verifier, so every skill here is a task with unlimited deterministic data and a trustworthy correctness check.
Their default difficulty is set low (short expressions, short spans) so that small models score above zero;
every generator option can be changed through the task's options (``get_task("rg_chain_sum", max_terms=5)``).

Splits are disjoint by a hash of the question text (see :mod:`programs.tasks.splits`): a question that two
seeds both generate always lands in the same split.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
from typing import Any

import dspy

from metrics import FormatValidity, Rubric
from programs.tasks.splits import SplitError, split_of

__all__ = ["RGScore", "basic_arithmetic", "chain_sum", "letter_counting", "make_task", "spell_backward"]

VIRTUAL_SIZE = 100_000  # reasoning-gym datasets are indexable up to their (virtual) size


@functools.lru_cache(maxsize=64)
def _dataset(name: str, config_items: tuple[tuple[str, Any], ...], seed: int):
    import reasoning_gym

    return reasoning_gym.create_dataset(name, seed=seed, size=VIRTUAL_SIZE, **dict(config_items))


def _config_items(name: str, config: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Validate generator options against reasoning-gym's config dataclass; a hashable, sorted form."""
    from reasoning_gym.factory import DATASETS

    from programs.registry import TaskOptionError

    if name not in DATASETS:
        raise TaskOptionError(f"reasoning-gym has no dataset {name!r}")
    config_cls = DATASETS[name][1]
    fields = {f.name for f in dataclasses.fields(config_cls)} - {"seed", "size"}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise TaskOptionError(f"reasoning-gym {name!r} has no options {unknown}; its options are {sorted(fields)}")
    items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in config.items()))
    try:
        config_cls(**dict(items)).validate()
    except AssertionError as exc:
        raise TaskOptionError(f"invalid options for reasoning-gym {name!r} {dict(items)}: {exc}") from exc
    return items


class RGScore:
    """Rubric component: reasoning-gym's own ``score_answer`` verifier on the predicted ``answer``.

    Picklable: it keeps the dataset's name and options and rebuilds the (cached) dataset object on demand.
    """

    def __init__(self, dataset: str, config_items: tuple[tuple[str, Any], ...] = (), name: str = "correct") -> None:
        self.dataset = dataset
        self.config_items = config_items
        self.name = name

    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> tuple[float, str]:
        answer = prediction.get("answer") if hasattr(prediction, "get") else getattr(prediction, "answer", None)
        if answer is None:
            return 0.0, "no answer field"
        entry = {"question": example["question"], "answer": example["answer"], "metadata": example["metadata"]}
        value = float(_dataset(self.dataset, self.config_items, 0).score_answer(str(answer).strip(), entry))
        return value, "" if value >= 1.0 else f"expected {example['answer']!r}, got {str(answer)[:80]!r}"

    def __repr__(self) -> str:
        return f"RGScore({self.dataset!r}, {dict(self.config_items)})"


def predict_program() -> dspy.Module:
    """``question -> answer`` in one call."""
    return dspy.Predict("question -> answer")


def cot_program() -> dspy.Module:
    """``question -> reasoning, answer``."""
    return dspy.ChainOfThought("question -> answer")


def make_task(registered: str, dataset: str, description: str, defaults: dict[str, Any], config: dict[str, Any]):
    """A :class:`~programs.registry.Task` over reasoning-gym's ``dataset`` with ``defaults`` updated by ``config``."""
    from programs.registry import Task

    items = _config_items(dataset, {**defaults, **config})

    def loader(split: str, n: int, seed: int) -> list[dspy.Example]:
        # One generator stream per seed (not per split): the hash of each question picks its split.
        rg_seed = int(hashlib.sha256(f"{registered}/{seed}".encode()).hexdigest()[:8], 16)
        data = _dataset(dataset, items, rg_seed)
        seen: set[str] = set()
        out: list[dspy.Example] = []
        for idx in itertools.count():
            if len(out) >= n:
                break
            if idx >= min(VIRTUAL_SIZE, 200 * n + 1000):
                raise SplitError(f"{registered}: only {len(out)} distinct {split} questions in {idx} draws; "
                                 f"the options {dict(items)} allow too few distinct items")
            entry = data[idx]
            question = entry["question"]
            if question in seen or split_of(question) != split:
                continue
            seen.add(question)
            out.append(dspy.Example(question=question, answer=str(entry["answer"]),
                                    metadata=entry["metadata"]).with_inputs("question"))
        return out

    def rubric() -> Rubric:
        return Rubric([RGScore(dataset, items), FormatValidity(["answer"])], weights={"correct": 3, "format": 1},
                      gates={"correct": "format"}, name=registered)

    return Task(
        name=registered,
        description=description,
        loader=loader,
        programs={"predict": predict_program, "cot": cot_program},
        rubric_factory=rubric,
        default_program="predict",
        gold_metric=Rubric([RGScore(dataset, items)], name=f"{registered}_gold"),
        options=dict(items),
    )


def basic_arithmetic(**config: Any):
    """``rg_basic_arithmetic``: "Calculate 12 + 7 * 3." (2-3 terms of 1-2 digits by default)."""
    return make_task("rg_basic_arithmetic", "basic_arithmetic", "Evaluate a short arithmetic expression "
                     "(reasoning-gym basic_arithmetic)",
                     {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}, config)


def chain_sum(**config: Any):
    """``rg_chain_sum``: "4 + 13 - 7 =" (2-3 terms of 1-2 digits by default)."""
    return make_task("rg_chain_sum", "chain_sum", "Add and subtract a chain of numbers (reasoning-gym chain_sum)",
                     {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}, config)


def letter_counting(**config: Any):
    """``rg_letter_counting``: how many times a letter appears in a span of 3-6 words (by default)."""
    return make_task("rg_letter_counting", "letter_counting", "Count a letter's occurrences in a short text "
                     "(reasoning-gym letter_counting)", {"min_words": 3, "max_words": 6}, config)


def spell_backward(**config: Any):
    """``rg_spell_backward``: spell a 3-6 letter word backward (by default)."""
    return make_task("rg_spell_backward", "spell_backward", "Spell a word backward (reasoning-gym spell_backward)",
                     {"min_word_len": 3, "max_word_len": 6}, config)
