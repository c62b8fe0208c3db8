"""Fixtures for the task tests: a *scripted* policy engine that records calls exactly like ``rl.engine``.

Why scripted: the tiny model cannot follow a multi-hop or ReAct format (its context is 1024 tokens and ReAct's
prompt alone is ~1800 of its tokens), so on it these programs stop at their first call. To show that the weight
stage gets one training row per predictor call and per agent step, the tests replace only *sampling*: the
engine below answers from a script, tokenizes prompt and completion with the tiny model's tokenizer and records
an ``rl.trace.LMCall`` into the open recordings, the way the real engine does. Rollouts, rubric and advantages
are the real ``rl`` code.
"""

from __future__ import annotations

import itertools
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import dspy
import pytest
from dspy.lm15 import Message, Response, Usage

from rl.trace import LMCall, active_recorders, caller_info

Script = Callable[[Any, list[dict[str, str]], Any, int], str]  # (predictor, messages, rollout tag, call index)


class ScriptedEngine:
    """DSPy custom engine whose completions come from ``script``; every call is recorded as an LMCall."""

    def __init__(self, policy, script: Script) -> None:
        self.policy = policy
        self.script = script
        self._ids = itertools.count()
        self._per_tag: dict[Any, int] = defaultdict(int)
        self._lock = threading.Lock()

    def __deepcopy__(self, memo):
        return self

    def complete(self, request):
        messages = ([{"role": "system", "content": request.system}] if request.system else []) + [
            {"role": m.role, "content": m.text or ""} for m in request.messages]
        recorders = active_recorders()
        tag = recorders[-1].tag if recorders else None
        with self._lock:
            index = self._per_tag[tag]
            self._per_tag[tag] += 1
        predictor, modules = caller_info()
        text = self.script(predictor, messages, tag, index)
        call = LMCall(call_id=next(self._ids), model=request.model, version=0, messages=tuple(messages),
                      prompt_ids=tuple(self.policy.encode_messages(messages)),
                      completion_ids=tuple(self.policy.tokenizer.encode(text, add_special_tokens=False)),
                      text=text, finish_reason="stop", predictor=predictor, modules=modules,
                      temperature=float(request.config.temperature or 0.0), tag=tag)
        for recorder in recorders:
            recorder.append(call)
        n_in, n_out = len(call.prompt_ids), len(call.completion_ids)
        return Response(id=f"scripted-{call.call_id}", model=request.model, message=Message.assistant(text),
                        finish_reason="stop", usage=Usage(input_tokens=n_in, output_tokens=n_out,
                                                          total_tokens=n_in + n_out))


@pytest.fixture()
def scripted_lm(tiny_policy):
    """``scripted_lm(script) -> dspy.LM`` on a :class:`ScriptedEngine` with the tiny model's tokenizer."""

    def make(script: Script) -> dspy.LM:
        return dspy.LM("local/scripted@v0", engine=ScriptedEngine(tiny_policy, script), cache=False,
                       temperature=1.0, max_tokens=64, num_retries=0)

    return make
