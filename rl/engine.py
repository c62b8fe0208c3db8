"""The in-process policy engine: DSPy's custom-engine seam over one local model, with micro-batching.

Why: DSPy programs call their LM one request at a time, from many threads (``dspy.Evaluate``,
``dspy.Parallel``, our rollouts). A local model is only fast when it generates a batch at once. The
engine queues concurrent requests and a single worker thread turns them into one left-padded
``model.generate`` call, so N threads cost roughly one batch, not N sequential generations.

Every row of a batch keeps its own sampling settings (temperature, top_p, top_k, max_tokens, stop,
seed): sampling is done by :class:`RowSampler`, a logits processor that draws every row's token in one
vectorised pass from a counter-based RNG keyed by that row's seed, and hands ``generate`` a one-hot choice;
``generate`` itself runs greedy.
A request with a seed therefore gets the same completion whatever else shares its batch (up to the
float noise of batched matmuls).

The worker generates on its own torch intra-op thread count (``torch_threads``; torch's OpenMP/MKL count is per
calling thread, so setting it in the worker leaves the trainer's count alone). Why: a small model decodes one
token at a time in tiny matmuls, where a second thread costs more in synchronisation than it saves (the embedded
agent model decodes 2.5x faster on one thread than on two), while the GRPO update's large matmuls want every
core. A model folder recommends its count in ``cotune.json`` (``{"engine": {"torch_threads": 1}}``).

What happens around a generation (DSPy's ``complete(Request) -> Response`` contract, the seed rule, the
:class:`rl.trace.LMCall` record with the exact prompt and completion token ids, the counters) is
:class:`rl.engine_base.PolicyEngine`'s, shared with the vLLM engine; this module only generates.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from dspy.lm15 import ContextLengthError
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from rl.engine_base import Generation, PolicyEngine, Sampling, ServedPolicy
from rl.errors import EngineError


@dataclass
class _Job(Sampling):
    """A request queued for the batching worker: its settings (``max_tokens`` clipped by the worker when the prompt
    nears the context window), its prompt ids once encoded, and the future its caller waits on."""

    prompt_ids: list[int] | None = None
    future: Future = field(default_factory=Future)


_WAKE = object()  # queued by a declared caller's done(): wakes the worker to re-count the callers it waits for


@dataclass
class _Result:
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    finish_reason: str
    version: int
    model: str


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def counter_uniform(seeds: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Uniform (0, 1) noise of shape (rows, vocab) from splitmix64 of (row seed, step, token index).

    A counter-based RNG: each row's draws depend on its own seed and position only, so a batch can be sampled
    in one vectorised pass while every row stays reproducible whatever else is in the batch.
    """
    x = seeds[:, None] + (step * vocab + torch.arange(vocab, dtype=torch.int64))[None, :] * _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    x = x ^ _shr(x, 31)
    return (_shr(x, 11).double() + 0.5) / float(1 << 53)


class RowSampler(LogitsProcessor):
    """Choose each row's next token with that row's own settings and seed; return one-hot scores.

    Sampling is Gumbel-max over ``logits / temperature`` (after per-row top-k and top-p masks) with
    :func:`counter_uniform` noise, all rows in one vectorised pass. ``generate`` then runs greedy over these
    scores, so its argmax is exactly our choice.
    """

    def __init__(self, jobs: list[_Job]) -> None:
        self.seeds = torch.tensor([_signed(job.seed % (1 << 64)) for job in jobs], dtype=torch.int64)
        self.temperature = torch.tensor([max(job.temperature, 1e-6) for job in jobs], dtype=torch.float32)[:, None]
        self.greedy = torch.tensor([job.temperature <= 0 for job in jobs])
        self.top_k = torch.tensor([job.top_k or 0 for job in jobs], dtype=torch.long)
        self.top_p = torch.tensor([job.top_p if job.top_p is not None else 1.0 for job in jobs], dtype=torch.float32)
        self.step = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()
        choice = scores.argmax(dim=-1)
        if not bool(self.greedy.all()):
            logits = scores / self.temperature.to(scores.device)
            vocab = logits.size(-1)
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
            k = self.top_k.to(scores.device)
            if bool((k > 0).any()):
                rank = torch.arange(vocab, device=scores.device)[None, :]
                drop |= (k[:, None] > 0) & (rank >= k[:, None])
            p = self.top_p.to(scores.device)
            if bool((p < 1.0).any()):
                probs = torch.softmax(sorted_logits, dim=-1)
                drop |= (probs.cumsum(-1) - probs) >= p[:, None]
            masked = sorted_logits.masked_fill(drop, float("-inf"))
            gumbel = -torch.log(-torch.log(counter_uniform(self.seeds, self.step, vocab))).to(scores.device)
            picked = order.gather(1, (masked + gumbel.float()).argmax(dim=-1, keepdim=True)).squeeze(1)
            choice = torch.where(self.greedy.to(scores.device), choice, picked)
        self.step += 1
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, choice.unsqueeze(1), 0.0)
        return out


