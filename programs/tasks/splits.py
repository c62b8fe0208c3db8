"""Deterministic, disjoint train/val/test splits for every task, by hashing a stable key per example.

Why hashing and not shuffling: a split fixed by a hash of the example's own content (a number, a question, an
id) never depends on how many examples were asked for or on the seed, so train, val and test stay disjoint
whatever sizes and seeds an experiment uses, and a growing dataset never moves old examples between splits.
The seed only chooses *which* examples of a split are drawn and in what order.

Example:
    >>> split_of("What is 2 + 2?") in SPLITS
    True
    >>> take(["a", "b", "c", "d"], "train", 2, key=str, seed=0, ratios=(1.0, 0.0, 0.0))
    ['c', 'b']
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

SPLITS = ("train", "val", "test")
DEFAULT_RATIOS = (0.8, 0.1, 0.1)
_BUCKETS = 10_000

T = TypeVar("T")


class SplitError(ValueError):
    """An unknown split name, bad ratios, a negative size, or more examples asked for than a split holds."""


def check_split(split: str) -> str:
    """Return ``split`` if it is one of :data:`SPLITS`, else raise :class:`SplitError` naming the valid ones."""
    if split not in SPLITS:
        raise SplitError(f"unknown split {split!r}; expected one of {SPLITS}")
    return split


def check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    """Validate (train, val, test) fractions: three non-negative numbers summing to 1."""
    values = tuple(float(r) for r in ratios)
    if len(values) != 3 or any(r < 0 for r in values) or abs(sum(values) - 1.0) > 1e-6:
        raise SplitError(f"split ratios must be three non-negative fractions (train, val, test) summing to 1, "
                         f"got {tuple(ratios)!r}")
    return values  # type: ignore[return-value]


def split_of(key: str, ratios: Sequence[float] = DEFAULT_RATIOS, salt: str = "") -> str:
    """The split an example with this stable ``key`` belongs to (a sha256 bucket; ``salt`` re-deals the splits)."""
    train, val, _ = check_ratios(ratios)
    bucket = int(hashlib.sha256(f"{salt}{key}".encode()).hexdigest()[:12], 16) % _BUCKETS
    if bucket < round(train * _BUCKETS):
        return "train"
    return "val" if bucket < round((train + val) * _BUCKETS) else "test"


def take(
    items: Iterable[T],
    split: str,
    n: int | None,
    *,
    key: Callable[[T], str],
    group: Callable[[T], str] | None = None,
    seed: int = 0,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    salt: str = "",
) -> list[T]:
    """``n`` items of ``split`` from a finite collection, in a seeded order (``n=None``: all of them).

    Items with equal ``key`` are kept once. ``group`` (default: ``key``) is what is hashed: items of one group
    (e.g. every question about one entity) always share a split. Raises :class:`SplitError` when the split
    holds fewer than ``n`` items.
    """
    check_split(split)
    if n is not None and n < 0:
        raise SplitError(f"n must be >= 0, got {n}")
    seen: set[str] = set()
    pool = []
    for item in items:
        k = key(item)
        if k not in seen and split_of(group(item) if group else k, ratios, salt) == split:
            seen.add(k)
            pool.append(item)
    random.Random(f"take/{split}/{seed}").shuffle(pool)
    if n is None:
        return pool
    if n > len(pool):
        raise SplitError(f"asked for {n} {split} examples but the {split} split holds only {len(pool)}; "
                         f"ask for fewer (or change the split ratios)")
    return pool[:n]

