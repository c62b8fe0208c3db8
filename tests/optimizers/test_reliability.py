"""Issue 14's reliability probes as tests: nothing lost, nothing run that wasn't asked for.

Each test repeats one probe that failed before (a traceback, a deleted folder, code run from a bundle) on the real
tiny model and real files: the run lock (a second process, a stale lock), ``overwrite`` moving a run aside, resume
refusing changed settings, ``run.json`` that never shrinks, damaged run files named, a read-only or file output
dir, ``export --overwrite`` on a foreign folder / the source / a file, a malicious bundle, a truncated checkpoint,
and kill -9 at three points followed by a resume that ends on the adapter of an uninterrupted run.

Most runs here end on purpose at their baseline evaluation (a metric that raises): what is tested happens to the
run folder before that, so a probe costs seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dspy
import pytest
import torch
from safetensors.torch import load_file

from optimizers import (
    CorruptRunError,
    ExportTargetError,
    LoadError,
    MetricError,
    OptimizeCallback,
    OutputDirError,
    RunLockedError,
    export,
    load,
    optimize,
)
from optimizers.result import StageRecord, build_manifest, save_program, write_json
from programs.tasks import last_digit
from rl import Policy, WeightStageConfig, train_weights

SEED = 0
WEIGHTS = {"learning_rate": 1e-3, "max_tokens": 16, "num_generations": 4, "examples_per_step": 4}
PROMPT = {"num_candidate_programs": 2, "max_bootstrapped_demos": 3, "num_threads": 1}
REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("optimize_worker.py")
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

HOLDER = """
import os, signal, sys, time
from optimizers.run_folder import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", os.getpid(), flush=True)
if sys.argv[2] == "die":
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(600)
"""


def _broken_metric(example, pred, trace=None):
    raise KeyError("ends the run at its baseline evaluation")


class StopAtStage(OptimizeCallback):
    """Ends a run when stage ``index`` starts (its earlier stages are finished and saved)."""

    def __init__(self, index: int) -> None:
        self.index = index

    def on_stage_start(self, run, index, stage) -> None:
        if index == self.index:
            raise RuntimeError(f"stopped at stage {index}")


def _run(policy, output_dir, metric=_broken_metric, **kwargs):
    train, val = last_digit.load("train", 8, seed=SEED), last_digit.load("val", 4, seed=SEED)
    args = dict(schedule="p -> w", budget=400, prompt=PROMPT, weights=WEIGHTS, seed=SEED, progress=False,
                eval_threads=1)
    args.update(kwargs)
    return optimize(last_digit.predict_program(), train, val, metric=metric, policy=policy, output_dir=output_dir,
                    **args)


# --- the run lock -------------------------------------------------------------------------------------------


def test_a_second_process_on_a_locked_run_is_refused_naming_the_holder(tiny_policy, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), "hold"], stdout=subprocess.PIPE, text=True,
                              env=ENV)
    try:
        line = holder.stdout.readline()
        assert line.startswith("locked"), line
        with pytest.raises(RunLockedError, match=rf"pid {holder.pid} on host {re.escape(socket.gethostname())}"
                           ) as info:
            _run(tiny_policy, run)
        assert (info.value.pid, info.value.host) == (holder.pid, socket.gethostname())
        assert isinstance(info.value, OutputDirError)
        assert not (run / "run.json").exists()  # the refused process wrote nothing into the holder's folder
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_with_a_warning(tiny_policy, tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.run([sys.executable, "-c", HOLDER, str(run), "die"], capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert dead.returncode == -signal.SIGKILL, dead.stderr[-2000:]
    pid = int(dead.stdout.split()[1])
    assert json.loads((run / ".cotune.lock").read_text())["pid"] == pid  # left behind by the killed holder
    with caplog.at_level(logging.WARNING, logger="optimizers.run_folder"), pytest.raises(MetricError):
        _run(tiny_policy, run)
    assert f"stale run lock of {run} left by pid {pid}" in caplog.text
    assert json.loads((run / "run.json").read_text())["status"] == "failed"  # the run went on in that folder
    assert not (run / ".cotune.lock").exists()  # and released the lock when it ended


# --- an existing run folder: refuse, resume or move aside; never delete ---------------------------------------


def test_overwrite_moves_the_old_run_aside_and_deletes_nothing(tiny_policy, tmp_path, caplog):
    run = tmp_path / "run"
    with pytest.raises(MetricError):
        _run(tiny_policy, run)
    (run / "stages").mkdir(exist_ok=True)
    (run / "stages" / "notes.txt").write_text("mine")
    old_state = (run / "run.json").read_text()
    with pytest.raises(OutputDirError, match=rf"{re.escape(str(run))}.* already holds a run .*resume=True.*"
                                             r"overwrite=True.*move it aside"):
        _run(tiny_policy, run)
    with caplog.at_level(logging.WARNING, logger="optimizers.run_folder"), pytest.raises(MetricError):
        _run(tiny_policy, run, overwrite=True)
    [aside] = tmp_path.glob("run.old-*")
    assert re.fullmatch(r"run\.old-\d{8}-\d{6}", aside.name)
    assert (aside / "stages" / "notes.txt").read_text() == "mine"
    assert (aside / "run.json").read_text() == old_state
    assert f"moved it aside to {aside}" in caplog.text
    assert not (run / "stages" / "notes.txt").exists() and (run / "run.json").exists()


@pytest.mark.parametrize("change, named", [
    (dict(budget=800), "budget.rollouts: 400 -> 800"),
    (dict(weights={**WEIGHTS, "learning_rate": 5e-4}), "weights.learning_rate: 0.001 -> 0.0005"),
], ids=["budget", "learning_rate"])
def test_resume_with_changed_settings_is_refused_naming_them(tiny_policy, tmp_path, change, named):
    with pytest.raises(MetricError):
        _run(tiny_policy, tmp_path / "run")
    with pytest.raises(OutputDirError, match=re.escape(named) + ".*overwrite=True"):
        _run(tiny_policy, tmp_path / "run", resume=True, **change)


def test_a_failed_resume_never_shortens_run_json_and_stale_temporaries_are_cleared(tiny_policy, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(MetricError):
        _run(tiny_policy, run)
    state = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**state, "finished": [0, 1]}))
    stale = [run / "stages" / ".1-p.cotune-tmp-0a1b2c3d", run / ".best.k3j4h5g6"]  # ours, and an older version's
    for folder in stale:
        folder.mkdir(parents=True)
        (folder / "program.json").write_text("{")
    with pytest.raises(MetricError):  # the stage folders are gone: stage 0 runs again, and its metric fails again
        _run(tiny_policy, run, resume=True)
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "failed" and state["finished"] == [0, 1]
    assert not any(folder.exists() for folder in stale)


@pytest.mark.parametrize("damaged", ["run.json", "stages/0-baseline/record.json", "stages/0-baseline/program.json",
                                     "stages/0-baseline/adapter/adapter_model.safetensors"])
def test_a_damaged_run_file_is_named_on_resume(tiny_policy, tmp_path, damaged):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="stopped at stage 1"):
        _run(tiny_policy, run, metric=last_digit.correct, callbacks=[StopAtStage(1)])
    file = run / damaged
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CorruptRunError, match=re.escape(str(file))) as info:
        _run(tiny_policy, run, metric=last_digit.correct, resume=True)
    assert info.value.path == file


@contextlib.contextmanager
def _read_only(folder: Path) -> Iterator[None]:
    """Make ``folder`` read-only for this process: chmod, or (root ignores modes) the immutable attribute."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a filesystem without chattr +i: cannot make a folder read-only")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(folder)], check=True)


