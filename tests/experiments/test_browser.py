"""The MLflow UI shows our runs: headless Chromium loads the experiment page of a local server (optional).

Skips when Chromium is absent (Debian: ``apt-get install chromium``); fails instead under
``COTUNE_REQUIRE_CHROMIUM=1`` (CI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from tests.experiments.helpers import REPO
from tests.requires import missing

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--window-size=1400,1000",
         "--hide-scrollbars", "--virtual-time-budget=30000"]


def chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


@pytest.mark.slow
def test_mlflow_ui_experiment_page_shows_the_runs(tmp_path, mlflow_url):
    if chromium() is None:
        missing("chromium", "Chromium is not installed (apt-get install chromium)")
    import matplotlib.image
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(mlflow_url)
    eid = client.create_experiment("browser-check")
    names = ["joint-seed0", "rl-only-seed0", "prompt-only-seed0"]
    for i, name in enumerate(names):
        run = client.create_run(eid, run_name=name, tags={"cotune.kind": "run", "arm": name.rsplit("-", 1)[0]})
        client.log_batch(run.info.run_id, metrics=[Metric("val_score", 0.3 + 0.2 * i, int(time.time() * 1000), 0)])
        client.set_terminated(run.info.run_id, "FINISHED")
    page = f"{mlflow_url}/#/experiments/{eid}/runs"

    dom = subprocess.run([chromium(), *FLAGS, "--dump-dom", page], capture_output=True, text=True, timeout=180).stdout
    assert all(name in dom for name in names), dom[-2000:]

    shot = tmp_path / "experiment.png"
    subprocess.run([chromium(), *FLAGS, f"--screenshot={shot}", page], capture_output=True, timeout=180)
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1000, 1400) and pixels.std() > 0.05  # a rendered page, not a blank one


@pytest.mark.slow
def test_mlflow_ui_shows_a_rollout_trace_with_its_assessments(tmp_path, mlflow_url, request):
    """A trace cotune logged, with the rubric's feedback, the gold answer and a reviewer's HUMAN label, opened in the
    MLflow UI's trace view. The screenshot is the README's "review and calibrate" picture (docs/images/)."""
    if chromium() is None:
        missing("chromium", "Chromium is not installed (apt-get install chromium)")
    import dspy
    import matplotlib.image
    import mlflow
    from mlflow import MlflowClient

    from experiments.review import fetch_items, record_label
    from experiments.traces import from_prediction, log_traces

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_url)
    request.addfinalizer(lambda: mlflow.set_tracking_uri(previous))
    client = MlflowClient(mlflow_url)
    eid = client.create_experiment("trace-check")
    example = dspy.Example(question="What is the last digit of 1234567?", answer="7", id="q42").with_inputs("question")
    case = from_prediction(example, dspy.Prediction(answer="1"), 0.25, {"correct": 0.0, "format": 1.0},
                           {"cotune.run": "r", "cotune.stage": "2-w", "cotune.source": "eval"})
    (trace_id,) = log_traces([case], eid)
    mlflow.flush_trace_async_logging(terminate=False)
    (item,) = fetch_items(client, eid)
    record_label(item, False, rationale="the first digit, not the last", reviewer="ana")

    page = f"{mlflow_url}/#/experiments/{eid}/traces?selectedEvaluationId={trace_id}"
    dom = subprocess.run([chromium(), *FLAGS, "--dump-dom", page], capture_output=True, text=True, timeout=180).stdout
    assert trace_id in dom and "label" in dom and "correct" in dom, dom[-3000:]

    shot = tmp_path / "trace.png"
    subprocess.run([chromium(), *FLAGS, f"--screenshot={shot}", page], capture_output=True, timeout=180)
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1000, 1400) and pixels.std() > 0.05
    keep = REPO / "docs" / "images" / "trace-review.png"
    if os.environ.get("COTUNE_UPDATE_SCREENSHOTS"):  # a person looks at it before committing it
        keep.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, keep)
