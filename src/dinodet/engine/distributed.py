"""Process-group setup and the few collectives training and evaluation need.

One entry point serves every launch mode: a plain ``dinodet train`` is a world of one; under
``torchrun`` (single or multi node, rendezvous handled by torchrun) or a SLURM job (submitit
exports the same variables) the process group is initialised from the standard environment
variables RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.  Every helper here is a no-op
(or the identity) for a world of one, so callers never branch on distributed-ness.
"""
from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files, logs and progress bars."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info_from_env() -> DistInfo:
    """Read RANK / WORLD_SIZE / LOCAL_RANK as set by torchrun (or submitit); defaults: one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def init_distributed(device: str | torch.device = "cpu") -> tuple[DistInfo, torch.device]:
    """Join the process group described by the environment (if any) and pick this rank's device.

    NCCL for CUDA, gloo for CPU.  Under several processes a CUDA device becomes ``cuda:LOCAL_RANK``
    (one GPU per process, the torchrun convention).
    """
    info = dist_info_from_env()
    dev = torch.device(device)
    if dev.type == "cuda" and info.enabled:
        dev = torch.device("cuda", info.local_rank)
    elif dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # DDP and set_device want an index
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=info.world_size, **kwargs)
    return info, dev


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` for a world of one."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Element-wise sum over ranks (a copy; ``values`` is left unchanged)."""
    out = values.clone()
    if info.enabled:
        dist.all_reduce(out)
    return out


def all_gather_tensor(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """[world, *values.shape]: every rank's ``values`` (same shape on all ranks)."""
    if not info.enabled:
        return values.unsqueeze(0).clone()
    out = [torch.empty_like(values) for _ in range(info.world_size)]
    dist.all_gather(out, values.contiguous())
    return torch.stack(out)


# --------------------------------------------------------------------------------------- RNG state


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """All global RNG states as plain data a weights-only checkpoint can hold (no numpy arrays)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``get_rng_state``."""
    py = state["python"]
    # a weights-only load gives lists where pickling had tuples; random.setstate needs tuples
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block (e.g. evaluation) without it affecting any global RNG stream, so a run that
    evaluates and a run resumed from a checkpoint taken before that evaluation stay identical."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