def test_an_output_dir_that_is_a_file_or_read_only_is_a_clear_error(tiny_policy, tmp_path):
    target = tmp_path / "out"
    target.write_text("mine")
    with pytest.raises(OutputDirError, match="is a file"):
        _run(tiny_policy, target)
    assert target.read_text() == "mine"
    with pytest.raises(OutputDirError, match="a part of that path is a file"):
        _run(tiny_policy, target / "run")
    folder = tmp_path / "read-only"
    folder.mkdir()
    with _read_only(folder), pytest.raises(OutputDirError, match="is not writable"):
        _run(tiny_policy, folder)


# --- bundles: export --overwrite, load ----------------------------------------------------------------------


class Digits(dspy.Module):
    """A program class that can be built without arguments (what ``allowed_classes`` is for)."""

    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    def forward(self, question):
        return self.predict(question=question)


def _bundle(policy, folder: Path, program: dspy.Module | None = None, program_class: str | None = None) -> Path:
    """A bundle as ``OptimizeResult.save`` writes it: adapter, program state, manifest."""
    program = program if program is not None else last_digit.predict_program()
    folder.mkdir(parents=True)
    policy.save_adapter(folder / "adapter")
    save_program(program, folder / "program.json")
    cls = program_class or f"{type(program).__module__}:{type(program).__qualname__}"
    history = [StageRecord(index=0, stage="baseline", name="0-baseline", val_score=0.5)]
    write_json(folder / "manifest.json", build_manifest({"schedule": "p", "program_class": cls}, history, 0, policy))
    return folder


