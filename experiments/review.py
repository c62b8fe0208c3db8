"""The review queue: a person judges logged rollouts, and the judgements become MLflow assessments.

Why in the terminal as well as in MLflow's UI: the UI (the experiment's Traces page) already lets a person open a
trace and add feedback, and we do not write a web app of our own. But a reviewer wants the *useful* traces first,
and wants to label twenty of them in a minute. ``cotune review EXP`` reads the traces :mod:`experiments.traces`
logged, orders them (the rubric and the gold answer disagree first, then the rubric's components conflict), shows
one at a time and records a label with one keystroke. The labels are written through MLflow's own assessment API
with source ``HUMAN``, exactly what the UI writes, so :mod:`experiments.calibration` (and the UI) read both alike.

A label is HUMAN feedback named :data:`LABEL` (pass = ``True``, fail = ``False``, with an optional rationale);
a corrected answer is a HUMAN expectation named :data:`CORRECTED` (it becomes a training example with its
provenance, see ``metrics.calibration``). Feedback a person adds in the UI under the name ``label`` counts the same.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from experiments.traces import DATA_SOURCE_ID, RUBRIC_SOURCE_ID, TOTAL

logger = logging.getLogger(__name__)

LABEL = "label"  # HUMAN feedback: True (pass) / False (fail)
CORRECTED = "corrected_answer"  # HUMAN expectation: what the answer should have been
KEYS = {"p": True, "f": False}

__all__ = ["CORRECTED", "LABEL", "ReviewItem", "enqueue", "fetch_items", "labels", "queue", "record_label",
           "review_loop"]


class ReviewError(ValueError):
    """The review cannot start: no such experiment, or it holds no traces to review (the message says why)."""


@dataclass
class ReviewItem:
    """One logged trace, as a reviewer (and the calibration) needs it.

    Attributes:
        trace_id: the MLflow trace id.
        tags: the trace's cotune tags (run, stage, step, example id, seed, source).
        inputs: the example's inputs; outputs: what the program returned.
        expected: the example's labels (the gold answer), from the dataset.
        total: the rubric's total; components: each component's value (the rubric's CODE feedback).
        human: the HUMAN label (True pass / False fail), if any; rationale: its rationale.
        corrected: a HUMAN corrected answer, if any.
    """

    trace_id: str
    tags: dict[str, str]
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    expected: dict[str, Any]
    total: float
    components: dict[str, float] = field(default_factory=dict)
    human: bool | None = None
    rationale: str = ""
    corrected: str | None = None

    @property
    def gold_agrees(self) -> bool | None:
        """Whether the outputs match the gold answer on every labelled field they share (None: nothing shared)."""
        shared = [k for k in self.expected if k in self.outputs]
        if not shared:
            return None
        return all(_norm(self.outputs[k]) == _norm(self.expected[k]) for k in shared)

    @property
    def disagreement(self) -> bool:
        """The rubric passes what the gold answer rejects, or fails what it accepts."""
        gold = self.gold_agrees
        return gold is not None and gold != (self.total >= 0.5)

    @property
    def conflict(self) -> float:
        """How far apart the rubric's components are (max - min): a correct but over-long run, for example."""
        values = list(self.components.values())
        return max(values) - min(values) if len(values) > 1 else 0.0


def _verdict(value: Any) -> bool | None:
    """A HUMAN label's value as pass/fail: a bool, or the word MLflow's pass/fail question writes."""
    if isinstance(value, bool):
        return value
    return {"pass": True, "yes": True, "true": True, "fail": False, "no": False, "false": False}.get(
        str(value).strip().lower())


def _norm(value: Any) -> str:
    return " ".join(str(value).strip().lower().split())


def _item(trace: Any) -> ReviewItem:
    root = next((s for s in trace.data.spans if s.parent_id is None), None)
    components, total, expected = {}, 0.0, {}
    human, rationale, corrected = None, "", None
    for a in trace.info.assessments:
        source, value = a.source, getattr(a, "value", None)
        if source.source_type in ("CODE", "LLM_JUDGE") and source.source_id == RUBRIC_SOURCE_ID:
            if a.name == TOTAL:
                total = float(value)
            else:
                components[a.name] = float(value)
        elif source.source_type == "CODE" and source.source_id == DATA_SOURCE_ID:
            expected[a.name] = value
        elif source.source_type == "HUMAN" and a.name == LABEL and _verdict(value) is not None:
            human, rationale = _verdict(value), getattr(a, "rationale", None) or ""  # the newest is last: it wins
        elif source.source_type == "HUMAN" and a.name == CORRECTED:
            corrected = str(value)
    tags = {k: v for k, v in trace.info.tags.items() if k.startswith("cotune.")}
    return ReviewItem(trace.info.trace_id, tags, dict(root.inputs or {}) if root else {},
                      dict(root.outputs or {}) if root and isinstance(root.outputs, dict) else {},
                      expected, total, components, human, rationale, corrected)


def fetch_items(client: Any, experiment_id: str, *, filter_string: str | None = None,
                max_results: int = 1000) -> list[ReviewItem]:
    """Every cotune trace of the experiment (``filter_string`` narrows it: MLflow's trace search syntax, e.g.
    ``tags.`cotune.stage` = '2-w'``), oldest first."""
    items, token = [], None
    while len(items) < max_results:
        page = client.search_traces(locations=[experiment_id], filter_string=filter_string, page_token=token,
                                    max_results=min(100, max_results - len(items)), order_by=["timestamp_ms ASC"])
        items += [_item(t) for t in page if "cotune.run" in t.info.tags]
        token = page.token
        if not token:
            break
    return items


def queue(items: Iterable[ReviewItem]) -> list[ReviewItem]:
    """The unlabelled items, most useful first: rubric and gold disagree, then the largest component conflict."""
    todo = [i for i in items if i.human is None]
    return sorted(todo, key=lambda i: (not i.disagreement, -i.conflict))


def record_label(item: ReviewItem, passed: bool, *, rationale: str | None = None, corrected: str | None = None,
                 reviewer: str = "cotune-review") -> None:
    """Write the label (and a corrected answer) as HUMAN assessments on the trace, through MLflow's API.

    The process's tracking URI must be the experiment's store (``cotune review`` sets it).
    """
    import mlflow
    from mlflow.entities import AssessmentSource

    source = AssessmentSource(source_type="HUMAN", source_id=reviewer)
    mlflow.log_feedback(trace_id=item.trace_id, name=LABEL, value=passed, source=source, rationale=rationale)
    if corrected is not None:
        mlflow.log_expectation(trace_id=item.trace_id, name=CORRECTED, value=corrected, source=source)
    item.human, item.rationale, item.corrected = passed, rationale or "", corrected


def describe(item: ReviewItem, position: int, total: int) -> str:
    """What the reviewer sees for one item."""
    why = "rubric and gold disagree" if item.disagreement else (
        f"components conflict by {item.conflict:.2f}" if item.conflict else "")
    lines = [f"[{position}/{total}] trace {item.trace_id}  stage {item.tags.get('cotune.stage', '?')}  "
             f"example {item.tags.get('cotune.example_id', '?')}" + (f"  ({why})" if why else ""),
             f"  inputs:   {json.dumps(item.inputs)[:400]}",
             f"  outputs:  {json.dumps(item.outputs)[:400]}",
             f"  expected: {json.dumps(item.expected)[:200]}",
             f"  rubric:   {item.total:.3f}  " + "  ".join(f"{k}={v:.2f}" for k, v in item.components.items())]
    return "\n".join(lines)


def read_key(stream: Any = None) -> str:
    """One keystroke from a terminal (no Enter needed); one line's first character from anything else."""
    stream = stream or sys.stdin
    if stream.isatty():
        import termios
        import tty

        fd = stream.fileno()
        old = termios.tcgetattr(fd)
        try:
            tty.setcbreak(fd)
            return stream.read(1)
        finally:
            termios.tcsetattr(fd, termios.TCSADRAIN, old)
    line = stream.readline()
    return line[:1] if line else "q"


def review_loop(items: Sequence[ReviewItem], *, key: Callable[[], str], ask: Callable[[str], str],
                write: Callable[[str], None], reviewer: str = "cotune-review", limit: int | None = None) -> int:
    """Show each item of ``queue(items)`` and record the reviewer's key: ``p`` pass, ``f`` fail, ``c`` fail with
    a corrected answer (asked for), ``s`` skip, ``q`` quit. Returns the number of labels written."""
    todo = queue(items)[:limit]
    done = 0
    for n, item in enumerate(todo, 1):
        write(describe(item, n, len(todo)) + "\n  [p]ass [f]ail [c]orrect it [s]kip [q]uit > ")
        pressed = key().lower()
        write(pressed + "\n")
        if pressed == "q":
            break
        if pressed in KEYS:
            record_label(item, KEYS[pressed], reviewer=reviewer)
            done += 1
        elif pressed == "c":
            answer = ask("  corrected answer: ").strip()
            record_label(item, False, corrected=answer or None, rationale="corrected", reviewer=reviewer)
            done += 1
    write(f"{done} labels written; {len(queue(items))} traces left unlabelled\n")
    return done


def labels(items: Iterable[ReviewItem], *, gold: bool = True) -> list[Any]:
    """The items' verdicts as :class:`metrics.calibration.Label`\\ s: the HUMAN label where a person gave one, else
    (``gold=True``) whether the outputs match the gold answer, as a GOLD label. Items with neither are left out.

    Each label carries the example (inputs, gold answer, id) and the prediction, so candidate criteria can be
    scored on it and a corrected answer becomes a training example.
    """
    import dspy

    from metrics.calibration import Label

    out = []
    for item in items:
        if item.human is not None:
            verdict, source = item.human, "HUMAN"
        elif gold and item.gold_agrees is not None:
            verdict, source = item.gold_agrees, "GOLD"
        else:
            continue
        fields = {**item.inputs, **item.expected}
        fields.setdefault("id", item.tags.get("cotune.example_id", item.trace_id))
        example = dspy.Example(**fields).with_inputs(*item.inputs)
        out.append(Label(item.trace_id, item.components, verdict, source=source, rationale=item.rationale,
                         corrected=item.corrected, example=example, prediction=dspy.Prediction(**item.outputs)))
    return out


def enqueue(experiment_id: str, items: Iterable[ReviewItem], name: str = "cotune-review") -> tuple[str, int]:
    """Put :func:`queue`'s order into an MLflow review queue of the experiment, for its own Review page.

    MLflow 3.17 keeps review queues in the tracking store (no hosted service needed; checked on sqlite and
    ``mlflow server``): a queue holds trace items and the questions a reviewer answers, and the answers are
    ``Feedback`` assessments on the traces. The questions here are the ones ``cotune review`` asks, under the same
    names (:data:`LABEL` pass/fail with a comment, :data:`CORRECTED` text), so ``cotune calibrate`` reads the
    answers given in MLflow's UI like its own. An existing queue of that name gets the new items. Returns the
    queue id and how many items were added. The process's tracking URI must be the experiment's store.
    """
    import mlflow.genai.label_schemas as schemas
    import mlflow.genai.review_queues as queues

    existing = {q.name: q for q in schemas.list_label_schemas(experiment_id)}
    questions = [
        existing.get(LABEL) or schemas.create_label_schema(
            LABEL, type="feedback", experiment_id=experiment_id, enable_comment=True,
            input=schemas.InputPassFail(positive_label="pass", negative_label="fail"),
            instruction="Is this run of the program right?"),
        existing.get(CORRECTED) or schemas.create_label_schema(
            CORRECTED, type="expectation", experiment_id=experiment_id, input=schemas.InputText(),
            instruction="What should the answer have been?")]
    try:
        found = queues.get_review_queue(name=name, experiment_id=experiment_id)
    except Exception as exc:  # noqa: BLE001 - MLflow raises its own "not found" error: make the queue
        # Safe: any other failure (the store unreachable) makes the creation below fail too, with its own error.
        logger.debug("review queue %r not found in experiment %s (%s: %s); creating it", name, experiment_id,
                     type(exc).__name__, exc)
        found = queues.create_review_queue(name, queue_type="custom", experiment_id=experiment_id,
                                           schema_ids=[q.schema_id for q in questions])
    todo = [item.trace_id for item in queue(items)]
    added = queues.add_items_to_review_queue(found.queue_id, item_ids=todo) if todo else []
    return found.queue_id, len(added)
