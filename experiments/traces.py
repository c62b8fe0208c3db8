"""Rollouts and evaluated predictions as MLflow traces, where a person can see what the program did and judge it.

Why: rewards and val scores say *how much*; a reviewer needs to see *what*. One trace is one run of the program on
one example: a span per predictor call (the messages, the completion, token counts) and per tool call (args,
observation, error), the rubric's total and each component as feedback (``LLM_JUDGE`` for an LM judge's
component, ``CODE`` for the rest), and the example's labels (the gold answer) as expectations. MLflow 3 stores
traces with their assessments, and its UI (the experiment's Traces page) shows them and lets a person add
``HUMAN`` feedback, which ``cotune review`` / ``cotune calibrate`` read back.

Only a sample goes there (a few per stage, :class:`experiments.tracking.MlflowTracking`'s ``traces_per_stage``):
a trace costs a few milliseconds of the stage, and a reviewer reads a handful, not thousands.

Three facts about MLflow 3.17 this module is built on (checked; tests/experiments/test_traces.py fails by name
when they change):

- traces are exported to the *process's* tracking URI; an ``MlflowClient``'s own URI is ignored for them (a trace
  started through a client of another store went to the default one). So the tracker sets the process's URI;
  ``cotune run`` uses one store per process.
- trace ids come from OpenTelemetry's generator, which draws from Python's ``random``; a seeded run reseeds it,
  and two stages drew the same id (one trace overwrote the other). The tracker turns on MLflow's isolated
  generator (``MLFLOW_TRACE_USE_ISOLATED_RANDOM_ID_GENERATOR``).
- an assessment logged on its own (``mlflow.log_feedback``) needs the trace already written: with MLflow's async
  export that meant a ~1.1 s flush per batch, or ~50 ms per trace written synchronously, too slow for a tiny model's
  stage. But the store writes the assessments a live trace carries when it exports it. So the rubric's feedback
  and the expectations are attached to the live trace (:func:`_attach`, the one place that touches MLflow's
  internals: ``InMemoryTraceManager``) and go in the same write, on MLflow's own export thread.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

RUBRIC_SOURCE_ID = "cotune.rubric"  # the CODE source of the rubric's feedback
DATA_SOURCE_ID = "cotune.dataset"  # the CODE source of the gold answers (expectations)
TOTAL = "reward"  # the feedback name of the rubric's total

__all__ = ["DATA_SOURCE_ID", "RUBRIC_SOURCE_ID", "TOTAL", "TraceCase", "example_id", "from_prediction", "from_rollout",
           "log_traces", "sample_rollouts"]


@dataclass
class TraceCase:
    """One run of the program on one example, in the terms a trace needs (plain data, no rl types).

    Attributes:
        name: the trace's name (``rollout`` or ``eval``).
        inputs: the example's inputs.
        outputs: the program's outputs (an error's message when it failed).
        expected: the example's labels (the gold answer), logged as expectations.
        total: the rubric's total for the run.
        components: each rubric component's value.
        rationale: the rubric's feedback text.
        calls: per predictor call: ``predictor``, ``messages``, ``completion``, ``prompt_tokens``,
            ``completion_tokens``.
        tools: per tool call: ``tool``, ``args``, ``observation``, ``error``.
        tags: trace tags (run, stage, step, example id, seed...).
    """

    name: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    expected: dict[str, Any]
    total: float
    components: dict[str, float] = field(default_factory=dict)
    rationale: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)


def _plain(value: Any) -> Any:
    """A JSON value: what MLflow can store as span inputs/outputs or an assessment value."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return str(value)


def _tool_steps(prediction: Any) -> list[dict[str, Any]]:
    """The tool calls in a ReAct-style ``trajectory`` (``tool_name_i``, ``tool_args_i``, ``observation_i``)."""
    trajectory = getattr(prediction, "trajectory", None) if prediction is not None else None
    if not isinstance(trajectory, Mapping):
        return []
    steps, i = [], 0
    while f"tool_name_{i}" in trajectory:
        observation = str(trajectory.get(f"observation_{i}", ""))
        steps.append({"tool": str(trajectory[f"tool_name_{i}"]), "args": _plain(trajectory.get(f"tool_args_{i}")),
                      "observation": observation,
                      "error": observation if observation.startswith("Execution error in ") else ""})
        i += 1
    return steps


def example_id(example: Any) -> str:
    """The example's ``id`` field when it has one, else a short hash of its inputs (stable across runs)."""
    import hashlib

    given = example.get("id") if hasattr(example, "get") else None
    if given is not None:
        return str(given)
    inputs = json.dumps(_plain(dict(example.inputs())), sort_keys=True)
    return hashlib.sha256(inputs.encode()).hexdigest()[:12]


def _outputs(prediction: Any) -> dict[str, Any]:
    if prediction is None:
        return {}
    return {k: _plain(v) for k, v in dict(prediction.items()).items() if k != "trajectory"}


