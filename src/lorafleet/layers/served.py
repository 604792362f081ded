"""What one adapted linear holds for each trained method in the batch (LoRA, DoRA, Bone, Bat).

Every method is served per row, in the same batch as LoRA rows, exactly as PEFT computes it in
eval mode (dropout off), with W the base weight [d_out, d_in] and b its bias:

- LoRA / rsLoRA / BiLoRA (saved as LoRA): y = W x + b + s B A x, s = alpha / r (or / sqrt r).
- DoRA (PEFT's DoraLinearLayer): y = r_vec * (W x + s B A x) + b with the per-output-row ratio
  r_vec = m / ||W + s B A||_row: [d_out] (m = lora_magnitude_vector; PEFT detaches the norm,
  which changes no value). r_vec depends only on the adapter and W, so it is computed once at
  load; the row's LoRA term goes through the shared A / B slots as for LoRA and the ratio is
  applied to that row's output afterwards: memory d_out per layer.
- Bone (PEFT MiSS, default init): y = W x + b + (sum_j x_(j)) @ block, x_(j) the r-sized chunks
  of x (zero-padded at the end). That is LoRA with B = block^T and A = [I_r ... I_r] (A[k, j] =
  1 where j % r == k), scale 1: it takes a LoRA slot of rank r.
- Bat (PEFT MiSS, init "bat"): W' = W + dW with dW's block (i, j) = W_ij b_i + b_i (b: [d_out/r,
  r, r]); dW depends on W, so it is precomputed dense at load and y += x dW^T for the row. Cost:
  d_out x d_in per adapted linear per resident Bat adapter (a full copy of the adapted weights),
  and one dense matmul per distinct Bat adapter in the batch per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SlotEntry:
    """One adapter's weights for one layer: the LoRA part (A, B, scale; None for Bat) and
    DoRA's ratio or Bat's dense delta when the method has one."""

    A: Tensor | None  # [r, d_in]
    B: Tensor | None  # [d_out, r]
    scale: float = 1.0
    ratio: Tensor | None = None  # DoRA: m / ||W + s B A||_row, [d_out]
    dense: Tensor | None = None  # Bat: W' - W, [d_out, d_in]


@torch.no_grad()
def dora_ratio(W: Tensor, A: Tensor, B: Tensor, scale: float, magnitude: Tensor) -> Tensor:
    """m / ||W + s B A|| over each output row (PEFT's get_weight_norm, dim=1): [d_out]."""
    lora_weight = (B @ A).to(W.dtype)  # [d_out, d_in]
    norm = torch.linalg.norm(W + scale * lora_weight, dim=1).to(W.dtype)
    return magnitude.to(W.dtype) / norm


def bone_A(r: int, d_in: int, like: Tensor) -> Tensor:
    """Bone's fixed A = [I_r ... I_r] (last block cut at d_in): A[k, j] = 1 where j % r == k."""
    cols = torch.arange(d_in, device=like.device) % r  # [d_in]
    return (cols[None, :] == torch.arange(r, device=like.device)[:, None]).to(like.dtype)


@torch.no_grad()
def bat_delta(W: Tensor, block: Tensor) -> Tensor:
    """Bat's dW: block (i, j) = W_ij b_i + b_i, as PEFT's MissLinear.get_delta_weight."""
    b = block.to(W.dtype)
    r = b.size(-1)
    Wb = W.reshape(W.size(0) // r, r, W.size(1) // r, r).permute(2, 0, 1, 3)  # [in/r, out/r, r, r]
    return (Wb @ b + b).permute(1, 2, 0, 3).reshape(W.shape)  # [d_out, d_in]
