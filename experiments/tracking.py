"""MLflow tracking of ``optimize()`` runs: one parent run per call, one nested run per stage.

Why a callback on an explicit client: ``optimizers/`` knows nothing of MLflow (``optimize()`` works with
tracking off), and MLflow's fluent API keeps its active-run stack per thread. :class:`MlflowTracking` talks to
an ``MlflowClient`` with explicit experiment and run ids, so it works from any thread, nests runs under any
parent (an Optuna study run, say) and never touches the process-global active run.

What is logged (the x-axis of every curve is *rollouts spent*, the currency all arms share):

* parent run -- tags ``arm``, ``schedule``, ``task``, ``seed``, ``model_hash`` (+ the caller's); params: the
  run's full configuration flattened (``weights.learning_rate``, ``lora.r``, ``budget.rollouts`` ...);
  metrics ``val_score`` (and ``val/<component>``, ``gold_score``) after every stage at step = total rollouts,
  the weight stages' per-step metrics, and at the end ``final_val_score`` (the returned program's), ``last_val_score``,
  ``total_rollouts``, ``total_lm_calls``; artifacts: ``manifest.json``, ``run.json`` and ``best/`` (the bundle:
  program JSON + PEFT adapter + manifest).
* stage run (nested) -- tags ``stage``, ``stage_index``; per-step metrics of a ``w``/``s`` stage (reward
  mean/std and each rubric component, parse failures, KL, tokens...) at step = total rollouts; the stage's
  val score and spend; artifacts: ``program.json``, ``adapter/``, ``predictions.jsonl``, ``record.json``.

A crash marks the open runs FAILED (Ctrl-C: KILLED; an Optuna prune: KILLED with tag ``cotune.outcome=pruned``)
and keeps everything logged so far. A logging failure after the run started is a warning, never the end of a
training run.

A process killed outright (kill -9, a lost machine) cannot close its runs: they stay RUNNING. So every run carries
tags ``cotune.host``, ``cotune.pid`` and ``cotune.run_dir``, and the run ids are kept in the run folder
(``mlflow.json``). A resume (``resume=True``) continues the same parent and stage runs instead of opening new ones
beside them, and marks FAILED any other run of its folder still RUNNING (``optimize()`` holds the folder's lock, so
no live process owns them). :func:`close_abandoned_runs` (called by ``cotune compare``) marks FAILED the RUNNING runs
whose process, on this host, is gone.

Example:
    >>> from experiments.tracking import MlflowTracking                              # doctest: +SKIP
    >>> tracking = MlflowTracking("sqlite:///mlflow.db", "quickstart", tags={"task": "x"})  # doctest: +SKIP
    >>> optimize(program, train, val, metric=rubric, policy=policy, callbacks=[tracking])  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock

from optimizers.callbacks import OptimizeCallback
from optimizers.run_folder import process_alive
from rl.atomic import write_json

logger = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"
KIND_TAG = "cotune.kind"  # "run" (cotune run), "trial" (cotune tune), "study" (a tuning study's parent run)
OUTCOME_TAG = "cotune.outcome"  # completed / failed / killed / pruned
PROGRAM_HASH_TAG = "cotune.program_hash"  # the returned program's prompts + adapter: seeds that could not differ
HOST_TAG, PID_TAG, RUN_DIR_TAG = "cotune.host", "cotune.pid", "cotune.run_dir"  # who owns a RUNNING run
RUN_IDS_FILE = "mlflow.json"  # in the run folder: the parent and stage run ids, for a resume
MAX_PARAM_CHARS = 6000
DEFAULT_TRACES_PER_STAGE = 4  # rollouts (w) and val predictions (every stage) per stage, as MLflow traces


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, bad URI); the message says which and why."""


# --- where runs go ------------------------------------------------------------------------------


def default_tracking_uri(directory: str | os.PathLike | None = None) -> str:
    """``sqlite:///<cwd>/mlflow.db``: MLflow 3 refuses the old file store, so the default is explicit."""
    return f"sqlite:///{(Path(directory or Path.cwd()) / DEFAULT_DB).resolve()}"


