"""`cotune compare` reads runs back from MLflow: latest run per (arm, seed), t-based CIs, legible PNGs."""

from __future__ import annotations

import statistics
import time

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from experiments.compare import CompareError, ci95, compare, format_table, summarize
from experiments.tracking import KIND_TAG, PROGRAM_HASH_TAG


def log_run(client, experiment_id, arm, schedule, seed, curve, test, status="FINISHED", kind="run", gold=None):
    run = client.create_run(experiment_id, run_name=f"{arm}-seed{seed}",
                            tags={KIND_TAG: kind, "arm": arm, "schedule": schedule, "seed": str(seed), "task": "toy"})
    rid = run.info.run_id
    now = int(time.time() * 1000)
    client.log_batch(rid, metrics=[Metric("val_score", v, now, s) for s, v in curve])
    client.log_batch(rid, metrics=[Metric("final_val_score", max(v for _, v in curve), now, 0),
                                   Metric("last_val_score", curve[-1][1], now, 0),
                                   Metric("test_score", test, now, 0),
                                   Metric("total_rollouts", curve[-1][0], now, 0),
                                   Metric("total_lm_calls", curve[-1][0], now, 0),
                                   Metric("wall_seconds", 30.0, now, 0)])
    if gold is not None:
        client.log_metric(rid, "test_gold_score", gold)
    client.log_param(rid, "budget.rollouts", "600")
    client.log_param(rid, "model", "tiny")
    client.set_terminated(rid, status)
    return rid


def test_ci95_is_the_t_interval():
    values = [0.9, 0.95, 0.91]
    expected = 4.302652729911275 * statistics.stdev(values) / 3 ** 0.5  # t(0.975, df=2)
    assert ci95(values) == pytest.approx(expected)
    assert ci95([0.5]) != ci95([0.5])  # NaN for a single seed


def test_compare_reads_runs_back_and_writes_report(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    eid = client.create_experiment("toy")
    # an older joint seed-0 run that a newer one replaces
    log_run(client, eid, "joint", "p -> w", 0, [(0, 0.3), (600, 0.1)], 0.1)
    time.sleep(0.01)
    tests = {"prompt-only": [0.80, 0.84, 0.82], "joint": [0.90, 0.95, 0.91]}
    for seed in range(3):
        log_run(client, eid, "prompt-only", "p", seed, [(0, 0.3), (400, 0.7 + 0.05 * seed)], tests["prompt-only"][seed])
        log_run(client, eid, "joint", "p -> w", seed, [(0, 0.3), (250, 0.6), (600, 0.9 + 0.02 * seed)],
                tests["joint"][seed])
    log_run(client, eid, "joint", "p -> w", 5, [(0, 0.3)], 0.0, status="FAILED")
    log_run(client, eid, "rl-only", "w", 0, [(0, 0.3)], 0.0, status="RUNNING")
    log_run(client, eid, "joint", "p -> w", 7, [(0, 0.3)], 0.0, kind="trial")

    report = compare("toy", uri, tmp_path / "report", arm_order=["prompt-only", "joint"])

    assert [a.arm for a in report.arms] == ["prompt-only", "joint"]
    joint = report.arms[1]
    assert joint.n == 3 and joint.test_mean == pytest.approx(statistics.fmean(tests["joint"]))
    assert joint.test_ci == pytest.approx(ci95(tests["joint"]))
    assert {(r.arm, r.seed) for r in report.runs} == {(a, s) for a in ("prompt-only", "joint") for s in range(3)}
    assert [r.curve for r in report.runs if r.arm == "joint" and r.seed == 0] == [[(0, 0.3), (250, 0.6), (600, 0.9)]]
    text = report.markdown.read_text()
    assert report.table in text and "0.920 ± " in report.table and "val_vs_rollouts.png" in text
    for plot in report.plots:
        assert plot.exists() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 20_000
        import matplotlib.image

        pixels = matplotlib.image.imread(plot)
        assert pixels.shape[0] >= 600 and pixels.shape[1] >= 1000 and pixels.std() > 0.05  # not blank


def test_the_gold_metric_on_test_is_its_own_column(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    eid = client.create_experiment("golden")
    golds = [0.46, 0.68, 0.72]
    for seed, gold in enumerate(golds):
        log_run(client, eid, "rl-only", "w", seed, [(0, 0.69), (1200, 0.78)], 0.8, gold=gold)
    report = compare("golden", uri, tmp_path / "report")
    (arm,) = report.arms
    assert arm.test_gold_mean == pytest.approx(statistics.fmean(golds)) and arm.test_gold_ci == pytest.approx(ci95(golds))
    assert "test gold (held out)" in report.table and f"{statistics.fmean(golds):.3f} ± " in report.table
    assert "| 0.800 | 0.720 | 1200 |" in report.markdown.read_text()  # seed 2's row: test, test gold, rollouts


def test_table_without_test_scores_and_single_seed():
    from experiments.compare import RunRow

    rows = [RunRow("a", "joint", "p -> w", 0, 0, 0.9, 0.9, None, 600, 600, 60, [(0, 0.3), (600, 0.9)])]
    table = format_table(summarize(rows))
    assert "test" not in table and "| joint | p -> w   | 1     | 0.900" in table


def test_missing_experiment_is_a_clear_error(tmp_path):
    with pytest.raises(CompareError, match="cotune run"):
        compare("nothing-here", f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "out")


def test_an_arm_whose_seeds_returned_the_same_program_is_flagged(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    eid = client.create_experiment("seeds")
    for seed in range(3):
        same = log_run(client, eid, "prompt-only", "p", seed, [(0, 0.3), (400, 0.875)], 0.8)
        client.set_tag(same, PROGRAM_HASH_TAG, "aaaa")
        differ = log_run(client, eid, "joint", "p -> w", seed, [(0, 0.3), (400, 0.8 + 0.05 * seed)], 0.8)
        client.set_tag(differ, PROGRAM_HASH_TAG, f"b{seed}")
    report = compare("seeds", uri, tmp_path / "report")
    flags = {a.arm: a.identical_seeds for a in report.arms}
    assert flags == {"joint": False, "prompt-only": True}
    assert "3 (identical!)" in report.table
    assert "every seed of `prompt-only` returned the same program" in report.markdown.read_text()


def test_a_stage_that_spends_nothing_follows_the_baseline_in_the_curve(tmp_path):
    """Random demos cost no rollouts: their val score shares step 0 with the baseline and must come after it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    rid = log_run(client, client.create_experiment("free"), "random-demos", "p", 0, [(0, 0.69)], 0.68)
    client.log_batch(rid, metrics=[Metric("val_score", 0.48, int(time.time() * 1000) + 5, 0)])
    (row,) = compare("free", uri, tmp_path / "report").runs
    assert row.curve == [(0, 0.69), (0, 0.48)]
