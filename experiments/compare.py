"""``cotune compare``: read an experiment's runs back from MLflow and write a report (Markdown + PNG plots).

Why from MLflow and not from local folders: the tracking store is the record a team shares (runs from
several machines, a remote server); local run folders are scratch. Everything here comes from the REST/SQL
store through ``MlflowClient``: the parent runs of ``cotune run`` (tag ``cotune.kind=run``), their tags
(``arm``, ``schedule``, ``seed``), final metrics and the ``val_score`` history logged at step = rollouts spent.

For each (arm, seed) the most recent FINISHED run counts, so re-running an experiment replaces its runs in the
report. An arm whose seeds all returned the same program (same prompts, same adapter: tag ``cotune.program_hash``)
is flagged: its confidence interval then measures nothing, since the seeds could not differ. The report has: a
table per arm (mean and 95% confidence interval over seeds, Student's t), a plot of
val score against rollouts spent (mean over seeds, band = min..max over seeds, thin line per seed), and a plot
of the final score per arm with its 95% CI and each seed as a dot.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.tracking import (
    KIND_TAG,
    PROGRAM_HASH_TAG,
    TrackingError,
    check_tracking_uri,
    describe_store,
    redact,
)


class CompareError(ValueError):
    """Nothing to compare (no such experiment, no finished runs); the message says what to run first."""


@dataclass
class RunRow:
    """One finished ``cotune run`` run as read from MLflow."""

    run_id: str
    arm: str
    schedule: str
    seed: int
    start_time: int
    final_val: float | None
    last_val: float | None
    test: float | None
    rollouts: float | None
    lm_calls: float | None
    seconds: float | None
    curve: list[tuple[int, float]] = field(default_factory=list)  # (rollouts spent, val score)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    test_gold: float | None = None  # the task's gold metric on the test split (``gold: true``), e.g. task success


@dataclass
class ArmSummary:
    arm: str
    schedule: str
    n: int
    val_mean: float
    val_ci: float
    test_mean: float | None
    test_ci: float | None
    rollouts: float
    lm_calls: float
    minutes: float
    identical_seeds: bool = False  # every seed returned the same program: the CI is not evidence of anything
    test_gold_mean: float | None = None
    test_gold_ci: float | None = None


@dataclass
class Report:
    experiment: str
    tracking_uri: str
    out_dir: Path
    markdown: Path
    plots: list[Path]
    table: str
    arms: list[ArmSummary]
    runs: list[RunRow]


# --- statistics -----------------------------------------------------------------------------------


def ci95(values: Sequence[float]) -> float:
    """Half-width of the 95% confidence interval of the mean (Student's t, n-1 degrees of freedom); NaN for n < 2."""
    n = len(values)
    if n < 2:
        return float("nan")
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n))


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


# --- reading MLflow -------------------------------------------------------------------------------


def fetch_runs(tracking_uri: str, experiment: str) -> list[RunRow]:
    """The latest FINISHED run of every (arm, seed) of ``experiment``, read from the tracking store.

    Raises:
        TrackingError: the store cannot be reached.
        CompareError: no such MLflow experiment, or no finished ``cotune run`` runs in it.
    """
    from mlflow import MlflowClient

    check_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise CompareError(f"no MLflow experiment named {experiment!r} in {redact(tracking_uri)}; run "
                           f"`cotune run <experiment file>` first (or pass --tracking-uri)")
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], f"tags.`{KIND_TAG}` = 'run' and attributes.status = 'FINISHED'",
                                  max_results=1000, order_by=["attributes.start_time DESC"], page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    latest: dict[tuple[str, int], Any] = {}
    for run in runs:
        tags = run.data.tags
        try:
            key = (tags["arm"], int(tags["seed"]))
        except (KeyError, ValueError):
            continue
        if key not in latest or run.info.start_time > latest[key].info.start_time:
            latest[key] = run
    if not latest:
        raise CompareError(f"MLflow experiment {experiment!r} has no finished `cotune run` runs yet")
    rows = []
    for (arm, seed), run in sorted(latest.items(), key=lambda kv: kv[0]):
        m, tags = run.data.metrics, run.data.tags
        history = client.get_metric_history(run.info.run_id, "val_score")
        # in logging order within a step: a stage that spends no rollouts (random demos) shares step 0 with the baseline
        curve = [(int(h.step), float(h.value)) for h in sorted(history, key=lambda h: (h.step, h.timestamp))]
        rows.append(RunRow(run_id=run.info.run_id, arm=arm, schedule=tags.get("schedule", ""), seed=seed,
                           start_time=run.info.start_time, final_val=m.get("final_val_score"),
                           last_val=m.get("last_val_score"), test=m.get("test_score"), rollouts=m.get("total_rollouts"),
                           lm_calls=m.get("total_lm_calls"), seconds=m.get("wall_seconds"), curve=curve,
                           params=dict(run.data.params), tags=dict(tags), test_gold=m.get("test_gold_score")))
    return rows


