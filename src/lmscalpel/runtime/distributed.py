"""Several processes on one job: the few ``torch.distributed`` steps statistics and evaluation use.

A job started by ``torchrun --nproc-per-node N -m lmscalpel ...`` (or any launcher that sets the
same environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) runs
N copies of the program. :func:`join` makes this process part of the launch's process group, once
(gloo for a model on the CPU, NCCL for one on CUDA; ``backend=`` or ``$LMSCALPEL_DIST_BACKEND``
chooses another); before that, and in a process nobody launched, every accessor answers as for a
lone process: rank 0 of 1, nothing to reduce, nothing to wait for.

What the library does with it:

* key statistics (:mod:`lmscalpel.mechanics.stats`): every rank streams a disjoint shard of the
  corpus rows, the sums and counts are added up (:func:`all_reduce_sum`), rank 0 writes the cache;
* evaluation (:mod:`lmscalpel.evaluation.runner`): the cases are sharded (:func:`shard`), each
  rank measures its own, and rank 0 gathers the records (:func:`gather_to_rank_zero`) and writes
  the one run folder.

Code that runs between two collective steps may raise on one rank only; :func:`together` (run a
step, then raise on every rank if it failed anywhere) and :func:`on_rank_zero` (run a step on
rank 0, hand its result or its error to all) keep the others from waiting forever. Inside
:func:`independently` the ranks do separate work (the sharded evaluation's edits), and the
library's collective steps are switched off (:func:`lockstep` is false), so that a method that
asks for statistics mid-edit reads them from the cache instead of waiting for the other ranks.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from lmscalpel.core.config import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKEND_VARIABLE = "LMSCALPEL_DIST_BACKEND"
"""The environment variable that overrides the backend :func:`join` picks (gloo, nccl...)."""

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT")


class DistributedError(ConfigError):
    """A launch that cannot work as described (inconsistent environment, unknown backend), or a
    step that failed on another rank; the message says which."""


@dataclass(frozen=True)
class Launch:
    """This process's place in a launch: ``rank`` of ``world_size`` processes, ``local_rank`` on
    its machine (the GPU it takes)."""

    rank: int
    world_size: int
    local_rank: int


def launch_from_env(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The launch this process belongs to, read from ``environ`` (default ``os.environ``) as
    torchrun sets it; ``None`` when nothing launched it (none of ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK`` set). A partial or contradictory environment is a :class:`DistributedError`."""
    environ = os.environ if environ is None else environ
    given = {name: environ.get(name) for name in LAUNCH_VARIABLES}
    if all(value is None for value in given.values()):
        return None
    if given["LOCAL_RANK"] is None:  # a launcher for one machine may leave it out
        given["LOCAL_RANK"] = given["RANK"]
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise DistributedError(
            f"a distributed launch sets {', '.join(LAUNCH_VARIABLES)}; this environment lacks "
            f"{', '.join(missing)} (start the processes with torchrun)"
        )
    try:
        rank, world, local = (int(given[name]) for name in LAUNCH_VARIABLES)  # type: ignore[arg-type]
    except ValueError:
        raise DistributedError(
            "RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
            + ", ".join(f"{name}={given[name]!r}" for name in LAUNCH_VARIABLES)
        ) from None
    if world < 1 or not 0 <= rank < world or not 0 <= local <= rank:
        raise DistributedError(
            f"inconsistent launch: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} (need "
            "0 <= LOCAL_RANK <= RANK < WORLD_SIZE)"
        )
    if world > 1:
        absent = [name for name in RENDEZVOUS_VARIABLES if not environ.get(name)]
        if absent:
            raise DistributedError(
                f"a launch of {world} processes needs {', '.join(absent)} to meet (torchrun "
                "sets them)"
            )
    return Launch(rank, world, local)


def _backend_for(device: torch.device | str | None, backend: str | None) -> str:
    chosen = backend or os.environ.get(BACKEND_VARIABLE) or None
    if chosen is None:
        on_cuda = device is not None and torch.device(device).type == "cuda"
        return "nccl" if on_cuda else "gloo"
    chosen = chosen.lower()
    if chosen not in ("gloo", "nccl", "mpi", "ucc", "xccl"):
        raise DistributedError(f"unknown torch.distributed backend {chosen!r}: use gloo or nccl")
    if chosen == "nccl" and not torch.cuda.is_available():
        raise DistributedError("the nccl backend needs CUDA GPUs; use gloo on CPUs")
    return chosen


def join(
    device: torch.device | str | None = None,
    *,
    backend: str | None = None,
    timeout: timedelta | None = None,
) -> int:
    """Join the process group of the launch this process belongs to, once; returns the number of
    processes working together (1 when nothing launched this one, or the launch has one process).

    ``device``: where the model lives, which picks the backend (CUDA: nccl, else gloo) unless
    ``backend`` or ``$LMSCALPEL_DIST_BACKEND`` names one. A group initialised by the caller
    (``torch.distributed.init_process_group``) is used as it is. Every process of a launch must
    call the library's collective functions (statistics, evaluation) in the same order.
    """
    if is_initialised():
        return world_size()
    launch = launch_from_env()
    if launch is None or launch.world_size == 1:
        return 1
    chosen = _backend_for(device, backend)
    if chosen == "nccl":
        torch.cuda.set_device(launch.local_rank)
    options: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
    dist.init_process_group(chosen, rank=launch.rank, world_size=launch.world_size, **options)
    atexit.register(_leave)
    log.info("rank %d of %d joined (%s backend)", launch.rank, launch.world_size, chosen)
    return launch.world_size


