"""The GRPO weight stage on the real tiny model: learning, multi-module rows, loops, bad input, resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import dspy
import pytest
import torch
from safetensors.torch import load_file

from metrics import MetricError
from programs.tasks import last_digit
from rl import (
    CheckpointsExistError,
    LoraSettings,
    Policy,
    TrainsetError,
    WeightStageConfig,
    recording,
    train_weights,
)
from rl.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rl.grpo import GRPOUpdater
from rl.rollouts import run_rollouts

SMALL = dict(num_generations=4, examples_per_step=2, max_tokens=24, learning_rate=1e-3, micro_batch_size=32)


def lora_params(policy):
    return {k: v.detach().clone() for k, v in policy.model.named_parameters() if "lora_" in k}


# --- bad input -----------------------------------------------------------------------------------


def test_empty_trainset_is_refused(fresh_policy):
    with pytest.raises(TrainsetError, match="empty"):
        train_weights(last_digit.predict_program(), [], last_digit.correct, fresh_policy,
                      WeightStageConfig(**SMALL, max_rollouts=8), progress=False)


def test_examples_without_inputs_are_refused(fresh_policy):
    with pytest.raises(TrainsetError, match=r"trainset\[0\].*with_inputs"):
        train_weights(last_digit.predict_program(), [dspy.Example(question="q", answer="1")], last_digit.correct,
                      fresh_policy, WeightStageConfig(**SMALL, max_rollouts=8), progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_generations": 1}, "must be >= 2"),
    ({"temperature": 0.0}, "temperature > 0"),
    ({"max_rollouts": 3}, "below one step"),
    ({"micro_batch_size": 3}, "micro_batch_size must be even"),  # TRL would crash on it in the first update
])
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WeightStageConfig(**{**SMALL, "max_rollouts": 64, **kwargs})


def test_metric_that_raises_names_the_example(fresh_policy):
    def broken(example, pred, trace=None):
        raise KeyError("gold")

    train = last_digit.load("train", 4)
    with pytest.raises(MetricError, match="KeyError.*What is the last digit of"):
        train_weights(last_digit.predict_program(), train, broken, fresh_policy,
                      WeightStageConfig(**SMALL, max_rollouts=8), progress=False)
    assert fresh_policy.version == 0, "no update may happen on a failed step"
    assert "ref" not in fresh_policy.model.peft_config


def test_nan_reward_names_the_example(fresh_policy):
    train = last_digit.load("train", 4)
    with pytest.raises(MetricError, match="nan on example.*last digit"):
        train_weights(last_digit.predict_program(), train, lambda e, p, t=None: float("nan"), fresh_policy,
                      WeightStageConfig(**SMALL, max_rollouts=8), progress=False)


def test_monitor_events_are_returned_and_counted(fresh_policy):
    from metrics import DegeneracyMonitor

    monitor = DegeneracyMonitor(max_mean_chars=5)  # every answer block is longer: fires on every step

    def degeneracy(step, rollouts):
        return monitor.observe(step, [t for r in rollouts for t in r.texts])[1]

    result = train_weights(last_digit.predict_program(), last_digit.load("train", 8), last_digit.correct,
                           fresh_policy, WeightStageConfig(**SMALL, max_rollouts=16), monitors=[degeneracy],
                           progress=False)
    assert result.steps == 2 and [h["guard_events"] for h in result.history] == [1, 1]
    assert [e.step for e in result.events] == [1, 2] and all(e.kind for e in result.events)


# --- rows from every call ---------------------------------------------------------------------


class ProposeThenFinalize(dspy.Module):
    """Two predictors: a ChainOfThought proposes, a Predict finalizes."""

    def __init__(self):
        super().__init__()
        self.propose = dspy.ChainOfThought("question -> answer")
        self.finalize = dspy.Predict("question -> answer")

    def forward(self, question):
        self.propose(question=question)
        return self.finalize(question=question)


class AskThrice(dspy.Module):
    """A loop: the same predictor is called three times per run."""

    def __init__(self):
        super().__init__()
        self.step = dspy.Predict("question -> answer")

    def forward(self, question):
        for _ in range(3):
            pred = self.step(question=question)
        return pred


@pytest.mark.slow
def test_rollouts_record_every_call_of_loops_and_react(tiny_policy):
    lm = tiny_policy.lm(temperature=1.0, max_tokens=24, cache=False)
    examples = last_digit.load("train", 2)
    greedy = tiny_policy.lm(temperature=0.0, max_tokens=24, cache=False)  # always parses: the loop runs to the end
    loop = run_rollouts(AskThrice(), examples, greedy, last_digit.correct, num_generations=3)
    assert len(loop) == 6 and all(len(r.calls) == 3 and r.error is None for r in loop)
    assert all(c.predictor is not None for r in loop for c in r.calls)

    def calculator(expression: str) -> str:
        """Evaluate integer arithmetic like '12345 % 10'."""
        a, op, b = expression.split()
        return str(int(a) % int(b)) if op == "%" else "unsupported"

    agent = dspy.ReAct("question -> answer", tools=[calculator], max_iters=3)
    with recording() as everything:
        react = run_rollouts(agent, examples, lm, last_digit.correct, num_generations=2)
    # every engine call made during the rollouts belongs to exactly one rollout, in order
    assert sum(len(r.calls) for r in react) == len(everything) >= 4
    for r in react:
        assert [c.tag for c in r.calls] == [(None, r.example_index, r.sample)] * len(r.calls)
        assert {type(c.predictor).__name__ for c in r.calls} <= {"Predict"}


def _logprob(policy, call) -> float:
    ids = torch.tensor([list(call.prompt_ids) + list(call.completion_ids)], device=policy.device)
    with torch.no_grad():
        logits = policy.model(input_ids=ids).logits[0, len(call.prompt_ids) - 1 : -1]
    return float(torch.log_softmax(logits.float(), -1).gather(1, ids[0, len(call.prompt_ids):, None]).sum())


@pytest.mark.slow
def test_two_predictor_program_trains_both_predictors(fresh_policy):
    from rl.advantages import compute_advantages, predictor_namer

    program = ProposeThenFinalize()
    name_of = predictor_namer(program)
    trained: dict[str, int] = {"propose.predict": 0, "finalize": 0}
    first_calls = {}

    def watch(step, rollouts):
        rows, _ = compute_advantages(rollouts, name_of)
        for row in rows:
            trained[row.group[1]] += 1
        for r in rollouts:
            for c in r.calls:
                first_calls.setdefault(name_of(c.predictor), c)

    config = WeightStageConfig(**{**SMALL, "examples_per_step": 4}, max_rollouts=16 * 8, beta=0.04)
    before = {}
    result = train_weights(program, last_digit.load("train", 200), last_digit.correct, fresh_policy, config,
                           progress=False, monitors=[watch, lambda step, _: before or before.update(
                               {n: _logprob(fresh_policy, c) for n, c in first_calls.items()})])
    assert result.steps == 8 and max(h["groups"] for h in result.history) == 8  # 4 examples x 2 predictors
    assert trained["propose.predict"] > 0 and trained["finalize"] > 0, trained
    # the same completions of each predictor are now more or less likely under the trained adapter
    for name, call in first_calls.items():
        assert abs(_logprob(fresh_policy, call) - before[name]) > 1e-3, name
    kls = [h["kl"] for h in result.history if h["updated"]]
    assert kls and all(math.isfinite(k) and k >= 0 for k in kls) and max(kls) > 0  # KL to the frozen reference
    assert "ref" not in fresh_policy.model.peft_config  # TRL's reference copy is dropped after the stage


# --- learning -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_weight_stage_raises_held_out_accuracy_for_two_seeds(tiny_model_dir):
    program = last_digit.predict_program()
    train = last_digit.load("train", 3000, seed=1)
    base = Policy.from_pretrained(tiny_model_dir)
    start = last_digit.measure(program, base.lm(temperature=0.0, cache=False), 500)
    for seed in (0, 1):
        policy = Policy.from_pretrained(tiny_model_dir, lora=LoraSettings(seed=seed), seed=seed)
        config = WeightStageConfig(num_generations=8, examples_per_step=8, max_tokens=24, learning_rate=1e-3,
                                   micro_batch_size=64, max_rollouts=64 * 40, seed=seed)
        result = train_weights(program, train, last_digit.correct, policy, config, progress=False)
        end = last_digit.measure(program, policy.lm(temperature=0.0, cache=False), 500)
        seconds = sum(h["seconds_rollout"] + h["seconds_update"] for h in result.history)
        print(f"seed {seed}: {start.accuracy:.3f} -> {end.accuracy:.3f} in {result.steps} steps, {seconds:.0f}s")
        assert seconds < 300
        assert end.accuracy >= start.accuracy + 0.15
        logged = {"loss", "entropy", "clip_ratio", "grad_norm", "reward_mean", "reward_std", "parse_failure_rate",
                  "zero_variance_groups", "tokens_generated", "seconds_rollout", "seconds_update", "rollouts"}
        assert logged <= set(result.history[-1])
        updates = sum(h["updated"] for h in result.history)  # a step whose groups all agree makes no update
        assert result.rollouts == 64 * 40 and result.history[-1]["adapter_version"] == updates > 20


# --- checkpoints and resume -------------------------------------------------------------------


def test_checkpoint_round_trip_is_bit_exact(tiny_model_dir, tmp_path):
    config = WeightStageConfig(**SMALL, max_rollouts=64)
    policy = Policy.from_pretrained(tiny_model_dir)
    train_weights(last_digit.predict_program(), last_digit.load("train", 20), last_digit.correct, policy, config,
                  output_dir=tmp_path, progress=False, stop_after_steps=2)
    updater = GRPOUpdater(policy, config, config.max_steps)
    updater.trainer.optimizer.step()  # materialise optimizer state to compare
    saved = save_checkpoint(tmp_path / "ck", 2, policy, updater, {"cursor": {"epoch": 0, "position": 4},
                                                                  "history": [], "rollouts": 16, "lm_calls": 16})
    assert latest_checkpoint(tmp_path / "ck") == saved
    other = Policy.from_pretrained(tiny_model_dir)
    other_updater = GRPOUpdater(other, config, config.max_steps)
    state = load_checkpoint(saved, other, other_updater)
    assert state["cursor"] == {"epoch": 0, "position": 4} and state["step"] == 2
    ours, theirs = lora_params(policy), lora_params(other)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert other.version == policy.version and other.model_string == policy.model_string
    a, b = updater.state_dict()["optimizer"]["state"], other_updater.state_dict()["optimizer"]["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)
    updater.close()
    other_updater.close()


def test_a_second_run_into_a_folder_with_checkpoints_is_refused_and_changes_nothing(tiny_model_dir, tmp_path):
    """Without ``resume``, a folder holding checkpoints is refused before any rollout. It used to be written: the
    new run's checkpoints replaced the earlier run's of the same step and were pruned beside its later ones."""
    config = WeightStageConfig(**SMALL, max_rollouts=64, checkpoint_every=1)
    program, train = last_digit.predict_program(), last_digit.load("train", 20)
    train_weights(program, train, last_digit.correct, Policy.from_pretrained(tiny_model_dir), config,
                  output_dir=tmp_path, progress=False, stop_after_steps=2)
    def files() -> dict:
        return {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()}

    before = files()
    assert [p.name for p in sorted((tmp_path / "checkpoints").glob("step-*"))] == ["step-000001", "step-000002"]
    policy = Policy.from_pretrained(tiny_model_dir)
    with pytest.raises(CheckpointsExistError, match=r"2 checkpoint\(s\) .*latest step-000002.*resume=True"):
        train_weights(program, train, last_digit.correct, policy, config, output_dir=tmp_path, progress=False)
    assert files() == before
    assert policy.engine.counters["calls"] == 0  # refused before any rollout
    resumed = train_weights(program, train, last_digit.correct, policy, config, output_dir=tmp_path, resume=True,
                            progress=False, stop_after_steps=1)
    assert resumed.resumed_from == 2


def _capture_gradients(updater) -> dict:
    """The LoRA gradients the updater's next optimizer step applies (Adam's first step is ~sign(g): compare g)."""
    captured, step = {}, updater.trainer.optimizer.step

    def capture(*args, **kwargs):
        captured.update({n: p.grad.clone() for n, p in updater.policy.model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    updater.trainer.optimizer.step = capture
    return captured


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_importance_sampling_drops_rows_the_sampler_made_unlikely(tiny_model_dir):
    """vLLM-sampled rows: ratio 1 where the sampler agrees with the trainer, 0 (masked) above the cap.

    The corrected update must equal an uncorrected one in which the masked row pushes nothing (advantage 0, same
    tokens, so the same token normaliser).
    """
    from rl.advantages import Row

    policies = [Policy.from_pretrained(tiny_model_dir, name="tiny-is") for _ in range(2)]
    tok = policies[0].tokenizer
    pairs = [(tok.encode(f"What is the last digit of {n}?"), tok.encode(f"Answer: {n % 10}")) for n in (123, 456, 789, 42)]
    with torch.no_grad():  # the trainer's own log-probs at temperature 1 (what a faithful sampler reports)
        logps = []
        for prompt, completion in pairs:
            ids = torch.tensor([prompt + completion], device=policies[0].device)
            logits = policies[0].model(ids).logits[0, len(prompt) - 1 : -1]
            logps.append(logits.log_softmax(-1).gather(-1, ids[0, len(prompt):, None])[:, 0].tolist())
    logps[3] = [v - 2.0 for v in logps[3]]  # the sampler found this completion e^(2T) times less likely: ratio > 3
    advantages = [1.0, -1.0, 0.5, -0.5]
    rows = [Row(tuple(p), tuple(c), a, 0.0, (i, "p"), False, tuple(lp))
            for i, ((p, c), a, lp) in enumerate(zip(pairs, advantages, logps))]
    base = dict(SMALL, max_rollouts=64, temperature=1.0, micro_batch_size=2)
    corrected = GRPOUpdater(policies[0], WeightStageConfig(**base, importance_sampling="sequence_mask"), 1)
    plain = GRPOUpdater(policies[1], WeightStageConfig(**base, importance_sampling="none"), 1)
    grads = [_capture_gradients(corrected), _capture_gradients(plain)]
    metrics = corrected.step(corrected.to_batch(rows))
    assert metrics["is_masked_rows"] == 0.25 and abs(metrics["is_ratio_mean"] - 0.75) < 1e-5
    plain.step(plain.to_batch([Row(r.prompt_ids, r.completion_ids, 0.0 if i == 3 else r.advantage, 0.0, r.group, False)
                               for i, r in enumerate(rows)]))
    a, b = grads
    assert a.keys() == b.keys() and any(v.abs().max() > 1e-4 for v in a.values())
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)  # gradients ~0.1
    corrected.close()
    plain.close()


WORKER = textwrap.dedent("""
    import json, os, signal, sys
    import dspy
    from programs.tasks import last_digit
    from rl import Policy, WeightStageConfig, train_weights
    model_dir, out, kill_at, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    policy = Policy.from_pretrained(model_dir)
    config = WeightStageConfig(num_generations=4, examples_per_step=2, max_tokens=24, learning_rate=1e-3,
                               micro_batch_size=32, max_rollouts=8 * 5, checkpoint_every=1, deterministic=True)
    def on_step(m):
        with open(os.path.join(out, "steps.log"), "a") as f:
            f.write(f"{m['step']}\\n")
        if m["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    train_weights(last_digit.predict_program(), last_digit.load("train", 50), last_digit.correct, policy, config,
                  output_dir=out, resume=resume, callbacks=[on_step], progress=False)
    policy.save_adapter(os.path.join(out, "final"))
