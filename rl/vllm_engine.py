"""The vLLM policy engine: DSPy's custom-engine seam over a vLLM server, with the in-process engine's traces.

Why: on a GPU machine, rollouts and evaluation are generation-bound and vLLM generates many times faster than
``model.generate``; training stays in-process (TRL on the policy's PEFT model). The two meet at the adapter:
after every weight step :meth:`VLLMEngine.sync` saves it and loads it into the server under a new versioned
name (``<name>@v<version>-<hash>``), and requests name that version, so no completion can come from stale
weights. Old versions are unloaded once no request uses them.

The weight stage trains on the exact token ids the model saw and produced, so they come from the server's
response (``return_token_ids``), never from re-tokenizing text. The prompt ids are checked against the
trainer's own tokenization (:meth:`rl.policy.Policy.encode_messages`); a mismatch (another chat template or
tokenizer version on the server) is a :class:`TokenizationMismatchError`, not silently off-policy training.
Each call is recorded as the same :class:`rl.trace.LMCall` the in-process engine records, by the same code
(:class:`rl.engine_base.PolicyEngine`, with the same seed rule), so the weight stage does not care which engine ran.

Example:
    >>> policy = Policy.from_pretrained("/models/Qwen2.5-0.5B-Instruct", engine="vllm")     # doctest: +SKIP
    >>> dspy.configure(lm=policy.lm(temperature=0.0))                                       # doctest: +SKIP
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dspy.lm15 import ContextLengthError

from rl import distributed
from rl.atomic import atomic_dir
from rl.engine_base import Generation, PolicyEngine, Sampling, ServedPolicy
from rl.errors import EngineError
from rl.vllm_server import VLLMServer, VLLMServerError

_FINISH = {"stop": "stop", "length": "length"}


class TokenizationMismatchError(EngineError):
    """The server tokenized a prompt differently from the trainer; training on its ids would be off-policy."""


class VLLMEngine(PolicyEngine):
    """DSPy custom engine that generates on a vLLM server and records every call like :class:`rl.engine.BatchedEngine`.

    Args:
        policy: the trainable policy; its tokenizer checks the server's prompt ids, its adapter is served.
        server: a started or attached :class:`rl.vllm_server.VLLMServer` serving ``policy``'s base model.
        adapter_dir: where adapter versions are written for the server to load (must be readable by the
            server: the same machine or a shared filesystem). Default: a temporary folder removed on close.
        default_max_tokens: used when a request sets no ``max_tokens``.
        seed: seeds the engine's seed stream, for requests that carry no seed of their own, outside a tagged
            :func:`rl.trace.recording` (the seed rule: :mod:`rl.engine_base`).
        history_size: how many recent :class:`LMCall` records :attr:`calls` keeps.
        check_tokens: compare every prompt's ids with the trainer's tokenization (cheap: memoised).
        own_server: close the server (our HTTP client, and the process if we started one) with the engine.
    """

    kind = "vLLM policy"
    id_prefix = "cotune-vllm"

    def __init__(
        self,
        policy: ServedPolicy,
        server: VLLMServer,
        *,
        adapter_dir: str | Path | None = None,
        default_max_tokens: int = 256,
        seed: int = 0,
        history_size: int = 10_000,
        check_tokens: bool = True,
        own_server: bool = False,
    ) -> None:
        super().__init__(policy, default_max_tokens=default_max_tokens, seed=seed, history_size=history_size)
        self.server = server
        self.check_tokens = check_tokens
        self.own_server = own_server
        self.swaps = 0  # adapter versions loaded into the server
        self._tag = uuid.uuid4().hex[:6]  # engines sharing a server never touch each other's adapters
        self._temp = None if adapter_dir else tempfile.TemporaryDirectory(prefix="cotune-vllm-adapters-")
        self.adapter_dir = Path(adapter_dir or self._temp.name)
        # served adapter name -> (version, model string); in-flight requests per name; the current name
        self._served: dict[str, tuple[int, str]] = {}
        self._inflight: dict[str, int] = {}
        self._current: str | None = None
        self._swap_lock = threading.Condition()
        # Data parallel training (accelerate launch): the ranks attached to one server share its adapter names and
        # the lowest of them alone writes and loads each version; the others wait for it (see sync).
        self._loader, self._shared = True, False
        if distributed.is_distributed() and server.process is None:
            peers = distributed.gather_objects((server.url, self._tag))
            first = next(i for i, (url, _) in enumerate(peers) if url == server.url)
            self._tag, self._loader, self._shared = peers[first][1], first == distributed.rank(), True
        self.sync()

    # --- adapter versions -----------------------------------------------------------------------

    def adapter_name(self) -> str:
        """The served name of the policy's current adapter, ``<name>@v<version>-<hash>.<engine>``.

        It changes with the weights (version and content hash), and carries this engine's tag so that two
        engines sharing one server never unload each other's adapters.
        """
        base = re.sub(r"[^A-Za-z0-9_.@-]", "_", self.policy.model_string.removeprefix("local/"))
        return f"{base}.{self._tag}"

    def sync(self) -> str:
        """Make the server serve the policy's current adapter; unload versions no request uses any more.

        Called by :meth:`rl.policy.Policy.bump_version` (the weight stage bumps after every optimizer step) and
        when an adapter is loaded. Idempotent: a version already served is not reloaded.

        Under several training processes attached to one server this is a collective call (every rank bumps its
        version at the same point, with bit-identical weights, hence the same name): one rank writes and loads the
        adapter, the others wait at a barrier until the server holds it, then name it in their requests.
        """
        with self.policy.lock:
            name, version, model_string = self.adapter_name(), self.policy.version, self.policy.model_string
            with self._swap_lock:
                if name == self._current:
                    return name
            if name not in self._served and self._loader:
                folder = self.adapter_dir / name
                with atomic_dir(folder) as tmp:
                    self.policy.save_adapter(tmp)
                self.server.load_adapter(name, folder)
                self.swaps += 1
            if self._shared:
                distributed.barrier()
        with self._swap_lock:
            self._served[name] = (version, model_string)
            self._current = name
        self._unload_idle()
        return name

    def _unload_idle(self) -> None:
        with self._swap_lock:
            idle = [n for n in self._served if n != self._current and not self._inflight.get(n)]
            for n in idle:
                del self._served[n]
        for n in idle if self._loader else ():  # a rank that did not load a version leaves it to the one that did
            self.server.unload_adapter(n)
            shutil.rmtree(self.adapter_dir / n, ignore_errors=True)

    @contextmanager
    def _use_current(self) -> Iterator[tuple[str, int, str]]:
        """Pin the current adapter version for one request, so that a swap does not unload it mid-flight."""
        with self._swap_lock:
            name = self._current
            self._inflight[name] = self._inflight.get(name, 0) + 1
            version, model_string = self._served[name]
        try:
            yield name, version, model_string
        finally:
            with self._swap_lock:
                self._inflight[name] -= 1
                stale = name != self._current and not self._inflight[name]
            if stale:
                self._unload_idle()

    def served_adapters(self) -> list[str]:
        """Names of this engine's adapters that the server holds now (from ``/v1/models``)."""
        return [m["id"] for m in self.server.models() if m.get("parent") and m["id"].endswith(f".{self._tag}")]

    # --- generation (PolicyEngine.complete does the rest) -------------------------------------------

    def _generate(self, sampling: Sampling) -> Generation:
        """One chat request to the server, naming the current adapter version; its token ids checked."""
        max_tokens = sampling.max_tokens
        expected = self.policy.encode_messages(sampling.messages) if self.check_tokens else None
        limit = self.server.max_model_len or self.policy.max_positions
        if limit is not None and expected is not None:
            if len(expected) >= limit:
                raise ContextLengthError(f"prompt of {len(expected)} tokens does not fit the model's {limit}-token "
                                         "context")
            max_tokens = min(max_tokens, limit - len(expected))
        with self._use_current() as (name, version, model_string):
            payload = {
                "model": name, "messages": sampling.messages, "max_tokens": max_tokens,
                "temperature": sampling.temperature,
                # neutral values sent explicitly: a server's generation_config defaults must not reshape sampling
                "top_p": sampling.top_p if sampling.top_p is not None else 1.0, "top_k": sampling.top_k or 0,
                "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                "seed": sampling.seed % (1 << 63), "return_token_ids": True, "skip_special_tokens": True,
                # the sampled tokens' log-probs, for the trainer's importance-sampling correction
                "logprobs": True, "top_logprobs": 0,
            }
            if sampling.stop:
                payload["stop"] = list(sampling.stop)
            body = self.server.chat(payload)
        choice = body["choices"][0]
        prompt_ids, completion_ids = body.get("prompt_token_ids"), choice.get("token_ids")
        if prompt_ids is None or completion_ids is None:
            raise EngineError(f"the server at {self.server.url} returned no token ids; it needs vLLM >= 0.10.2 "
                              "(the `return_token_ids` request field)")
        if expected is not None and list(prompt_ids) != list(expected):
            raise self._mismatch(expected, prompt_ids)
        finish = _FINISH.get(choice.get("finish_reason"))
        if finish is None:
            raise EngineError(f"vLLM finished a request with {choice.get('finish_reason')!r}: {choice}")
        logprobs = [entry.get("logprob") for entry in (choice.get("logprobs") or {}).get("content") or []]
        return Generation(
            prompt_ids=prompt_ids, completion_ids=completion_ids, text=choice["message"].get("content") or "",
            finish_reason=finish, version=version, model=model_string, max_tokens=max_tokens,
            # one per completion token, else unusable (None: the trainer then applies no correction to this call)
            completion_logprobs=(tuple(float("nan") if v is None else float(v) for v in logprobs)
                                 if len(logprobs) == len(completion_ids) else None),
        )

    def _mismatch(self, expected: list[int], got: list[int]) -> TokenizationMismatchError:
        at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
        tok = self.policy.tokenizer
        return TokenizationMismatchError(
            f"the vLLM server tokenized a prompt differently from the trainer (first difference at token {at}: "
            f"trainer {tok.decode(expected[at:at + 8])!r} vs server {tok.decode(got[at:at + 8])!r}; "
            f"{len(expected)} vs {len(got)} tokens). Serve the very model folder the policy loaded "
            f"({self.policy.base_path}) so both use its tokenizer and chat template, and keep the tokenizers "
            "library versions compatible; training on these ids would be off-policy.")

    # --- bookkeeping ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Totals for logging and budgets (same keys as the in-process engine; the server batches itself)."""
        return {**self.totals(), "batches": 0, "mean_batch": 0.0, "adapter_swaps": self.swaps}

    def close(self) -> None:
        """Unload our adapters from a server that lives on (or stop the one we started); remove our folders."""
        if not (self.own_server and self.server.process is not None):
            with self._swap_lock:
                names, self._served, self._current = list(self._served), {}, None
            for name in names if self._loader else ():
                try:
                    self.server.unload_adapter(name)
                except VLLMServerError:  # the server is gone or already dropped it: nothing left to free
                    pass
        if self.own_server:
            self.server.close()
        if self._temp is not None:
            self._temp.cleanup()
