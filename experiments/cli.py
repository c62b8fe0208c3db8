"""The ``cotune`` command line.

Why argparse: one small dependency-free parser whose ``--help`` is the documentation. Each subcommand is a
thin shell over the Python API; errors from cotune become a one-line message and exit code 2 (Ctrl-C: 130).

    cotune run EXPERIMENT.yaml        # every arm x seed of an experiment, tracked in MLflow
    cotune compare EXPERIMENT.yaml    # read the runs back from MLflow; write a Markdown + PNG report
    cotune tune EXPERIMENT.yaml --trials N   # one Optuna worker on the experiment's study (start several)
    cotune export RUN_OR_BUNDLE OUT   # a stand-alone bundle (program + PEFT adapter [+ merged weights])
    cotune review EXPERIMENT          # label logged rollouts (one keystroke each), or --mlflow-queue for MLflow's UI
    cotune calibrate EXPERIMENT.yaml  # fit the rubric's weights to those labels; write calibrated/NAME-vK.json
    cotune config SECTION             # the fields an experiment file takes under prompt / weights / self_training / lora
    cotune model build tiny           # build (or reuse) the embedded test model, then report its accuracy
    cotune model build agent          # the same for the embedded ReAct agent model (its band per question kind)
    cotune model eval PATH            # parse rate and accuracy of any local model on the default task

Tracking URI: ``--tracking-uri`` > the file's ``tracking.uri`` > ``$MLFLOW_TRACKING_URI`` > ``./mlflow.db``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import warnings
from pathlib import Path


def _cmd_model_build(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.name not in ("tiny", "agent"):
        raise SystemExit(f"cotune: unknown model {args.name!r}; the embedded models are 'tiny' and 'agent'")
    bar = None

    def progress(step: int, total: int, loss: float) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="warm-start SFT", unit="step")
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    start = time.time()
    if args.name == "agent":
        from embedded import agent_model_path

        path = agent_model_path(seed=args.seed, progress=progress, force=args.force, from_recipe=True)
    else:
        from embedded import tiny_model_path

        path = tiny_model_path(seed=args.seed, progress=progress, force=args.force, from_recipe=True)
    if bar is not None:
        bar.close()
    print(f"{args.name} model built from its recipe at {path} ({time.time() - start:.0f}s)")
    measured = None
    if not args.no_eval:
        _threads(args.threads)  # for the report only: the warm-start training keeps torch's default
        if args.name == "agent":  # the band on the 72 held-out react_tools questions, per question kind
            from embedded import agent_band_problems, measure_agent_band

            measured = measure_agent_band(path)
            print("in the band" if not agent_band_problems(measured) else
                  "OUT of the band: " + "; ".join(agent_band_problems(measured)))
        else:
            _report(path, args.eval_size)
    if args.ship:
        if args.name == "agent":
            from embedded import ship_agent_model

            print(f"shipped: {ship_agent_model(path, measured=measured)}")
        else:
            from embedded import ship_tiny_model

            print(f"shipped: {ship_tiny_model(path)}")
    return 0


def _cmd_model_eval(args: argparse.Namespace) -> int:
    _threads(args.threads)
    _report(args.path, args.eval_size)
    return 0


def _report(path, n: int) -> None:
    """Greedy and sampled accuracy of a model on the default task's held-out questions."""
    from experiments.model_report import evaluate_default_task

    for row in evaluate_default_task(path, n):
        print(row)


def _seeds(text: str | None) -> list[int] | None:
    """``--seeds 0,1,2``: distinct integers >= 0, checked before anything is written."""
    if not text:
        return None
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers >= 0 like 0,1,2, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds takes distinct integers >= 0 like 0,1,2, got {text!r}")
    return seeds


