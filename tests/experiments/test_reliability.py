"""`cotune run` loses nothing and runs nothing it was not asked to (issue 14, the experiments side).

Each test repeats a probe that once failed: a second `cotune run` deleting the first, `--resume` answering
"completed; skipped" after the settings changed, arms overwriting each other's folders, MLflow runs left RUNNING
after kill -9 and duplicated by the resume, two processes in one run folder, bad input ending in a traceback or a
half-made folder, and experiment files that run code (a metric from the current directory or the standard
library, a foreign `vllm.python`). Runs are real (the embedded tiny model, a real sqlite MLflow store); the slow
ones kill a real `cotune run` process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.cli import main
from experiments.config import ConfigError, parse_experiment
from tests.experiments.helpers import REPO

TINY = """\
name: {name}
task: last_digit_long
program: predict
model: tiny
data: {{train: 8, val: 8, test: 0, seed: 0}}
arms:
  rl-only: "w"
seeds: [0]
threads: 1
budget: {budget}
weights: {{learning_rate: {lr}, num_generations: 4, examples_per_step: 2, max_tokens: 16, checkpoint_every: 2}}
eval: {{threads: 8}}
"""


def tiny_experiment(folder: Path, name: str = "rel", budget: int = 16, lr: str = "5.0e-4", extra: str = "",
                    file: str | None = None) -> Path:
    """A one-arm experiment of a few seconds (``budget`` rollouts of a weight stage, 8 per step)."""
    path = folder / (file or f"{name}.yaml")
    path.write_text(TINY.format(name=name, budget=budget, lr=lr) + extra)
    return path


def error_of(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; it must fail with one line on stderr and exit code 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cotune: error:") and "\n" not in err, err
    return err


def start_cotune(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "experiments.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for_line(process: subprocess.Popen, text: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    for line in process.stdout:
        if text in line:
            return
        assert time.time() < deadline, f"no {text!r} within {timeout}s"
    raise AssertionError(f"the process ended before printing {text!r}: {process.stderr.read()[-3000:]}")


def runs_of(uri: str, experiment: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    return list(client.search_runs([found.experiment_id], max_results=1000)) if found else []


def parents(runs: list) -> list:
    return [r for r in runs if r.data.tags.get("cotune.kind") == "run"]


# --- arm names, bad input, code execution: refused before anything runs ------------------------------------


BASE = "name: x\ntask: last_digit_long\ndata: {train: 8, val: 8}\nbudget: 16\n"


@pytest.mark.parametrize("arms, problem", [
    ('{"a/b": "p", "a b": "w"}', "arm names 'a/b' and 'a b' would share the folder 'a_b'"),
    ('{"Joint": "p", "joint": "w"}', "would share the folder 'joint'"),
    ('{"..": "p"}', "'..' would be a hidden or parent folder"),
    ('{".": "p"}', "hidden or parent folder"),
    ('{"tune": "p"}', "reserved for `cotune tune`"),
])
def test_arm_names_that_are_unsafe_or_share_a_folder_are_refused(arms, problem):
    with pytest.raises(ConfigError) as exc:
        parse_experiment(BASE + f"arms: {arms}\n", source="x.yaml")
    assert str(exc.value).startswith("x.yaml:5: arms.") and problem in str(exc.value)


def test_arm_folders_are_the_validated_names():
    exp = parse_experiment(BASE + 'arms: {"p -> w": "p -> w", prompt-only: "p"}\n', source="x.yaml")
    assert [a.folder for a in exp.arms] == ["p-w", "prompt-only"]


def test_a_binary_experiment_file_is_an_error_naming_it(tmp_path, capsys):
    path = tmp_path / "model.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    assert "model.yaml: is not a UTF-8 text file" in error_of(capsys, ["run", str(path)])
    control = tmp_path / "control.yaml"
    control.write_bytes(b"name: x\x00\x01\n")
    assert "control.yaml: not YAML text" in error_of(capsys, ["run", str(control)])


@pytest.mark.parametrize("content, problem", [
    (b"", "is empty"),
    (b"   \n\n", "is empty"),
    (b"garbage {{{ not json\n", "bad.jsonl:1: not a JSON object"),
    (b'{"q": "1", "a": "1"}\n{"q":', "bad.jsonl:2: not a JSON object"),
    (b"[1, 2]\n", "bad.jsonl:1: a JSON line must be an object"),
    (b'{"q": "1", "a": "1"}\n\x89PNG\r\n\x1a\n\x00\xff', "bad.jsonl:2: not UTF-8 text"),
])
def test_an_empty_or_garbage_jsonl_task_file_is_an_error_naming_it(tmp_path, capsys, content, problem):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    path = tmp_path / "file.yaml"
    path.write_text(f"name: f\ntask:\n  name: file\n  options: {{path: {data}, field_map: {{question: q, answer: a}}}}\n"
                    "data: {train: 1, val: 1}\narms: {p: p}\nbudget: 16\n")
    err = error_of(capsys, ["run", str(path), "--no-tracking"])
    assert "file.yaml:4: task.options:" in err and problem in err
    assert "StopIteration" not in err and "DatasetGenerationError" not in err


def test_negative_seeds_are_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tiny_experiment(tmp_path)
    assert "--seeds takes distinct integers >= 0" in error_of(capsys, ["run", str(path), "--seeds", "-1",
                                                                     "--no-tracking"])
    assert "distinct" in error_of(capsys, ["run", str(path), "--seeds", "0,0", "--no-tracking"])
    assert not (tmp_path / "runs").exists()
    from experiments.config import load_experiment
    from experiments.runner import run_experiment

    with pytest.raises(ConfigError, match="a seed is an integer >= 0"):  # the Python API checks too
        run_experiment(load_experiment(path), seeds=[-1], track=False)
    assert not (tmp_path / "runs").exists()


def test_negative_checkpoint_every_is_refused(tmp_path, capsys):
    path = tiny_experiment(tmp_path)
    path.write_text(path.read_text().replace("checkpoint_every: 2", "checkpoint_every: -3"))
    err = error_of(capsys, ["run", str(path)])
    assert "rel.yaml:11: weights.checkpoint_every: checkpoint_every must be >= 0" in err


def test_an_output_dir_that_is_a_file_or_read_only_is_an_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("a file, not a folder")
    path = tiny_experiment(tmp_path, extra="output_dir: taken/runs\n")
    err = error_of(capsys, ["run", str(path), "--no-tracking"])
    assert "taken is a file, not a folder" in err
    path = tiny_experiment(tmp_path, extra="output_dir: taken\n")
    assert "taken is a file, not a folder" in error_of(capsys, ["run", str(path), "--no-tracking"])
    if os.geteuid() == 0:
        return  # root writes into read-only folders: nothing to refuse
    (tmp_path / "ro").mkdir(mode=0o555)
    path = tiny_experiment(tmp_path, extra="output_dir: ro\n")
    assert "cannot write to output_dir ro" in error_of(capsys, ["run", str(path), "--no-tracking"])


@pytest.mark.parametrize("metric", ["os:system", "builtins:exec", "subprocess:getoutput", "os:abort"])
def test_a_standard_library_function_is_no_metric(tmp_path, capsys, metric):
    path = tiny_experiment(tmp_path, extra=f"metric: '{metric}'\n")
    err = error_of(capsys, ["run", str(path), "--no-tracking"])
    assert f"rel.yaml:13: metric: '{metric}' is in the Python standard library" in err


def test_a_metric_module_in_the_current_directory_is_never_imported(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "evilmetric.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                            "def metric(example, pred, trace=None):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # what `python -m` / `python script.py` do with the current folder
    monkeypatch.delenv("PYTHONPATH", raising=False)
    path = tiny_experiment(tmp_path, extra="metric: evilmetric:metric\n")
    err = error_of(capsys, ["run", str(path), "--no-tracking"])
    assert "cannot import 'evilmetric:metric'" in err and "current directory" in err and "PYTHONPATH" in err
    assert not marker.exists() and "evilmetric" not in sys.modules
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # named explicitly: imported
    from experiments.config import import_metric

    assert import_metric("evilmetric:metric")(None, None) == 1.0 and marker.exists()


def test_a_tampered_shipped_model_is_one_line_that_says_restore_not_rebuild(tmp_path, capsys, monkeypatch):
    """issue 32: EmbeddedModelError escaped `cotune run` as a traceback, advising `--ship`, which would write a build
    for this CPU over the shipped weights."""
    from embedded import tiny

    copy = tiny.ship_tiny_model(tiny.SHIPPED_DIR, tmp_path / "shipped")
    monkeypatch.setattr(tiny, "SHIPPED_DIR", copy)
    with open(copy / "config.json", "a") as f:
        f.write(" ")
    err = error_of(capsys, ["run", str(tiny_experiment(tmp_path)), "--no-tracking"])
    assert "config.json is missing or differs from the sha256" in err and "git checkout -- " in err, err
    assert "--force-reinstall" in err and "--ship`" not in err


def test_a_metric_must_look_like_a_metric(tmp_path, capsys):
    path = tiny_experiment(tmp_path, extra="metric: 'experiments.config:arm_folder'\n")
    assert "is not a metric: a metric takes (example, pred, trace=None)" in error_of(capsys, ["run", str(path)])


def test_vllm_python_must_be_the_venv_cotune_builds(tmp_path, capsys, monkeypatch):
    from rl.vllm_server import venv_dir

    monkeypatch.delenv("COTUNE_VLLM_PYTHON", raising=False)
    foreign = tmp_path / "python"
    foreign.write_text("#!/bin/sh\ntouch ran\n")
    foreign.chmod(0o755)
    path = tiny_experiment(tmp_path, extra=f"engine: vllm\nvllm: {{python: {foreign}}}\n")
    err = error_of(capsys, ["run", str(path), "--no-tracking"])
    assert f"rel.yaml:14: vllm.python: '{foreign}' is not the vLLM venv's python ({venv_dir()}/bin/python" in err
    assert "allow_custom_python: true" in err and not (tmp_path / "ran").exists()
    base = "name: x\ntask: last_digit_long\narms: {p: p}\nengine: vllm\n"
    exp = parse_experiment(base + f"vllm: {{python: {foreign}, allow_custom_python: true}}\n")
    assert exp.vllm == {"python": str(foreign)}  # an explicit choice; the flag itself is no server option
    assert parse_experiment(base + f"vllm: {{python: {venv_dir()}/bin/python}}\n").vllm["python"]
    monkeypatch.setenv("COTUNE_VLLM_PYTHON", str(foreign))  # the user's environment, not the shared file
    assert parse_experiment(base + f"vllm: {{python: {foreign}}}\n").vllm == {"python": str(foreign)}
    with pytest.raises(ConfigError, match="allow_custom_python: is set but vllm.python is not"):
        parse_experiment(base + "vllm: {allow_custom_python: true}\n")


@pytest.mark.parametrize(("vllm", "named"), [
    ("{extra_args: ['--trust-remote-code']}", "'--trust-remote-code' is not one of the checked vLLM flags"),
    ("{extra_args: ['--middleware=evil.mod:App']}", "'--middleware' is not one of the checked vLLM flags"),
    ("{env: {LD_PRELOAD: /tmp/x.so}}", "vllm.env.LD_PRELOAD: LD_PRELOAD makes a process load code"),
    ("{env: {PYTHONPATH: /tmp/evil}}", "vllm.env.PYTHONPATH: PYTHONPATH makes a process load code"),
    ("{env: {VLLM_LOGGING_CONFIG_PATH: /tmp/log.json}}", "VLLM_LOGGING_CONFIG_PATH makes a process load code"),
    ("{env: {PYTHONPYCACHEPREFIX: /tmp/pyc}}", "PYTHONPYCACHEPREFIX makes a process load code"),
    ("{env: {PYTHONWARNINGS: 'error::evil.Warn'}}", "PYTHONWARNINGS makes a process load code"),
])
def test_vllm_args_and_env_that_load_code_need_an_explicit_flag(vllm, named):
    base = "name: x\ntask: last_digit_long\narms: {p: p}\nengine: vllm\n"
    with pytest.raises(ConfigError, match="allow_unchecked_args: true") as caught:
        parse_experiment(base + f"vllm: {vllm}\n")
    assert named in str(caught.value)
    allowed = parse_experiment(base + f"vllm: {vllm[:-1]}, allow_unchecked_args: true}}\n").vllm
    assert "allow_unchecked_args" not in allowed and ("extra_args" in allowed or "env" in allowed)
    sizing = parse_experiment(base + "vllm: {extra_args: ['--tensor-parallel-size', '2', '--max-num-seqs=64'], "
                                     "env: {CUDA_VISIBLE_DEVICES: '1', VLLM_CPU_KVCACHE_SPACE: '4'}}\n").vllm
    assert sizing["extra_args"] == ["--tensor-parallel-size", "2", "--max-num-seqs=64"]


def test_a_folder_of_other_files_is_refused_even_with_overwrite(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "runs" / "rel" / "rl-only" / "seed-0"
    folder.mkdir(parents=True)
    (folder / "thesis.txt").write_text("mine")
    path = tiny_experiment(tmp_path)
    for flags in ([], ["--resume"], ["--overwrite"]):
        err = error_of(capsys, ["run", str(path), "--no-tracking", *flags])
        assert f"{Path('runs/rel/rl-only/seed-0')} is not empty and holds no cotune run" in err
    assert (folder / "thesis.txt").read_text() == "mine" and sorted(p.name for p in folder.iterdir()) == ["thesis.txt"]


def test_resume_and_overwrite_exclude_each_other(tmp_path):
    with pytest.raises(SystemExit):
        main(["run", str(tiny_experiment(tmp_path)), "--resume", "--overwrite"])


# --- a run folder that holds a run: refused, resumed or moved aside; never deleted -----------------------


@pytest.mark.slow
def test_a_second_run_refuses_then_resumes_or_moves_aside(tmp_path, capsys, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = tiny_experiment(tmp_path)
    assert main(["run", str(path), "--tracking-uri", uri]) == 0
    capsys.readouterr()
    root = tmp_path / "runs" / "rel" / "rl-only" / "seed-0"
    (root / "notes.txt").write_text("my notes")
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert json.loads((root / "run.json").read_text())["status"] == "completed"
    ids = json.loads((root / "mlflow.json").read_text())
    assert json.loads((root / "experiment.json").read_text())["settings"]["budget"] == 16

    # again, no flag: refused, naming the folder and both choices; nothing touched
    err = error_of(capsys, ["run", str(path), "--tracking-uri", uri])
    assert f"{Path('runs/rel/rl-only/seed-0')} already holds a completed run" in err
    assert "--resume" in err and "--overwrite" in err
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before

    # --resume: completed with the same settings, so skipped
    assert main(["run", str(path), "--resume", "--tracking-uri", uri]) == 0
    assert "already completed" in capsys.readouterr().out
    assert (root / "notes.txt").read_text() == "my notes"

    # --resume after the budget or the learning rate changed: refused, the changes named, never "skipped"
    for changed, what in ((tiny_experiment(tmp_path, budget=32, file="b.yaml"), "budget: 16 -> 32"),
                          (tiny_experiment(tmp_path, lr="1.0e-3", file="lr.yaml"),
                           "weights.learning_rate: 0.0005 -> 0.001")):
        err = error_of(capsys, ["run", str(changed), "--resume", "--tracking-uri", uri])
        assert "holds a completed run with other settings" in err and what in err and "--overwrite" in err
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before

    # --overwrite: the old run (and the user's file) moved aside to a timestamped folder, a new run in place
    assert main(["run", str(path), "--overwrite", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    moved = [p for p in root.parent.iterdir() if p.name.startswith("seed-0.old-")]
    assert len(moved) == 1 and f"moved the earlier run of {Path('runs/rel/rl-only/seed-0')} aside to" in out
    assert (moved[0] / "notes.txt").read_text() == "my notes"
    assert sorted(str(p.relative_to(moved[0])) for p in moved[0].rglob("*")) == before
    assert json.loads((root / "run.json").read_text())["status"] == "completed" and not (root / "notes.txt").exists()
    assert json.loads((root / "mlflow.json").read_text())["parent_run_id"] != ids["parent_run_id"]
    assert {r.info.status for r in runs_of(uri, "rel")} == {"FINISHED"}


@pytest.mark.slow
def test_kill_9_then_resume_continues_the_same_mlflow_runs(tmp_path, capsys, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = tiny_experiment(tmp_path, name="killed", budget=160)
    process = start_cotune("run", str(path), "--tracking-uri", uri, cwd=tmp_path)
    wait_for_line(process, "step 10:")  # in the middle of the weight stage
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    root = tmp_path / "runs" / "killed" / "rl-only" / "seed-0"
    ids = json.loads((root / "mlflow.json").read_text())
    killed = runs_of(uri, "killed")
    assert {r.info.run_id: r.info.status for r in killed} == {
        ids["parent_run_id"]: "RUNNING", ids["stage_run_ids"]["0"]: "FINISHED", ids["stage_run_ids"]["1"]: "RUNNING"}

    # without a flag, or with other settings: refused, the folder as it was
    assert "already holds an interrupted run" in error_of(capsys, ["run", str(path), "--tracking-uri", uri])
    changed = tiny_experiment(tmp_path, name="killed", budget=160, lr="1.0e-3", file="changed.yaml")
    err = error_of(capsys, ["run", str(changed), "--resume", "--tracking-uri", uri])
    assert "holds an interrupted run" in err and "other settings (weights.learning_rate: 0.0005 -> 0.001)" in err

    # `cotune compare` finds the runs of the dead process and marks them FAILED
    assert main(["compare", str(path), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "marked 2 run(s) FAILED that a killed cotune process on this host had left RUNNING" in err
    assert "has no finished `cotune run` runs yet" in err
    assert {r.info.status for r in runs_of(uri, "killed") if r.info.run_id != ids["stage_run_ids"]["0"]} == {"FAILED"}

    # --resume continues the same parent and stage runs; nothing is left RUNNING, one FINISHED parent per arm+seed
    assert main(["run", str(path), "--resume", "--tracking-uri", uri]) == 0
    assert "resuming arm rl-only" in capsys.readouterr().out
    runs = runs_of(uri, "killed")
    assert {r.info.run_id: r.info.status for r in runs} == {
        ids["parent_run_id"]: "FINISHED", ids["stage_run_ids"]["0"]: "FINISHED", ids["stage_run_ids"]["1"]: "FINISHED"}
    assert json.loads((root / "mlflow.json").read_text()) == ids
    assert json.loads((root / "run.json").read_text())["status"] == "completed"
    (parent,) = parents(runs)
    assert parent.data.metrics["total_rollouts"] == 160 and parent.data.tags["cotune.outcome"] == "completed"


@pytest.mark.slow
def test_a_run_resumed_after_kill_9_closes_what_the_dead_process_left_running(tmp_path, capsys, monkeypatch,
                                                                           tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = tiny_experiment(tmp_path, name="orphans", budget=160)
    process = start_cotune("run", str(path), "--tracking-uri", uri, cwd=tmp_path)
    wait_for_line(process, "step 10:")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    root = tmp_path / "runs" / "orphans" / "rl-only" / "seed-0"
    (root / "mlflow.json").unlink()  # as if killed before the ids were saved: the resume cannot continue them
    assert main(["run", str(path), "--resume", "--tracking-uri", uri]) == 0
    runs = runs_of(uri, "orphans")
    assert "RUNNING" not in {r.info.status for r in runs}
    assert sorted(r.info.status for r in parents(runs)) == ["FAILED", "FINISHED"]
    dead = next(r for r in parents(runs) if r.info.status == "FAILED")
    assert "abandoned: process" in dead.data.tags["cotune.error"]


@pytest.mark.slow
def test_a_second_process_on_a_running_folder_is_refused_naming_the_first(tmp_path, capsys, monkeypatch,
                                                                         tiny_model_dir):
    import socket

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = tiny_experiment(tmp_path, name="busy", budget=400)
    first = start_cotune("run", str(path), "--tracking-uri", uri, cwd=tmp_path)
    wait_for_line(first, "step 10:")
    root = tmp_path / "runs" / "busy" / "rl-only" / "seed-0"
    assert (root / "stages" / "0-baseline" / "record.json").is_file()
    holder = f"in use by another cotune process (pid {first.pid} on host {socket.gethostname()}"
    for flags in (["--resume"], [], ["--overwrite"]):
        assert holder in error_of(capsys, ["run", str(path), "--tracking-uri", uri, *flags])
    # the Python API refuses too, however it is called
    from experiments.config import load_experiment
    from experiments.runner import run_one
    from optimizers import RunLockedError

    exp = load_experiment(path)
    with pytest.raises(RunLockedError, match=f"pid {first.pid}"):
        run_one(exp, exp.arms[0], 0, output_dir=root, resume=True)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert (root / "stages" / "0-baseline" / "record.json").is_file() and (root / "stages" / "1-w").is_dir()
    assert json.loads((root / "run.json").read_text())["status"] == "completed"
    runs = runs_of(uri, "busy")
    assert [r.info.status for r in parents(runs)] == ["FINISHED"] and "RUNNING" not in {r.info.status for r in runs}
