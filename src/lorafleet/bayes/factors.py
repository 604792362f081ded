"""Kronecker factors as pure tensor math: dense or low-rank + diagonal, accumulated batch by batch.

A factor is a sum of outer products `F = sum_i v_i v_i^T` (d x d). Small factors are summed
densely and eigendecomposed at the end. Large ones (d above a threshold) keep only `M` (d x k),
with `M M^T` the top-k part of F, updated by an incremental SVD (`M <- top-k SVD of [M, V^T]`),
plus the exact diagonal of F; the leftover diagonal `diag(F) - diag(M M^T)` is kept so the
factor is "low-rank + diagonal". Memory is d*k, never d^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Factor:
    """F ~ U diag(s) U^T + diag(d): U (dim x k) orthonormal, s (k) >= 0, d (dim) >= 0.

    A dense factor has k = dim and d = 0 (an exact eigendecomposition)."""

    U: torch.Tensor
    s: torch.Tensor
    d: torch.Tensor

    @property
    def dim(self) -> int:
        return self.U.shape[0]

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    @property
    def is_dense(self) -> bool:
        """An exact eigendecomposition (nothing left over in the diagonal)."""
        return self.rank == self.dim and not bool(self.d.any())

    def matrix(self) -> torch.Tensor:
        """The d x d matrix (for tests and small factors only)."""
        return (self.U * self.s) @ self.U.T + torch.diag(self.d)


def eig_factor(matrix: torch.Tensor) -> Factor:
    """An exact eigendecomposition of a symmetric PSD matrix (negative round-off clipped)."""
    matrix = 0.5 * (matrix + matrix.T)
    s, U = torch.linalg.eigh(matrix.double())
    return Factor(U=U.float(), s=s.clamp_min(0).float(), d=torch.zeros(matrix.shape[0]))


class FactorAccumulator:
    """Sums `v v^T` over the rows v of the batches it is given; dense or low-rank + diagonal."""

    def __init__(self, dim: int, *, rank: int | None = None):
        """`rank` None: dense (dim x dim); else keep a rank-`rank` part plus the diagonal."""
        self.dim = dim
        self.rank = None if rank is None or rank >= dim else int(rank)
        if self.rank is None:
            self.total = torch.zeros(dim, dim, dtype=torch.float64)
        else:
            self.M = torch.zeros(dim, 0, dtype=torch.float64)  # grows to dim x rank
            self.diag = torch.zeros(dim, dtype=torch.float64)

    def add(self, vectors: torch.Tensor) -> None:
        """Add `sum_i v_i v_i^T` for the rows of `vectors` ([n, dim])."""
        v = vectors.detach().reshape(-1, self.dim).double().cpu()  # [n, dim]
        if v.shape[0] == 0:
            return
        if self.rank is None:
            self.total += v.T @ v
            return
        self.diag += (v * v).sum(0)
        # [M, V^T] [M, V^T]^T = M M^T + V^T V: the new sum; keep its top-k left singular part.
        if self.M.shape[1] + v.shape[0] > self.dim:
            # More vectors than dimensions (KFAC-expand adds one per position): the same top-k
            # from the eigendecomposition of the d x d sum, cheaper than the SVD of [M, V^T].
            s, U = torch.linalg.eigh(self.M @ self.M.T + v.T @ v)  # ascending
            k = min(self.rank, self.dim)
            self.M = U[:, -k:].flip(1) * s[-k:].flip(0).clamp_min(0).sqrt()  # [dim, k]
            return
        Z = torch.cat([self.M, v.T], dim=1)  # [dim, k + n]
        U, S, _ = torch.linalg.svd(Z, full_matrices=False)
        k = min(self.rank, S.shape[0])
        self.M = U[:, :k] * S[:k]  # [dim, k]

    def factor(self) -> Factor:
        if self.rank is None:
            return eig_factor(self.total)
        U, S, _ = torch.linalg.svd(self.M, full_matrices=False)
        s = S * S
        # What the low-rank part misses on the diagonal stays, so diag(F) is exact.
        rest = (self.diag - (U * U * s).sum(1)).clamp_min(0)
        return Factor(U=U.float(), s=s.float(), d=rest.float())


def scaled(factor: Factor, c: float) -> Factor:
    """The factor times c >= 0 (same eigenvectors)."""
    return Factor(U=factor.U, s=factor.s * c, d=factor.d * c)


def sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a small PSD matrix (e.g. the logit Hessian diag(p) - p p^T)."""
    s, U = torch.linalg.eigh(matrix)
    return (U * s.clamp_min(0).sqrt().unsqueeze(-2)) @ U.transpose(-1, -2)


def softmax_hessian(probs: torch.Tensor) -> torch.Tensor:
    """diag(p) - p p^T per row: the Hessian of cross-entropy w.r.t. the logits. [B, C, C]."""
    return torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)