def _run_folder(policy, root: Path) -> Path:
    """A finished run folder: ``run.json`` and its ``best/`` bundle."""
    _bundle(policy, root / "best")
    write_json(root / "run.json", {"status": "completed", "finished": [0]})
    return root


def test_export_overwrite_never_replaces_a_foreign_folder_the_source_or_a_file(tiny_policy, tmp_path):
    run = _run_folder(tiny_policy, tmp_path / "runs" / "run")
    foreign = tmp_path / "thesis"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "thesis.txt").write_text("chapter 1")
    (foreign / "sub" / "data.csv").write_text("1,2")
    with pytest.raises(ExportTargetError, match="not a cotune bundle"):
        export(run, foreign, overwrite=True)
    assert (foreign / "thesis.txt").read_text() == "chapter 1" and (foreign / "sub" / "data.csv").exists()
    for target in (run, run.parent, run / "best"):  # the source run, a folder holding it, the bundle it exports
        with pytest.raises(ExportTargetError, match="never replaces the source"):
            export(run, target, overwrite=True)
    assert (run / "run.json").exists() and (run / "best" / "manifest.json").exists()
    file = tmp_path / "out.txt"
    file.write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(ExportTargetError, match="is a file"):
            export(run, file, overwrite=overwrite)
    assert file.read_text() == "keep"


def test_export_overwrite_replaces_a_bundle_and_writes_normal_permissions(tiny_policy, tmp_path):
    run = _run_folder(tiny_policy, tmp_path / "run")
    umask = os.umask(0o022)
    try:
        out = export(run, tmp_path / "bundle")
        (out / "old-export.txt").write_text("from the previous export")
        with pytest.raises(FileExistsError, match="overwrite=True"):
            export(run, out)
        export(run, out, overwrite=True)
    finally:
        os.umask(umask)
    assert not (out / "old-export.txt").exists() and (out / "manifest.json").exists()
    assert stat.S_IMODE(out.stat().st_mode) == 0o755 and stat.S_IMODE((out / "adapter").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "adapter" / "adapter_model.safetensors").stat().st_mode) == 0o644  # safetensors: 0600


EVIL_MODULE = "import pathlib\npathlib.Path('imported.marker').write_text('ran')\n\n\nclass Program:\n    pass\n"
LOAD_NAMED = """
import json
from optimizers import LoadError, load
out = {}
for named in ("evil:Program", "os:abort"):
    manifest = json.load(open("manifest.json"))
    json.dump({**manifest, "program_class": named}, open("manifest.json", "w"))
    try:
        load(".")
        out[named] = "loaded"
    except LoadError as exc:
        out[named] = str(exc)
print(json.dumps(out))
"""


def test_load_never_imports_code_a_bundle_names(tiny_policy, tmp_path):
    bundle = _bundle(tiny_policy, tmp_path / "bundle")
    (bundle / "evil.py").write_text(EVIL_MODULE)
    # ``python -c`` puts the current folder on sys.path: an import of "evil" would find the bundle's module
    proc = subprocess.run([sys.executable, "-c", LOAD_NAMED], cwd=bundle, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]  # "os:abort" called would have killed it with SIGABRT
    refusals = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(refusals) == {"evil:Program", "os:abort"}
    assert all("never imports" in message and "program=" in message for message in refusals.values()), refusals
    assert not (bundle / "imported.marker").exists()


def test_load_builds_only_an_allowed_class(tiny_policy, tmp_path):
    name = f"{Digits.__module__}:{Digits.__qualname__}"
    bundle = _bundle(tiny_policy, tmp_path / "bundle", program=Digits())
    for allowed in ([Digits], {name: Digits}):
        program = load(bundle, allowed_classes=allowed)
        assert isinstance(program, Digits) and program.policy.base_fingerprint == tiny_policy.base_fingerprint
    with pytest.raises(LoadError, match="not among allowed_classes"):
        load(bundle, allowed_classes=[last_digit.predict_program().__class__])
    with pytest.raises(LoadError, match="pass program="):
        load(bundle)
    assert isinstance(load(bundle, program=Digits()), Digits)


# --- checkpoints: verified when loaded --------------------------------------------------------------------


CHECKPOINTED = dict(num_generations=4, examples_per_step=2, max_tokens=16, learning_rate=1e-3, max_rollouts=8 * 4,
                    checkpoint_every=1, deterministic=True)


@pytest.fixture(scope="module")
def checkpointed(tiny_model_dir, tmp_path_factory) -> Path:
    """A weight stage stopped after step 3 of 4: its folder keeps checkpoints step-2 and step-3."""
    out = tmp_path_factory.mktemp("checkpointed")
    policy = Policy.from_pretrained(tiny_model_dir)
    train_weights(last_digit.predict_program(), last_digit.load("train", 20), last_digit.correct, policy,
                  WeightStageConfig(**CHECKPOINTED), output_dir=out, progress=False, stop_after_steps=3)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    return out


