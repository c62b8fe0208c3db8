"""``optimize()`` and ``cotune run`` under ``accelerate launch``: 2 processes (gloo on CPU), one run.

Every rank calls ``optimize()`` with the same arguments (tests/optimizers/optimize_worker.py). What must hold:
rank 0 alone does the single-process work (prompt stage, evaluations, run folder, callbacks) and every rank ends
with the same history, program and adapter -- the adapter restored from the best stage, which rank 1 never read
from disk; weight and self-train stages train on both ranks; an error on rank 0 stops rank 1 with that error,
and a resumed run reloads the finished stages on every rank.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from tests.requires import missing

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("optimize_worker.py")
pytestmark = pytest.mark.slow


def _launch(*args: str, config: str = "cpu.yaml") -> list[str]:
    """The documented CPU recipe (docs/accelerate/cpu.yaml: 2 processes through torchrun, gloo)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"docs/accelerate/{config}",
            "--main_process_port", str(port), *args]


def _run(args: list[str], expect_ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert (out.returncode == 0) == expect_ok, (out.stdout + out.stderr)[-4000:]
    return out


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _state_hash(program_json: Path) -> str:
    state = json.loads(program_json.read_text())
    state.pop("metadata", None)
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module", params=["cpu.yaml", "deepspeed_zero2_cpu.yaml"], ids=["ddp", "zero2"])
def joint_run(request, tiny_model_dir, tmp_path_factory):
    if request.param.startswith("deepspeed"):
        if importlib.util.find_spec("deepspeed") is None:
            missing("deepspeed", "DeepSpeed is not installed (pip install cotune[deepspeed])")
    out = tmp_path_factory.mktemp("optimize-ddp")
    _run(_launch(str(WORKER), str(out), str(tiny_model_dir), "p -> w -> s", "144", config=request.param))
    return out, _ranks(out)


def test_every_rank_returns_the_same_result(joint_run):
    _, (r0, r1) = joint_run
    assert (r0["world"], r1["world"]) == (2, 2) and "error" not in r0 and "error" not in r1
    assert [h["name"] for h in r0["history"]] == ["0-baseline", "1-p", "2-w", "3-s"]
    for key in ("history", "best_index", "program", "last_program", "version", "model_string"):
        assert r0[key] == r1[key], key
    p, w, s = r0["history"][1:]
    assert w["details"]["steps"] == 3 and w["spend"]["rollouts"] == 48  # one budget, counted over both ranks
    left = 144 - p["spend"]["rollouts"] - 48  # the last stage gets what the others left, in whole examples of 4 runs
    assert s["details"]["rollouts"] == s["spend"]["rollouts"] == left - left % 4 and s["details"]["steps"] >= 1
    assert r0["history"][-1]["total_spend"]["rollouts"] <= 144


def test_rank_zero_alone_writes_the_run_and_calls_back(joint_run):
    out, (r0, r1) = joint_run
    run = json.loads((out / "run" / "run.json").read_text())
    assert run["status"] == "completed" and run["finished"] == [0, 1, 2, 3]
    assert sorted(p.name for p in (out / "run" / "stages").iterdir()) == ["0-baseline", "1-p", "2-w", "3-s"]
    assert r1["events"] == []  # callbacks (MLflow, progress) belong to rank 0
    kinds = [e[0] for e in r0["events"]]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end" and kinds.count("stage_end") == 4
    assert [e[2] for e in r0["events"] if e[0] == "step" and e[1] == 2] == [1, 2, 3]  # w-stage steps, once each


def test_program_and_adapter_of_the_best_stage_on_every_rank(joint_run):
    out, (r0, _) = joint_run
    best = out / "run" / "best"
    assert r0["program"] == _state_hash(best / "program.json")  # rank 1 got it from rank 0, not from disk
    stages = out / "run" / "stages"
    assert _state_hash(stages / "1-p" / "program.json") != _state_hash(stages / "0-baseline" / "program.json")
    saved = load_file(best / "adapter" / "adapter_model.safetensors")
    for r in (0, 1):
        live = load_file(out / f"rank{r}-adapter.safetensors")
        assert _same_tensors(live, saved), f"rank {r} does not serve the best stage's adapter"
    trained = load_file(stages / "3-s" / "adapter" / "adapter_model.safetensors")
    assert not _same_tensors(trained, load_file(stages / "1-p" / "adapter" / "adapter_model.safetensors"))


def test_an_error_on_rank_zero_stops_every_rank_and_resume_continues(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir)
    _run(_launch(str(WORKER), str(tmp_path), model, "w -> p", "96", "--crash-at", "2"), expect_ok=False)
    r0, r1 = _ranks(tmp_path)
    assert r0["error"] == {"type": "RuntimeError", "message": "crash at stage 2"}
    assert r1["error"]["type"] == "MainProcessError" and "crash at stage 2" in r1["error"]["message"]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "failed" and run["finished"] == [0, 1] and "crash at stage 2" in run["error"]
    after_w = [load_file(tmp_path / f"rank{r}-adapter.safetensors") for r in (0, 1)]
    assert _same_tensors(*after_w)

    _run(_launch(str(WORKER), str(tmp_path), model, "w -> p", "96", "--resume"))
    r0, r1 = _ranks(tmp_path)
    assert r0["history"] == r1["history"] and [h["name"] for h in r0["history"]] == ["0-baseline", "1-w", "2-p"]
    assert ["stage_start", 1, "w"] not in r0["events"] and ["stage_start", 2, "p"] in r0["events"]
    saved_w = load_file(tmp_path / "run" / "stages" / "1-w" / "adapter" / "adapter_model.safetensors")
    assert _same_tensors(saved_w, after_w[0])
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "completed"


@pytest.mark.parametrize(("config", "schedule", "budget"),
                         [("cpu.yaml", "w -> p", "96"), ("deepspeed_zero3_cpu.yaml", "w -> p -> s", "144")],
                         ids=["ddp", "zero3"])
def test_ranks_share_one_vllm_server_through_optimize(vllm_python, tiny_model_dir, tmp_path, config, schedule, budget):
    # under ZeRO-3 the weights are partitioned: rank 0's prompt stage and evaluations generate on the server alone,
    # and the self-training stage samples on it
    from rl import VLLMServer

    if config.startswith("deepspeed"):
        if importlib.util.find_spec("deepspeed") is None:
            missing("deepspeed", "DeepSpeed is not installed (pip install cotune[deepspeed])")
    with VLLMServer.start(tiny_model_dir, python=vllm_python, dtype="float32") as server:
        _run(_launch(str(WORKER), str(tmp_path), str(tiny_model_dir), schedule, budget, "--engine", server.url,
                     config=config))
    r0, r1 = _ranks(tmp_path)
    for key in ("history", "best_index", "program", "version", "model_string", "current", "served", "partitioned"):
        assert r0[key] == r1[key], key
    assert r0["partitioned"] == config.startswith("deepspeed_zero3")
    trained = r0["history"][1]["adapter_version"]  # one version per GRPO update (a step whose groups all tie skips it)
    assert 1 <= trained <= 3
    assert [h["name"] for h in r0["history"]][1:] == [f"{k}-{s}" for k, s in enumerate(schedule.split(" -> "), 1)]
    assert r0["version"] >= r0["history"][-1]["adapter_version"]  # restoring the best stage's adapter is a version
    assert r0["swaps"] == r0["version"] + 1 and r1["swaps"] == 0  # rank 0 alone loads each version (and v0)
    assert r0["served"] == [r0["current"]]  # old versions unloaded; the adapter left is the one in use
    saved = load_file(tmp_path / "run" / "best" / "adapter" / "adapter_model.safetensors")
    assert all(_same_tensors(load_file(tmp_path / f"rank{r}-adapter.safetensors"), saved) for r in (0, 1))


def test_cotune_run_under_accelerate_tracks_once(tiny_model_dir, tmp_path):
    exp = tmp_path / "ddp.yaml"
    exp.write_text(f"""
name: ddp
task: last_digit
model: {tiny_model_dir}
data: {{train: 16, val: 8, test: 8}}
arms: {{rl-only: "w"}}
budget: 32
weights: {{learning_rate: 1.0e-3, num_generations: 4, examples_per_step: 2, max_tokens: 16}}
tracking: {{uri: "sqlite:///{tmp_path}/mlflow.db"}}
output_dir: {tmp_path}/runs
threads: 1
""")
    out = _run(_launch("-m", "experiments.cli", "run", str(exp)))
    assert out.stdout.count("[cotune] run 1/1 done") == 1, out.stdout  # rank 1 prints nothing
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["ddp"], filter_string="tags.`cotune.kind` = 'run'",
                              output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(runs[0].info.run_id, "val_score")) == 2  # baseline + w, logged once each
    assert "test_score" in runs[0].data.metrics
    logs = sorted(p.name for p in (tmp_path / "runs" / "rl-only").glob("*.log"))
    assert logs == ["seed-0.log", "seed-0.rank1.log"]
