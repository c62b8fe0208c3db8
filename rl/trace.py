"""What the policy engine records about every LM call, and how a caller collects those records.

Why: the weight stage trains on *exactly* the token ids the model received and produced. The engine
tokenizes once and records the ids here; nothing downstream re-renders text to reconstruct them
(DSPy's own GRPO does, and trains off-policy because of it).

Collection uses DSPy's context (``dspy.context(...)``) rather than a bare ``contextvars.ContextVar``,
because DSPy's ``ParallelExecutor`` (behind ``dspy.Evaluate``/``dspy.Parallel``) copies its context
overrides into its worker threads: a ``recording()`` opened around an evaluation sees every call.

Example:
    >>> from rl.trace import recording
    >>> with recording(tag="rollout-0") as calls:   # doctest: +SKIP
    ...     program(question="What is the last digit of 123?")
    >>> calls[0].completion_ids                     # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import dspy

from rl import dspy_seam

_SETTINGS_KEY = "cotune_recorders"


@dataclass(frozen=True)
class LMCall:
    """One generation by the policy engine, as the model saw and produced it.

    Attributes:
        call_id: engine-wide sequence number.
        model: the versioned model string the call was made under (``local/<name>@v<k>-<hash>``).
        version: the adapter version that produced the completion.
        messages: the chat messages (system first) exactly as received from DSPy's adapter.
        prompt_ids: token ids fed to the model (chat template applied, no padding).
        completion_ids: token ids sampled, including the EOS token when the model stopped on it.
        text: the completion as returned to DSPy (special tokens removed, cut at a stop string).
        finish_reason: ``"stop"`` (EOS or stop string) or ``"length"``.
        predictor: the ``dspy.Predict`` that made the call (``None`` outside a DSPy module).
        modules: class names of the DSPy modules on the call stack, outermost first.
        temperature, top_p, top_k, max_tokens, seed: the sampling settings used.
        tag: the tag of the innermost :func:`recording` active for the call.
        completion_logprobs: the sampler's log-probability of each completion token, when the engine samples from
            another copy of the model (vLLM); ``None`` for the in-process engine, which samples from the trainer's.
    """

    call_id: int
    model: str
    version: int
    messages: tuple[dict[str, str], ...]
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    text: str
    finish_reason: str
    predictor: Any = field(default=None, repr=False, compare=False)
    modules: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int = 0
    seed: int | None = None
    tag: Any = None
    completion_logprobs: tuple[float, ...] | None = field(default=None, repr=False)


class Recorder:
    """A thread-safe list of :class:`LMCall` with a tag."""

    def __init__(self, tag: Any = None) -> None:
        self.tag = tag
        self._calls: list[LMCall] = []
        self._lock = threading.Lock()
        self._seeds = 0

    def next_seed(self) -> int | None:
        """A sampling seed derived from the tag and the call's index in this recording (``None`` without a tag).

        This makes tagged work (a rollout) sample the same tokens whatever thread or batch it runs in.
        """
        if self.tag is None:
            return None
        with self._lock:
            k, self._seeds = self._seeds, self._seeds + 1
        return int(hashlib.sha256(f"{self.tag!r}/{k}".encode()).hexdigest()[:15], 16)

    def append(self, call: LMCall) -> None:
        with self._lock:
            self._calls.append(call)

    @property
    def calls(self) -> list[LMCall]:
        with self._lock:
            return list(self._calls)


def active_recorders() -> tuple[Recorder, ...]:
    """The recorders open in the calling context (innermost last)."""
    return tuple(dspy.settings.get(_SETTINGS_KEY) or ())


@contextmanager
def recording(tag: Any = None) -> Iterator[list[LMCall]]:
    """Collect every engine call made inside the block (in this thread and DSPy's worker threads).

    Yields a list that is filled when the block exits (in call order). Recordings nest: an outer
    recording also sees the calls of an inner one.
    """
    recorder = Recorder(tag)
    calls: list[LMCall] = []
    with dspy.context(**{_SETTINGS_KEY: (*active_recorders(), recorder)}):
        try:
            yield calls
        finally:
            calls.extend(sorted(recorder.calls, key=lambda c: c.call_id))


def caller_info() -> tuple[Any, tuple[str, ...]]:
    """(calling predictor, module class names on the stack) from DSPy's context, in the calling thread."""
    modules = dspy_seam.caller_modules()
    predictor = next((m for m in reversed(modules) if isinstance(m, dspy.Predict)), None)
    return predictor, tuple(type(m).__name__ for m in modules)
