"""The KFAC Laplace posterior of one LoRA weight block: covariance products, log-det, samples.

A block is lora_A (r x d_in) or lora_B (d_out x r) of one module, written "oriented" as an
r x d matrix X (lora_A's weight as is, lora_B's transposed) so that the small r x r factor S
always acts on the rows and the possibly large d x d factor F on the columns. With n training
examples and prior precision lam, the posterior precision is (1/n) S (x) F + lam I, i.e. in the
eigenbasis V of S, row j of V^T X has precision

    P_j = lam I + (sigma_j / n) F,   F = U diag(s) U^T + diag(d)  (low-rank + diagonal).

Dense F (d = 0, U square) gives a diagonal precision in the rotated basis; otherwise P_j is a
diagonal plus rank k and is inverted with the Woodbury identity, in O(r d k) memory.

`data_fit(X)` is x^T lam H (H + lam I)^-1 x with H = P - lam I the block's curvature: the
quadratic term of the marginal likelihood of the likelihood's quadratic approximation (see
prior.py), computed as a sum of non-negative terms so it stays exact where H << lam.
"""

from __future__ import annotations

import math

import torch

from lorafleet.bayes.factors import Factor


class BlockPosterior:
    """Posterior of one oriented r x d block for a given prior precision."""

    def __init__(self, small: Factor, big: Factor, prior_precision: float, n: int):
        if prior_precision <= 0 or not math.isfinite(prior_precision):
            raise ValueError(f"prior precision must be positive and finite, got {prior_precision}")
        self.V = small.U  # [r, r] eigenvectors of the small factor
        sigma = small.s / n  # [r]
        self.dense = big.is_dense
        self.U = big.U  # [d, k]
        lam = self.lam = float(prior_precision)
        if self.dense:
            # Rotated into both eigenbases the precision is diagonal: lam + sigma_j s_i / n.
            self.h = sigma[:, None] * big.s[None, :]  # [r, d] the curvature's eigenvalues
            self.prec = lam + self.h  # [r, d]
            return
        self.hd = sigma[:, None] * big.d[None, :]  # [r, d] the curvature's diagonal part
        self.M = lam + self.hd  # [r, d] diagonal part of each P_j
        # P_j = diag(M_j) + W_j W_j^T with W_j = U diag(sqrt(sigma_j s)).
        self.W = self.U[None] * (sigma[:, None] * big.s[None, :]).sqrt()[:, None, :]  # [r, d, k]
        k = self.U.shape[1]
        # Capacitance K_j = I + W_j^T M_j^-1 W_j (>= I, so its Cholesky never fails).
        K = torch.eye(k) + torch.einsum("rdk,rd,rdl->rkl", self.W, 1.0 / self.M, self.W)
        self.L = torch.linalg.cholesky(K)  # [r, k, k]

    def rotate(self, X: torch.Tensor) -> torch.Tensor:
        """[..., r, d] -> the same in the small factor's (and, when dense, big's) eigenbasis."""
        X = torch.einsum("rj,...rd->...jd", self.V, X)
        return X @ self.U if self.dense else X

    def features(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(phi, psi) with x^T Sigma y = phi_x . phi_y - psi_x . psi_y for oriented X [..., r, d];
        phi [..., r*d], psi [..., r*k] (None for dense blocks)."""
        Xr = self.rotate(X)
        if self.dense:
            return (Xr / self.prec.sqrt()).flatten(-2), None
        phi = (Xr / self.M.sqrt()).flatten(-2)  # [..., r*d]
        t = torch.einsum("...rd,rdk->...rk", Xr / self.M, self.W)  # [..., r, k]
        # L^-1 t per row j: psi_x . psi_y = t_x^T K^-1 t_y.
        psi = torch.linalg.solve_triangular(self.L, t.unsqueeze(-1), upper=False).squeeze(-1)
        return phi, psi.flatten(-2)

    def data_fit(self, X: torch.Tensor) -> float:
        """x^T lam H (H + lam I)^-1 x for the oriented block X [r, d] (H = P - lam I).

        Dense: sum over the rotated coordinates of x^2 lam h / (lam + h). Low-rank + diagonal:
        with P = M + W W^T, M = lam + h_d, the same equals x^T lam diag(h_d / M) x +
        lam^2 ||L^-1 W^T M^-1 x||^2 (Woodbury), both terms >= 0."""
        lam = self.lam
        Xr = self.rotate(X.float())  # [r, d]
        if self.dense:
            h = self.h.double()
            return float((Xr.double().pow(2) * (lam * h / (lam + h))).sum())
        diag = (Xr.double().pow(2) * (lam * self.hd.double() / self.M.double())).sum()
        t = torch.einsum("rd,rdk->rk", Xr / self.M, self.W)  # [r, k] W_j^T M_j^-1 x_j
        psi = torch.linalg.solve_triangular(self.L, t.unsqueeze(-1), upper=False)  # [r, k, 1]
        return float(diag + lam**2 * psi.double().pow(2).sum())

    def trace_cov(self) -> float:
        """tr(P^-1), the trace of the block's posterior covariance: d logdet(P) / d lam.

        Low-rank + diagonal (Woodbury): sum 1/M - ||L^-1 W^T M^-1||_F^2 per row j."""
        if self.dense:
            return float((1.0 / self.prec.double()).sum())
        Z = (self.W / self.M.unsqueeze(-1)).transpose(1, 2).double()  # [r, k, d]: W^T M^-1
        S = torch.linalg.solve_triangular(self.L.double(), Z, upper=False)  # [r, k, d]
        return float((1.0 / self.M.double()).sum() - S.pow(2).sum())

    def logdet(self) -> float:
        """log det of the block's posterior precision."""
        if self.dense:
            return float(self.prec.double().log().sum())
        chol_diag = self.L.diagonal(dim1=-2, dim2=-1).double()
        return float(self.M.double().log().sum() + 2 * chol_diag.log().sum())

    def sample(self, generator: torch.Generator | None = None, n: int | None = None):
        """Draws of the oriented weight deviation from N(0, Sigma): [r, d], or [n, r, d]."""
        shape = (1 if n is None else n, *self.V.shape[:1])
        if self.dense:
            eps = torch.randn(*shape, self.prec.shape[1], generator=generator)
            Z = eps / self.prec.sqrt()  # rotated basis
            out = self.V @ Z @ self.U.T
            return out[0] if n is None else out
        d, k = self.U.shape
        # u ~ N(0, P_j), then P_j^-1 u ~ N(0, P_j^-1).
        e1 = torch.randn(*shape, d, generator=generator)
        e2 = torch.randn(*shape, k, generator=generator)
        u = self.M.sqrt() * e1 + torch.einsum("rdk,srk->srd", self.W, e2)
        w = u / self.M  # [s, r, d]
        t = torch.einsum("srd,rdk->srk", w, self.W).unsqueeze(-1)
        t = torch.cholesky_solve(t, self.L).squeeze(-1)  # K^-1 W^T M^-1 u
        out = self.V @ (w - torch.einsum("rdk,srk->srd", self.W, t) / self.M)
        return out[0] if n is None else out


def orient(name: str, weight: torch.Tensor) -> torch.Tensor:
    """lora_A's weight [r, d_in] as is; lora_B's [d_out, r] transposed to [r, d_out]."""
    return weight if name == "A" else weight.transpose(-1, -2)


def log_evidence(
    log_lik: float,
    theta_sq: float,
    logdet: float,
    n_params: int,
    prior_precision: float,
    data_fit: float | None = None,
) -> float:
    """Laplace log marginal likelihood up to a constant in lam:
    log p(D|theta) - 1/2 [lam ||theta||^2 + logdet(H + lam I) - P log lam] (the "mode" form);
    with `data_fit` (x^T lam H (H + lam I)^-1 x) in place of lam ||theta||^2 (the "quadratic"
    form, see prior.py)."""
    lam = prior_precision
    fit = lam * theta_sq if data_fit is None else data_fit
    return log_lik - 0.5 * (fit + logdet - n_params * math.log(lam))