def summarize(rows: Sequence[RunRow], arm_order: Sequence[str] | None = None) -> list[ArmSummary]:
    """Mean and 95% CI per arm (in ``arm_order``, then alphabetical)."""
    by_arm: dict[str, list[RunRow]] = defaultdict(list)
    for row in rows:
        by_arm[row.arm].append(row)
    order = [a for a in (arm_order or []) if a in by_arm] + sorted(a for a in by_arm if a not in (arm_order or []))
    out = []
    for arm in order:
        group = by_arm[arm]
        vals = [r.final_val for r in group if r.final_val is not None]
        tests = [r.test for r in group if r.test is not None]
        golds = [r.test_gold for r in group if r.test_gold is not None]
        out.append(ArmSummary(
            arm=arm, schedule=group[0].schedule, n=len(group), val_mean=_mean(vals), val_ci=ci95(vals),
            test_mean=_mean(tests) if tests else None, test_ci=ci95(tests) if tests else None,
            rollouts=_mean([r.rollouts for r in group if r.rollouts is not None]),
            lm_calls=_mean([r.lm_calls for r in group if r.lm_calls is not None]),
            minutes=_mean([r.seconds / 60 for r in group if r.seconds is not None]),
            identical_seeds=identical_programs(group),
            test_gold_mean=_mean(golds) if golds else None, test_gold_ci=ci95(golds) if golds else None))
    return out


def identical_programs(rows: Sequence[RunRow]) -> bool:
    """True when several seeds all returned the same program (prompts and adapter), so they could not differ."""
    hashes = [r.tags.get(PROGRAM_HASH_TAG) for r in rows]
    return len(rows) > 1 and None not in hashes and len(set(hashes)) == 1


# --- rendering ------------------------------------------------------------------------------------


def _pm(mean: float | None, ci: float | None) -> str:
    if mean is None or mean != mean:
        return "-"
    return f"{mean:.3f} ± {ci:.3f}" if ci is not None and ci == ci else f"{mean:.3f}"