class RowStopper(StoppingCriteria):
    """Per-row stop: the row's own ``max_tokens`` or one of its stop strings; records where each row ended."""

    def __init__(self, jobs: list[_Job], prompt_width: int, tokenizer) -> None:
        self.jobs = jobs
        self.prompt_width = prompt_width
        self.tokenizer = tokenizer
        self.ended_at: list[int | None] = [None] * len(jobs)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_width
        done = torch.zeros(len(self.jobs), dtype=torch.bool, device=input_ids.device)  # where generate keeps its flags
        for i, job in enumerate(self.jobs):
            if self.ended_at[i] is not None:
                done[i] = True
                continue
            if generated >= job.max_tokens:
                self.ended_at[i] = job.max_tokens
            elif job.stop:
                text = self.tokenizer.decode(input_ids[i, self.prompt_width :], skip_special_tokens=True)
                if any(s in text for s in job.stop):
                    self.ended_at[i] = generated
            done[i] = self.ended_at[i] is not None
        return done


class BatchedEngine(PolicyEngine):
    """DSPy custom engine over a :class:`rl.policy.Policy`; batches concurrent requests.

    Args:
        policy: the model, tokenizer, adapter and version to generate with.
        max_batch_size: most requests generated together.
        max_wait_ms: longest the worker waits for more requests after the first one (it waits only while fewer
            requests are queued than recent batches held, so a lone sequential caller never waits).
        default_max_tokens: used when a request sets no ``max_tokens``.
        seed: seeds the engine's seed stream, for requests that carry no seed of their own, outside a tagged
            :func:`rl.trace.recording` (the seed rule: :mod:`rl.engine_base`).
        history_size: how many recent :class:`LMCall` records :attr:`calls` keeps.
        client_wait_ms: longest wait for the requests of callers declared with :meth:`clients`.
        torch_threads: torch intra-op threads the worker generates on (default: the process's count).
    """

    kind = "local policy"

    def __init__(
        self,
        policy: ServedPolicy,
        max_batch_size: int = 64,
        max_wait_ms: float = 15.0,
        default_max_tokens: int = 256,
        seed: int = 0,
        history_size: int = 10_000,
        client_wait_ms: float = 250.0,
        torch_threads: int | None = None,
    ) -> None:
        super().__init__(policy, default_max_tokens=default_max_tokens, seed=seed, history_size=history_size)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.batch_sizes: deque[int] = deque(maxlen=history_size)
        self._queue: queue.Queue[_Job | object] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._clients = 0
        self._clients_lock = threading.Lock()
        self.client_wait_s = client_wait_ms / 1000.0
        if torch_threads is not None and torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {torch_threads}")
        self.torch_threads = torch_threads

    @contextmanager
    def clients(self, n: int) -> Iterator[Callable[[], None]]:
        """Declare ``n`` concurrent callers (e.g. the rollouts of one step) for the duration of the block.

        Yields a ``done()`` callable each caller invokes when it will make no more requests. While declared
        callers remain, the worker waits (up to ``client_wait_ms``) until one request from each caller still
        declared is queued before generating, so G x B rollouts that start together are generated as one batch
        instead of being split by the few milliseconds DSPy takes to format each prompt. ``done()`` wakes the
        worker, so a caller that finishes while the others' requests wait ends the wait at once.
        """
        remaining = [n]
        with self._clients_lock:
            self._clients += n

        def done() -> None:
            with self._clients_lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
                self._clients -= 1
            self._queue.put(_WAKE)  # a worker waiting for this caller's request stops waiting

        try:
            yield done
        finally:
            with self._clients_lock:
                left, remaining[0] = remaining[0], 0
                self._clients -= left
            if left:
                self._queue.put(_WAKE)

    # --- generation (PolicyEngine.complete does the rest) -------------------------------------------

    def _generate(self, sampling: Sampling) -> Generation:
        """Queue the request for the batching worker and wait for its row of the batch."""
        job = _Job(**{f.name: getattr(sampling, f.name) for f in fields(Sampling)})
        self._ensure_worker()
        self._queue.put(job)
        result: _Result = job.future.result()
        return Generation(prompt_ids=result.prompt_ids, completion_ids=result.completion_ids, text=result.text,
                          finish_reason=result.finish_reason, version=result.version, model=result.model,
                          max_tokens=job.max_tokens)  # clipped by the worker when the prompt nears the context

    # --- batching worker ----------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        if self._worker is not None and self._worker.is_alive():
            return
        with self._start_lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._serve, name="cotune-engine", daemon=True)
                self._worker.start()

    def _serve(self) -> None:
        if self.torch_threads is not None:
            torch.set_num_threads(self.torch_threads)  # this worker thread's own count: see the module docstring
        recent: deque[int] = deque([1], maxlen=2)
        while True:
            first = self._queue.get()
            if first is _WAKE:
                continue
            jobs = [first]
            # Declared callers: wait for one request from each caller still declared, re-read whenever one is done
            # (done() queues a wake-up), so a caller that finished never holds the batch back. Undeclared callers
            # (k DSPy threads) come back together after each batch, a few ms apart: wait for as many as the recent
            # batches held (they are likely on their way), but never longer than max_wait.
            declared = self._clients > 0
            deadline = time.monotonic() + (self.client_wait_s if declared else self.max_wait_s)
            while len(jobs) < self.max_batch_size:
                expected = min(self.max_batch_size, self._clients if declared else max(recent))
                timeout = deadline - time.monotonic() if len(jobs) < expected else 0.0
                try:
                    job = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not _WAKE:
                    jobs.append(job)
            recent.append(len(jobs))
            jobs = self._refuse_overlong(jobs)
            if not jobs:
                continue
            try:
                results = self.generate_batch(jobs)
            except BaseException as exc:  # noqa: BLE001 - every waiting caller must be released
                error = EngineError(f"generation failed for a batch of {len(jobs)} requests: {exc!r}")
                error.__cause__ = exc
                for job in jobs:
                    job.future.set_exception(error)
                continue
            for job, result in zip(jobs, results):
                job.future.set_result(result)

    def _refuse_overlong(self, jobs: list[_Job]) -> list[_Job]:
        """Fail requests whose prompt leaves no room in the context window; clip the others' max_tokens.

        The error is lm15's ``ContextLengthError``, which DSPy surfaces as ``ContextWindowExceededError`` (ReAct,
        for one, reacts by truncating its trajectory).
        """
        limit = self.policy.max_positions
        kept = []
        for job in jobs:
            try:
                job.prompt_ids = self.policy.encode_messages(job.messages)
            except Exception as exc:  # noqa: BLE001 - a bad chat template fails this request only
                job.future.set_exception(EngineError(f"could not apply the chat template: {exc!r}"))
                continue
            if limit is not None and len(job.prompt_ids) >= limit:
                job.future.set_exception(ContextLengthError(
                    f"prompt of {len(job.prompt_ids)} tokens does not fit the model's {limit}-token context"))
                continue
            if limit is not None:
                job.max_tokens = min(job.max_tokens, limit - len(job.prompt_ids))
            kept.append(job)
        return kept

    def generate_batch(self, jobs: list[_Job]) -> list[_Result]:
        """Generate all ``jobs`` in one left-padded ``model.generate`` call."""
        policy = self.policy
        tok = policy.tokenizer
        prompts = [job.prompt_ids or policy.encode_messages(job.messages) for job in jobs]
        width = max(len(p) for p in prompts)
        pad = tok.pad_token_id if tok.pad_token_id is not None else policy.eos_token_ids[0]
        input_ids = torch.full((len(jobs), width), pad, dtype=torch.long)
        attention = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids) :] = 1
        stopper = RowStopper(jobs, width, tok)
        gen_config = GenerationConfig(
            max_new_tokens=max(job.max_tokens for job in jobs),
            do_sample=False,
            num_beams=1,
            eos_token_id=policy.eos_token_ids,
            pad_token_id=pad,
        )
        with policy.lock, torch.inference_mode():
            policy.model.eval()
            version, model_string = policy.version, policy.model_string
            device = policy.device
            out = policy.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                generation_config=gen_config,
                logits_processor=LogitsProcessorList([RowSampler(jobs)]),
                stopping_criteria=StoppingCriteriaList([stopper]),
            )
        self.batch_sizes.append(len(jobs))
        generated = out[:, width:].cpu().tolist()
        eos = set(policy.eos_token_ids)
        results = []
        for row, job in enumerate(jobs):
            ids = generated[row]
            cut = min(len(ids), job.max_tokens)
            if stopper.ended_at[row] is not None:
                cut = min(cut, stopper.ended_at[row])
            eos_pos = next((i for i, t in enumerate(ids[:cut]) if t in eos), None)
            hit_eos = eos_pos is not None
            if hit_eos:
                cut = eos_pos + 1
            completion = ids[:cut]
            text = tok.decode(completion, skip_special_tokens=True)
            hit_stop = False
            for s in job.stop:
                if s in text:
                    text, hit_stop = text[: text.index(s)], True
            finish = "stop" if hit_eos or hit_stop else "length"
            results.append(_Result(prompts[row], completion, text, finish, version, model_string))
        return results

    def stats(self) -> dict[str, Any]:
        """Totals for logging and budgets: calls, input/output tokens, and the mean size of recent batches."""
        sizes = list(self.batch_sizes)
        return {**self.totals(), "batches": len(sizes), "mean_batch": sum(sizes) / max(1, len(sizes))}