def resolve_tracking_uri(explicit: str | None = None, configured: str | None = None) -> str:
    """The tracking URI: ``explicit`` (CLI) > ``configured`` (experiment file) > ``$MLFLOW_TRACKING_URI`` > default."""
    return explicit or configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any run starts, when the store cannot be used.

    Raises:
        TrackingError: an http(s) server that does not answer, a sqlite file in a missing folder, a file store,
            or a database that refuses connections.
    """
    shown = redact(uri)
    if uri.startswith(("http://", "https://")):
        base, headers = _without_credentials(uri.rstrip("/"))
        for path in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
            try:
                with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers),
                                            timeout=timeout) as response:
                    if response.status == 200:
                        _check_credentials(uri)
                        return
            except urllib.error.HTTPError as exc:
                if exc.code in (401, 403):
                    raise TrackingError(f"MLflow server {shown} refused the request (HTTP {exc.code}); check "
                                        "credentials (MLFLOW_TRACKING_TOKEN) or its --allowed-hosts") from None
                continue
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                raise TrackingError(f"cannot reach the MLflow tracking server at {shown} ({reason}); start it "
                                    "(mlflow server --host 127.0.0.1 --port PORT) or fix tracking.uri / "
                                    "MLFLOW_TRACKING_URI") from None
        raise TrackingError(f"{shown} answers, but not as an MLflow tracking server (no /health, no REST API)")
    if uri.startswith("file:") or "://" not in uri:
        raise TrackingError(f"tracking URI {shown!r} is a file store, which MLflow 3 refuses; use "
                            f"sqlite:///{DEFAULT_DB} or an http(s):// server")
    sqlite = sqlite_file(uri)
    if sqlite is not None and not sqlite.parent.is_dir():
        raise TrackingError(f"tracking URI {shown}: folder {str(sqlite.parent)!r} does not exist")
    from mlflow import MlflowClient

    # Opening a database store creates or migrates its tables. Two processes doing that to one fresh sqlite file at
    # once collide ("duplicate column name", or "table _alembic_tmp_experiments already exists", which leaves a
    # half-migrated file that no retry can open), so on one machine the first open is serialised by a lock file
    # beside the database. Server-backed stores migrate on the server; one attempt is enough there.
    lock = FileLock(f"{sqlite}.lock") if sqlite is not None else contextlib.nullcontext()
    try:
        with lock:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any driver error means the same thing to the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TrackingError(f"cannot use tracking store {shown}: {redact(first)}") from None


def _check_credentials(uri: str) -> None:
    """The server answers: check that it lets this client in (``/health`` needs no login on an auth server)."""
    from mlflow import MlflowClient

    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - only an auth refusal is worth its own message here
        text = str(exc)
        if "401" in text or "403" in text or "UNAUTHENTICATED" in text or "PERMISSION_DENIED" in text:
            raise TrackingError(f"MLflow server {redact(uri)} refused this client ({'401' if '401' in text else '403'})"
                                "; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (a server started with "
                                "--app-name basic-auth) or MLFLOW_TRACKING_TOKEN, see docs/cluster.md") from None
        # Anything else (a server mid-restart, a proxy hiccup) is no refusal of this client: the server answered its
        # health check, and a run that cannot log says so itself (logging failures are warnings, never the end of
        # a run). Say what happened rather than hide it.
        logger.warning("MLflow server %s answers, but listing experiments failed (%s); going on without checking "
                       "credentials", redact(uri), redact(_one_line(exc)))


def describe_store(uri: str) -> str:
    """Where the runs are and how to look at them."""
    sqlite = sqlite_file(uri)
    if sqlite is not None:
        return (f"{uri} (artifacts in {sqlite.parent / 'mlruns'}); browse with: "
                f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1")
    if uri.startswith(("http://", "https://")):
        return f"MLflow server {redact(uri)} (open it in a browser)"
    return redact(uri)


_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][\w+.-]*://)(?P<userinfo>[^:/@]+):(?P<password>.*)@(?P<rest>[^@]*)$")


_SECRET = re.compile(r"(?P<head>[A-Za-z][\w+.-]*://[^:/@\s]+):\S*@")


def redact(text: str) -> str:
    """``text`` safe to print: every ``scheme://user:secret@host`` in it becomes ``scheme://user:***@host``
    (tracking and Optuna storage URLs, and error messages that quote them; the password may contain ``@`` or ``/``).

    >>> redact("http://bob:p@ss/w0rd@127.0.0.1:5000"), redact("sqlite:///runs/mlflow.db")
    ('http://bob:***@127.0.0.1:5000', 'sqlite:///runs/mlflow.db')
    """
    return _SECRET.sub(r"\g<head>:***@", text)


def _without_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """An http(s) URL without its ``user:password@`` and the Basic-auth header that carries them instead (urllib
    would read them as part of the host)."""
    m = _USERINFO.match(uri)  # split at the user's ':' and the last '@' (a password may hold '@' or '/')
    if m is None:
        return uri, {}
    pair = f"{urllib.parse.unquote(m['userinfo'])}:{urllib.parse.unquote(m['password'])}"
    return m["scheme"] + m["rest"], {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URL (a tracking store or an Optuna storage), absolute (relative
    paths are relative to the working folder, as for SQLAlchemy); None for other URLs and for in-memory sqlite.

    >>> str(sqlite_file("sqlite:////tmp/optuna.db")), sqlite_file("postgresql://h/db"), sqlite_file("sqlite://")
    ('/tmp/optuna.db', None, None)
    """
    if not url.startswith("sqlite:///") or url.endswith(":memory:"):
        return None
    return Path(url[len("sqlite:///"):].split("?", 1)[0]).absolute()


