"""The policy engine on the real tiny model: DSPy seam, batching, sampling, versions, traces.

The model's quality band (parse rate, headroom, demos) is asserted in tests/embedded/test_tiny.py.
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import dspy
import torch
from dspy.lm15 import Config, Message, Request

from programs.tasks import last_digit
from rl import recording
from rl.engine_base import Generation, PolicyEngine, Sampling


def _ask(policy, question, **config):
    request = Request(
        model=policy.model_string,
        messages=(Message.user(question),),
        system="You are a test.",
        config=Config(**config),
    )
    return policy.engine.complete(request)


def test_predict_runs_and_records_the_exact_tokens(tiny_policy, chat_adapter):
    program = last_digit.predict_program()
    with dspy.context(lm=tiny_policy.lm(temperature=0.0, cache=False), adapter=chat_adapter):
        with recording(tag="t") as calls:
            pred = program(question="What is the last digit of 1234?")
    assert pred.answer == "4"  # short numbers are always right
    assert len(calls) == 1
    call = calls[0]
    assert call.tag == "t" and call.predictor is program and call.modules == ("Predict",)
    assert call.model == tiny_policy.model_string and call.version == tiny_policy.version
    tok = tiny_policy.tokenizer
    # The prompt ids are the chat template of the recorded messages, tokenized once.
    rendered = tok.apply_chat_template(list(call.messages), add_generation_prompt=True, tokenize=False)
    assert tok.decode(call.prompt_ids) == rendered
    assert tiny_policy.encode_messages(call.messages) == list(call.prompt_ids)
    # The completion ids decode to the text DSPy received, and the model stopped on EOS.
    assert call.finish_reason == "stop" and call.completion_ids[-1] in tiny_policy.eos_token_ids
    assert tok.decode(call.completion_ids, skip_special_tokens=True) == call.text
    assert tok.encode(call.text, add_special_tokens=False) + [call.completion_ids[-1]] == list(call.completion_ids)
    assert chat_adapter.parse(program.signature, call.text)["answer"] == "4"


def test_deepcopy_shares_the_model(tiny_policy):
    program = last_digit.predict_program()
    program.set_lm(tiny_policy.lm())
    clone = copy.deepcopy(program)
    assert clone.lm is not program.lm  # the LM object is copied...
    assert clone.lm._engine_spec is program.lm._engine_spec  # ...but shares one engine
    assert clone.lm._engine_spec.policy is tiny_policy
    ours = dict(tiny_policy.model.named_parameters())
    theirs = dict(clone.lm._engine_spec.policy.model.named_parameters())
    assert all(ours[k].data_ptr() == theirs[k].data_ptr() for k in ours)
    assert clone.lm.model == tiny_policy.model_string


def test_eight_threads_match_sequential_at_temperature_zero(tiny_policy, chat_adapter):
    questions = [ex.question for ex in last_digit.load("val", 24, seed=3)]
    program = last_digit.predict_program()
    lm = tiny_policy.lm(temperature=0.0, cache=False, seed=7)

    def run(q):
        with dspy.context(lm=lm, adapter=chat_adapter):
            return program(question=q).answer

    sequential = [run(q) for q in questions]
    before = len(tiny_policy.engine.batch_sizes)
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(run, questions))
    assert concurrent == sequential
    sizes = list(tiny_policy.engine.batch_sizes)[before:]
    assert max(sizes) > 1, f"concurrent requests were never batched: {sizes}"


def test_seeded_sampling_is_independent_of_batch_companions(tiny_policy):
    alone = _ask(tiny_policy, "What is the last digit of 98765?", temperature=1.0, seed=11, max_tokens=12)
    barrier = threading.Barrier(6)

    def ask(i):
        barrier.wait()
        if i == 0:
            return _ask(tiny_policy, "What is the last digit of 98765?", temperature=1.0, seed=11, max_tokens=12)
        return _ask(tiny_policy, f"What is the last digit of {1000 + i * 37}?", temperature=1.0, max_tokens=20)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(ask, range(6)))
    assert results[0].message.text == alone.message.text


def test_unseeded_sampling_varies(tiny_policy):
    texts = {_ask(tiny_policy, "What is the last digit of 4815162342?", temperature=1.5, max_tokens=8).message.text
             for _ in range(12)}
    assert len(texts) > 1


def test_the_engine_generates_on_the_torch_threads_its_model_folder_asks_for(tiny_model_dir, tmp_path):
    """``cotune.json``'s ``engine.torch_threads`` sets the worker's own count; the caller keeps its count; an
    explicit ``torch_threads=`` wins over the file."""
    import json
    import shutil

    from rl import Policy

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "cotune.json").write_text(json.dumps({"engine": {"torch_threads": 1}}))
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for policy, expected in ((Policy.from_pretrained(folder), 1),
                                 (Policy.from_pretrained(folder, torch_threads=2), 2)):
            seen = []
            policy.model.get_base_model().register_forward_hook(lambda *_, seen=seen: seen.append(torch.get_num_threads()))
            _ask(policy, "What is the last digit of 12?", temperature=0.0, max_tokens=4)
            assert seen and set(seen) == {expected}
            assert torch.get_num_threads() == 3  # the caller's own count is untouched
    finally:
        torch.set_num_threads(before)


def test_engine_counts_calls_and_tokens(fresh_policy):
    before = fresh_policy.engine.stats()
    response = _ask(fresh_policy, "What is the last digit of 123?", temperature=0.0, max_tokens=30)
    after = fresh_policy.engine.stats()
    assert after["calls"] == before["calls"] + 1
    assert after["input_tokens"] - before["input_tokens"] == response.usage.input_tokens > 0
    assert after["output_tokens"] - before["output_tokens"] == response.usage.output_tokens > 0


def test_a_declared_caller_that_finishes_ends_the_wait_for_its_request(fresh_policy):
    """Two declared callers: one asks, the other finishes without asking while the worker waits for it. The one
    request is generated at once, not after ``client_wait_ms`` (an hour here; it was 250 ms at the end of every
    rollout, a quarter of the agent benchmark's engine time, before ``done()`` woke the worker)."""
    engine = fresh_policy.engine
    engine.client_wait_s = 3600.0
    answers = []
    with engine.clients(2) as done:
        asker = threading.Thread(daemon=True, target=lambda: answers.append(
            _ask(fresh_policy, "What is the last digit of 123?", temperature=0.0, max_tokens=4)))
        asker.start()
        threading.Event().wait(0.5)  # the worker has the request and waits for the second caller's
        done()  # the second caller will make none
        asker.join(timeout=120)
    assert answers and answers[0].usage.output_tokens == 4
    assert list(engine.batch_sizes) == [1]


def test_max_tokens_and_stop_strings(tiny_policy):
    short = _ask(tiny_policy, "What is the last digit of 123?", temperature=0.0, max_tokens=2)
    assert short.finish_reason == "length" and short.usage.output_tokens == 2
    full = _ask(tiny_policy, "What is the last digit of 123?", temperature=0.0, max_tokens=30)
    assert full.finish_reason == "stop"
    marker = "[[ ## completed"
    assert marker in full.message.text
    stopped = _ask(tiny_policy, "What is the last digit of 123?", temperature=0.0, max_tokens=30, stop=(marker,))
    assert stopped.finish_reason == "stop"
    assert stopped.message.text == full.message.text[: full.message.text.index(marker)]


def test_version_bump_bypasses_dspy_cache(fresh_policy, chat_adapter):
    program = last_digit.predict_program()
    lm = fresh_policy.lm(temperature=0.0, cache=True)
    question = "What is the last digit of 55551?"

    def calls_made():
        return len(fresh_policy.engine.calls)

    with dspy.context(lm=lm, adapter=chat_adapter):
        program(question=question)
        n = calls_made()
        program(question=question)
        assert calls_made() == n, "an identical request at the same version must come from DSPy's cache"
        old_model = lm.model
        with torch.no_grad():
            for name, p in fresh_policy.model.named_parameters():
                if "lora_B" in name:
                    p.add_(0.05 * torch.randn_like(p))
        fresh_policy.bump_version()
        assert lm.model != old_model and lm.model.startswith("local/tiny-fresh@v1-")
        program(question=question)
        assert calls_made() == n + 1, "after the weights changed the prompt must be generated again"
        assert fresh_policy.engine.calls[-1].version == 1


def test_recording_sees_calls_from_evaluate_threads(tiny_policy, chat_adapter):
    devset = last_digit.load("val", 16, seed=1)
    program = last_digit.cot_program()
    with dspy.context(lm=tiny_policy.lm(temperature=0.0, cache=False), adapter=chat_adapter):
        with recording(tag="eval") as calls:
            dspy.Evaluate(devset=devset, metric=last_digit.correct, num_threads=4, display_progress=False)(program)
    assert len(calls) == 16
    assert all(c.tag == "eval" and c.predictor is program.predict for c in calls)
    assert all(c.modules == ("ChainOfThought", "Predict") for c in calls)


# --- the shared request path and its one seed rule (no model: a fake engine that echoes its seed) -------------


class _EchoSeed(PolicyEngine):
    """A PolicyEngine whose generation is the seed it was handed: what the shared path decided, made visible."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(None, default_max_tokens=8, seed=seed, history_size=100)

    def _generate(self, sampling: Sampling) -> Generation:
        return Generation(prompt_ids=(1, 2, 3), completion_ids=(4,), text=str(sampling.seed), finish_reason="stop",
                          version=0, model="local/echo", max_tokens=sampling.max_tokens)


def _seed(engine, seed=None):
    request = Request(model="local/echo", messages=(Message.user("hi"),), config=Config(seed=seed))
    return int(engine.complete(request).message.text)


def test_both_engines_share_one_request_path():
    from rl.engine import BatchedEngine
    from rl.vllm_engine import VLLMEngine

    for engine in (BatchedEngine, VLLMEngine):
        assert engine.complete is PolicyEngine.complete and engine.seed_for is PolicyEngine.seed_for


def test_the_request_seed_wins_then_the_tagged_recording_then_the_engine_stream():
    engine = _EchoSeed(seed=3)
    with recording(tag=("rollout", 0, 1)):
        assert _seed(engine, seed=42) == 42  # 1. the request's own seed, even inside a tagged recording
        tagged = _seed(engine)  # 2. the tag's first seed
    with recording(tag=("rollout", 0, 1)):
        assert _seed(engine) == tagged  # the same tag samples the same, whatever ran before
    stream = [_seed(engine) for _ in range(3)]  # 3. the engine's stream, from its seed=
    fresh = _EchoSeed(seed=3)
    assert stream == [_seed(fresh) for _ in range(3)]  # nothing above drew from it
    assert len(set(stream)) == 3
    with recording():  # an untagged recording has no seeds of its own
        assert _seed(engine) not in stream


def test_a_seeded_request_never_shifts_the_seeds_around_it():
    plain, mixed = _EchoSeed(seed=5), _EchoSeed(seed=5)
    with recording(tag="t"):
        expected = [_seed(plain), _seed(plain)]
    with recording(tag="t"):
        got = [_seed(mixed), _seed(mixed, seed=9), _seed(mixed)]
    assert [got[0], got[2]] == expected and got[1] == 9
    assert [_seed(plain), _seed(plain)] == [_seed(mixed), _seed(mixed)]  # nor the engine's stream


def test_every_call_is_recorded_counted_and_answered_the_same_way():
    engine = _EchoSeed()
    with recording(tag="t") as calls:
        response = engine.complete(Request(model="local/echo", messages=(Message.user("hi"),), system="sys",
                                           config=Config(seed=7, temperature=0.5, max_tokens=4)))
    [call] = calls
    assert call.messages == ({"role": "system", "content": "sys"}, {"role": "user", "content": "hi"})
    assert (call.seed, call.temperature, call.max_tokens, call.tag, call.text) == (7, 0.5, 4, "t", "7")
    assert list(engine.calls) == [call] and engine.stats() == {"calls": 1, "input_tokens": 3, "output_tokens": 1}
    assert response.id == "cotune-0" and response.usage.total_tokens == 4