""")


def _run_worker(model_dir, out, kill_at, resume):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, "-c", WORKER, str(model_dir), str(out), str(kill_at), str(int(resume))],
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_adapter(tiny_model_dir, tmp_path):
    crashed, straight = tmp_path / "crashed", tmp_path / "straight"
    crashed.mkdir()
    straight.mkdir()
    first = _run_worker(tiny_model_dir, crashed, kill_at=3, resume=False)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    # step 3 ran but was killed before its checkpoint: the latest checkpoint is step 2
    assert latest_checkpoint(crashed / "checkpoints").name == "step-000002"
    ckpt_state = json.loads((crashed / "checkpoints" / "step-000002" / "state.json").read_text())
    assert ckpt_state["cursor"] == {"epoch": 0, "position": 4} and [h["step"] for h in ckpt_state["history"]] == [1, 2]

    second = _run_worker(tiny_model_dir, crashed, kill_at=-1, resume=True)
    assert second.returncode == 0, second.stderr[-2000:]
    steps = [int(s) for s in (crashed / "steps.log").read_text().split()]
    assert steps == [1, 2, 3, 3, 4, 5]  # step 3 repeated once (it was lost), none skipped

    third = _run_worker(tiny_model_dir, straight, kill_at=-1, resume=False)
    assert third.returncode == 0, third.stderr[-2000:]
    a = load_file(crashed / "final" / "adapter_model.safetensors")
    b = load_file(straight / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    # it really trained: lora_B starts at zero (lora_A is random from the start, so it proves nothing)
    assert any(not math.isclose(float(a[k].abs().sum()), 0.0) for k in a if "lora_B" in k)


def test_rollout_threads_are_stopped_when_their_owner_closes(tiny_policy):
    import threading

    from rl.rollouts import RolloutThreads

    def rollout_threads():
        return [t for t in threading.enumerate() if t.name.startswith("cotune-rollout") and t.is_alive()]

    before = len(rollout_threads())
    lm = tiny_policy.lm(temperature=1.0, max_tokens=16, cache=False)
    examples = last_digit.load("train", 2)
    with RolloutThreads() as threads:
        run_rollouts(last_digit.predict_program(), examples, lm, last_digit.correct, 2, num_threads=4,
                     threads=threads)
        assert len(rollout_threads()) > before
    run_rollouts(last_digit.predict_program(), examples, lm, last_digit.correct, 2, num_threads=4)  # its own
    assert len(rollout_threads()) == before
    with pytest.raises(RuntimeError, match="closed"):
        threads.pool(4)


class SlowThenAsk(dspy.Module):
    """Python work of a different length before each call (a tool, a parser), then one call."""

    def __init__(self):
        super().__init__()
        self.step = dspy.Predict("question -> answer")

    def forward(self, question):
        import time

        time.sleep(0.02 * (len(question) % 4))  # 0-60 ms, by question: longer than the engine's 15 ms window
        return self.step(question=question)


def test_rollout_workers_are_batched_together_even_when_their_python_work_takes_different_times(fresh_policy):
    """More rollouts than threads: each worker is declared to the engine as one caller, so every batch holds one call
    from each worker still playing, however long the Python work between calls takes."""
    lm = fresh_policy.lm(temperature=1.0, max_tokens=8, cache=False)
    examples = last_digit.load("train", 6)
    rollouts = run_rollouts(SlowThenAsk(), examples, lm, last_digit.correct, num_generations=2, num_threads=4)
    assert [(r.example_index, r.sample) for r in rollouts] == [(i, g) for i in range(6) for g in range(2)]
    assert all(len(r.calls) == 1 for r in rollouts)
    assert list(fresh_policy.engine.batch_sizes) == [4, 4, 4]
