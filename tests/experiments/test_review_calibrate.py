"""Humans in the loop, end to end against a real ``mlflow server``: traces, HUMAN labels, calibration, retraining.

1. ``cotune run`` a short ``p -> w`` whose rubric has a bad component (``contrarian``: it rewards a well-formed
   wrong answer exactly as much as ``correct`` rewards a right one, so the rubric cannot tell them apart).
2. The traces, their spans and the rubric's component feedback are read back over REST.
3. A "reviewer" labels traces through the REST endpoint the MLflow UI posts assessments to: pass iff the answer is
   right, so the labels reject what ``contrarian`` rewards.
4. ``cotune calibrate`` zeroes ``contrarian`` and raises agreement on held-out labels.
5. A weight stage on the calibrated rubric ends with a gold score not below the same stage on the original one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.experiments.helpers import cotune, rest

EXPERIMENT = """\
name: {name}
task: last_digit_long
program: predict
model: tiny
metric: {metric}
gold: true
data: {{train: 32, val: 24, test: 0, seed: 0}}
arms:
  {arm}: "{schedule}"
seeds: [0]
threads: 1
budget: {budget}
prompt: {{max_bootstrapped_demos: 2, max_labeled_demos: 2, num_candidate_programs: 2}}
weights: {{num_generations: 4, examples_per_step: 4, max_tokens: 16}}
tracking: {{uri: "{url}", traces: 24}}
"""


def _write(folder: Path, name: str, url: str, metric: str, arm: str, schedule: str, budget: int) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(EXPERIMENT.format(name=name, url=url, metric=metric, arm=arm, schedule=schedule, budget=budget))
    return path


def _run(path: Path, cwd: Path) -> None:
    done = cotune("run", str(path), cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]


def _traces(url: str, experiment_id: str) -> list[dict]:
    traces, token = [], None
    while True:
        payload = {"locations": [{"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": experiment_id}}],
                   "max_results": 100, **({"page_token": token} if token else {})}
        page = rest(url, "/api/3.0/mlflow/traces/search", payload)
        traces += page.get("traces", [])
        token = page.get("next_page_token")
        if not token:
            return traces


def _gold_after_w(runs: Path) -> float:
    """The gold score after the weight stage (its record in the run folder)."""
    (record,) = runs.glob("*/seed-0/stages/1-w/record.json")
    return json.loads(record.read_text())["gold_score"]


@pytest.mark.slow
def test_review_labels_calibrate_the_rubric_and_retraining_on_it_keeps_gold(mlflow_url, tmp_path):
    exp = _write(tmp_path, "calib", mlflow_url, "tests.experiments.helpers:contrarian_rubric", "joint", "p -> w", 192)
    _run(exp, tmp_path)

    # 2. traces, spans and component feedback over REST
    experiment_id = rest(mlflow_url, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=calib")[
        "experiment"]["experiment_id"]
    infos = _traces(mlflow_url, experiment_id)
    assert len(infos) == 24 * 4  # 24 val predictions after each of 3 stages + 24 rollouts of the weight stage
    rollout = next(t for t in infos if t["tags"].get("cotune.source") == "rollout")
    full = rest(mlflow_url, f"/api/3.0/mlflow/traces/{rollout['trace_id']}")["trace"]["trace_info"]
    names = {a["assessment_name"]: a for a in full["assessments"]}
    assert {"reward", "correct", "format", "contrarian", "answer"} <= set(names)
    assert names["contrarian"]["source"]["source_type"] == "CODE" and "expectation" in names["answer"]

    # 3. a reviewer labels 60 traces through the endpoint the UI uses: pass iff the answer is right
    labelled = 0
    for info in infos[:60]:
        trace_id = info["trace_id"]
        assessments = rest(mlflow_url, f"/api/3.0/mlflow/traces/{trace_id}")["trace"]["trace_info"]["assessments"]
        by_name = {a["assessment_name"]: a for a in assessments}
        right = by_name["correct"]["feedback"]["value"] == 1.0
        rest(mlflow_url, f"/ajax-api/3.0/mlflow/traces/{trace_id}/assessments", {"assessment": {
            "trace_id": trace_id, "assessment_name": "label", "source": {"source_type": "HUMAN", "source_id": "ana"},
            "feedback": {"value": right}, "rationale": "right answer" if right else "wrong last digit"}})
        labelled += 1

    # 4. calibrate on the HUMAN labels only
    done = cotune("calibrate", str(exp), "--human-only", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"labels: {labelled} HUMAN, 0 GOLD" in done.stdout
    saved = json.loads((tmp_path / "calibrated" / "calib-v1.json").read_text())
    weights, evidence = saved["weights"], saved["evidence"]
    assert weights["contrarian"] <= 0 < weights["correct"]
    assert evidence["after"]["concordance"] > evidence["before"]["concordance"], evidence
    calibration_runs = rest(mlflow_url, "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [experiment_id], "filter": "tags.`cotune.kind` = 'calibration'"})["runs"]
    assert len(calibration_runs) == 1

    # 5. the same weight stage, on the original rubric and on the calibrated one
    before = _write(tmp_path, "rl-original", mlflow_url, "tests.experiments.helpers:contrarian_rubric", "rl", "w", 160)
    after = _write(tmp_path, "rl-calibrated", mlflow_url, "calibrated/calib-v1.json", "rl", "w", 160)
    _run(before, tmp_path)
    _run(after, tmp_path)
    golds = {name: _gold_after_w(tmp_path / "runs" / name) for name in ("rl-original", "rl-calibrated")}
    print("gold after w:", golds, "calibration:", evidence)
    assert golds["rl-calibrated"] >= golds["rl-original"], golds