def from_rollout(rollout: Any, predictor_name: Callable[[Any], str], tags: Mapping[str, Any]) -> TraceCase:
    """A weight stage's :class:`rl.rollouts.Rollout` as a :class:`TraceCase` (every LM call it made, its tools)."""
    example = rollout.example
    calls = [{"predictor": predictor_name(c.predictor), "messages": [dict(m) for m in c.messages],
              "completion": c.text, "prompt_tokens": len(c.prompt_ids), "completion_tokens": len(c.completion_ids),
              "finish_reason": c.finish_reason} for c in rollout.calls]
    outputs = _outputs(rollout.prediction) if rollout.error is None else {"error": rollout.error}
    return TraceCase(name="rollout", inputs=_plain(dict(example.inputs())), outputs=outputs,
                     expected={k: _plain(v) for k, v in dict(example.labels()).items()}, total=float(rollout.reward),
                     components=dict(rollout.components), rationale=rollout.feedback, calls=calls,
                     tools=_tool_steps(rollout.prediction),
                     tags={**{k: str(v) for k, v in tags.items()}, "cotune.example_id": example_id(example),
                           "cotune.sample": str(rollout.sample)})


def from_prediction(example: Any, prediction: Any, total: float, components: Mapping[str, float],
                    tags: Mapping[str, Any]) -> TraceCase:
    """An evaluation's prediction (greedy, after a stage) as a :class:`TraceCase`, without its LM calls."""
    return TraceCase(name="eval", inputs=_plain(dict(example.inputs())), outputs=_outputs(prediction),
                     expected={k: _plain(v) for k, v in dict(example.labels()).items()}, total=float(total),
                     components=dict(components), tools=_tool_steps(prediction),
                     tags={**{k: str(v) for k, v in tags.items()}, "cotune.example_id": example_id(example)})


def sample_rollouts(rollouts: Sequence[Any], k: int) -> list[Any]:
    """``k`` rollouts of different examples when there are enough (the first sample of each), in batch order."""
    firsts = [r for r in rollouts if r.sample == 0]
    rest = [r for r in rollouts if r.sample != 0]
    return (firsts + rest)[: max(0, k)]


def _attach(root: Any, assessments: list) -> None:
    """Put ``assessments`` on the live trace of ``root`` so they are written with it (MLflow internals, 3.17)."""
    from mlflow.tracing.trace_manager import InMemoryTraceManager

    with InMemoryTraceManager.get_instance().get_trace(root.trace_id) as trace:
        if trace is None:
            raise RuntimeError(f"MLflow has no live trace {root.trace_id}: mlflow.tracing internals changed")
        trace.info.assessments.extend(assessments)


def _assessments(case: TraceCase, trace_id: str, judges: Collection[str]) -> list:
    from mlflow.entities import AssessmentSource, Expectation, Feedback

    rubric = AssessmentSource(source_type="CODE", source_id=RUBRIC_SOURCE_ID)
    judge = AssessmentSource(source_type="LLM_JUDGE", source_id=RUBRIC_SOURCE_ID)
    data = AssessmentSource(source_type="CODE", source_id=DATA_SOURCE_ID)
    out = [Feedback(name=TOTAL, value=case.total, source=rubric, rationale=case.rationale or None, trace_id=trace_id)]
    out += [Feedback(name=name, value=float(value), source=judge if name in judges else rubric, trace_id=trace_id)
            for name, value in case.components.items()]
    out += [Expectation(name=name, value=value, source=data, trace_id=trace_id) for name, value in case.expected.items()]
    return out


def _write(case: TraceCase, experiment_id: str, run_id: str | None, judges: Collection[str]) -> str:
    import mlflow
    from mlflow.entities import SpanType

    metadata = {"mlflow.sourceRun": run_id} if run_id else None
    root = mlflow.start_span_no_context(case.name, span_type=SpanType.AGENT, inputs=case.inputs,
                                        experiment_id=experiment_id, tags=case.tags, metadata=metadata)
    try:
        for i, call in enumerate(case.calls):
            span = mlflow.start_span_no_context(f"{i}:{call['predictor']}", span_type=SpanType.CHAT_MODEL,
                                                parent_span=root, inputs={"messages": call["messages"]},
                                                attributes={"prompt_tokens": call["prompt_tokens"],
                                                            "completion_tokens": call["completion_tokens"],
                                                            "finish_reason": call["finish_reason"]})
            span.end(outputs={"completion": call["completion"]})
        for i, tool in enumerate(case.tools):
            span = mlflow.start_span_no_context(f"{i}:{tool['tool']}", span_type=SpanType.TOOL, parent_span=root,
                                                inputs={"args": tool["args"]})
            if tool["error"]:
                span.set_attribute("error", tool["error"])
            span.end(outputs={"observation": tool["observation"]}, status="ERROR" if tool["error"] else "OK")
        _attach(root, _assessments(case, root.trace_id, judges))
    finally:
        root.end(outputs=case.outputs)
    return root.trace_id


def log_traces(cases: Sequence[TraceCase], experiment_id: str, run_id: str | None = None,
               judges: Collection[str] = ()) -> list[str]:
    """Write ``cases`` as traces in ``experiment_id`` (linked to ``run_id``), with their assessments.

    Each trace carries the rubric's total (``reward``) and every component as feedback from ``cotune.rubric`` (the
    total with the rubric's feedback text as rationale): ``LLM_JUDGE`` for the components named in ``judges`` (the
    rubric's :attr:`metrics.Rubric.judges`), ``CODE`` for the rest; and each label of the example as an
    expectation from ``cotune.dataset``. Returns the trace ids, in order. MLflow writes them on its own export
    thread; ``mlflow.flush_trace_async_logging()`` waits for them. The caller has set the process's tracking URI
    (see the module docstring).
    """
    return [_write(case, experiment_id, run_id, judges) for case in cases]