def _names(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _cmd_run(args: argparse.Namespace) -> int:
    from experiments.config import describe, load_experiment
    from experiments.runner import run_experiment
    from rl import distributed

    exp = load_experiment(args.experiment)
    _seeds(args.seeds)  # a bad --seeds fails before anything else
    main = distributed.is_main_process()  # under accelerate launch the other ranks train silently
    if main:
        print(f"[cotune] {describe(exp)}", flush=True)
    _threads(args.threads or exp.threads)
    seeds = _seeds(args.seeds)
    outcomes = run_experiment(exp, arms=_names(args.arms), seeds=seeds, tracking_uri=args.tracking_uri,
                              track=not args.no_tracking, resume=args.resume, overwrite=args.overwrite,
                              verbose=args.verbose)
    if outcomes and not args.no_tracking and main:
        print(f"[cotune] {len(outcomes)} runs finished; compare them with: cotune compare {args.experiment}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from experiments.compare import compare
    from experiments.tracking import close_abandoned_runs, describe_store

    name, uri, exp = _experiment_and_uri(args, check_task=False)
    out, order = (exp.reports_dir, [a.name for a in exp.arms]) if exp is not None else (None, None)
    abandoned = close_abandoned_runs(uri, name)
    if abandoned:
        print(f"[cotune] marked {len(abandoned)} run(s) FAILED that a killed cotune process on this host had left "
              f"RUNNING: {', '.join(abandoned)}", file=sys.stderr)
    report = compare(name, uri, args.out or out or Path("reports") / name, arm_order=order)
    print(report.table)
    print(f"\nreport: {report.markdown}")
    print("plots:  " + ", ".join(str(p) for p in report.plots))
    print(f"MLflow: {describe_store(uri)}")
    return 0


def _experiment_and_uri(args: argparse.Namespace, check_task: bool = True):
    """(MLflow experiment name, tracking URI, the experiment file or None) from a YAML path or a name."""
    from experiments.tracking import check_tracking_uri, resolve_tracking_uri

    exp, name, configured = None, args.experiment, None
    if args.experiment.endswith((".yaml", ".yml")) or Path(args.experiment).is_file():
        from experiments.config import load_experiment

        exp = load_experiment(args.experiment, check_task=check_task)
        name, configured = exp.mlflow_experiment, exp.tracking_uri
    uri = resolve_tracking_uri(args.tracking_uri, configured)
    check_tracking_uri(uri)
    return name, uri, exp


def _cmd_review(args: argparse.Namespace) -> int:
    import mlflow
    from mlflow import MlflowClient

    from experiments.review import ReviewError, fetch_items, read_key, review_loop
    from experiments.tracking import redact

    name, uri, _ = _experiment_and_uri(args)
    found = MlflowClient(uri).get_experiment_by_name(name)
    if found is None:
        raise ReviewError(f"no MLflow experiment {name!r} in {redact(uri)}; run it first (cotune run)")
    stage = f"tags.`cotune.stage` = '{args.stage}'" if args.stage else None
    items = fetch_items(MlflowClient(uri), found.experiment_id, filter_string=stage)
    if not items:
        raise ReviewError(f"experiment {name!r} has no cotune traces{' in stage ' + args.stage if args.stage else ''}"
                          " (cotune run logs some unless tracking.traces is 0)")
    mlflow.set_tracking_uri(uri)  # labels are written through MLflow's fluent assessment API
    if args.mlflow_queue:
        from experiments.review import enqueue

        queue_id, added = enqueue(found.experiment_id, items, args.mlflow_queue)
        print(f"[cotune] {added} traces added to MLflow review queue {args.mlflow_queue!r} ({queue_id}) of "
              f"experiment {name!r}: open the experiment's Review page in the MLflow UI (mlflow ui / mlflow server)")
        return 0
    review_loop(items, key=read_key, ask=input, write=lambda text: print(text, end="", flush=True),
                reviewer=args.reviewer, limit=args.limit)
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from experiments.calibration import calibrate_experiment
    from experiments.runner import resolve_metric
    from experiments.tasks import resolve_task
    from metrics import Rubric

    name, uri, exp = _experiment_and_uri(args)
    if exp is None:
        raise ValueError("cotune calibrate needs the experiment YAML (its task's rubric is what gets calibrated)")
    rubric = resolve_metric(exp, resolve_task(exp.task))
    if not isinstance(rubric, Rubric):
        raise ValueError(f"the experiment's metric ({exp.metric}) is not a rubric: there are no weights to calibrate")
    base = exp.metric
    if base.endswith(".json"):  # calibrating a calibrated rubric again: the new file reweights the same base
        from experiments.calibration import base_metric_of

        base = base_metric_of(base)
    outcome = calibrate_experiment(uri, name, rubric, base_metric=base, out_dir=args.out, seed=args.seed,
                                   gold=not args.human_only)
    print(outcome.calibration.summary())
    print(f"\nlabels: {outcome.human} HUMAN, {outcome.gold} GOLD | written: {outcome.path} "
          f"(use it with `metric: {outcome.path}`) | MLflow run {outcome.run_id}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from experiments.config import load_experiment
    from experiments.tuning import tune_experiment

    exp = load_experiment(args.experiment)
    trials = args.trials or (exp.tune.trials if exp.tune else None)
    if not trials:
        raise ValueError("how many trials? pass --trials N (or set tune.trials in the file)")
    _threads(args.threads or exp.threads)
    outcome = tune_experiment(exp, trials, storage=args.storage, study_name=args.study, tracking_uri=args.tracking_uri,
                              worker_index=args.worker_index, verbose=args.verbose)
    states = ", ".join(f"{v} {k.lower()}" for k, v in sorted(outcome.states.items()))
    print(f"[cotune] study {outcome.study!r}: {states}")
    if outcome.best is None:
        print("[cotune] no trial completed yet; no best configuration")
        return 0
    best = outcome.best
    print(f"[cotune] best: trial {best['number']}, val {best['value']:.3f}")
    for key, value in best["params"].items():
        print(f"    {key}: {value}")
    print(f"[cotune] best configuration saved with the study's MLflow run {outcome.study_run_id} (best_config.yaml)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from optimizers.result import export

    source = args.source
    if source.startswith("runs:/"):
        source = _download_bundle(source, args.tracking_uri)
    out = export(source, args.out, merged=args.merged, overwrite=args.overwrite)
    print(f"bundle written to {out}" + (" (with merged weights)" if args.merged else ""))
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from experiments.config import SPACE_SECTIONS
    from rl.config import config_help

    print(config_help(SPACE_SECTIONS[args.section]()))
    return 0


def _download_bundle(uri: str, tracking_uri: str | None) -> str:
    """``runs:/<run id>``: the run's ``best/`` bundle, downloaded from MLflow."""
    import tempfile

    from mlflow import MlflowClient

    from experiments.tracking import check_tracking_uri, resolve_tracking_uri

    tracking = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(tracking)
    run_id = uri[len("runs:/"):].strip("/").split("/")[0]
    target = tempfile.mkdtemp(prefix="cotune-export-")
    try:
        return MlflowClient(tracking_uri=tracking).download_artifacts(run_id, "best", target)
    except Exception as exc:  # noqa: BLE001 - one line for the user
        raise ValueError(f"cannot download the bundle of run {run_id} from {tracking}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    """The ``cotune`` parser: one helper below per subcommand, so that each one's options read on their own."""
    parser = argparse.ArgumentParser(prog="cotune", description="Co-optimize prompts and LoRA weights of DSPy programs.")
    sub = parser.add_subparsers(dest="command", required=True)
    track, compute = _shared_options()
    # The order of the calls below is the order of the subcommands in `cotune --help`.
    _add_run(sub, track, compute)
    _add_compare(sub, track)
    _add_tune(sub, track, compute)
    _add_review(sub, track)
    _add_calibrate(sub, track)
    _add_export(sub, track)
    _add_config(sub)
    _add_model(sub)
    return parser


def _shared_options() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The options several subcommands take: where to track (``track``) and how to compute (``compute``)."""
    track = argparse.ArgumentParser(add_help=False)
    track.add_argument("--tracking-uri", help="MLflow tracking URI (default: the file's tracking.uri, then "
                                              "$MLFLOW_TRACKING_URI, then sqlite:///./mlflow.db)")
    compute = argparse.ArgumentParser(add_help=False)
    compute.add_argument("--threads", type=int, help="torch CPU threads (default: the file's threads, else torch's own; "
                                                          "1 per worker when several share a machine)")
    compute.add_argument("--verbose", action="store_true", help="show every progress bar and DSPy message "
                                                                "(default: one line per stage; the rest goes to a log)")
    return track, compute


def _add_run(sub, track: argparse.ArgumentParser, compute: argparse.ArgumentParser) -> None:
    run = sub.add_parser("run", parents=[track, compute], help="run every arm x seed of an experiment file",
                         description="Run every arm x seed of an experiment file (one optimize() call each), tracked "
                                     "in MLflow: one parent run per call, a nested run per stage.")
    run.add_argument("experiment", help="experiment YAML, e.g. experiments/quickstart.yaml")
    run.add_argument("--arms", help="comma-separated arm names to run (default: all)")
    run.add_argument("--seeds", help="comma-separated seeds to run (default: the file's)")
    folder = run.add_mutually_exclusive_group()
    folder.add_argument("--resume", action="store_true",
                        help="where a run folder already holds a run: skip it when completed, continue it when "
                             "interrupted (refused when the experiment's settings changed)")
    folder.add_argument("--overwrite", action="store_true",
                        help="where a run folder already holds a run: move it aside to <folder>.old-<date>-<time> "
                             "(never deleted) and start over. Without --resume or --overwrite such a folder is "
                             "refused before anything runs")
    run.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    run.set_defaults(func=_cmd_run)


def _add_compare(sub, track: argparse.ArgumentParser) -> None:
    compare = sub.add_parser("compare", parents=[track], help="report comparing an experiment's arms (from MLflow)",
                             description="Read an experiment's finished runs back from MLflow and write report.md, "
                                         "val_vs_rollouts.png and final_scores.png; print the table.")
    compare.add_argument("experiment", help="experiment YAML, or an MLflow experiment name")
    compare.add_argument("--out", help="report folder (default: the file's report_dir, else reports/<experiment>)")
    compare.set_defaults(func=_cmd_compare)


def _add_tune(sub, track: argparse.ArgumentParser, compute: argparse.ArgumentParser) -> None:
    tune = sub.add_parser("tune", parents=[track, compute], help="one Optuna worker on the experiment's study",
                          description="Join (or create) the experiment's Optuna study and run N trials in this "
                                      "process; each trial is an optimize() run nested under the study's MLflow run. "
                                      "Start several workers with the same --storage to share the study.")
    tune.add_argument("experiment", help="experiment YAML with a tune: section")
    tune.add_argument("--trials", type=int, help="trials this worker runs (default: tune.trials)")
    tune.add_argument("--storage", help="Optuna storage: sqlite:///optuna.db (default: tune.storage), "
                                        "postgresql+psycopg://user@host/db, journal:PATH")
    tune.add_argument("--study", help="study name (default: tune.study, else the experiment's name)")
    tune.add_argument("--worker-index", type=int, default=0,
                      help="distinct per worker of one study (offsets the sampler's seed)")
    tune.set_defaults(func=_cmd_tune)


def _add_review(sub, track: argparse.ArgumentParser) -> None:
    review = sub.add_parser("review", parents=[track], help="label logged rollouts, one keystroke each (HUMAN "
                                                             "feedback in MLflow)",
                            description="Show the experiment's traces that most need a person (the rubric and the gold "
                                        "answer disagree, then the rubric's components conflict) and record p(ass), "
                                        "f(ail) or c(orrected answer) as HUMAN assessments in MLflow, the same ones "
                                        "the MLflow UI's Traces page writes.")
    review.add_argument("experiment", help="experiment YAML, or an MLflow experiment name")
    review.add_argument("--stage", help="only traces of this stage, e.g. 2-w")
    review.add_argument("--limit", type=int, help="at most this many traces")
    review.add_argument("--reviewer", default="cotune-review", help="the HUMAN source id written with each label")
    review.add_argument("--mlflow-queue", metavar="NAME", help="instead of asking here, put the queue (in the same "
                                                                "order) into an MLflow review queue for the UI")
    review.set_defaults(func=_cmd_review)


def _add_calibrate(sub, track: argparse.ArgumentParser) -> None:
    calibrate = sub.add_parser("calibrate", parents=[track], help="fit the rubric's weights to the labels on the "
                                                                   "experiment's traces",
                               description="Read HUMAN labels (and, where none, the gold answer) from the "
                                           "experiment's traces, fit the rubric's component weights and gates, print "
                                           "agreement before and after on held-out labels, write the next "
                                           "calibrated/<experiment>-v<k>.json and log it to MLflow.")
    calibrate.add_argument("experiment", help="experiment YAML")
    calibrate.add_argument("--out", default="calibrated", help="folder of the versioned rubric files")
    calibrate.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    calibrate.add_argument("--human-only", action="store_true", help="ignore the gold answers; HUMAN labels only")
    calibrate.set_defaults(func=_cmd_calibrate)


def _add_export(sub, track: argparse.ArgumentParser) -> None:
    export = sub.add_parser("export", parents=[track], help="write a stand-alone bundle (program + PEFT adapter)",
                            description="Copy the best program and adapter of a run folder, a bundle, or an MLflow "
                                        "run (runs:/<run id>) into OUT, optionally with the adapter merged into full "
                                        "weights.")
    export.add_argument("source", help="a run folder (runs/<exp>/<arm>/seed-<k>), a bundle, or runs:/<run id>")
    export.add_argument("out", help="the bundle folder to write")
    export.add_argument("--merged", action="store_true", help="also write merged full weights (a plain HF model)")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it is not empty")
    export.set_defaults(func=_cmd_export)


def _add_config(sub) -> None:
    from experiments.config import SPACE_SECTIONS

    config = sub.add_parser("config", help="the settings an experiment YAML accepts under a section",
                            description="Print one line per setting an experiment YAML (or optimize()) accepts "
                                        "under SECTION: name (type, default): help.")
    config.add_argument("section", choices=list(SPACE_SECTIONS), help="the YAML section (the stage config it fills)")
    config.set_defaults(func=_cmd_config)


def _add_model(sub) -> None:
    model = sub.add_parser("model", help="build or inspect local models").add_subparsers(dest="model_cmd", required=True)
    build = model.add_parser("build", help="rebuild an embedded model (tiny or agent) from its recipe (cached under "
                                           "$COTUNE_CACHE); the shipped weights need no build",
                             description="Build the recipe of a shipped embedded model on this machine and report "
                                         "whether it lands in the quality band. Builds differ across CPUs; "
                                         "--ship copies the build over the shipped weights (for maintainers).")
    build.add_argument("name", choices=["tiny", "agent"], help="which embedded model to build: tiny (last digit) "
                                                             "or agent (react_tools ReAct episodes)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    build.add_argument("--no-eval", action="store_true", help="skip the accuracy report after building")
    build.add_argument("--ship", action="store_true", help="copy the build into embedded/weights/ (replaces the "
                                                           "shipped weights; every recorded number changes)")
    build.add_argument("--eval-size", type=int, default=500, help="held-out questions for the tiny model's report "
                                                                  "(the agent's band uses its 72 test questions)")
    build.add_argument("--threads", type=int, help="torch CPU threads for the report (1 is fastest for the tiny "
                                                   "model on 2 cores)")
    build.set_defaults(func=_cmd_model_build)

    evaluate = model.add_parser("eval", help="accuracy of a local model folder on the default task")
    evaluate.add_argument("path", help="a Hugging Face model folder")
    evaluate.add_argument("--eval-size", type=int, default=500)
    evaluate.add_argument("--threads", type=int, help="torch CPU threads")
    evaluate.set_defaults(func=_cmd_model_eval)


def _quiet_libraries() -> None:
    import logging

    import mlflow  # noqa: F401 - importing it sets its loggers to INFO, so it must come before quieting them

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    for name in ("mlflow", "alembic", "optuna"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # A tracking server that goes away mid-run should cost seconds of retries, not minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def _sigterm(signum, frame):  # noqa: ARG001 - a polite kill ends runs as KILLED, like Ctrl-C
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    from embedded.shipped import EmbeddedModelError
    from experiments.tracking import TrackingError
    from rl import distributed
    from rl.errors import CotuneRLError

    args = build_parser().parse_args(argv)
    if distributed.is_distributed() and args.func is not _cmd_run:
        print(f"cotune: error: only `cotune run` trains data-parallel under accelerate launch / torchrun (this is rank "
              f"{distributed.rank()} of {distributed.world_size()}); run this command in one process", file=sys.stderr)
        return 2
    _quiet_libraries()
    previous = signal.signal(signal.SIGTERM, _sigterm) if _main_thread() else None
    try:
        return args.func(args)
    except (CotuneRLError, TrackingError, EmbeddedModelError, ValueError, FileNotFoundError, FileExistsError,
            distributed.MainProcessError) as exc:
        print(f"cotune: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except (PermissionError, NotADirectoryError, IsADirectoryError) as exc:  # a path the user gave cannot be used
        print(f"cotune: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cotune: interrupted (open MLflow runs were marked KILLED)", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        close_tracing()


def close_tracing() -> None:
    """Drop MLflow's tracer provider before the interpreter exits.

    Why: with ``MLFLOW_TRACE_USE_ISOLATED_RANDOM_ID_GENERATOR`` (which tracked runs set, see
    :meth:`experiments.tracking.MlflowTracking.on_run_start`), MLflow 3.17's id generator is collected at interpreter
    teardown, after its module's globals are gone, and prints "Exception ignored in ... __del__ ... AttributeError"
    at the end of every ``cotune run``. ``mlflow.tracing.reset()`` (public) drops it while they still exist; the next
    trace starts a fresh provider. Checked by tests/experiments/test_cli.py (it fails when MLflow changes).
    """
    if "mlflow.tracing" in sys.modules:
        sys.modules["mlflow.tracing"].reset()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
