"""An LM-as-judge rubric component: ask any ``dspy.LM`` to grade a response against a criterion.

Why this module exists: many tasks have no exact answer, so part of the reward must come from a
judge model. The judge is an ordinary DSPy program (``dspy.Predict`` of :class:`JudgeSignature`), so
it works with every LM DSPy supports, including ``DummyLM`` in tests. Judging the same response twice
costs nothing: the judge keeps its own cache (optionally persisted as JSON), independent of DSPy's LM
cache and of the policy model's version suffix.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dspy

from metrics.base import ERROR_KEY, MISSING, ComponentResult, PicklableLock, get_field, input_items
from metrics.errors import JudgeError, RubricConfigError
from metrics.parsing import parse_number

__all__ = ["JudgeSignature", "LMJudge"]


class JudgeSignature(dspy.Signature):
    """Grade the response to a task against the criterion. Be strict and consistent. Give a one- or
    two-sentence justification that cites the response, then a single number on the given scale."""

    criterion: str = dspy.InputField(desc="what a good response does")
    task_inputs: str = dspy.InputField(desc="the task's inputs, one 'name: value' per line")
    response: str = dspy.InputField(desc="the response to grade")
    scale: str = dspy.InputField(desc="the allowed score range")
    justification: str = dspy.OutputField(desc="why this score")
    score: str = dspy.OutputField(desc="one number within the scale, nothing else")


class LMJudge(PicklableLock):
    """Rubric component scoring a prediction with an LM judge; the justification becomes the feedback.

    The judge's score is the first number in its ``score`` field ("4/5" reads as 4), mapped from ``scale`` to
    ``[0, 1]`` (e.g. 1..5: 4 -> 0.75); scores outside the scale are clipped (noted in the feedback). An
    empty or missing response scores 0 without calling the LM.

    Args:
        criterion: What a good response does, in plain words.
        lm: The judge ``dspy.LM``; ``None`` uses ``dspy.settings.lm`` at call time.
        name: Component name in the rubric.
        input_fields: Example fields shown to the judge as the task; ``None``: ``example.inputs()`` (every
            field when inputs are not marked, which would show gold labels: mark inputs or list fields).
        field: Prediction field to judge; ``None`` judges all output fields.
        scale: ``(low, high)`` score range the judge is asked to use, e.g. ``(1, 5)``.
        deterministic: Call the LM with ``temperature=0.0`` (default); ``False`` uses the LM's own settings.
        cache: Keep a judgment cache keyed by a hash of criterion, scale, inputs, response and LM model.
        cache_path: JSON file to load the cache from and persist it to (written atomically).

    Example:
        >>> from dspy.utils import DummyLM
        >>> judge = LMJudge("Is the answer polite?", lm=DummyLM([{"justification": "Says please.", "score": "4"}]),
        ...                 scale=(1, 5))
        >>> judge({"question": "Pass the salt"}, {"answer": "Here, please."})
        ComponentResult(value=0.75, feedback='Says please.')
        >>> judge({"question": "Pass the salt"}, {"answer": "Here, please."}).value, judge.lm_calls  # cached
        (0.75, 1)
    """

    def __init__(
        self,
        criterion: str,
        lm: Any = None,
        name: str = "judge",
        input_fields: Sequence[str] | None = None,
        field: str | None = "answer",
        *,
        scale: tuple[float, float] = (0.0, 1.0),
        deterministic: bool = True,
        cache: bool = True,
        cache_path: str | os.PathLike[str] | None = None,
    ) -> None:
        if not criterion or not str(criterion).strip():
            raise RubricConfigError("LMJudge needs a non-empty criterion")
        low, high = float(scale[0]), float(scale[1])
        if not high > low:
            raise RubricConfigError(f"LMJudge scale must be (low, high) with high > low, got {scale!r}")
        self.criterion = str(criterion)
        self.lm = lm
        self.name = name
        self.input_fields = None if input_fields is None else list(input_fields)
        self.field = field
        self.scale = (low, high)
        self.deterministic = deterministic
        self.cache_enabled = cache
        self.cache_path = None if cache_path is None else str(cache_path)
        self.lm_calls = 0
        self.cache_hits = 0
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, str]] = self._load_cache() if cache else {}

    # ----------------------------------------------------------------- cache
    def _load_cache(self) -> dict[str, tuple[float, str]]:
        if self.cache_path is None or not Path(self.cache_path).exists():
            return {}
        try:
            data = json.loads(Path(self.cache_path).read_text(encoding="utf-8"))
            return {k: (float(v[0]), str(v[1])) for k, v in data.items()}
        except (ValueError, TypeError, IndexError, AttributeError) as e:
            raise JudgeError(f"judge cache {self.cache_path} is not a valid cache file ({e}); delete it or pass "
                             "another cache_path") from e

    def _save_cache(self) -> None:
        if self.cache_path is None:
            return
        path = Path(self.cache_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({k: list(v) for k, v in self._cache.items()}, f)
        os.replace(tmp, path)

    def clear_cache(self) -> None:
        """Forget every cached judgment (the JSON file, if any, is rewritten on the next new judgment)."""
        with self._lock:
            self._cache.clear()

    @property
    def cache_size(self) -> int:
        """Number of cached judgments."""
        with self._lock:
            return len(self._cache)

    def cache_key(self, task_inputs: str, response: str, model: str | None = None) -> str:
        """Hash identifying one judgment: criterion, scale, task inputs, response and judge model."""
        blob = json.dumps([self.criterion, self.scale, task_inputs, response, model], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    # ----------------------------------------------------------------- rendering
    def _task_inputs(self, example: Any) -> str:
        if self.input_fields is None:
            items = input_items(example)
        else:
            items = {f: get_field(example, f, "") for f in self.input_fields}
        return "\n".join(f"{k}: {v}" for k, v in items.items())

    def _response(self, prediction: Any) -> str:
        if self.field is not None:
            value = get_field(prediction, self.field)
            return "" if value is MISSING or value is None else str(value)
        items = prediction.items() if hasattr(prediction, "items") else []
        return "\n".join(f"{k}: {v}" for k, v in items if k != ERROR_KEY)

    # ----------------------------------------------------------------- scoring
    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> ComponentResult:
        response = self._response(prediction)
        if not response.strip():
            error = get_field(prediction, ERROR_KEY, None)
            return ComponentResult(0.0, "no response to judge" + (f" (program failed: {error})" if error else ""))
        task_inputs = self._task_inputs(example)
        lm = self.lm if self.lm is not None else dspy.settings.lm
        key = self.cache_key(task_inputs, response, getattr(lm, "model", None))
        if self.cache_enabled:
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self.cache_hits += 1
            if hit is not None:
                return ComponentResult(*hit)
        if lm is None:
            raise JudgeError(f"LMJudge {self.name!r} has no LM: pass lm=dspy.LM(...) or call dspy.configure(lm=...)")
        value, justification = self._ask(lm, task_inputs, response)
        with self._lock:
            self.lm_calls += 1
            if self.cache_enabled:
                self._cache[key] = (value, justification)
                self._save_cache()
        return ComponentResult(value, justification)

    def _ask(self, lm: Any, task_inputs: str, response: str) -> tuple[float, str]:
        low, high = self.scale
        config = {"temperature": 0.0} if self.deterministic else {}
        # trace=None keeps the judge's call out of the program's trace (bootstrapping, GRPO rollouts); DSPy's own
        # `_trace=False` keyword works too but warns on every call that `_trace` is not a signature field
        with dspy.context(trace=None):
            out = dspy.Predict(JudgeSignature)(
                criterion=self.criterion, task_inputs=task_inputs, response=response,
                scale=f"a number from {low:g} (worst) to {high:g} (best)", lm=lm, config=config)
        raw = get_field(out, "score", None)
        number = parse_number(raw, which="first", fractions=False)  # "4/5" on a 1..5 scale is 4
        if number is None:
            raise JudgeError(f"judge {self.name!r} returned no number as its score: {raw!r:.80}; use a stronger "
                             "judge LM or a clearer criterion")
        justification = str(get_field(out, "justification", "") or "").strip()
        value = (number - low) / (high - low)
        if not 0.0 <= value <= 1.0:
            justification += f" (score {number:g} outside {low:g}..{high:g}, clipped)"
            value = min(1.0, max(0.0, value))
        return value, justification

    # ----------------------------------------------------------------- pickling / repr
    def __repr__(self) -> str:
        return f"LMJudge({self.criterion!r:.60}, name={self.name!r}, field={self.field!r}, scale={self.scale})"


