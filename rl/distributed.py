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
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
# How long the other ranks wait for rank 0's single-process work (a prompt stage, an evaluation) before giving up.
MAIN_WAIT_ENV = "COTUNE_MAIN_WAIT_S"
_MAIN_WAIT_DEFAULT_S = 7 * 24 * 3600


class MainProcessError(RuntimeError):
    """Rank 0 failed in work the other ranks were waiting for; the message is rank 0's error."""


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
    """True under a multi-process launcher (``accelerate launch`` with ``num_processes > 1``, torchrun).

    The one answer to "am I data-parallel?" for the whole project (weight stage, self-training, GRPO updater,
    ``optimize()``, the CLI); the GRPO updater refuses to start when accelerate's own count disagrees with it.
    """
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


class _Failed:
    """What rank 0 sends instead of a result when its work raised (the other ranks raise MainProcessError)."""

    def __init__(self, message: str) -> None:
        self.message = message


_control_groups: dict[int, Any] = {}


def _control_group():
    """A gloo group with a long timeout, for the ranks that wait while rank 0 works alone.

    Why not the default group: its collective timeout (10-30 minutes) is sized for training steps, while a prompt
    stage on rank 0 may run for hours; and gloo carries Python objects on the CPU whatever the training backend.
    Created once per process group, by every rank at the same point (the first :func:`on_main` call).
    """
    _ensure_group()
    key = id(dist.group.WORLD)
    if key not in _control_groups:
        seconds = float(os.environ.get(MAIN_WAIT_ENV, _MAIN_WAIT_DEFAULT_S))
        _control_groups[key] = dist.new_group(backend="gloo", timeout=timedelta(seconds=seconds))
    return _control_groups[key]


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` on rank 0 alone and return its (picklable) result on every rank.

    The other ranks wait (up to ``$COTUNE_MAIN_WAIT_S`` seconds, default a week). If ``fn`` raises on rank 0,
    rank 0 re-raises it and every other rank raises :class:`MainProcessError` with its message, so that no rank is
    left waiting in a later collective. Alone, this is just ``fn(*args, **kwargs)``.

    Every rank must call it at the same point. Example (in one process)::

        >>> on_main(sum, [1, 2, 3])
        6
    """
    if not is_distributed():
        return fn(*args, **kwargs)
    group = _control_group()
    if is_main_process():
        try:
            out: Any = fn(*args, **kwargs)
        except BaseException as exc:
            dist.broadcast_object_list([_Failed(f"{type(exc).__name__}: {exc}")], src=0, group=group)
            raise
        dist.broadcast_object_list([out], src=0, group=group)
        return out
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0, group=group)
    if isinstance(box[0], _Failed):
        raise MainProcessError(f"rank 0 failed, so rank {rank()} stops too: {box[0].message}")
    return box[0]


class Ranks:
    """Rank-0 work and collectives behind one object: this class is the single process, where each is a no-op.

    Why: the loops of ``optimize()``, the weight stage and self-training must read straight, not branch on "am I
    data-parallel?" at every collective. They take a :func:`ranks` object and call the same methods either way;
    :class:`TorchRanks` does the collectives over ``torch.distributed``. Alone, every method returns exactly what
    it was given (``gather`` wraps it in a one-item list), so the single-process path computes what it always did.

    Example:
        >>> r = Ranks()
        >>> r.main, r.parallel, r.shard([1, 2, 3]), r.gather("x"), r.any(False), r.on_main(sum, [1, 2])
        (True, False, [1, 2, 3], ['x'], False, 3)
    """

    rank, world, parallel = 0, 1, False

    @property
    def main(self) -> bool:
        """True on rank 0, the rank that writes files, logs and runs the single-process work."""
        return self.rank == 0

    def on_main(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` run on rank 0 alone, its result on every rank (see :func:`on_main`)."""
        return fn(*args, **kwargs)

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's contiguous share of ``items`` (all of them alone)."""
        return list(items)

    def tag(self, tag: tuple) -> tuple:
        """A rollout seed tag made distinct per rank (unchanged alone, so single-process seeds never move)."""
        return tag

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order."""
        return [obj]

    def all_reduce(self, values: Sequence[float], op: Literal["sum", "max", "min"] = "sum") -> list[float]:
        """Element-wise reduction over ranks (float64)."""
        return [float(v) for v in values]

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        return bool(flag)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        return obj

    def barrier(self) -> None:
        """Wait until every rank gets here."""


class TorchRanks(Ranks):
    """The same methods over ``torch.distributed`` (``accelerate launch`` / torchrun with several processes)."""

    parallel = True

    def __init__(self) -> None:
        self.rank, self.world = rank(), world_size()

    def on_main(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return on_main(fn, *args, **kwargs)

    def shard(self, items: Sequence[Any]) -> list[Any]:
        return shard(items, self.rank, self.world)

    def tag(self, tag: tuple) -> tuple:
        return tag + (self.rank,)

    def gather(self, obj: Any) -> list[Any]:
        return gather_objects(obj)

    def all_reduce(self, values: Sequence[float], op: Literal["sum", "max", "min"] = "sum") -> list[float]:
        return all_reduce(values, op)

    def any(self, flag: bool) -> bool:
        return any_rank(flag)

    def broadcast(self, obj: Any) -> Any:
        return broadcast_object(obj)

    def barrier(self) -> None:
        barrier()


def ranks() -> Ranks:
    """The :class:`Ranks` of this process: :class:`TorchRanks` under a multi-process launcher, else the no-op one."""
    return TorchRanks() if is_distributed() else Ranks()
