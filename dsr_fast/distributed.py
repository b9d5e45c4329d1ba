"""Data parallelism with FSDP2, set up from torchrun's environment.

`torchrun --nproc-per-node N [--nnodes M --rdzv-endpoint HOST:PORT] -m dsr_fast.train ...` starts
one process per GPU; each process:
  - holds 1/N of the policy (and reference) parameters, gradients and optimizer state
    (`fully_shard` on every decoder layer, then the root: embeddings, final norm and head);
  - computes in bf16 with fp32 master weights, gradients reduced in fp32;
  - rolls out its share of the step's prompts with a full bf16 copy in its colocated engine.
A plain `python -m dsr_fast.train` is world size 1 and uses none of this.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init(device_kind: str) -> World:
    """The process group from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK), or world size 1."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device_kind == "cuda":
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return world


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard(model: torch.nn.Module, compute_dtype: torch.dtype | None) -> None:
    """FSDP2 in place: one all-gather unit per decoder layer and one for the rest (embedding, norm,
    head; a tied head shares the embedding's unit). The logprob kernel runs inside the root's
    forward, so the head weight it reads is unsharded there."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every rank must call it), else t."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def all_gather_objects(world: World, obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; the picklable per-rank results of rollout and grading."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def _comm_device() -> torch.device:
    # NCCL reduces CUDA tensors only, gloo CPU ones
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(world: World, t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of t (a new tensor on t's device)."""
    if not world.distributed:
        return t
    out = t.detach().to(_comm_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def any_rank(world: World, flag: bool) -> bool:
    """True on every rank if it is True on some rank (e.g. SIGTERM reached one of them)."""
    if not world.distributed:
        return flag
    t = torch.tensor([int(flag)], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
