"""The bundled corpus and its BM25 index (``bm25s``), shared by the multi-hop and tool-use tasks.

Why in memory: the corpus is a few hundred short passages; ``bm25s`` indexes it in well under a second, so
building the index at first use is simpler and safer than caching an index file that could go stale. One index
per process is shared by every program copy (optimizers deepcopy programs; :class:`Retriever` is not copied).

Example:
    >>> retriever = default_retriever()
    >>> hit = retriever.search("Vialem Industries", k=1)[0]
    >>> hit.title
    'Vialem Industries'
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from programs.tasks.world import CORPUS_DIR

__all__ = ["CorpusError", "Passage", "Retriever", "count_option", "default_retriever", "read_jsonl"]


class CorpusError(FileNotFoundError):
    """A bundled corpus file is missing (a broken install): the message says how to regenerate it."""


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str

    def __str__(self) -> str:
        return f"{self.title}: {self.text}" if not self.text.startswith(self.title) else self.text


def read_jsonl(name: str, directory: Path = CORPUS_DIR) -> list[dict]:
    """Rows of a bundled JSON-lines file (``passages.jsonl``, ``multihop.jsonl``, ``tools.jsonl``)."""
    path = directory / name
    if not path.is_file():
        raise CorpusError(f"bundled corpus file {path} is missing; regenerate it with `python -m programs.tasks.world`")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def question_loader(task: str, name: str, kinds: Sequence[str], all_kinds: Sequence[str],
                    to_example: Callable[[dict], Any]) -> Callable[[str, int, int], list]:
    """A task loader over a bundled question file, restricted to ``kinds`` and split by entity group.

    Questions about one founder/company pair share a ``group``, so a split never sees a pair another split has.

    Raises:
        programs.registry.TaskOptionError: ``kinds`` is empty or names a kind the file does not have.
    """
    from programs.registry import TaskOptionError
    from programs.tasks.splits import take

    kinds = tuple(kinds)
    if not kinds or set(kinds) - set(all_kinds):
        raise TaskOptionError(f"{task} kinds must be a non-empty subset of {tuple(all_kinds)}, got {list(kinds)}")

    def loader(split: str, n: int, seed: int) -> list:
        rows = [r for r in read_jsonl(name) if r["kind"] in kinds]
        chosen = take(rows, split, n, key=lambda r: r["id"], group=lambda r: r["group"], seed=seed)
        return [to_example(r) for r in chosen]

    return loader


def count_option(value: Any, what: str) -> None:
    """Refuse a task option that counts something (passages, steps) unless it is an int >= 1.

    Raises:
        programs.registry.TaskOptionError: naming ``what`` and the value given.
    """
    from programs.registry import TaskOptionError

    if not isinstance(value, int) or value < 1:
        raise TaskOptionError(f"{what} must be an int >= 1, got {value!r}")


def _tokenize(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class Retriever:
    """BM25 over passages: ``search(query, k)`` for the top-k, ``lookup(name)`` for a title (or the best hit).

    Thread-safe (rollouts search from many threads); deep copies share the index (``__deepcopy__`` is identity).
    """

    def __init__(self, passages: list[Passage]) -> None:
        import bm25s

        if not passages:
            raise ValueError("a Retriever needs at least one passage")
        self.passages = list(passages)
        self._by_title = {p.title.casefold(): p for p in self.passages}
        self._index = bm25s.BM25()
        self._index.index(_tokenize([f"{p.title} {p.text}" for p in self.passages]), show_progress=False)
        self._lock = threading.Lock()

    def __deepcopy__(self, memo) -> Retriever:
        return self

    def __len__(self) -> int:
        return len(self.passages)

    def search(self, query: str, k: int = 3) -> list[Passage]:
        """The ``k`` best passages for ``query`` (fewer when the query shares no word with the corpus)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        tokens = _tokenize([str(query)])
        if not tokens[0]:
            return []
        with self._lock:
            docs, scores = self._index.retrieve(tokens, k=min(k, len(self.passages)), show_progress=False, n_threads=1)
        return [self.passages[int(d)] for d, s in zip(docs[0], scores[0]) if s > 0]

    def lookup(self, name: str) -> Passage | None:
        """The passage titled ``name`` (case-insensitive), else the best BM25 hit, else ``None``."""
        exact = self._by_title.get(str(name).strip().casefold())
        if exact is not None:
            return exact
        hits = self.search(name, k=1)
        return hits[0] if hits else None


@functools.lru_cache(maxsize=1)
def passages() -> tuple[Passage, ...]:
    """The bundled passages."""
    return tuple(Passage(r["id"], r["title"], r["text"]) for r in read_jsonl("passages.jsonl"))


_DEFAULT: Retriever | None = None
_DEFAULT_LOCK = threading.Lock()


def default_retriever() -> Retriever:
    """The process-wide retriever over the bundled corpus (built on first use)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Retriever(list(passages()))
        return _DEFAULT
