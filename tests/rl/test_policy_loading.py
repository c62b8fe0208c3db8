"""Loading real HF models through the same code as the tiny one: local folders and the local HF cache only."""

from __future__ import annotations

import shutil

import pytest
import torch

from rl import LoraSettings, ModelNotFoundError, Policy, UnsafeModelError


def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        Policy.from_pretrained(missing)


def test_repo_id_not_in_local_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not available offline.*someorg/some-model"):
        Policy.from_pretrained("someorg/some-model")


def test_a_cache_lookup_that_fails_otherwise_is_logged_not_hidden(tmp_path, monkeypatch, caplog):
    """"Not in the cache" is said quietly; any other failure of the lookup is still "not available offline" (nothing
    was found locally), but what failed is logged and chained."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from rl.policy import resolve_model_path

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level("WARNING", logger="rl.policy"), pytest.raises(ModelNotFoundError) as quiet:
        resolve_model_path("someorg/some-model")
    assert isinstance(quiet.value.__cause__, LocalEntryNotFoundError) and not caplog.records

    def broken(*args, **kwargs):
        raise PermissionError("cache folder not readable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", broken)
    with caplog.at_level("WARNING", logger="rl.policy"), pytest.raises(ModelNotFoundError, match="not available"):
        resolve_model_path("someorg/some-model")
    assert "PermissionError: cache folder not readable" in caplog.text


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        Policy.from_pretrained(tmp_path)


def test_pickle_only_weights_are_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UnsafeModelError, match="safetensors"):
        Policy.from_pretrained(folder)


def test_loads_from_the_local_hf_cache_by_repo_id(tiny_model_dir, tmp_path, monkeypatch):
    """A model in the standard HF cache layout resolves by its repo id, offline."""
    hub = tmp_path / "hub"
    snapshot = hub / "models--cotune--tiny" / "snapshots" / "0123456789abcdef"
    shutil.copytree(tiny_model_dir, snapshot)
    (hub / "models--cotune--tiny" / "refs").mkdir()
    (hub / "models--cotune--tiny" / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    policy = Policy.from_pretrained("cotune/tiny", lora=LoraSettings(r=4, alpha=8))
    assert policy.base_path == snapshot
    assert policy.lora.r == 4
    assert policy.model_string.startswith("local/0123456789abcdef@v0-")  # named after the snapshot it resolved


def test_adapter_round_trip_is_a_standard_peft_folder(fresh_policy, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        for name, p in fresh_policy.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1 * torch.randn_like(p))
    fresh_policy.bump_version()
    out = fresh_policy.save_adapter(tmp_path / "adapter")
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not list(out.glob("*.bin"))

    ids = torch.tensor([fresh_policy.encode_messages([{"role": "user", "content": "What is 12345?"}])])
    with torch.no_grad():
        ours = fresh_policy.model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(fresh_policy.base_path)
        theirs = PeftModel.from_pretrained(base, out)(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs)

    # Loading it into another policy reproduces the weights and their content hash (but not the version).
    other = Policy.from_pretrained(fresh_policy.base_path, adapter=out, name="tiny-fresh")
    assert other.adapter_hash() == fresh_policy.adapter_hash()
    assert other.model_string.split("-")[-1] == fresh_policy.model_string.split("-")[-1]


def test_loading_leaves_the_callers_rng_alone_and_the_fresh_adapter_follows_lora_seed(tiny_model_dir):
    def lora_a(policy):
        return {k: v.detach().clone() for k, v in policy.model.named_parameters() if "lora_A" in k}

    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    first = Policy.from_pretrained(tiny_model_dir, name="rng-a", lora=LoraSettings(seed=5))
    assert torch.equal(torch.rand(4), expected), "from_pretrained reseeded the global torch RNG"
    again = Policy.from_pretrained(tiny_model_dir, name="rng-b", lora=LoraSettings(seed=5))
    other = Policy.from_pretrained(tiny_model_dir, name="rng-c", lora=LoraSettings(seed=6))
    a, b, c = lora_a(first), lora_a(again), lora_a(other)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same seed, the same adapter, whatever the RNG held
    assert not all(torch.equal(a[k], c[k]) for k in a)
