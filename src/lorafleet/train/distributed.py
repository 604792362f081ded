"""Data parallelism under torchrun / accelerate launch: gloo on CPU, nccl on GPU.

Only the adapter's gradients travel (one flattened all-reduce per step), which is all a LoRA
run needs; the frozen base is never synchronised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lorafleet.models.device import resolve_device


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls, device: str = "auto") -> Distributed:
        """This process's place in a torchrun / accelerate run (WORLD_SIZE, LOCAL_RANK), on
        `device` (auto | cpu | cuda, models/device.py): cuda is GPU LOCAL_RANK and nccl; cpu
        is gloo; cuda without a GPU is a one-line LorafleetError."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if resolve_device(device).type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device("cpu")
        if world <= 1:
            return cls(device=device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), device=device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """In-place sum across ranks, as one flattened all-reduce."""
        if self.world <= 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])  # [sum of numels]
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
