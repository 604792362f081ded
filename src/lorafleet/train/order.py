"""Which examples each step trains on: a pure function of (seed, step), so resuming needs no
iterator state and every data-parallel rank agrees on the global batch."""

from __future__ import annotations

import torch


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def global_batch(n: int, batch: int, step: int, seed: int) -> list[int]:
    """Indices of the `batch` examples of optimizer step `step` (0-based): consecutive slices
    of a fresh permutation per epoch, continuing across epoch boundaries."""
    out: list[int] = []
    position = step * batch
    while len(out) < batch:
        epoch, offset = divmod(position, n)
        perm = epoch_permutation(n, seed, epoch)
        take = min(batch - len(out), n - offset)
        out.extend(perm[offset : offset + take].tolist())
        position += take
    return out


def rank_slice(indices: list[int], rank: int, world: int) -> list[int]:
    """This rank's share of a global batch (contiguous blocks; sizes differ by at most one)."""
    per, extra = divmod(len(indices), world)
    start = rank * per + min(rank, extra)
    return indices[start : start + per + (1 if rank < extra else 0)]