def get_or_create_experiment(client: Any, name: str, uri: str) -> str:
    """The experiment id of ``name``, created if missing (safe when several workers race to create it)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore) "
                                "or use another name (tracking.experiment)")
        return experiment.experiment_id
    sqlite = sqlite_file(uri)
    location = (sqlite.parent / "mlruns").resolve().as_uri() if sqlite is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception as exc:  # noqa: BLE001 - another worker created it between our two calls
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        logger.debug("MLflow experiment %r was created by another process meanwhile (%s)", name, _one_line(exc))
        return experiment.experiment_id


# --- runs left RUNNING by a dead process -------------------------------------------------------------


def _abandon(client: Any, run: Any, why: str) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run.info.run_id, tags=[RunTag(OUTCOME_TAG, "failed"), RunTag("cotune.error", why[:5000])])
    client.set_terminated(run.info.run_id, "FAILED")


def _running(client: Any, experiment_id: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000,
                                  page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def close_abandoned_runs(tracking_uri: str, experiment: str) -> list[str]:
    """Mark FAILED the runs of ``experiment`` left RUNNING by a cotune process of this host that is gone.

    Runs of other hosts are left alone (whether their process lives cannot be told from here); so are runs
    without the ``cotune.host``/``cotune.pid`` tags (older cotune versions). Returns the ids marked.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    host, marked = socket.gethostname(), []
    for run in _running(client, found.experiment_id):
        tags = run.data.tags
        pid = tags.get(PID_TAG, "")
        if tags.get(HOST_TAG) != host or not pid.isdigit() or process_alive(int(pid)):
            continue
        _abandon(client, run, f"abandoned: process {pid} on {host} ended without closing this run (killed?); "
                              "marked FAILED by cotune compare")
        marked.append(run.info.run_id)
    return marked


# --- flattening -----------------------------------------------------------------------------------


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"weights": {"lr": 1}}`` -> ``{"weights.lr": 1}`` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def program_hash(result: Any) -> str:
    """A short hash of what ``optimize()`` returned: the program's prompts and demos, and the adapter's weights.

    An adapter whose ``lora_B`` weights are all zero adds nothing to the base model (LoRA's delta is B @ A), whatever
    its seeded ``lora_A``: it hashes as "no adapter", so that seeds which all kept the untrained adapter compare as
    the same program (``cotune compare`` flags such an arm: its seeds could not differ).
    """
    from optimizers.result import program_state

    # without the policy's LM bound to the predictors: dump_state() refuses an LM whose engine cannot be saved
    state = json.dumps(program_state(result.program), sort_keys=True, default=str)
    weights = result.policy.adapter_state()
    no_op = all(not v.any() for k, v in weights.items() if "lora_B" in k)
    adapter = "no adapter" if no_op else result.policy.adapter_hash(weights)
    return hashlib.sha256(f"{state}/{adapter}".encode()).hexdigest()[:16]


