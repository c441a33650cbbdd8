"""Data parallelism through PyTorch's own engine, launched with torchrun; a no-op in a single process.

    torchrun --nproc_per_node K train.py ...      # DDP (or --fsdp); gloo on CPU, NCCL on GPUs
    torchrun --nproc_per_node K evaluate.py ...   # questions sharded over ranks, gathered on rank 0

`Dist` holds rank and world size and the three collectives the scripts need. Without torchrun's
environment it is rank 0 of 1 and every collective returns its input, so the single-process path
reads as if this file did not exist.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as td

from fileio import InputError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self):
        return self.rank == 0

    @classmethod
    def init(cls, device=None):
        """Join the process group torchrun describes (if any). Returns (Dist, device)."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if "RANK" not in os.environ:
            return cls(), torch.device(device)
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        cuda = device.startswith("cuda")
        if cuda:
            gpus = torch.cuda.device_count()
            if local >= gpus:  # else a bare "CUDA error: invalid device ordinal"
                raise InputError(f"torchrun started local rank {local}, but this machine has {gpus} CUDA device(s): "
                                 "start at most one process per GPU (--nproc_per_node), or pass --device cpu to train "
                                 "on the CPU (gloo)")
            torch.cuda.set_device(local)
        if not td.is_initialized():
            td.init_process_group(backend="nccl" if cuda else "gloo")
        return cls(rank, world, local), torch.device(f"cuda:{local}" if cuda else "cpu")

    def sum(self, x):
        """Sum a Python number over ranks."""
        if self.world == 1:
            return x
        t = torch.tensor([float(x)], dtype=torch.float64)
        if td.get_backend() == "nccl":
            t = t.cuda()
        td.all_reduce(t)
        return type(x)(t.item())

    def gather(self, obj):
        """Every rank's object, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.world > 1:
            td.barrier()

    def close(self):
        """Tear down together: a barrier first, so that no rank destroys its process group (and exits) while
        a peer still has collectives in flight -- gloo then aborts at interpreter exit ("terminate called
        without an active exception")."""
        if self.world > 1 and td.is_initialized():
            td.barrier()
            td.destroy_process_group()
