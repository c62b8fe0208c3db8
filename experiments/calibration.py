"""``cotune calibrate``: fit an experiment's rubric to the labels its traces carry, and keep the evidence.

Why here (not in ``metrics``): the fit itself is :func:`metrics.calibration.calibrate`, which knows nothing of
MLflow. This module is the MLflow side: it reads the labels back from the experiment's traces (HUMAN feedback from
``cotune review`` or the MLflow UI, else whether the output matched the gold answer), writes the calibrated rubric
as a new versioned file that an experiment YAML can name (``metric: calibrated/<experiment>-v2.json``), and logs
the change with its evidence (agreement before and after on held-out labels, old and new weights) as an MLflow run
of the experiment, with the file as an artifact.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.review import ReviewError, fetch_items, labels
from experiments.tracking import redact

KIND = "calibration"  # the cotune.kind tag of the MLflow run that records a calibration


@dataclass
class CalibrationOutcome:
    """What ``cotune calibrate`` did: the fit (:class:`metrics.calibration.Calibration`), the file it wrote, the
    MLflow run that records it, and how many labels of each source it read."""

    calibration: Any
    path: Path
    run_id: str | None
    human: int
    gold: int


def next_version(folder: Path, name: str) -> Path:
    """``folder/<name>-v<k>.json`` with ``k`` one above the highest version already there (1 for the first)."""
    pattern = re.compile(rf"{re.escape(name)}-v(\d+)\.json$")
    taken = [int(m.group(1)) for p in folder.glob(f"{name}-v*.json") if (m := pattern.match(p.name))]
    return folder / f"{name}-v{max(taken, default=0) + 1}.json"


def calibrate_experiment(tracking_uri: str, experiment: str, rubric: Any, *, base_metric: str = "rubric",
                         out_dir: str | Path = "calibrated", seed: int = 0, holdout: float = 0.3, gold: bool = True,
                         filter_string: str | None = None) -> CalibrationOutcome:
    """Calibrate ``rubric`` to the labels on ``experiment``'s traces, write the next versioned file, log the run.

    Args:
        tracking_uri: the experiment's MLflow store.
        experiment: the MLflow experiment name.
        rubric: the rubric the traces were scored with (its component names must match the traces' feedback).
        base_metric: how the experiment file names that rubric (``rubric``, or ``package.module:name``); recorded
            in the file as ``base_metric`` so ``metric: <the file>`` rebuilds the same rubric before reweighting it.
        out_dir: where the versioned file goes.
        seed, holdout: the held-out split (see :func:`metrics.calibration.calibrate`).
        gold: also use the gold answer as a label where no person labelled a trace.
        filter_string: MLflow trace search syntax, to calibrate on part of the traces only.

    Raises:
        ReviewError: no such experiment, or no trace to read.
        metrics.calibration.CalibrationError: too few labels, one class only, components that do not match...
    """
    from mlflow import MlflowClient

    from metrics.calibration import calibrate

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ReviewError(f"no MLflow experiment {experiment!r} in {redact(tracking_uri)}; run it first (cotune run)")
    items = fetch_items(client, found.experiment_id, filter_string=filter_string)
    if not items:
        raise ReviewError(f"experiment {experiment!r} has no cotune traces to calibrate on (traces are logged by "
                          "cotune run unless tracking.traces is 0)")
    found_labels = labels(items, gold=gold)
    cal = calibrate(rubric, found_labels, seed=seed, holdout=holdout)
    path = next_version(Path(out_dir), experiment)
    path.parent.mkdir(parents=True, exist_ok=True)
    cal.save(path, {"base_metric": base_metric})
    human = sum(1 for label in found_labels if label.source == "HUMAN")
    run_id = _log(client, found.experiment_id, cal, path, human, len(found_labels) - human)
    return CalibrationOutcome(cal, path, run_id, human, len(found_labels) - human)


def _log(client: Any, experiment_id: str, cal: Any, path: Path, human: int, gold: int) -> str:
    from mlflow.entities import Metric, Param, RunTag

    run = client.create_run(experiment_id, run_name=path.stem, tags={"cotune.kind": KIND,
                                                                      "cotune.rubric_file": str(path)})
    run_id = run.info.run_id
    metrics = {f"before_{k}": v for k, v in cal.before.as_dict().items()}
    metrics.update({f"after_{k}": v for k, v in cal.after.as_dict().items()})
    metrics.update(labels_fit=cal.n_fit, labels_heldout=cal.n_heldout, labels_human=human, labels_gold=gold)
    params = {f"weight.{k}": v for k, v in cal.weights.items()}
    params.update({f"old_weight.{k}": v for k, v in cal.old_weights.items()})
    client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in params.items()],
                     tags=[RunTag("cotune.summary", cal.summary()[:5000])])
    client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def base_metric_of(path: str | Path) -> str:
    """The metric a calibrated file reweights, as an experiment file names it (``rubric`` when not recorded)."""
    return str(json.loads(Path(path).read_text()).get("base_metric", "rubric"))
