"""What every policy engine does around one generation: the request's settings, the seed rule, the
:class:`rl.trace.LMCall` record, the counters and DSPy's response.

Why one base class: the in-process :class:`rl.engine.BatchedEngine` and the server-side
:class:`rl.vllm_engine.VLLMEngine` differ only in how they generate. Everything around that (which seed a request
samples with, what is recorded for the weight stage, what budgets are charged from) must be the same on both, or
a run would train and count differently depending on where it generates. So :meth:`PolicyEngine.complete` is
written once, and an engine supplies :meth:`PolicyEngine._generate`.

The engines implement DSPy's custom-engine contract: ``complete(Request) -> Response``, and ``__deepcopy__``
returning the engine itself (optimizers deepcopy programs; the model must be shared, not copied).

**The seed rule** (:meth:`PolicyEngine.seed_for`), the same on every engine:

1. a request's own ``seed`` wins;
2. else, inside a tagged :func:`rl.trace.recording`, the innermost recording's next seed (derived from its tag
   and the call's index in it), so a rollout samples the same tokens whatever thread or batch it runs in;
3. else the next draw of the engine's own seed stream (seeded by the engine's ``seed=``).

A fallback is drawn only when it is used: a request that brings its own seed never shifts the seeds of the
unseeded requests around it.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from dspy.lm15 import Message, Request, Response, Usage

from rl.errors import EngineError
from rl.trace import LMCall, Recorder, active_recorders, caller_info

__all__ = ["Generation", "PolicyEngine", "Sampling", "ServedPolicy", "chat_messages"]


class ServedPolicy(Protocol):
    """What an engine needs of the policy it serves (:class:`rl.policy.Policy` is the one implementation).

    Why a protocol: the policy builds its engines, so the engines naming ``Policy`` made ``rl.policy`` and the
    engine modules import each other; they name this instead.
    """

    model: Any
    tokenizer: Any
    lock: threading.RLock
    version: int
    model_string: str
    base_path: Path
    device: Any
    eos_token_ids: list[int]
    max_positions: int | None

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]: ...

    def save_adapter(self, path: str | Path) -> None: ...


def chat_messages(request: Request) -> list[dict[str, str]]:
    """A DSPy request as chat messages: the adapter's system prompt first, ``developer`` as ``system``.

    Every engine renders through this one function, so the same request gives the same prompt token ids on each.
    """
    return ([{"role": "system", "content": request.system}] if request.system else []) + [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text or ""} for m in request.messages
    ]


@dataclass
class Sampling:
    """One request as an engine generates it: the chat messages and the sampling settings, seed resolved.

    Attributes:
        seed: the seed to sample with (see the seed rule in the module docstring).
        user_seed: the request's own seed, ``None`` when it set none (what :class:`rl.trace.LMCall` records).
    """

    messages: list[dict[str, str]]
    temperature: float
    top_p: float | None
    top_k: int | None
    max_tokens: int
    stop: tuple[str, ...]
    seed: int
    user_seed: int | None


@dataclass(frozen=True)
class Generation:
    """What an engine's :meth:`PolicyEngine._generate` returns for one request.

    Attributes:
        max_tokens: the limit actually applied (a prompt near the context window clips the requested one).
        completion_logprobs: the sampler's log-probability of each completion token when the engine samples from
            another copy of the model (vLLM); ``None`` otherwise.
    """

    prompt_ids: Sequence[int]
    completion_ids: Sequence[int]
    text: str
    finish_reason: str
    version: int
    model: str
    max_tokens: int
    completion_logprobs: tuple[float, ...] | None = None


class PolicyEngine:
    """The shared request/recording path of the policy engines; subclasses implement :meth:`_generate`.

    Attributes:
        calls: the recent :class:`rl.trace.LMCall` records (``history_size`` of them).
        counters: monotonic totals since the engine started (``calls``, ``input_tokens``, ``output_tokens``);
            budgets are charged from these, never from the bounded :attr:`calls`.
    """

    supports_function_calling = False
    supports_reasoning = False
    supports_response_schema = False
    kind: ClassVar[str] = "policy"  # named in errors: "the <kind> policy engine"
    id_prefix: ClassVar[str] = "cotune"  # response ids are "<id_prefix>-<call_id>"

    def __init__(self, policy: ServedPolicy, *, default_max_tokens: int, seed: int, history_size: int) -> None:
        self.policy = policy
        self.default_max_tokens = default_max_tokens
        self.calls: deque[LMCall] = deque(maxlen=history_size)
        self.counters = {"calls": 0, "input_tokens": 0, "output_tokens": 0}
        self._count_lock = threading.Lock()
        self._seed_rng = torch.Generator().manual_seed(seed)
        self._seed_lock = threading.Lock()
        self._ids = itertools.count()

    def __deepcopy__(self, memo: dict) -> PolicyEngine:
        return self  # one model (or server), shared by every copy of a program

    def seed_for(self, requested: int | None, recorders: Sequence[Recorder] = ()) -> int:
        """The seed a request samples with: its own, else the innermost tagged recording's, else the engine's
        stream (see the module docstring)."""
        if requested is not None:
            return int(requested)
        drawn = recorders[-1].next_seed() if recorders else None
        if drawn is None:
            with self._seed_lock:
                drawn = int(torch.randint(0, 2**62, (1,), generator=self._seed_rng))
        return drawn

    def complete(self, request: Request) -> Response:
        """Generate one completion for a DSPy request, record it and count it (blocking; safe from many threads)."""
        if request.tools:
            raise EngineError(f"the {self.kind} engine does not do native tool calling; use DSPy's text adapters")
        cfg = request.config
        recorders = active_recorders()
        sampling = Sampling(
            messages=chat_messages(request),
            temperature=float(cfg.temperature) if cfg.temperature is not None else 0.0,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            max_tokens=int(cfg.max_tokens or self.default_max_tokens),
            stop=tuple(cfg.stop or ()),
            seed=self.seed_for(cfg.seed, recorders),
            user_seed=cfg.seed,
        )
        predictor, modules = caller_info()  # read in the calling thread, where DSPy's context is
        out = self._generate(sampling)
        call = LMCall(
            call_id=next(self._ids),
            model=out.model,
            version=out.version,
            messages=tuple(sampling.messages),
            prompt_ids=tuple(out.prompt_ids),
            completion_ids=tuple(out.completion_ids),
            text=out.text,
            finish_reason=out.finish_reason,
            predictor=predictor,
            modules=modules,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=out.max_tokens,
            seed=sampling.user_seed,
            tag=recorders[-1].tag if recorders else None,
            completion_logprobs=out.completion_logprobs,
        )
        n_in, n_out = len(call.prompt_ids), len(call.completion_ids)
        self.calls.append(call)
        with self._count_lock:
            self.counters["calls"] += 1
            self.counters["input_tokens"] += n_in
            self.counters["output_tokens"] += n_out
        for recorder in recorders:
            recorder.append(call)
        return Response(
            id=f"{self.id_prefix}-{call.call_id}",
            model=out.model,
            message=Message.assistant(out.text),
            finish_reason=out.finish_reason,
            usage=Usage(input_tokens=n_in, output_tokens=n_out, total_tokens=n_in + n_out),
        )

    def _generate(self, sampling: Sampling) -> Generation:
        """Generate the completion of one request (blocking; called from many threads at once)."""
        raise NotImplementedError

    def totals(self) -> dict[str, int]:
        """A consistent copy of :attr:`counters`."""
        with self._count_lock:
            return dict(self.counters)

    def stats(self) -> dict[str, Any]:
        """Totals for logging and budgets; engines add their own keys."""
        return self.totals()
