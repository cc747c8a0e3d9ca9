"""Data-parallel basics for the CLIs and training: which process am I, how many are we, my share
of the work, wait for the others, collect their results.

Launchers (``torchrun``, ``accelerate launch``, SLURM via either) describe the job in environment
variables: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/MASTER_PORT. Without them this is one plain
process (rank 0 of 1) and every helper is a no-op, so the same code runs both ways. The process
group uses NCCL on CUDA and gloo on CPU. Only torch.distributed is used here; training may hand the
group to accelerate (see fpdm/train.py).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, List, Sequence


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0) -> str:
    """"auto": this process's GPU (cuda:LOCAL_RANK) when CUDA is there, else the CPU; anything else as given."""
    if device != "auto":
        return device
    import torch

    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def env_context(device: str = "auto") -> Context:
    """Rank and world size from the launcher's environment (never from what hardware is present);
    ``device`` as ``resolve_device``."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"launcher environment is inconsistent: RANK={rank}, WORLD_SIZE={world}")
    return Context(rank, world, local, resolve_device(device, local))


def warn_lone_launch() -> None:
    """Warn when a launcher meant several processes but gave this one no world: ``accelerate launch
    --cpu --num_processes N`` starts one plain process unless it runs under mpirun (it sets MASTER_ADDR
    for a group but no WORLD_SIZE)."""
    if "WORLD_SIZE" in os.environ or "MASTER_ADDR" not in os.environ or "ACCELERATE_MIXED_PRECISION" not in os.environ:
        return
    print("warning: accelerate launch set MASTER_ADDR but no WORLD_SIZE, so this is ONE process. On CPUs, "
          "`accelerate launch --cpu --num_processes N` needs MPI (--mpirun_hostfile); use `torchrun "
          "--nproc_per_node N -m ...` or `accelerate launch --multi_gpu --num_processes N -m ...` (gloo on CPU)",
          file=sys.stderr, flush=True)


def init(device: str = "auto") -> Context:
    """``env_context`` plus the process group when there is more than one process."""
    ctx = env_context(device)
    warn_lone_launch()
    if ctx.world > 1:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            cuda = ctx.device.startswith("cuda")
            if cuda:
                torch.cuda.set_device(ctx.device)
            dist.init_process_group("nccl" if cuda else "gloo")
    return ctx


def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard(items: Sequence, rank: int, world: int) -> list:
    """This process's share: items rank, rank + world, ... (round robin keeps shares within one
    item of each other and an item's owner independent of how the others are split)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad shard: rank {rank} of {world}")
    return list(items)[rank::world]


def all_reduce_mean(t):
    """The mean of ``t`` over the processes, in place (``t`` itself for one process)."""
    if active():
        import torch.distributed as dist

        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def gather_objects(obj: Any) -> List[Any]:
    """Every process's ``obj``, in rank order, on every process ([obj] for one process)."""
    if not active():
        return [obj]
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def finish() -> None:
    """Leave the process group (after a final barrier) if this module's caller started one."""
    if active():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