def _resume(tiny_model_dir, out: Path) -> tuple[object, Policy]:
    policy = Policy.from_pretrained(tiny_model_dir)
    result = train_weights(last_digit.predict_program(), last_digit.load("train", 20), last_digit.correct, policy,
                           WeightStageConfig(**CHECKPOINTED), output_dir=out, resume=True, progress=False,
                           stop_after_steps=0)
    return result, policy


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


@pytest.mark.parametrize("damaged", ["adapter/adapter_model.safetensors", "trainer.pt", "rng.pt", "state.json",
                                     "no-checksums:trainer.pt"])
def test_a_truncated_checkpoint_is_named_and_the_previous_one_is_used(checkpointed, tiny_model_dir, tmp_path, caplog,
                                                                       damaged):
    out = tmp_path / "stage"
    shutil.copytree(checkpointed, out)
    if damaged.startswith("no-checksums:"):  # written before checksums existed: checked by reading every file
        damaged = damaged.removeprefix("no-checksums:")
        for checkpoint in (out / "checkpoints").iterdir():
            (checkpoint / "checksums.json").unlink()
    file = out / "checkpoints" / "step-000003" / damaged
    _truncate(file)
    with caplog.at_level(logging.WARNING, logger="rl.checkpoint"):
        result, policy = _resume(tiny_model_dir, out)
    assert result.resumed_from == 2
    assert str(file) in caplog.text
    previous = json.loads((out / "checkpoints" / "step-000002" / "state.json").read_text())
    assert policy.version == previous["adapter_version"]
    reference = load_file(out / "checkpoints" / "step-000002" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(reference[k], v) for k, v in policy.adapter_state().items())


def test_when_no_checkpoint_is_good_the_stage_starts_over(checkpointed, tiny_model_dir, tmp_path, caplog):
    out = tmp_path / "stage"
    shutil.copytree(checkpointed, out)
    for checkpoint in (out / "checkpoints").iterdir():
        _truncate(checkpoint / "trainer.pt")
    with caplog.at_level(logging.WARNING, logger="rl.checkpoint"):
        result, policy = _resume(tiny_model_dir, out)
    assert result.resumed_from is None and result.steps == 0 and policy.version == 0
    assert "weight stage starts over from step 0" in caplog.text


# --- kill -9, then resume ----------------------------------------------------------------------------------


def _worker(model_dir: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    """``optimize("p -> w", budget=160)`` on last_digit in a fresh process, single-threaded (deterministic)."""
    command = [sys.executable, str(WORKER), str(out), str(model_dir), "p -> w", "160", "--deterministic", *args]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=900)


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "last" / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = _worker(tiny_model_dir, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kill_at, left", [
    ("metric:1:10", ["0-baseline"]),                       # inside the prompt stage (its 10th metric call)
    ("stage_end:1", ["0-baseline", "1-p"]),                # between stages: the prompt stage was saved
    ("step:2:3", ["0-baseline", "1-p", "2-w"]),            # inside the weight stage, before checkpoint 3
], ids=["prompt-stage", "between-stages", "weight-stage"])
def test_kill_9_then_resume_ends_on_the_adapter_of_an_uninterrupted_run(uninterrupted, tiny_model_dir, tmp_path,
                                                                         kill_at, left):
    run = tmp_path / "run"
    killed = _worker(tiny_model_dir, tmp_path, "--kill-at", kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert json.loads((run / "run.json").read_text())["status"] == "running"  # nothing could mark it
    assert sorted(p.name for p in (run / "stages").iterdir()) == left
    resumed = _worker(tiny_model_dir, tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "took over the stale run lock" in resumed.stderr

    ours = json.loads((tmp_path / "rank0.json").read_text())
    theirs = json.loads((uninterrupted / "rank0.json").read_text())
    assert [(h["name"], h["val_score"], h["total_spend"]) for h in ours["history"]] == \
        [(h["name"], h["val_score"], h["total_spend"]) for h in theirs["history"]]
    assert ours["adapter_hash"] == theirs["adapter_hash"]
    a, b = _adapter(run), _adapter(uninterrupted / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "completed" and state["finished"] == [0, 1, 2]
    weight_stage = json.loads((run / "stages" / "2-w" / "record.json").read_text())
    assert weight_stage["details"]["resumed_from"] == (2 if kill_at.startswith("step") else None)
    assert not (run / "stages" / "2-w" / "checkpoints").exists()  # a finished stage keeps only its final adapter
    assert not (run / ".cotune.lock").exists()
