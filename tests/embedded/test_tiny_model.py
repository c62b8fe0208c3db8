"""The tiny-model builder: deterministic from a seed, content-addressed cache, atomic output."""

from __future__ import annotations

import dataclasses

import pytest
from safetensors.torch import load_file

from embedded.tiny_model import TinyModelRecipe, build_or_load, recipe_key
from programs.tasks import last_digit

SMALL = TinyModelRecipe(vocab_size=400, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                        num_kv_heads=1, steps=3, batch_size=8)


@pytest.fixture(scope="module")
def corpus():
    return last_digit.warmstart_messages(64, seed=0)


def test_build_is_deterministic_and_cached(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("COTUNE_CACHE", str(tmp_path / "a"))
    first = build_or_load("t", lambda: corpus, SMALL)
    monkeypatch.setenv("COTUNE_CACHE", str(tmp_path / "b"))
    second = build_or_load("t", lambda: corpus, SMALL)
    assert first.name == second.name  # same recipe + data -> same key
    w1, w2 = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert w1.keys() == w2.keys() and all((w1[k] == w2[k]).all() for k in w1)
    assert (first / "build_info.json").exists() and (first / "tokenizer.json").exists()
    # A second call reuses the folder instead of rebuilding.
    mtime = (second / "model.safetensors").stat().st_mtime_ns
    assert build_or_load("t", lambda: corpus, SMALL) == second
    assert (second / "model.safetensors").stat().st_mtime_ns == mtime
    assert not [p for p in second.parent.iterdir() if p.name.startswith(".t-") and p.is_dir()]


def test_changed_recipe_or_data_description_changes_the_key():
    key = recipe_key(SMALL, {"examples": 64})
    assert recipe_key(SMALL, {"examples": 64}) == key
    assert recipe_key(dataclasses.replace(SMALL, prompt_loss_weight=0.5), {"examples": 64}) != key
    assert recipe_key(dataclasses.replace(SMALL, individual_digits=False), {"examples": 64}) != key
    assert recipe_key(dataclasses.replace(SMALL, first_steps=2), {"examples": 64}) != key
    assert recipe_key(dataclasses.replace(SMALL, steps=4), {"examples": 64}) != key
    assert recipe_key(SMALL, {"examples": 63}) != key
    assert recipe_key(SMALL, {"examples": 64, "noise": 0.5}) != key


def test_cache_hit_does_not_generate_the_data(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("COTUNE_CACHE", str(tmp_path))
    first = build_or_load("t", lambda: corpus, SMALL)

    def must_not_run():
        raise AssertionError("a cache hit must not regenerate the corpus")

    assert build_or_load("t", must_not_run, SMALL) == first


def test_warmstart_corpus_is_rendered_by_dspy_and_uses_train_numbers_only(corpus):
    import dspy

    adapter = dspy.ChatAdapter()
    sig = last_digit.predict_program().signature
    plain = [c for c in corpus if len(c) == 3 and "reasoning" not in c[0]["content"]]
    assert plain, "expected demo-free Predict conversations"
    conv = plain[0]
    question = conv[1]["content"].split("\n")[1]
    assert conv[:2] == adapter.format(sig, [], {"question": question})
    assert adapter.parse(sig, conv[2]["content"])["answer"].isdigit()
    for c in corpus:
        n = int(c[-2]["content"].split("last digit of ")[1].split("?")[0])
        assert last_digit.split_of(n) == "train"


def test_empty_corpus_is_refused(tmp_path):
    from embedded.tiny_model import build_tiny_model

    with pytest.raises(ValueError, match="at least one conversation"):
        build_tiny_model([], tmp_path / "x", SMALL)


def test_prompt_loss_weight_adds_prompt_tokens_to_the_objective_and_reports_the_completion_loss():
    """At weight 0 the objective is transformers' own completion-only loss; above it, prompt tokens count too."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from embedded.tiny_model import _losses

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    ids = torch.randint(1, 50, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding
    labels = torch.full_like(ids, -100)
    labels[:, 5:7] = ids[:, 5:7]  # the completion
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    completion, objective = _losses(out.logits, ids, labels, mask, 0.0)
    assert torch.allclose(objective, out.loss) and torch.allclose(completion, out.loss)
    completion, objective = _losses(out.logits, ids, labels, mask, 0.5)
    assert torch.allclose(completion, out.loss) and not torch.allclose(objective, out.loss)
    full = ids.masked_fill(mask == 0, -100)
    everything = model(input_ids=ids, attention_mask=mask, labels=full).loss  # every real token at weight 1
    assert torch.allclose(_losses(out.logits, ids, labels, mask, 1.0)[1], everything)


def test_a_curriculum_trains_on_the_first_conversations_alone_then_on_everything(corpus, tmp_path, monkeypatch):
    """``first_steps`` batches come from ``first`` only; the later ones from the whole corpus, ``first`` included."""
    import embedded.tiny_model as tiny_model

    pools = []
    real = tiny_model._length_bucketed_batches

    def spy(lengths, batch_size, generator):
        pools.append(len(lengths))
        return real(lengths, batch_size, generator)

    monkeypatch.setattr(tiny_model, "_length_bucketed_batches", spy)
    recipe = dataclasses.replace(SMALL, steps=4, first_steps=2, batch_size=4)
    with pytest.raises(ValueError, match="2 steps on the `first` conversations; none was given"):
        tiny_model.build_tiny_model(corpus[:32], tmp_path / "x", recipe)
    first = corpus[32:40]
    tiny_model.build_tiny_model(corpus[:32], tmp_path / "y", recipe, first=first)
    assert pools == [8, 40]  # one epoch of `first` (2 batches of 4), then the whole corpus
