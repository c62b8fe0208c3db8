"""Rollouts: run a whole DSPy program G times per example on the policy, recording every LM call.

Why: the unit of reward is a *program execution* (several predictors, tool loops), but the unit of
training is an *LM call*. A rollout keeps both: the program's prediction (scored once by the rubric) and
the engine's exact records of every call it made (each becomes a training row with the rollout's reward).

Rollouts run concurrently in threads so the engine can micro-batch them. A rollout whose output does not
parse, or whose program raises, is kept: its prediction carries ``cotune_error`` (the convention of
``metrics.ERROR_KEY``) plus whatever fields DSPy could parse, and its calls are still trained on with the
configured failure score (that is the signal that teaches format).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import dspy
from dspy.utils.exceptions import AdapterParseError

from metrics import ERROR_KEY, call_metric
from rl import dspy_seam
from rl.trace import LMCall, recording


@dataclass
class Rollout:
    """One execution of the program on one example.

    Attributes:
        example_index: position of the example in the batch (the GRPO group id).
        sample: which of the G samples this is.
        prediction: what the program returned (on failure: a prediction with ``cotune_error``).
        calls: every policy LM call made during the execution, in order.
        error: why the run failed (parse error or exception), or ``None``.
        reward: the scalar reward.
        components: per-component reward values, when the metric reports them.
        feedback: textual feedback from the metric, when it gives any.
    """

    example_index: int
    sample: int
    example: dspy.Example
    prediction: dspy.Prediction
    calls: list[LMCall] = field(default_factory=list)
    error: str | None = None
    reward: float = 0.0
    components: dict[str, float] = field(default_factory=dict)
    feedback: str = ""

    @property
    def texts(self) -> list[str]:
        """The completion text of every LM call of this rollout."""
        return [c.text for c in self.calls]


def _failed_prediction(exc: Exception) -> tuple[dspy.Prediction, str]:
    if isinstance(exc, AdapterParseError):
        partial = exc.parsed_result if isinstance(exc.parsed_result, dict) else {}
        message = f"parse error ({exc.adapter_name}): the output did not match the signature's fields"
        return dspy.Prediction(**partial, **{ERROR_KEY: message}), message
    message = f"{type(exc).__name__}: {exc}"
    return dspy.Prediction(**{ERROR_KEY: message}), message


class RolloutThreads:
    """The worker threads rollouts run on, kept across calls (one pool per size) until :meth:`close`.

    Why an owner: starting 64 threads every step costs more than a tiny model's step, so a stage keeps its threads
    for all its steps; and threads kept at module level would outlive every stage that used them. A stage opens one
    (``with RolloutThreads() as threads:``) and passes it to each :func:`run_rollouts`; a lone call makes its own.
    """

    def __init__(self) -> None:
        self._pools: dict[int, ThreadPoolExecutor] = {}
        self._lock = threading.Lock()
        self._closed = False

    def pool(self, workers: int) -> ThreadPoolExecutor:
        """The pool of ``workers`` threads (made on first use)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("these rollout threads were closed; open a new RolloutThreads")
            if workers not in self._pools:
                self._pools[workers] = ThreadPoolExecutor(max_workers=workers,
                                                          thread_name_prefix=f"cotune-rollout{workers}")
            return self._pools[workers]

    def close(self) -> None:
        """Stop every thread (after the work already handed to them); idempotent."""
        with self._lock:
            pools, self._pools, self._closed = list(self._pools.values()), {}, True
        for pool in pools:
            pool.shutdown(wait=True)

    def __enter__(self) -> RolloutThreads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_rollouts(
    program: dspy.Module,
    examples: Sequence[dspy.Example],
    lm: dspy.LM,
    metric: Callable,
    num_generations: int,
    *,
    format_failure_score: float = 0.0,
    num_threads: int = 16,
    adapter: dspy.Adapter | None = None,
    tag: Any = None,
    first_index: int = 0,
    threads: RolloutThreads | None = None,
) -> list[Rollout]:
    """Run ``program`` ``num_generations`` times on each example, concurrently, and score each run.

    Args:
        program: the DSPy program; it is called, never modified.
        examples: examples with inputs set (``with_inputs``).
        lm: the policy LM to sample from (temperature > 0, ``cache=False``).
        metric: ``metric(example, prediction, trace)`` -> float / bool / Prediction(score, feedback) / Score.
        num_generations: G, the rollouts per example.
        format_failure_score: reward of a run that failed to parse or raised.
        num_threads: concurrent program executions (the engine batches their LM calls).
        adapter: DSPy adapter; default ``ChatAdapter`` without the JSON fallback, so a parse failure is scored
            as a failure instead of silently retried in another format.
        tag: prefix of each rollout's recording tag ``(tag, example, sample)``; the engine derives sampling
            seeds from it, so the same tag samples the same tokens whatever the thread scheduling.
        first_index: the ``example_index`` of ``examples[0]``; a caller that samples one batch in several calls
            (the weight stage's dynamic sampling) numbers them on, so that group ids and tags stay distinct.
        threads: the caller's :class:`RolloutThreads`, reused across its calls; default: threads for this call only.

    Returns:
        ``len(examples) * num_generations`` rollouts, ordered by (example, sample).
    """
    adapter = adapter or dspy.ChatAdapter(use_json_adapter_fallback=False)
    jobs = [(i, g) for i in range(len(examples)) for g in range(num_generations)]

    # Worker threads start with DSPy's global settings only: carry the caller's dspy.context overrides
    # (open recordings, callbacks, ...) into them, as DSPy's own ParallelExecutor does.
    parent = dspy_seam.context_overrides()

    def run(k: int, finished: Callable[[], None]) -> Rollout:
        i, g = jobs[k]
        example = examples[i]
        rollout = Rollout(example_index=first_index + i, sample=g, example=example, prediction=dspy.Prediction())
        overrides = {**parent, "lm": lm, "adapter": adapter, "trace": []}
        with dspy.context(**overrides), recording(tag=(tag, first_index + i, g)) as calls:
            try:
                rollout.prediction = program(**example.inputs())
            except Exception as exc:  # noqa: BLE001 - a failed run is data, not a crash
                rollout.prediction, rollout.error = _failed_prediction(exc)
            finally:
                finished()  # the program makes no more calls; the metric below makes none on the policy
            trace = list(dspy.settings.trace or [])
        rollout.calls = calls
        if rollout.error is not None:
            rollout.reward = float(format_failure_score)
        else:
            score = call_metric(metric, example, rollout.prediction, trace)
            rollout.reward, rollout.components, rollout.feedback = score.value, score.components, score.feedback
        return rollout

    return _play(run, len(jobs), lm, num_threads, threads)


