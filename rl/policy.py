"""The trainable policy: one local causal LM with a PEFT LoRA adapter, served to DSPy as a ``dspy.LM``.

Why one object: prompts and weights are optimized against the *same* model. The prompt stages see it as
a ``dspy.LM`` (:meth:`Policy.lm`), the weight stage trains its LoRA adapter in place, and the model string
DSPy caches under (``local/<name>@v<version>-<hash>``) changes whenever the adapter's weights change, so
DSPy's cache can never serve a completion produced by older weights.

Loading is local only (there is no hub at run time): a folder path, or a name already in the local
Hugging Face cache. Weights load from safetensors only and ``trust_remote_code`` stays off unless asked.

Example:
    >>> from rl import Policy
    >>> policy = Policy.from_pretrained("/models/Qwen2.5-0.5B-Instruct", lora=LoraSettings(r=16))  # doctest: +SKIP
    >>> import dspy
    >>> dspy.configure(lm=policy.lm(temperature=0.0))                                              # doctest: +SKIP
    >>> dspy.Predict("question -> answer")(question="2+2?").answer                                 # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dspy
import torch

from rl import dspy_seam
from rl.engine import BatchedEngine
from rl.errors import ModelNotFoundError, StageConfigError, UnsafeModelError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter shape; maps onto ``peft.LoraConfig``.

    ``target_modules="all-linear"`` adapts every linear layer but the output head (PEFT's own rule).
    Dropout defaults to 0: GRPO's importance ratio is noisy with dropout on.
    """

    r: int = field(default=16, metadata={"help": "LoRA rank (the adapter's inner dimension)"})
    alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator: the update is scaled by alpha / r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input (0: GRPO's ratio stays "
                                                          "exact)"})
    target_modules: str | tuple[str, ...] = field(default="all-linear", metadata={
        "help": "modules to adapt: 'all-linear' (every linear layer but the output head) or a list of names"})
    seed: int = field(default=0, metadata={"help": "seed of the adapter's initial weights"})

    def __post_init__(self) -> None:
        for name in ("r", "alpha"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise StageConfigError(f"lora.{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise StageConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")

    def to_peft(self):
        from peft import LoraConfig

        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets, task_type="CAUSAL_LM"
        )


def resolve_model_path(path_or_name: str | os.PathLike) -> Path:
    """A local folder for ``path_or_name``: the folder itself, or its snapshot in the local HF cache.

    Raises:
        ModelNotFoundError: nothing local matches (there is no download at run time).
    """
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"model folder {str(path)!r} has no config.json; is it a Hugging Face model folder?")
        return path
    name = str(path_or_name)
    looks_like_repo = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    cause: Exception | None = None
    if looks_like_repo:
        try:
            from huggingface_hub import snapshot_download
            from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

            # HF_HUB_CACHE is read here, at call time (huggingface_hub reads it once, at import)
            return Path(snapshot_download(name, local_files_only=True, cache_dir=os.environ.get("HF_HUB_CACHE")))
        except (LocalEntryNotFoundError, HFValidationError) as exc:  # not in the cache / not a hub name at all
            cause = exc
        except Exception as exc:  # noqa: BLE001 - a broken cache entry or hub install: no local model either
            # Safe to go on: with local_files_only nothing was downloaded, and the error below says the model is not
            # available offline, which is true. What went wrong is logged (and chained) so it is not hidden.
            logger.warning("looking %r up in the local Hugging Face cache failed (%s: %s); treating it as not cached",
                           name, type(exc).__name__, exc)
            cause = exc
    raise ModelNotFoundError(
        f"model {name!r} is not available offline: no folder at {str(path.resolve())!r} and no snapshot in the "
        "local Hugging Face cache. Pass the path of a downloaded model folder (config.json + *.safetensors), "
        "or build the embedded test model with `cotune model build tiny`."
    ) from cause


