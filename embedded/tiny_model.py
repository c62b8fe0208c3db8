"""Build a tiny causal LM from scratch on this machine: tokenizer, config, short supervised warm-start.

Why: there is no model hub at run time (here or in CI), yet every layer of cotune needs a real
``transformers`` model to run on. The builder is generic: it takes chat conversations whose last
message is the assistant target (``embedded`` feeds it our default task, rendered by DSPy's
ChatAdapter) and writes a standard HF folder (``config.json``, ``model.safetensors``, tokenizer
files with a chat template) that :meth:`rl.Policy.from_pretrained` loads like any other model.

Design choices (measured when the builder was written):
* BPE with one token per digit and ``ByteLevel(use_regex=False)``: the fixed ChatAdapter text collapses
  into a few long tokens (prompt ~160 -> ~40 tokens), which makes every later step several times cheaper.
* Llama config (hidden 128, 4 layers, GQA 4/2): ~1M parameters, trains in minutes on 2 cores. Not Qwen2:
  transformers 5 forces ``Qwen2Tokenizer`` (with Qwen's regex pre-split) on any ``qwen2`` folder, which would
  silently re-tokenize our text differently from training; for ``llama`` it honours the saved tokenizer.
  :func:`build_tiny_model` checks the round trip (``AutoTokenizer`` on the saved folder) before publishing.
* A plain training loop rather than a Trainer: the warm-start must be deterministic from a seed and must
  tokenize prompts with the very chat template the engine uses (``apply_chat_template``), with loss on
  the assistant tokens only. It is a model *build* step, not a user-facing trainer.

Why in ``embedded`` (not ``rl``): only the embedded models (``embedded.tiny``, ``embedded.agent``) are built from
scratch; ``rl`` trains adapters on any model and never needs to build one.

The output folder is addressed by a hash of the recipe, a description of the training data and the library
versions that shape the rendering, so a changed recipe rebuilds and an unchanged one is reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rl.atomic import atomic_dir

BUILDER_VERSION = 3  # bump when this file changes what it builds
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class TinyModelRecipe:
    """Everything that determines the built model (its hash names the cache folder)."""

    vocab_size: int = 640
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_positions: int = 1024
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    seed: int = 0
    prompt_loss_weight: float = 0.0  # > 0: prompt tokens are targets too, at this weight (see build_tiny_model)
    individual_digits: bool = True  # one token per digit (arithmetic); False: digit runs are BPE'd (copying numbers)
    first_steps: int = 0  # steps on the ``first`` conversations alone before the whole corpus (see build_tiny_model)


# Fields added after models were shipped: left out of the key at these defaults, so older recipes keep their key.
_LATER_FIELDS = {"prompt_loss_weight": 0.0, "individual_digits": True, "first_steps": 0}


def cache_root() -> Path:
    """``$COTUNE_CACHE`` or ``~/.cache/cotune``: where built models live."""
    return Path(os.environ.get("COTUNE_CACHE", Path.home() / ".cache" / "cotune"))


def recipe_key(recipe: TinyModelRecipe, extra: dict | None = None) -> str:
    """A short hash of the recipe, the data description (``extra``) and the library versions that shape the result.

    The data is described, not hashed: generating it costs seconds, and a cache hit must be instant. Whoever
    supplies the data puts everything that determines it (generator version, size, seed) in ``extra``.
    """
    import dspy
    import tokenizers
    import transformers

    fields = {k: v for k, v in asdict(recipe).items() if k not in _LATER_FIELDS or v != _LATER_FIELDS[k]}
    h = hashlib.sha256()
    h.update(json.dumps(fields, sort_keys=True).encode())
    h.update(json.dumps(extra or {}, sort_keys=True).encode())
    h.update(f"{BUILDER_VERSION}/{dspy.__version__}/{transformers.__version__}/{tokenizers.__version__}".encode())
    h.update(f"{torch.__version__}".encode())
    return h.hexdigest()[:12]


def train_tokenizer(texts: Sequence[str], vocab_size: int, individual_digits: bool = True):
    """A byte-level BPE trained on the rendered corpus; digits never merge with other characters.

    ``individual_digits``: one token per digit (the last-digit model reasons over digits); ``False`` lets a run of
    digits merge into longer tokens (``1955``), so a model that copies numbers copies fewer, rarer tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=individual_digits), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.padding_side = "left"
    return hf