def _leave() -> None:
    if is_initialised():
        dist.destroy_process_group()


def is_initialised() -> bool:
    """Whether this process is part of a process group."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The number of processes working together: the process group's size, 1 without one."""
    return dist.get_world_size() if is_initialised() else 1


def rank() -> int:
    """This process's rank in the process group (0 without one)."""
    return dist.get_rank() if is_initialised() else 0


def is_rank_zero() -> bool:
    """Whether this process is the one that reports: rank 0 of the group, or (before the group is
    joined) of the launch; a process nobody launched is."""
    if is_initialised():
        return dist.get_rank() == 0
    launch = launch_from_env()
    return launch is None or launch.rank == 0


def rank_device(requested: str | torch.device | None = "auto") -> str | torch.device | None:
    """The device this process should put its model on: under a launch of several processes,
    ``"auto"`` or ``"cuda"`` become ``cuda:LOCAL_RANK`` (one GPU per process) when CUDA is
    present; anything else (the CPU, an explicit ``cuda:N``) is kept."""
    launch = launch_from_env()
    if launch is None or launch.world_size == 1 or not torch.cuda.is_available():
        return requested
    if requested in (None, "auto", "cuda") or (
        isinstance(requested, torch.device) and requested.type == "cuda" and requested.index is None
    ):
        return f"cuda:{launch.local_rank}"
    return requested


def shard_of(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank ``rank``'s share of ``items`` among ``world`` processes: every ``world``-th item from
    position ``rank`` (disjoint shares that together hold every item, sizes within one)."""
    if not 0 <= rank < world:
        raise DistributedError(f"rank {rank} is not one of {world} processes")
    return list(items[rank::world])


def shard(items: Sequence[T]) -> list[T]:
    """This process's share of ``items`` (:func:`shard_of`; all of them without a group)."""
    return shard_of(items, rank(), world_size())


# ---- collective steps (each a no-op, or the identity, for a lone process) -------------------
_independent = 0


def lockstep() -> bool:
    """Whether the library's collective steps are on: several processes, not inside
    :func:`independently`."""
    return world_size() > 1 and _independent == 0


@contextmanager
def independently() -> Iterator[None]:
    """A section in which the ranks do separate work and call no collective step (the library's
    functions then act for this process alone: :func:`lockstep` is false)."""
    global _independent
    _independent += 1
    try:
        yield
    finally:
        _independent -= 1


def _communication_device(tensor: torch.Tensor) -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` replaced, in place, by its sum over all processes (and returned). A CPU tensor
    under NCCL travels through this process's GPU and back."""
    if world_size() == 1:
        return tensor
    where = _communication_device(tensor)
    if where == tensor.device:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
    moved = tensor.to(where)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    tensor.copy_(moved.to(tensor.device))
    return tensor


def gather_to_rank_zero(value: Any) -> list[Any] | None:
    """Every process's picklable ``value``: the list by rank on rank 0, ``None`` elsewhere."""
    if world_size() == 1:
        return [value]
    gathered: list[Any] | None = [None] * world_size() if rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def all_gather(value: Any) -> list[Any]:
    """Every process's picklable ``value``, by rank, on every process."""
    if world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_from_rank_zero(value: Any) -> Any:
    """Rank 0's picklable ``value`` on every process (the argument elsewhere is ignored)."""
    if world_size() == 1:
        return value
    holder = [value if rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    """Wait until every process got here."""
    if world_size() > 1:
        dist.barrier()


def _portable(error: BaseException) -> BaseException:
    """``error`` itself when it survives pickling (so other ranks raise the same type), else a
    :class:`DistributedError` with its message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return DistributedError(f"{type(error).__name__}: {error}")


def raise_if_failed_anywhere(error: BaseException | None) -> None:
    """Collective: raise on every process when ``error`` is not ``None`` on any — the process's
    own error where it had one, else the lowest failing rank's (a copy, or a
    :class:`DistributedError` when it cannot travel)."""
    if world_size() == 1:
        if error is not None:
            raise error
        return
    errors = all_gather(None if error is None else _portable(error))
    if error is not None:
        raise error
    for number, other in enumerate(errors):
        if other is not None:
            log.error("rank %d failed: %s: %s", number, type(other).__name__, other)
            raise other


def together(step: Callable[[], T]) -> T:
    """``step()`` on this process, then raise on every process if it failed on any (see
    :func:`raise_if_failed_anywhere`); its result otherwise (each process its own)."""
    try:
        result = step()
    except Exception as error:
        raise_if_failed_anywhere(error)
        raise  # (not reached: the call above raises)
    raise_if_failed_anywhere(None)
    return result


def on_rank_zero(step: Callable[[], T]) -> T:
    """``step()`` on rank 0 only; its picklable result on every process, or its error raised on
    every process."""
    if world_size() == 1:
        return step()
    outcome: tuple[bool, Any] = (True, None)
    failure: BaseException | None = None
    if rank() == 0:
        try:
            outcome = (True, step())
        except Exception as error:
            failure, outcome = error, (False, _portable(error))
    succeeded, payload = broadcast_from_rank_zero(outcome)
    if failure is not None:
        raise failure
    if not succeeded:
        raise payload
    return payload
