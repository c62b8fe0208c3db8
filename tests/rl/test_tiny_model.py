"""The tiny-model builder: deterministic from a seed, content-addressed cache, atomic output."""

from __future__ import annotations

import dataclasses

import pytest
from safetensors.torch import load_file

from programs.tasks import last_digit
from rl.tiny_model import TinyModelRecipe, build_or_load, recipe_key

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
    from rl.tiny_model import build_tiny_model

    with pytest.raises(ValueError, match="at least one conversation"):
        build_tiny_model([], tmp_path / "x", SMALL)