def format_table(arms: Sequence[ArmSummary]) -> str:
    """The per-arm table as Markdown (readable as plain text too)."""
    has_test = any(a.test_mean is not None for a in arms)
    has_gold = any(a.test_gold_mean is not None for a in arms)
    header = ["arm", "schedule", "seeds", "val (best stage)"] + (["test (held out)"] if has_test else []) + \
        (["test gold (held out)"] if has_gold else []) + ["rollouts", "LM calls", "min/run"]
    lines = [header]
    for a in arms:
        lines.append([a.arm, a.schedule, f"{a.n} (identical!)" if a.identical_seeds else str(a.n),
                      _pm(a.val_mean, a.val_ci)]
                     + ([_pm(a.test_mean, a.test_ci)] if has_test else [])
                     + ([_pm(a.test_gold_mean, a.test_gold_ci)] if has_gold else [])
                     + [f"{a.rollouts:.0f}", f"{a.lm_calls:.0f}", f"{a.minutes:.1f}"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |"

    return "\n".join([fmt(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in lines[1:]])


def _step_values(curve: list[tuple[int, float]], grid: Sequence[float]) -> list[float]:
    """The val score in force at each grid point (the last stage evaluated at or before it)."""
    out, j, current = [], 0, curve[0][1]
    for x in grid:
        while j < len(curve) and curve[j][0] <= x:
            current = curve[j][1]
            j += 1
        out.append(current)
    return out


COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
STYLES = ["-", "--", "-.", ":"]  # overlapping arms (a shared baseline, scores at 1.0) stay distinguishable


def plot_curves(rows: Sequence[RunRow], arms: Sequence[ArmSummary], path: Path, title: str) -> Path:
    """Val score vs rollouts spent: per arm the mean over seeds (bold), the min..max band, each seed (thin)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=150)
    for i, arm in enumerate(arms):
        color = COLORS[i % len(COLORS)]
        curves = [r.curve for r in rows if r.arm == arm.arm and r.curve]
        if not curves:
            continue
        end = max(c[-1][0] for c in curves)
        grid = sorted({x for c in curves for x, _ in c} | {end})
        values = [_step_values(c, grid) for c in curves]
        common = min(c[-1][0] for c in curves)  # where every seed still has data
        k = [j for j, x in enumerate(grid) if x <= common]
        mean = [statistics.fmean(v[j] for v in values) for j in k]
        low = [min(v[j] for v in values) for j in k]
        high = [max(v[j] for v in values) for j in k]
        xs = [grid[j] for j in k]
        ax.fill_between(xs, low, high, step="post", color=color, alpha=0.15, linewidth=0)
        for c in curves:
            ax.step([x for x, _ in c], [y for _, y in c], where="post", color=color, alpha=0.35, linewidth=1)
        ax.step(xs, mean, where="post", color=color, linewidth=2.5, linestyle=STYLES[i % len(STYLES)],
                label=f"{arm.arm}  ({arm.schedule}, {len(curves)} seed{'s' if len(curves) > 1 else ''})")
        ax.plot([x for c in curves for x, _ in c], [y for c in curves for _, y in c], "o", color=color,
                markersize=4, alpha=0.6)
    ax.set_xlabel("rollouts spent (program executions)", fontsize=12)
    ax.set_ylabel("val score (after each stage)", fontsize=12)
    ax.set_title(title, fontsize=13)
    ax.set_ylim(_ylim([y for r in rows for _, y in r.curve]))
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=11)
    ax.legend(fontsize=11, loc="lower right", title="bold: mean over seeds; band: min..max", title_fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _ylim(values: Sequence[float]) -> tuple[float, float]:
    if values and min(values) >= 0 and max(values) <= 1:
        return (0.0, 1.05)
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    pad = 0.05 * (hi - lo or 1)
    return (lo - pad, hi + pad)


def plot_final(rows: Sequence[RunRow], arms: Sequence[ArmSummary], path: Path, title: str) -> Path:
    """Final score per arm: bar = mean over seeds, whisker = 95% CI (t), dots = seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_test = all(a.test_mean is not None for a in arms)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=150)
    xs = list(range(len(arms)))
    for i, arm in enumerate(arms):
        color = COLORS[i % len(COLORS)]
        mean, ci = (arm.test_mean, arm.test_ci) if use_test else (arm.val_mean, arm.val_ci)
        err = None if ci != ci else [[ci], [ci]]
        ax.bar(i, mean, width=0.6, color=color, alpha=0.75, yerr=err, capsize=8, ecolor="black",
               error_kw={"linewidth": 1.5})
        seeds = [r for r in rows if r.arm == arm.arm]
        ys = [(r.test if use_test else r.final_val) for r in seeds]
        offsets = [(j - (len(ys) - 1) / 2) * 0.08 for j in range(len(ys))]
        ax.plot([i + o for o in offsets], ys, "o", color="black", markersize=5, zorder=3)
        label = f"{mean:.3f}" + (f" ± {ci:.3f}" if ci == ci else "")
        top = mean + (ci if ci == ci else 0)
        ax.text(i, min(top + 0.03, 1.12) if top <= 1.05 else top * 1.02, label, ha="center", va="bottom", fontsize=11)
    ax.set_xticks(xs, [f"{a.arm}\n({a.schedule})" for a in arms], fontsize=11)
    ax.set_ylabel(("test score (held out)" if use_test else "val score (best stage)") + ", mean ± 95% CI", fontsize=12)
    ax.set_title(title, fontsize=13)
    values = [(r.test if use_test else r.final_val) or 0.0 for r in rows]
    lo, hi = _ylim(values)
    ax.set_ylim(min(0.0, lo), max(1.2, hi) if hi <= 1.05 else hi * 1.1)
    ax.grid(True, axis="y", alpha=0.3)
    ax.tick_params(axis="y", labelsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _markdown(experiment: str, uri: str, arms: list[ArmSummary], rows: list[RunRow], table: str,
              plots: list[Path]) -> str:
    first = rows[0]
    task, model = first.tags.get("task", "?"), first.params.get("model", "?")
    budget = first.params.get("budget.rollouts", "?")
    lines = [
        f"# {experiment}: comparison of arms", "",
        f"Task `{task}`, model `{model}`, budget {budget} rollouts per run (the limit; a prompt optimizer may "
        f"need fewer). {len(rows)} runs read from MLflow on {time.strftime('%Y-%m-%d %H:%M')}: the latest finished "
        f"run of each arm and seed.", "",
        f"MLflow store: {describe_store(uri)}.", "",
        "## Final scores (mean ± 95% CI over seeds, Student's t)", "", table, "",
        "`val (best stage)` is the val score of the stage `optimize()` returned; the val split also picks prompt "
        "candidates and the best stage, so it is optimistic. `test (held out)` scores the same program on examples "
        "no stage saw" + ("; `test gold (held out)` is the task's gold metric on them (`gold: true`), scored "
                          "alongside and never optimized." if any(a.test_gold_mean is not None for a in arms) else "."),
        "",
    ]
    same = [a.arm for a in arms if a.identical_seeds]
    if same:
        lines += [f"**Seeds that could not differ:** every seed of {', '.join(f'`{a}`' for a in same)} returned the "
                  "same program (same prompts and adapter), so its ± is not a confidence interval over anything. "
                  "Give the arm more room to differ (a larger trainset, more candidates) or read it as one run.", ""]
    for plot in plots:
        lines += [f"![{plot.stem}]({plot.name})", ""]
    lines += ["## Runs", "", "| arm | seed | val by stage (rollouts: score) | best val | test | test gold | rollouts "
              "| run id |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: ([a.arm for a in arms].index(r.arm), r.seed)):
        curve = ", ".join(f"{x}: {y:.2f}" for x, y in r.curve)
        test = f"{r.test:.3f}" if r.test is not None else "-"
        gold = f"{r.test_gold:.3f}" if r.test_gold is not None else "-"
        best = f"{r.final_val:.3f}" if r.final_val is not None else "-"
        lines.append(f"| {r.arm} | {r.seed} | {curve} | {best} | {test} | {gold} | {r.rollouts or 0:.0f} "
                     f"| `{r.run_id}` |")
    return "\n".join(lines) + "\n"


def compare(experiment: str, tracking_uri: str, out_dir: str | Path, *, arm_order: Sequence[str] | None = None
            ) -> Report:
    """Write ``report.md``, ``val_vs_rollouts.png`` and ``final_scores.png`` for ``experiment`` into ``out_dir``.

    Raises:
        TrackingError, CompareError: see :func:`fetch_runs`.
    """
    rows = fetch_runs(tracking_uri, experiment)
    arms = summarize(rows, arm_order)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    budget = rows[0].params.get("budget.rollouts", "?")
    plots = [plot_curves(rows, arms, out / "val_vs_rollouts.png",
                         f"{experiment}: val score vs rollouts spent (budget {budget} per run)"),
             plot_final(rows, arms, out / "final_scores.png", f"{experiment}: final score per arm")]
    table = format_table(arms)
    markdown = out / "report.md"
    tmp = markdown.with_name(markdown.name + ".tmp")
    tmp.write_text(_markdown(experiment, tracking_uri, arms, rows, table, plots))
    tmp.replace(markdown)
    return Report(experiment=experiment, tracking_uri=tracking_uri, out_dir=out, markdown=markdown, plots=plots,
                  table=table, arms=arms, runs=rows)


__all__ = ["ArmSummary", "CompareError", "Report", "RunRow", "TrackingError", "ci95", "compare", "fetch_runs",
           "format_table", "identical_programs", "summarize"]