def _play(play: Callable[[int, Callable[[], None]], Rollout], n: int, lm: dspy.LM, num_threads: int,
          threads: RolloutThreads | None) -> list[Rollout]:
    """``[play(k, finished) for k in range(n)]``, played by up to ``num_threads`` workers; ``play`` calls
    ``finished()`` once its program makes no more LM calls.

    Each worker plays rollouts one after another, taking the next as soon as its program returns. Every worker is
    declared to a batching engine as one caller (done when it takes no more rollouts), so each engine batch holds
    one call from every worker still playing, whatever time each worker's Python work between calls takes; an
    undeclared worker would leave batching to a timing window, which splits them.
    """
    results: list[Rollout | None] = [None] * n
    pending = iter(range(n))
    take_lock = threading.Lock()

    def take() -> int | None:
        with take_lock:
            return next(pending, None)

    def worker(done: Callable[[], None]) -> None:
        following = [take()]

        def finished() -> None:
            following[0] = take()
            if following[0] is None:
                done()

        if following[0] is None:
            done()
        while following[0] is not None:
            k = following[0]
            results[k] = play(k, finished)

    workers = max(1, min(num_threads, n))
    clients = getattr(dspy_seam.engine_of(lm), "clients", None)
    declared = clients(workers) if clients is not None else contextlib.nullcontext(lambda: None)
    with declared as done:
        if workers == 1:
            worker(done)
        else:
            with contextlib.ExitStack() as stack:
                pool = (threads or stack.enter_context(RolloutThreads())).pool(workers)
                for future in [pool.submit(worker, done) for _ in range(workers)]:
                    future.result()
    return results  # type: ignore[return-value]  # every index was played
