"""Helpers for experiment tests: real MLflow servers on 127.0.0.1, a real PostgreSQL, the CLI, small experiment files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.requires import missing

REPO = Path(__file__).resolve().parents[2]

SMALL_EXPERIMENT = """\
name: {name}
task: last_digit_long
program: predict
model: tiny
data: {{train: 16, val: 16, test: 16, seed: 0}}
arms:
  prompt-only: "p"
  rl-only: "w"
  joint: "p -> w"
seeds: [0]
threads: 1
budget: 192
prompt: {{max_bootstrapped_demos: 2, max_labeled_demos: 2, num_candidate_programs: 4}}
weights: {{learning_rate: 5.0e-4, num_generations: 4, examples_per_step: 4, max_tokens: 16}}
eval: {{threads: 8}}
"""


def write_experiment(path: Path, name: str = "small", extra: str = "", **replace: str) -> Path:
    """A small experiment file (3 arms x 1 seed on 16 examples), with optional extra YAML appended."""
    text = SMALL_EXPERIMENT.format(name=name)
    for old, new in replace.items():
        text = text.replace(old, new)
    path.write_text(text + textwrap.dedent(extra))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cotune(*args: str, cwd: Path, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the `cotune` CLI in a subprocess (as a user would)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "experiments.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def rest(url: str, path: str, payload: dict | None = None) -> dict:
    """One MLflow REST call (GET without payload, POST with)."""
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url.rstrip("/") + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def search_runs(url: str, experiment_id: str, filter_string: str = "") -> list[dict]:
    runs, token = [], None
    while True:
        payload = {"experiment_ids": [experiment_id], "filter": filter_string, "max_results": 1000}
        if token:
            payload["page_token"] = token
        page = rest(url, "/api/2.0/mlflow/runs/search", payload)
        runs += page.get("runs", [])
        token = page.get("next_page_token")
        if not token:
            return runs


def tags_of(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def metrics_of(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


@contextlib.contextmanager
def mlflow_server(root: Path, backend_uri: str | None = None, timeout: float = 120) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (sqlite backend in ``root`` unless ``backend_uri``); yields its URL."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    backend = backend_uri or f"sqlite:///{root / 'mlflow.db'}"
    log = open(root / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited early: {(root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"mlflow server not healthy after {timeout}s: "
                                   f"{(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # the server's own process group (we started it)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        log.close()


# --- PostgreSQL -------------------------------------------------------------------------------------


def postgres_bin() -> Path | None:
    """The folder holding initdb/pg_ctl/postgres: on PATH, or Debian's /usr/lib/postgresql/*/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    return None


@contextlib.contextmanager
def postgres_server(root: Path, databases: tuple[str, ...]) -> Iterator[str]:
    """A throwaway PostgreSQL on 127.0.0.1 (trust auth, user ``cotune``); yields ``host:port``.

    PostgreSQL refuses to run as root: as root, the server runs as the ``postgres`` system user in a folder of
    its own (pytest's temporary folders are private to root).
    """
    import tempfile

    bindir = postgres_bin()
    assert bindir is not None
    prefix: list[str] = []
    own_dir = None
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        if runuser is None:
            missing("postgres", "running as root without runuser: cannot start PostgreSQL as an unprivileged user")
        prefix = [runuser, "-u", "postgres", "--"]
        root = own_dir = Path(tempfile.mkdtemp(prefix="cotune-pg-"))
        shutil.chown(root, "postgres")
    root.mkdir(parents=True, exist_ok=True)
    data = root / "pgdata"
    port = free_port()

    def pg(*args: str) -> None:
        done = subprocess.run(prefix + list(args), capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed: {(done.stdout + done.stderr)[-2000:]}")

    try:
        pg(str(bindir / "initdb"), "-D", str(data), "-U", "cotune", "--auth=trust", "-E", "UTF8")
        options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={data} -c fsync=off"
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "pg.log"), "-w", "-t", "60",
           "start")
        try:
            import psycopg

            with psycopg.connect(f"host=127.0.0.1 port={port} user=cotune dbname=postgres", autocommit=True) as conn:
                for name in databases:
                    conn.execute(f'CREATE DATABASE "{name}"')
            yield f"127.0.0.1:{port}"
        finally:
            subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           capture_output=True, timeout=120)
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)


def exploding_metric(example, prediction, trace=None):
    """A metric that fails on every example (for crash tests: the run must end FAILED, not RUNNING)."""
    raise ZeroDivisionError("exploding metric")


def _contrarian(example, prediction, trace=None) -> float:
    """Rewards a well-formed *wrong* last digit: the component the reviewers' labels reject."""
    answer = str(getattr(prediction, "answer", "") or "").strip()
    return float(len(answer) == 1 and answer.isdigit() and answer != example.answer)


def contrarian_rubric():
    """The last-digit rubric with one bad component: correct and contrarian weigh the same, so its total cannot tell
    a right answer from a wrong one (both gated on format). Labels that pass right answers must zero it."""
    from metrics import Custom, ExactMatch, FormatValidity, Rubric

    return Rubric([ExactMatch("answer", name="correct"), FormatValidity(["answer"]),
                   Custom(_contrarian, name="contrarian")],
                  weights={"correct": 1, "format": 1, "contrarian": 1},
                  gates={"correct": "format", "contrarian": "format"}, name="contrarian")
