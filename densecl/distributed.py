"""Where a run executes: the device, and torch.distributed set up from the environment (torchrun and submitit
alike), with the gathers and the shuffle-BN permutation the model needs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA when this machine has it, else the CPU; CUDA asked for on a machine without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} but CUDA is not available on this machine")
    return device


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_variables() -> DistEnv:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (the pipeline exports them under submitit)."""
    try:
        return DistEnv(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )
    except ValueError as err:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {err}") from err


def init_distributed(device: torch.device) -> tuple[DistEnv, bool]:
    """Join the process group the environment describes. Returns (env, whether this call created it)."""
    if is_distributed():
        return current_env(), False
    env = env_from_variables()
    if env.world_size <= 1:
        return env, False
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={env.world_size} but {key} is not set: launch with torchrun or submitit")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)
    return env, True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def current_env() -> DistEnv:
    if not is_distributed():
        return DistEnv(0, 1, 0)
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-sized tensors from every rank along dim 0 (no gradient: used for keys only)."""
    if not is_distributed():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def shuffle_batch(x: torch.Tensor, local: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shuffle-BN: redistribute the key batch across ranks with a permutation drawn on rank 0, so that BN
    statistics of the key encoder do not come from the same images as the query's (MoCo). In a single
    process, `local=True` permutes the batch itself (for split BN, densecl.method.split_bn); otherwise a no-op."""
    if not is_distributed():
        if not local:
            return x, None
        perm = torch.randperm(x.shape[0], device=x.device)
        return x[perm], torch.argsort(perm)
    world, rank = dist.get_world_size(), dist.get_rank()
    x_all = concat_all_gather(x)
    perm = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast(perm, src=0)
    unshuffle = torch.argsort(perm)
    return x_all[perm.view(world, -1)[rank]], unshuffle


@torch.no_grad()
def unshuffle_batch(x: torch.Tensor, unshuffle: torch.Tensor | None) -> torch.Tensor:
    if unshuffle is None:
        return x
    if not is_distributed():
        return x[unshuffle]
    world, rank = dist.get_world_size(), dist.get_rank()
    return concat_all_gather(x)[unshuffle.view(world, -1)[rank]]
