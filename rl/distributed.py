"""Rank and world helpers for running the weight stage data-parallel under ``accelerate launch`` / torchrun.

Why a module of its own: the weight stage (shard a step's examples, reduce metrics, write checkpoints once),
the GRPO updater (pad ranks to the same micro-batches, count the step's tokens over every rank) and the vLLM
engine (one rank loads each adapter version into a shared server) all need the same four things: "which rank
am I, how many are we", a sum or max of a few numbers, a gather of small Python objects, and a barrier. In the
usual single process every helper here is a no-op that never touches ``torch.distributed``, so the single-process
path computes exactly what it did before this module existed.

The process group is the one accelerate creates (``TrainingArguments`` does it when TRL's trainer is built). A
helper called before that (e.g. the vLLM engine, built with the policy) creates it the same way through
``accelerate.PartialState``: gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of training processes (``WORLD_SIZE`` set by the launcher before the group exists), 1 when alone."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 when alone)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    """True under a multi-process launcher (``accelerate launch`` with ``num_processes > 1``, torchrun)."""
    return world_size() > 1


def is_main_process() -> bool:
    """True on rank 0, the rank that writes checkpoints and logs and loads adapters into a shared server."""
    return rank() == 0


def _ensure_group() -> None:
    """Create the process group as accelerate would, if the launcher asked for several processes and none exists."""
    if not dist.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())
        if not dist.is_initialized():
            raise RuntimeError(f"WORLD_SIZE={world_size()} but accelerate did not create a process group; launch "
                               "with `accelerate launch` or `torchrun` so that RANK, MASTER_ADDR and MASTER_PORT are set")


def _device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank gets here (no-op alone)."""
    if is_distributed():
        _ensure_group()
        dist.barrier()


def all_reduce(values: Sequence[float], op: Literal["sum", "max", "min"] = "sum") -> list[float]:
    """Element-wise sum / max / min of ``values`` over ranks (float64); ``values`` itself when alone.

    Every rank must call this with the same number of values, in the same order.
    """
    if not is_distributed():
        return [float(v) for v in values]
    _ensure_group()
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (a collective decision, e.g. to stop)."""
    return all_reduce([1.0 if flag else 0.0], "max")[0] > 0


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` when alone."""
    if not is_distributed():
        return [obj]
    _ensure_group()
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself when alone)."""
    if not is_distributed():
        return obj
    _ensure_group()
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard(items: Sequence[Any], rank_: int | None = None, world: int | None = None) -> list[Any]:
    """This rank's contiguous share of ``items``: shares differ in size by at most one, in rank order.

    Example:
        >>> [shard(range(5), r, 2) for r in (0, 1)]
        [[0, 1, 2], [3, 4]]
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    base, extra = divmod(len(items), world)
    start = rank_ * base + min(rank_, extra)
    return list(items[start : start + base + (rank_ < extra)])
