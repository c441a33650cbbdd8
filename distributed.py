"""Data parallelism through PyTorch's own engine, launched with torchrun; a no-op in a single process.

    torchrun --nproc_per_node K train.py ...      # DDP (or --fsdp); gloo on CPU, NCCL on GPUs
    torchrun --nproc_per_node K evaluate.py ...   # questions sharded over ranks, gathered on rank 0

`Dist` holds rank and world size and the three collectives the scripts need. Without torchrun's
environment it is rank 0 of 1 and every collective returns its input, so the single-process path
reads as if this file did not exist.
"""

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as td
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

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
        return cls.join(device)

    @classmethod
    def join(cls, device):
        """Under torchrun: this process's rank of the group its environment describes -> (Dist, device)."""
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


def rank_share(batch, dist, contiguous):
    """This rank's examples of a global micro-batch: every world-th one, or with shared-prefix rows a contiguous
    slice (question-grouped batches: a question's branches then stay on one rank, sharing its prefix)."""
    if not contiguous:
        return batch[dist.rank::dist.world]
    size, extra = divmod(len(batch), dist.world)
    start = dist.rank * size + min(dist.rank, extra)
    return batch[start:start + size + (dist.rank < extra)]


# -----------------------------------------------------------------------------
# Training under torchrun (train.py)


def data_parallel(model, fsdp, dist, device):
    """Under torchrun: DDP replicates the model, FSDP2 (--fsdp) shards it per layer."""
    if fsdp:
        mesh = init_device_mesh(device.type, (dist.world,))  # named: FSDP's default mesh is CUDA's wherever CUDA is
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    devices = [dist.local_rank] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=devices)


@contextmanager
def no_sync(model):
    """Under torchrun: no gradient all-reduce in the block (a step's micro-batches but the last; DDP and FSDP2)."""
    if hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    else:  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


def full_states(model, optimizer=None):
    """Model and optimizer state (None: the model's only) as whole tensors keyed by parameter name, whatever the
    wrapping (plain, DDP or FSDP; a collective under torchrun): a checkpoint resumes on any number of ranks."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=options))


def set_optimizer_state(model, optimizer, state):
    """full_states' optimizer state (whole tensors by parameter name) back into `optimizer`, whatever the wrapping."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