def _metric_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def _finite_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:5000]


# --- the callback ---------------------------------------------------------------------------------


class MlflowTracking(OptimizeCallback):
    """Log an ``optimize()`` call to MLflow (see the module docstring for what goes where).

    Args:
        tracking_uri: any MLflow tracking URI (``sqlite:///mlflow.db``, ``http://127.0.0.1:5000``, ...).
        experiment: MLflow experiment name (created if missing).
        tags: extra tags on the parent run (``task``, ``experiment``, ``cotune.kind``, Optuna trial number ...).
        run_name: the parent run's name (default ``<arm>-seed<seed>``).
        parent_run_id: nest the parent run under this run (a tuning study's run).
        log_artifacts: upload program JSON, adapters, predictions and bundles.
        extra_params: more params for the parent run (flattened), e.g. a trial's sampled values.
        resume: the run resumes ``optimize(resume=True)``: continue the parent and stage runs whose ids the run
            folder keeps (``mlflow.json``) instead of opening new ones.
        traces_per_stage: rollouts of each weight stage, and val predictions of each stage's evaluation, logged as
            MLflow traces (:mod:`experiments.traces`) for review; 0 turns traces off. Sets the process's tracking
            URI when on (MLflow writes traces there).
    """

    def __init__(self, tracking_uri: str, experiment: str, *, tags: Mapping[str, Any] | None = None,
                 run_name: str | None = None, parent_run_id: str | None = None, log_artifacts: bool = True,
                 extra_params: Mapping[str, Any] | None = None, resume: bool = False,
                 traces_per_stage: int = DEFAULT_TRACES_PER_STAGE) -> None:
        from mlflow import MlflowClient

        if not isinstance(traces_per_stage, int) or traces_per_stage < 0:
            raise TrackingError(f"traces_per_stage must be an int >= 0 (0: no traces), got {traces_per_stage!r}")

        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self.log_artifacts = log_artifacts
        self.extra_params = dict(extra_params or {})
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self.resume = resume
        self.resumed = False  # whether on_run_start continued the runs of an earlier process
        self.stage_runs: dict[int, str] = {}
        self._closed_stages: set[int] = set()
        self._open_stage: int | None = None
        self._run_dir: Path | None = None
        self._rollouts_before = 0
        self._started = 0.0
        self.errors = 0
        self.traces_per_stage = traces_per_stage
        self.traces: dict[int, list[str]] = {}  # stage index -> trace ids logged (rollouts, then val predictions)
        self.trace_seconds: dict[int, float] = {}  # stage index -> seconds the stage spent logging them
        self._judges: tuple[str, ...] = ()  # the rubric's LM-judge components (LLM_JUDGE assessments)
        self._process_uri: str | None = None  # the process's tracking URI before this run set it (traces on)

    # --- helpers ----------------------------------------------------------------------------------

    def _safe(self, what: str, fn, *args, **kwargs) -> Any:
        """Logging must never end a training run: a failure is a warning (and counted)."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            self.errors += 1
            logger.warning("MLflow tracking: %s failed (%s); the run goes on", what, _one_line(exc))
            return None

    def _log_batch(self, run_id: str, metrics: Mapping[str, Any] | None = None, step: int = 0,
                   params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        values = {k: _finite_number(v) for k, v in (metrics or {}).items()}
        metric_rows = [Metric(_metric_key(k), v, now, int(step)) for k, v in values.items() if v is not None]
        param_rows = [Param(k[:250], str(v)[:MAX_PARAM_CHARS]) for k, v in (params or {}).items()]
        tag_rows = [RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items()]
        for i in range(0, max(len(metric_rows), len(param_rows), len(tag_rows), 1), 100):
            chunk = (metric_rows[i:i + 100], param_rows[i:i + 100], tag_rows[i:i + 100])
            if any(chunk):
                self.client.log_batch(run_id, metrics=chunk[0], params=chunk[1], tags=chunk[2])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log more metrics on the parent run (the runner adds ``test_score`` this way before the run ends)."""
        if self.run_id is not None:
            self._safe("log_metrics", self._log_batch, self.run_id, metrics,
                       self._rollouts_before if step is None else step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.run_id is not None:
            self._safe("set_tags", self._log_batch, self.run_id, tags=tags)

    def _upload(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        if not self.log_artifacts or not path.exists():
            return
        if path.is_dir():
            self._safe(f"upload {path.name}", self.client.log_artifacts, run_id, str(path), artifact_path)
        else:
            self._safe(f"upload {path.name}", self.client.log_artifact, run_id, str(path), artifact_path)

    # --- hooks ------------------------------------------------------------------------------------

    def _owner_tags(self) -> dict[str, str]:
        tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
        if self._run_dir is not None:
            tags[RUN_DIR_TAG] = str(self._run_dir)
        return tags

    def on_run_start(self, run) -> None:
        """Open the parent run, or, resuming, continue the one the run folder names (``optimize()`` calls this once
        it holds the folder's lock, so no other live process writes to these runs)."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        self._started = time.time()
        self._judges = run.judges
        self.experiment_id = get_or_create_experiment(self.client, self.experiment, self.tracking_uri)
        if self.traces_per_stage:  # traces go to the process's store (experiments/traces.py); put back at the end
            import mlflow

            # trace ids from MLflow's own RNG: OpenTelemetry's default draws them from `random`, which a seeded run
            # reseeds, and two stages then drew the same id and one trace overwrote the other (seen in the tests)
            os.environ.setdefault("MLFLOW_TRACE_USE_ISOLATED_RANDOM_ID_GENERATOR", "true")
            self._process_uri = mlflow.get_tracking_uri()
            mlflow.set_tracking_uri(self.tracking_uri)
        self._run_dir = Path(run.output_dir).resolve() if run.output_dir is not None else None
        params = run.params
        tags = {"arm": run.arm, "schedule": params.get("schedule", ""), "seed": run.seed,
                "model_hash": str(params.get("base_fingerprint", ""))[:16], KIND_TAG: "run",
                **{k: v for k, v in (params.get("tags") or {}).items()}, **self.tags, **self._owner_tags()}
        if self.parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = self.parent_run_id
        flat = flatten({k: v for k, v in params.items() if k != "tags"})
        flat.update(flatten(self.extra_params))
        stored = self._stored_runs(run, arm=str(tags["arm"])) if self.resume else None
        if stored is not None:
            self.run_id, self.stage_runs, self.resumed = stored[0], stored[1], True
            self.client.update_run(self.run_id, status="RUNNING")
            tags = {k: v for k, v in tags.items() if k != MLFLOW_PARENT_RUN_ID}
            tags["cotune.resumed"] = time.strftime("%Y-%m-%d %H:%M:%S")
            self._safe("tag resumed run", self._log_batch, self.run_id, tags=tags)
            self._safe("log params", self._log_batch, self.run_id, params=flat)  # the same values: a no-op
        else:
            name = self.run_name or f"{run.arm}-seed{run.seed}"
            created = self.client.create_run(self.experiment_id, tags={k: str(v) for k, v in tags.items()},
                                             run_name=name)
            self.run_id = created.info.run_id
            self._log_batch(self.run_id, params=flat)
        self._save_run_ids()
        self._safe("close abandoned runs", self._close_abandoned_of_folder)
        self._log_restored(run)

    # --- run ids in the run folder (resume) -----------------------------------------------------------

    def _stored_runs(self, run, arm: str) -> tuple[str, dict[int, str]] | None:
        """The parent and stage run ids an earlier process of this run folder used, if they are in this store.

        ``arm`` is the ``arm`` tag this run is given: the experiment's arm name when the caller tags one (``cotune
        run``: ``arms: {rl: w}`` tags ``rl``), else the schedule's kind (``rl-only``)."""
        if self._run_dir is None or not (self._run_dir / RUN_IDS_FILE).exists():
            return None
        path = self._run_dir / RUN_IDS_FILE
        try:
            stored = json.loads(path.read_text())
            parent = self.client.get_run(stored["parent_run_id"])
            stages = {int(k): str(v) for k, v in (stored.get("stage_run_ids") or {}).items()}
        except Exception as exc:  # noqa: BLE001 - unreadable file or unknown run: open new runs, say why
            logger.warning("MLflow tracking: not continuing the runs named in %s (%s); opening new ones",
                           path, _one_line(exc))
            return None
        tags = parent.data.tags
        if (stored.get("tracking_uri") != redact(self.tracking_uri) or parent.info.experiment_id != self.experiment_id
                or parent.info.lifecycle_stage != "active" or tags.get("arm") != arm
                or tags.get("seed") != str(run.seed)):
            logger.warning("MLflow tracking: %s names runs of another store, experiment or arm/seed; opening new "
                           "runs", path)
            return None
        return parent.info.run_id, stages

    def _save_run_ids(self) -> None:
        if self._run_dir is None or not self._run_dir.is_dir():
            return
        data = {"tracking_uri": redact(self.tracking_uri), "experiment": self.experiment,
                "experiment_id": self.experiment_id, "parent_run_id": self.run_id,
                "stage_run_ids": {str(k): v for k, v in sorted(self.stage_runs.items())}}
        self._safe("save run ids", write_json, self._run_dir / RUN_IDS_FILE, data)

    def _close_abandoned_of_folder(self) -> None:
        """Mark FAILED the runs of this run folder (and host) that a dead process left RUNNING: the lock that
        ``optimize()`` holds on the folder means no live process owns them. Runs this tracker continues are kept."""
        if self._run_dir is None:
            return
        ours = {self.run_id, *self.stage_runs.values()}
        host = socket.gethostname()
        for found in _running(self.client, self.experiment_id):
            tags = found.data.tags
            if found.info.run_id in ours or tags.get(RUN_DIR_TAG) != str(self._run_dir) or tags.get(HOST_TAG) != host:
                continue
            _abandon(self.client, found, f"abandoned: process {tags.get(PID_TAG, '?')} on {host} ended without "
                                         f"closing this run (killed?); marked FAILED when {self._run_dir} was run "
                                         f"again (run {self.run_id})")

    def _log_restored(self, run) -> None:
        """A resumed run reloads its finished stages without calling stage hooks: log them now, tagged restored
        (those whose stage runs the earlier process finished are already logged)."""
        from optimizers.result import StageRecord
        from optimizers.run_folder import finished_stages

        if run.output_dir is None:
            return
        finished = finished_stages(Path(run.output_dir), run.stages)  # what optimize() reloads
        names = ("baseline",) + tuple(run.stages)
        for index in sorted(i for i in finished if 0 <= i < len(names)):
            path = Path(run.output_dir) / "stages" / f"{index}-{names[index]}" / "record.json"
            if not path.exists():
                continue
            record = StageRecord(**json.loads(path.read_text()))
            if index in self.stage_runs and self._status(self.stage_runs[index]) == "FINISHED":
                self._rollouts_before = int(record.total_spend.get("rollouts", 0))  # logged by the earlier process
                self._closed_stages.add(index)
                continue
            known = index in self.stage_runs
            stage_run = self._start_stage(run, index, record.stage)
            if stage_run is not None and not known:
                self._safe("tag restored", self._log_batch, stage_run, tags={"restored": "true"})
            self.on_stage_end(run, record)

    def _status(self, run_id: str) -> str | None:
        found = self._safe("get run", self.client.get_run, run_id)
        return found.info.status if found is not None else None

    def on_stage_start(self, run, index: int, stage: str) -> None:
        self._start_stage(run, index, stage)

    def _start_stage(self, run, index: int, stage: str) -> str | None:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        if self.run_id is None:
            return None
        tags = {MLFLOW_PARENT_RUN_ID: self.run_id, "stage": stage, "stage_index": index, "arm": run.arm,
                "seed": run.seed, KIND_TAG: "stage", **{k: v for k, v in self.tags.items() if k != KIND_TAG},
                **self._owner_tags()}
        if index in self.stage_runs:  # resuming: the stage run an earlier process opened goes on
            stage_run = self.stage_runs[index]
            self._safe("reopen stage run", self.client.update_run, stage_run, status="RUNNING")
            self._safe("tag stage run", self._log_batch, stage_run, tags={**self._owner_tags(), "resumed": "true"})
            self._open_stage = index
            return stage_run
        created = self._safe("create stage run", self.client.create_run, self.experiment_id,
                             tags={k: str(v) for k, v in tags.items()}, run_name=f"{index}-{stage}")
        if created is None:
            return None
        self.stage_runs[index] = created.info.run_id
        self._open_stage = index
        self._save_run_ids()
        return created.info.run_id

    def on_step(self, run, index: int, metrics: dict[str, Any]) -> None:
        stage_run = self.stage_runs.get(index)
        step = self._rollouts_before + int(metrics.get("rollouts", metrics.get("step", 0)) or 0)
        values = {k: v for k, v in metrics.items() if k not in ("rollouts",)}
        if stage_run is not None:
            self._safe("log step", self._log_batch, stage_run, values, step)
        if self.run_id is not None:
            self._safe("log step", self._log_batch, self.run_id, {f"train/{k}": v for k, v in values.items()}, step)

    def _log_traces(self, index: int, cases: list) -> None:
        """Log ``cases`` as traces of stage ``index`` (MLflow writes them on its export thread; the time spent here,
        building spans, is what the stage pays and is recorded)."""
        from experiments.traces import log_traces

        if not cases:
            return
        start = time.perf_counter()
        ids = self._safe("log traces", log_traces, cases, self.experiment_id, self.stage_runs.get(index) or self.run_id,
                         self._judges)
        self.traces.setdefault(index, []).extend(ids or [])
        self.trace_seconds[index] = self.trace_seconds.get(index, 0.0) + time.perf_counter() - start

    def _finish_traces(self) -> None:
        """Wait for MLflow to write the traces, record per stage how many and the time spent logging them, and put
        the process's tracking URI back."""
        if self.traces:
            import mlflow

            self._safe("flush traces", mlflow.flush_trace_async_logging, terminate=False)
            for index, ids in self.traces.items():
                stage_run = self.stage_runs.get(index)
                if stage_run is not None:
                    self._safe("log traces", self._log_batch, stage_run,
                               {"traces": len(ids), "trace_seconds": self.trace_seconds.get(index, 0.0)})
        self._restore_process_uri()

    def _trace_tags(self, run, index: int, stage: str, **more: Any) -> dict[str, Any]:
        return {"cotune.run": self.run_id, "cotune.stage": f"{index}-{stage}", "cotune.stage_index": index,
                "cotune.arm": run.arm, "cotune.seed": run.seed, **more}

    def on_rollouts(self, run, index: int, step: int, rollouts, predictor_name) -> None:
        """Log the first ``traces_per_stage`` rollouts of a ``w`` or ``s`` stage (different examples where it can)."""
        from experiments.traces import from_rollout, sample_rollouts

        left = self.traces_per_stage - len(self.traces.get(index, []))
        if self.run_id is None or left <= 0:
            return
        tags = self._trace_tags(run, index, run.stages[index - 1], **{"cotune.step": step, "cotune.source": "rollout"})
        self._log_traces(index, [from_rollout(r, predictor_name, tags) for r in sample_rollouts(rollouts, left)])

    def on_evaluation(self, run, record, evaluation) -> None:
        """Log the stage's greedy predictions on the first ``traces_per_stage`` val examples (the same examples
        after every stage, so a reviewer can follow one question through the run)."""
        from experiments.traces import from_prediction

        if self.run_id is None or not self.traces_per_stage:
            return
        tags = self._trace_tags(run, record.index, record.stage, **{"cotune.source": "eval"})
        cases = [from_prediction(example, prediction, score.value if score is not None else 0.0,
                                 score.components if score is not None else {}, tags)
                 for example, prediction, score in evaluation.results[: self.traces_per_stage]]
        self._log_traces(record.index, cases)

    def on_stage_end(self, run, record) -> None:
        if self.run_id is None:
            return
        stage_run = self.stage_runs.get(record.index) or self._start_stage(run, record.index, record.stage)
        step = int(record.total_spend.get("rollouts", 0))
        self._rollouts_before = step
        scores = {"val_score": record.val_score, **{f"val/{k}": v for k, v in record.val_components.items()}}
        if record.gold_score is not None:
            scores["gold_score"] = record.gold_score
        stage_metrics = {**scores, "val_errors": record.val_errors, "seconds": record.seconds,
                         "spend_rollouts": record.spend.get("rollouts", 0),
                         "spend_lm_calls": record.spend.get("lm_calls", 0),
                         "total_rollouts": step, "total_lm_calls": record.total_spend.get("lm_calls", 0)}
        self._safe("log stage", self._log_batch, self.run_id,
                   {**scores, "total_lm_calls": record.total_spend.get("lm_calls", 0), "stage_index": record.index},
                   step)
        if stage_run is None:
            return
        details = {k: v for k, v in record.details.items() if k not in ("history", "config")}
        params = flatten({"details": details}) if details else {}
        tags = {"note": record.note} if record.note else {}
        if record.events:
            tags["events"] = " | ".join(record.events)
        self._safe("log stage", self._log_batch, stage_run, stage_metrics, step, params=params, tags=tags)
        folder = run.output_dir / "stages" / record.name if run.output_dir is not None else None
        if folder is not None and folder.is_dir():
            for name in ("program.json", "predictions.jsonl", "record.json"):
                self._upload(stage_run, folder / name)
            self._upload(stage_run, folder / "adapter", "adapter")
        elif self.log_artifacts:
            self._safe("log record", self.client.log_dict, stage_run, record.to_dict(), "record.json")
        self._safe("end stage run", self.client.set_terminated, stage_run, "FINISHED")
        self._closed_stages.add(record.index)
        self._open_stage = None

    def _restore_process_uri(self) -> None:
        if self._process_uri is not None:
            import mlflow

            mlflow.set_tracking_uri(self._process_uri)
            self._process_uri = None

    def on_run_end(self, run, result) -> None:
        self._finish_traces()
        if self.run_id is None:
            return
        last = result.history[-1]
        final = {"final_val_score": result.val_score, "last_val_score": last.val_score,
                 "best_stage_index": result.best.index, "total_rollouts": last.total_spend.get("rollouts", 0),
                 "total_lm_calls": last.total_spend.get("lm_calls", 0), "wall_seconds": time.time() - self._started}
        if result.best.gold_score is not None:
            final["final_gold_score"] = result.best.gold_score
        tags = {OUTCOME_TAG: "completed", "best_stage": result.best.name}
        digest = self._safe("hash the program", program_hash, result)
        if digest is not None:
            tags[PROGRAM_HASH_TAG] = digest
        self._safe("log final", self._log_batch, self.run_id, final, self._rollouts_before, tags=tags)
        if run.output_dir is not None:
            self._upload(self.run_id, Path(run.output_dir) / "best" / "manifest.json")
            self._upload(self.run_id, Path(run.output_dir) / "run.json")
            self._upload(self.run_id, Path(run.output_dir) / "best", "best")
        elif self.log_artifacts:
            self._safe("log manifest", self.client.log_dict, self.run_id, result.manifest(), "manifest.json")
        if self.errors:
            self._safe("tag errors", self._log_batch, self.run_id, tags={"cotune.tracking_errors": self.errors})
        self._safe("end run", self.client.set_terminated, self.run_id, "FINISHED")

    def on_run_error(self, run, error: BaseException) -> None:
        self._finish_traces()
        if self.run_id is None:
            return
        if type(error).__name__ == "TrialPruned":
            status, outcome = "KILLED", "pruned"
        elif isinstance(error, KeyboardInterrupt):
            status, outcome = "KILLED", "killed"
        else:
            status, outcome = "FAILED", "failed"
        tags = {OUTCOME_TAG: outcome, "cotune.error": _one_line(error)}
        for index, stage_run in self.stage_runs.items():  # the open stage, and stage runs a resume had not reached
            if index in self._closed_stages:
                continue
            self._safe("tag stage", self._log_batch, stage_run, tags=tags)
            self._safe("end stage run", self.client.set_terminated, stage_run, status)
        self._safe("tag run", self._log_batch, self.run_id, tags=tags)
        if run.output_dir is not None:
            self._upload(self.run_id, Path(run.output_dir) / "run.json")
        self._safe("end run", self.client.set_terminated, self.run_id, status)