def _fingerprint_folder(path: Path) -> str:
    """A cheap identity of a model folder: config plus names and sizes of its weight files."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:12]


class PolicyLM(dspy.LM):
    """A ``dspy.LM`` whose model string always names the policy's *current* adapter version.

    Copies (``lm.copy()``, deep copies of programs) share the engine and therefore follow the policy too.
    """

    @property
    def model(self) -> str:  # type: ignore[override]
        return dspy_seam.engine_of(self).policy.model_string

    @model.setter
    def model(self, value: str) -> None:  # the string follows the policy; dspy's __init__ assigns it once
        pass


@dataclass
class Policy:
    """A causal LM + LoRA adapter + tokenizer, the batched engine over them, and the adapter version.

    Build one with :meth:`from_pretrained`. The model is shared by every ``dspy.LM`` handed out by
    :meth:`lm`; :attr:`lock` serializes generation against weight updates.
    """

    model: Any
    tokenizer: Any
    name: str
    base_path: Path
    lora: LoraSettings
    engine_options: dict[str, Any] = field(default_factory=dict)
    version: int = 0
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def __post_init__(self) -> None:
        self.base_fingerprint = _fingerprint_folder(self.base_path)
        self.eos_token_ids = _eos_ids(self.model, self.tokenizer)
        self.max_positions: int | None = getattr(self.model.config, "max_position_embeddings", None)
        self._adapter_hash = self.adapter_hash()
        self._encode_cached = functools.lru_cache(maxsize=4096)(self._encode_uncached)
        self.engine = BatchedEngine(self, **self.engine_options)

    def __deepcopy__(self, memo: dict) -> Policy:
        return self

    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str | os.PathLike,
        *,
        name: str | None = None,
        lora: LoraSettings = LoraSettings(),
        adapter: str | os.PathLike | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | None = None,
        trust_remote_code: bool = False,
        max_batch_size: int = 64,
        max_wait_ms: float = 15.0,
        default_max_tokens: int = 256,
        seed: int = 0,
        torch_threads: int | None = None,
        engine: str = "local",
        vllm: dict[str, Any] | None = None,
    ) -> Policy:
        """Load a local HF causal LM and attach a LoRA adapter (fresh, or ``adapter=`` a saved PEFT folder).

        Args:
            path_or_name: a model folder, or a repo id already in the local HF cache.
            name: short name used in the model string; defaults to the folder name.
            lora: shape of a fresh adapter (ignored when ``adapter`` is given).
            adapter: a PEFT adapter folder to load (trainable) instead of a fresh one.
            dtype: torch dtype for the weights (default: float32 on CPU, the model's own dtype elsewhere).
            device: ``"cpu"``, ``"cuda:1"``, ... (default: ``cuda:$LOCAL_RANK`` when CUDA is available, so each rank of
                a multi-GPU launch gets its own GPU; else the CPU).
            trust_remote_code: run code shipped with the model. Off unless you trust the folder.
            max_batch_size, max_wait_ms, default_max_tokens, seed: engine settings (see :class:`BatchedEngine`).
            torch_threads: torch threads the in-process engine generates on; default: the model folder's
                ``cotune.json`` ``engine.torch_threads``, else the process's count.
            engine: where generation runs: ``"local"`` (in-process :class:`BatchedEngine`), ``"vllm"`` (start a
                vLLM server on this model folder) or the URL of a running vLLM server. Training is in-process
                either way; see :meth:`use_vllm`.
            vllm: options for :meth:`use_vllm` (server options such as ``dtype``, ``python``, ``env``, and
                ``adapter_dir``) when ``engine`` is not ``"local"``.

        Raises:
            ModelNotFoundError: the model is not available locally.
            UnsafeModelError: the folder has no safetensors weights.
            rl.config.ModelSettingsError: the folder's ``cotune.json`` is malformed.
        """
        from peft import PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rl.config import read_model_settings

        path = resolve_model_path(path_or_name)
        if torch_threads is None:
            torch_threads = read_model_settings(path).get("engine", {}).get("torch_threads")
        if not list(path.glob("*.safetensors")):
            raise UnsafeModelError(
                f"{str(path)!r} has no *.safetensors weights; cotune loads safetensors only "
                "(convert pickle checkpoints with `transformers` save_pretrained(safe_serialization=True))."
            )
        # under accelerate/torchrun each rank takes its own GPU (LOCAL_RANK); one process takes cuda:0
        device = device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = torch.float32 if device == "cpu" else "auto"
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        if tokenizer.chat_template is None:
            raise ModelNotFoundError(f"tokenizer at {str(path)!r} has no chat template; DSPy chat needs one")
        tokenizer.padding_side = "left"
        base = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, local_files_only=True, trust_remote_code=trust_remote_code
        ).to(device)
        if adapter is not None:
            adapter_path = Path(adapter)
            if not (adapter_path / "adapter_config.json").exists():
                raise ModelNotFoundError(f"adapter folder {str(adapter_path)!r} has no adapter_config.json")
            model = PeftModel.from_pretrained(base, adapter_path, is_trainable=True)
            lora = _settings_from_peft(model)
        else:
            # A fresh adapter's initial weights are a function of lora.seed alone, drawn from a forked RNG: loading a
            # model must not reseed the caller's global torch RNG (their own seeding would silently be undone).
            cuda = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(lora.seed)
                model = get_peft_model(base, lora.to_peft())
        model.eval()
        policy = cls(
            model=model,
            tokenizer=tokenizer,
            name=name or path.name,
            base_path=path,
            lora=lora,
            engine_options={
                "max_batch_size": max_batch_size,
                "max_wait_ms": max_wait_ms,
                "default_max_tokens": default_max_tokens,
                "seed": seed,
                "torch_threads": torch_threads,
            },
        )
        if engine != "local":
            policy.use_vllm(None if engine == "vllm" else engine, **(vllm or {}))
        return policy

    def use_vllm(self, url: str | None = None, *, server: Any = None, adapter_dir: str | os.PathLike | None = None,
                 **server_options: Any):
        """Serve generation from vLLM from now on; training stays in-process on :attr:`model`.

        Starts a vLLM server on :attr:`base_path` (from the venv of ``scripts/vllm_venv.sh``), or attaches to
        ``url`` / ``server``. The current adapter is loaded at once and again after every :meth:`bump_version`
        under a versioned name. LMs made earlier by :meth:`lm` keep the previous engine: switch first.

        Args:
            url: a running server (started with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``).
            server: a :class:`rl.vllm_server.VLLMServer` to use as is.
            adapter_dir: where adapter versions are written; the server must be able to read it.
            server_options: :meth:`rl.vllm_server.VLLMServer.start` options (``dtype``, ``python``, ``env``, ...),
                or with ``url`` those of :meth:`rl.vllm_server.VLLMServer.attach` (``api_key``, ``served_model``).

        Returns:
            The :class:`rl.vllm_engine.VLLMEngine`, also :attr:`engine`.
        """
        from rl.vllm_engine import VLLMEngine
        from rl.vllm_server import VLLMServer

        own = server is None  # a server made here (started, or attached to url) closes with the engine
        if server is None:
            if url is not None:
                server = VLLMServer.attach(url, **server_options)  # served_model, api_key, timeout_s
            else:
                server_options.setdefault("max_lora_rank", self.lora.r)
                server_options.setdefault("dtype", str(next(self.model.parameters()).dtype).removeprefix("torch."))
                server = VLLMServer.start(self.base_path, **server_options)
        options = {k: self.engine_options[k] for k in ("default_max_tokens", "seed") if k in self.engine_options}
        try:
            engine = VLLMEngine(self, server, adapter_dir=adapter_dir, own_server=own, **options)
        except BaseException:
            if own:
                server.close()
            raise
        previous, self.engine = self.engine, engine
        getattr(previous, "close", lambda: None)()
        return engine

    def close(self) -> None:
        """Release what the engine holds (a vLLM server this policy started); the model stays usable."""
        getattr(self.engine, "close", lambda: None)()

    # --- recommended stage settings -------------------------------------------------------------

    def recommended_settings(self) -> dict[str, dict[str, Any]]:
        """The stage settings the model folder recommends in its ``cotune.json`` (``{}`` when it has none).

        Raises:
            rl.config.ModelSettingsError: the file is there but is not a JSON object of settings sections.
        """
        from rl.config import read_model_settings

        return read_model_settings(self.base_path)

    @property
    def hidden_size(self) -> int | None:
        """The base model's hidden size (what :func:`rl.config.lora_learning_rate` sizes the rate by)."""
        config = self.model.config
        return getattr(config, "hidden_size", None) or getattr(config, "d_model", None)

    # --- DSPy side ------------------------------------------------------------------------------

    @property
    def model_string(self) -> str:
        """``local/<name>@v<version>-<hash>``: DSPy's cache key part that changes with the weights."""
        return f"local/{self.name}@v{self.version}-{self._adapter_hash[:10]}"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def lm(self, **kwargs: Any) -> PolicyLM:
        """A ``dspy.LM`` on this policy. ``kwargs`` are ``dspy.LM`` settings (temperature, max_tokens, cache...)."""
        kwargs.setdefault("num_retries", 0)
        return PolicyLM(model=self.model_string, engine=self.engine, **kwargs)

    def encode_messages(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Prompt token ids for chat ``messages`` with the generation prompt, as the engine feeds them.

        Memoised on the messages' text: a rollout batch sends each prompt G times, and tokenizing is pure.
        """
        return list(self._encode_cached(tuple((m["role"], m["content"]) for m in messages)))

    def _encode_uncached(self, messages: tuple[tuple[str, str], ...]) -> tuple[int, ...]:
        chat = [{"role": role, "content": content} for role, content in messages]
        ids = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):
            ids = ids["input_ids"]
        return tuple(ids)

    # --- weights --------------------------------------------------------------------------------

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The LoRA weights (PEFT's naming), detached copies on CPU.

        Under DeepSpeed ZeRO-3 each rank holds a partition: the weights are gathered, a collective that every rank
        must enter (:meth:`bump_version` does, after every update, and keeps the result for :meth:`save_adapter`).
        """
        from peft import get_peft_model_state_dict

        with gathered_lora(self.model):
            state = get_peft_model_state_dict(self.model, adapter_name="default")
            return {k: v.detach().cpu().clone() for k, v in state.items()}

    def adapter_hash(self, state: dict[str, torch.Tensor] | None = None) -> str:
        """Content hash of base identity + LoRA weights (``state``, default: :meth:`adapter_state`)."""
        h = hashlib.sha256(self.base_fingerprint.encode())
        for key, value in sorted((state if state is not None else self.adapter_state()).items()):
            h.update(key.encode())
            h.update(value.float().numpy().tobytes())
        return h.hexdigest()

    def bump_version(self) -> int:
        """Call after the adapter's weights changed: advances the version and the model string."""
        with self.lock:
            self.version += 1
            self._adapter_changed()
            return self.version

    def _adapter_changed(self) -> None:
        state = self.adapter_state()
        # partitioned weights (ZeRO-3): keep the gathered copy, so that one rank can save it alone
        self._adapter_snapshot = state if zero3_lora_params(self.model) else None
        self._adapter_hash = self.adapter_hash(state)
        self._sync_engine()

    def _sync_engine(self) -> None:
        """Tell an out-of-process engine (vLLM) that the adapter changed, so that it serves the new version."""
        sync = getattr(self.engine, "sync", None)
        if sync is not None:
            sync()

    def save_adapter(self, out_dir: str | os.PathLike) -> Path:
        """Write a standard PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
        out = Path(out_dir)
        with self.lock:
            snapshot = getattr(self, "_adapter_snapshot", None) if zero3_lora_params(self.model) else None
            # partitioned weights: PEFT would write empty shards; write the copy gathered at the last update
            full = None if snapshot is None else {_peft_param_name(k): v for k, v in snapshot.items()}
            self.model.save_pretrained(out, safe_serialization=True, selected_adapters=["default"], state_dict=full)
        meta = {"base_model": str(self.base_path), "base_fingerprint": self.base_fingerprint,
                "version": self.version, "model_string": self.model_string, "lora": asdict(self.lora)}
        tmp = out / "cotune_adapter.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, out / "cotune_adapter.json")
        return out

    def load_adapter(self, adapter_dir: str | os.PathLike, version: int | None = None) -> int:
        """Load LoRA weights saved by :meth:`save_adapter` (same shape) into the live model.

        The version advances by one, or is set to ``version`` (when restoring a checkpoint).
        """
        from safetensors.torch import load_file

        path = Path(adapter_dir) / "adapter_model.safetensors"
        if not path.exists():
            raise ModelNotFoundError(f"no adapter_model.safetensors in {str(adapter_dir)!r}")
        return self.load_adapter_state(load_file(path), version=version, source=str(adapter_dir))

    def load_adapter_state(self, state: dict[str, torch.Tensor], version: int | None = None,
                           source: str = "state") -> int:
        """Load LoRA weights in PEFT's naming (:meth:`adapter_state`, a saved ``adapter_model.safetensors``).

        The version advances by one, or is set to ``version``. This is how a rank receives another rank's adapter
        without a shared filesystem.
        """
        from peft import set_peft_model_state_dict

        with self.lock:
            with gathered_lora(self.model, modifier_rank=0):  # ZeRO-3: a collective; rank 0's values are kept
                result = set_peft_model_state_dict(self.model, state)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"adapter {source!r} does not match this model: {result.unexpected_keys[:3]}")
            if version is None:
                return self.bump_version()
            self.version = version
            self._adapter_changed()
            return self.version


def zero3_lora_params(model) -> list[torch.nn.Parameter]:
    """The LoRA parameters DeepSpeed ZeRO-3 partitioned across ranks (empty when it did not)."""
    return [p for n, p in model.named_parameters() if "lora_" in n and hasattr(p, "ds_id")]


def gathered_lora(model, modifier_rank: int | None = None):
    """Full LoRA weights inside the block under ZeRO-3 (a collective; ``modifier_rank``'s changes are kept)."""
    params = zero3_lora_params(model)
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def _peft_param_name(key: str) -> str:
    """PEFT's saved key (``...lora_A.weight``) as the model's parameter name (``...lora_A.default.weight``)."""
    return key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")


def _eos_ids(model, tokenizer) -> list[int]:
    ids = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, gen_eos):
        for v in value if isinstance(value, list) else [value]:
            if v is not None and v not in ids:
                ids.append(int(v))
    if not ids:
        raise ModelNotFoundError("the model defines no EOS token; set tokenizer.eos_token")
    return ids


def _settings_from_peft(model) -> LoraSettings:
    cfg = model.peft_config["default"]
    targets = cfg.target_modules
    targets = targets if isinstance(targets, str) else tuple(sorted(targets))
    return LoraSettings(r=cfg.r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=targets)