def _encode(tokenizer, conversation: Sequence[dict]) -> tuple[list[int], list[int]]:
    """(prompt ids as the engine renders them, completion ids ending in EOS)."""
    prompt = tokenizer.apply_chat_template(list(conversation[:-1]), add_generation_prompt=True, tokenize=True)
    if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
        prompt = prompt["input_ids"]
    completion = tokenizer.encode(conversation[-1]["content"], add_special_tokens=False) + [tokenizer.eos_token_id]
    return list(prompt), completion


def _check_tokenizer_round_trip(tokenizer, folder: Path, conversations: Sequence[Sequence[dict]]) -> None:
    """The saved folder, loaded as any user loads it, must tokenize exactly as the model was trained."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    for conv in conversations:
        if _encode(loaded, conv) != _encode(tokenizer, conv):
            raise RuntimeError(
                f"AutoTokenizer loads {type(loaded).__name__} from {folder}, which tokenizes differently from the "
                "tokenizer the model was trained with; the saved model would be unusable"
            )


def _length_bucketed_batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch of batches of similar-length examples (less padding: ~2x faster steps), in random order."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * 16
    batches = []
    for start in range(0, len(order) - batch_size + 1, window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


def build_tiny_model(
    conversations: Sequence[Sequence[dict]],
    out_dir: str | Path,
    recipe: TinyModelRecipe = TinyModelRecipe(),
    progress: Callable[[int, int, float], None] | None = None,
    first: Sequence[Sequence[dict]] = (),
) -> Path:
    """Train tokenizer + model on ``conversations`` and save an HF folder at ``out_dir`` atomically.

    Args:
        conversations: chat message lists; the last message of each is the assistant target.
        out_dir: destination folder; written to a temporary sibling first, then renamed into place.
        recipe: model size and optimisation settings.
        progress: optional ``progress(step, total_steps, loss)`` callback; ``loss`` is the mean over the
            completion tokens (the assistant target) whatever ``recipe.prompt_loss_weight`` is.
        first: a curriculum: the first ``recipe.first_steps`` steps train on these alone, the rest on them and
            ``conversations`` together. Why: a skill the corpus needs but rarely rewards on its own, such as copying
            an unseen name, forms on short drills and then carries over; mixed in from the start it never formed
            (measured on the agent model, :func:`embedded.agent.model_recipe`).

    ``recipe.prompt_loss_weight`` > 0 makes the prompt tokens targets too, at that weight relative to the
    completion. Why: an agent's prompt holds its own earlier steps, which copy names and numbers from the question
    and the observations, so predicting them is more copying signal per step. Measured on the agent model
    (:func:`embedded.agent.model_recipe`): 0.5 helped episodes copy numbers, but on prompts of random text it kept
    copying from forming, so the agent recipe now leaves it at 0.

    Returns:
        The path of the saved model folder.
    """
    from transformers import LlamaForCausalLM

    if not conversations:
        raise ValueError("build_tiny_model needs at least one conversation")
    if recipe.first_steps and not first:
        raise ValueError(f"the recipe trains {recipe.first_steps} steps on the `first` conversations; none was given")
    out_dir = Path(out_dir)
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)

    conversations = [*conversations, *first]
    texts = [f"{m['role']}\n{m['content']}" for conv in conversations for m in conv]  # as the template joins them
    tokenizer = train_tokenizer(texts, recipe.vocab_size, recipe.individual_digits)
    encoded = [_encode(tokenizer, conv) for conv in conversations]
    curriculum = list(range(len(conversations) - len(first), len(conversations)))  # indices of `first`

    model = LlamaForCausalLM(_model_config(recipe, tokenizer))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)

    def lr_at(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        progress_frac = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress_frac))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    lengths = [len(p) + len(c) for p, c in encoded]
    batches: list[list[int]] = []
    for step in range(recipe.steps):
        if step == recipe.first_steps:
            batches = []  # the curriculum is over: whole-corpus epochs from here
        if not batches:
            pool = curriculum if step < recipe.first_steps else range(len(encoded))
            batches = [[pool[i] for i in b] for b in _length_bucketed_batches(
                [lengths[i] for i in pool], recipe.batch_size, generator)]
        input_ids, labels, mask = _pad_batch([encoded[i] for i in batches.pop()], tokenizer.pad_token_id)
        if recipe.prompt_loss_weight:
            loss, objective = _losses(model(input_ids=input_ids, attention_mask=mask).logits, input_ids, labels,
                                      mask, recipe.prompt_loss_weight)
        else:  # transformers' own loss, exactly as the shipped tiny model was built
            objective = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss = objective.detach()
        objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if progress is not None:
            progress(step + 1, recipe.steps, loss.item())

    model.eval()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _check_tokenizer_round_trip(tokenizer, tmp, conversations[:50])
    return out_dir


def _model_config(recipe: TinyModelRecipe, tokenizer):
    """The Llama architecture of ``recipe``, with ``tokenizer``'s vocabulary and special tokens."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        max_position_embeddings=recipe.max_positions,
        tie_word_embeddings=True,
        attention_bias=True,  # as Qwen2: a q/k bias lets RoPE form pure relative-position heads (copying)
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _pad_batch(batch: Sequence[tuple[list[int], list[int]]],
               pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, labels, mask)`` of ``(prompt, completion)`` pairs, right-padded to the longest; only the
    completion tokens are labels (-100 elsewhere)."""
    width = max(len(p) + len(c) for p, c in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (p, c) in enumerate(batch):
        ids = p + c
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(p) : len(ids)] = torch.tensor(c)
        mask[row, : len(ids)] = 1
    return input_ids, labels, mask


def _losses(logits: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
            prompt_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean completion loss, the training objective): completion tokens at weight 1, prompt tokens at
    ``prompt_weight``, padding at 0; the objective is the weighted mean."""
    logits, targets = logits[:, :-1].float(), input_ids[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                                   reduction="none").view_as(targets)
    completion = (labels[:, 1:] != -100).float()
    weight = completion + prompt_weight * (mask[:, 1:].float() - completion)
    completion_loss = (token_loss * completion).sum() / completion.sum()
    objective = (token_loss * weight).sum() / weight.sum()
    return completion_loss.detach(), objective


def build_dir(name: str, recipe: TinyModelRecipe = TinyModelRecipe(), extra_key: dict | None = None) -> Path:
    """Where :func:`build_or_load` keeps the build of this recipe: ``cache_root()/models/<name>-<key>``."""
    return cache_root() / "models" / f"{name}-{recipe_key(recipe, extra_key)}"


def build_or_load(
    name: str,
    conversations_fn: Callable[[], Sequence[Sequence[dict]]],
    recipe: TinyModelRecipe = TinyModelRecipe(),
    extra_key: dict | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    force: bool = False,
    first_fn: Callable[[], Sequence[Sequence[dict]]] | None = None,
) -> Path:
    """Return the cached model folder for this recipe, building it first if needed.

    The folder is ``cache_root()/models/<name>-<hash of recipe and extra_key>``; a ``build_info.json`` records
    the recipe, the build time and the key. ``conversations_fn`` (and ``first_fn``, the curriculum of
    :func:`build_tiny_model`) run only when a build is needed. A file lock keeps two processes from building the
    same model at once.
    """
    out = build_dir(name, recipe, extra_key)
    key = out.name.rsplit("-", 1)[1]
    info_path = out / "build_info.json"
    if info_path.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / f".{name}-{key}.lock"
    with open(lock_path, "w") as lock:
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if info_path.exists() and not force:  # another process built it while we waited
                return out
            start = time.time()
            conversations = conversations_fn()
            first = first_fn() if first_fn is not None else ()
            build_tiny_model(conversations, out, recipe, progress, first)
            info = {"name": name, "key": key, "recipe": asdict(recipe), "extra": extra_key or {},
                    "seconds": round(time.time() - start, 1), "examples": len(conversations) + len(first)}
            tmp = info_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(info, indent=2))
            os.replace(tmp, info_path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out
