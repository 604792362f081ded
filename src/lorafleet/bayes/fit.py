"""Fit KFAC factors of the restricted-label Fisher over a LoRA adapter's A and B weights.

For one LoRA Linear with weight W (d_out x d_in), the per-example Jacobian of a logit is
sum_t e_t a_t^T (positions t). The weight is shared over the positions; Eschenhagen et al.
(2023) give two Kronecker approximations (config.KFAC_KINDS), both exact for one position:
- reduce: the Jacobian taken as e_bar a_bar^T, with a_bar the mean input over the prompt
  positions and e_bar the summed output gradient (one term per example);
- expand (the official Laplace-LoRA backend's, and the default): every position counted as an
  example of its own, H ~ (1/T) (sum_{n,t} a a^T) (x) (sum_{n,t} e Lambda e^T), T the number of
  prompt positions over all examples (laplace-torch's KronLaplace with curvlinops, whose
  examples all have the same length, divides by N times that length).
The Fisher of the C-way softmax over the restricted
logits f is J^T Lambda J with Lambda = diag(p) - p p^T ("exact" labels: every class weighted by
p), or J^T u u^T J with u = p - onehot(y), y drawn from p ("sampled" labels, as the paper).
Lambda 1 = 0, so the same Fisher is taken over the contrasts g = f_{1:} - f_0 with
Lambda_g = diag(p_{1:}) - p_{1:} p_{1:}^T (u_g = u_{1:}): one backward pass fewer per example.
Summed over n examples the factors are

    Q = sum_n a_bar a_bar^T    (input factor)
    G = sum_n E_n Lambda_n E_n^T   (output-gradient factor, E_n = [e_bar for each contrast])

and the curvature of the block is H ~ (1/n) Q (x) G (vec column-major). Expand sums over the
positions as well and stores Q times n / T, so that the same (1/n) Q (x) G holds.

Which weights (config.SUBSETS): "all" LoRA layers, or "last_layer": the LoRA on lm_head only.
In both, a LoRA on lm_head is cut to the answer tokens' rows of its B (as the official code's
head, which carries only those rows): the factors, norms and posterior cover those rows alone
(config["rows"] names them), the other rows of B stay as trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from lorafleet.adapters.lora_keys import strip_prefix
from lorafleet.bayes.capture import (
    ClassItem,
    answer_rows,
    batches,
    capture,
    head_name,
    lora_weight,
    subset_layers,
)
from lorafleet.bayes.config import LaplaceConfig
from lorafleet.bayes.factors import (
    Factor,
    FactorAccumulator,
    scaled,
    softmax_hessian,
    sqrt_psd,
)
from lorafleet.bayes.posterior import orient
from lorafleet.errors import LorafleetError

T = TypeVar("T")


@dataclass
class ModuleFactors:
    """The four Kronecker factors of one LoRA module (A: r x d_in, B: d_out x r)."""

    A_in: Factor  # d_in x d_in (large)
    A_out: Factor  # r x r
    B_in: Factor  # r x r
    B_out: Factor  # d_out x d_out (large)

    def block(self, part: str) -> tuple[Factor, Factor]:
        """(small r x r factor, large factor) of the oriented block (see posterior.py)."""
        return (self.A_out, self.A_in) if part == "A" else (self.B_in, self.B_out)


@dataclass
class KfacFactors:
    """KFAC factors of a whole adapter plus what the marginal likelihood needs."""

    modules: dict[str, ModuleFactors]
    n: int  # training examples
    log_lik: float  # sum of log p(y | x) over them at the MAP, restricted softmax
    theta_sq: float  # squared norm of all LoRA A and B weights at the MAP
    config: dict = field(default_factory=dict)
    prior_precision: float | None = None  # lam of the reference group (see prior.py)
    # ||theta_b||^2 and ||theta_b - theta_b(init)||^2 per (module, part) block; {} when unknown
    block_sq: dict = field(default_factory=dict)
    init_sq: dict = field(default_factory=dict)
    # the oriented weights (posterior.orient) per (module, part) block, and their initial values
    # when recorded: what the "quadratic" evidence form needs; {} when unknown
    weights: dict = field(default_factory=dict)
    init_weights: dict = field(default_factory=dict)
    prior: str = "zero"  # the prior's kind (config.PRIORS)
    evidence_form: str = "mode"  # how the evidence treats the weights (config.EVIDENCE_FORMS)
    ratios: dict = field(default_factory=dict)  # group -> its lam / prior_precision (default 1)
    edge: list = field(default_factory=list)  # groups whose tuned lam is on the search's edge
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_params(self) -> int:
        total = 0
        for m in self.modules.values():
            total += m.A_out.dim * m.A_in.dim + m.B_in.dim * m.B_out.dim
        return total

    def blocks(self):
        """(module, part, small factor, large factor) for every A and B block."""
        for name, m in self.modules.items():
            for part in ("A", "B"):
                yield (name, part, *m.block(part))

    def block_size(self, name: str, part: str) -> int:
        small, big = self.modules[name].block(part)
        return small.dim * big.dim

    def cached(self, key: float, make: Callable[[], T]) -> T:
        """`make()` kept under `key` until another key is asked for or `forget()` runs: one
        value at a time, since a posterior holds O(r d k) per block."""
        if key not in self._cache:
            self._cache.clear()
            self._cache[key] = make()
        return self._cache[key]

    def forget(self) -> None:
        """Drop the cached value (the prior's kind or group ratios changed under it)."""
        self._cache.clear()

    def rows(self) -> dict[str, torch.Tensor]:
        """{module: row ids} for LoRA layers whose B is cut to the answer tokens' rows."""
        return {
            k: torch.tensor(v, dtype=torch.long) for k, v in self.config.get("rows", {}).items()
        }


def last_layer(factors: KfacFactors) -> KfacFactors:
    """The `last_layer` subset of factors fitted over `all`: the lm_head LoRA's modules alone
    (the factors of a module do not depend on which others are fitted), untuned."""
    keep = set(factors.config.get("rows", {}))
    if not keep:
        raise LorafleetError("these factors have no LoRA on lm_head: no last_layer subset")

    def only(blocks: dict) -> dict:
        return {k: v for k, v in blocks.items() if k[0] in keep}

    block_sq = only(factors.block_sq)
    return KfacFactors(
        {k: m for k, m in factors.modules.items() if k in keep},
        factors.n,
        factors.log_lik,
        sum(block_sq.values()),
        {**factors.config, "subset": "last_layer"},
        block_sq=block_sq,
        init_sq=only(factors.init_sq),
        weights=only(factors.weights),
        init_weights=only(factors.init_weights),
        prior=factors.prior,
        evidence_form=factors.evidence_form,
    )


def _mean_over_prompt(act: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(act.dtype)  # [B, T, 1]
    return (act * m).sum(1) / m.sum(1)  # [B, d_in]


def fit_kfac(
    model: nn.Module,
    items: Sequence[ClassItem],
    config: LaplaceConfig | None = None,
    *,
    adapter_name: str = "default",
    pad: int = 0,
    progress: Callable[[int], None] | None = None,
    init: Mapping[tuple[str, str], torch.Tensor] | None = None,
) -> KfacFactors:
    """One pass over labelled `items`: KFAC factors of every LoRA module, log-likelihood, norms
    (with `init` {(module, part): initial weight}, module named as in the adapter file, also
    the distance from the initialisation)."""
    cfg = config or LaplaceConfig()
    layers = subset_layers(model, cfg.subset, adapter_name)
    if any(it.label is None for it in items):
        raise LorafleetError("fitting Laplace factors needs labelled examples")
    head = head_name(model, layers)
    rows = {} if head is None else {head: answer_rows(items)}
    gen = torch.Generator().manual_seed(cfg.seed)

    def acc(dim: int) -> FactorAccumulator:
        return FactorAccumulator(dim, rank=cfg.n_kfac if dim > cfg.threshold else None)

    accs: dict[tuple[str, str], FactorAccumulator] = {}
    for name, layer in layers.items():
        r, d_in = lora_weight(layer, "A", adapter_name).shape
        d_out = len(rows[name]) if name in rows else lora_weight(layer, "B", adapter_name).shape[0]
        accs[(name, "A_in")], accs[(name, "A_out")] = acc(d_in), acc(r)
        accs[(name, "B_in")], accs[(name, "B_out")] = acc(r), acc(d_out)
    positions = dict.fromkeys(((name, part) for name in layers for part in ("A", "B")), 0)
    was_training = model.training
    model.eval()  # no dropout: the factors are of the deterministic MAP network
    log_lik, n = 0.0, 0
    try:
        for idx in batches(items, cfg.batch_size):
            chunk = [items[i] for i in idx]
            cap = capture(model, layers, chunk, adapter_name=adapter_name, pad=pad, rows=rows)
            labels = torch.tensor([it.label for it in chunk])
            logp = F.log_softmax(cap.f, dim=-1)  # [B, C]
            log_lik += float(logp[torch.arange(len(chunk)), labels].sum())
            n += len(chunk)
            p = logp.exp()
            q = p[:, 1:]  # the contrasts' share of the softmax Hessian / gradient
            if cfg.labels == "exact":
                weights = sqrt_psd(softmax_hessian(q).double()).float()  # [B, C-1, C-1]
            else:
                y = torch.multinomial(p, 1, generator=gen).squeeze(1)
                onehot = F.one_hot(y, p.shape[1]).float()[:, 1:]
                weights = (q - onehot).unsqueeze(-1)  # [B, C-1, 1]
            for key in positions:
                ins, outs = accs[(key[0], f"{key[1]}_in")], accs[(key[0], f"{key[1]}_out")]
                act, grad, mask = cap.acts[key], cap.grads[key], cap.positions(key)
                if cfg.kfac == "reduce":
                    ins.add(_mean_over_prompt(act, mask))
                    e_bar = grad.sum(2).permute(1, 2, 0)  # [C-1, B, T, o] -> [B, o, C-1]
                    vectors = e_bar @ weights  # [B, o, C'] : E_n Lambda_n^(1/2)
                    outs.add(vectors.transpose(1, 2))  # rows [B*C', o]
                    continue
                keep = mask.bool()  # [B, T]
                ins.add(act[keep])  # [P, d_in], P = prompt positions in the batch
                e = grad.permute(1, 2, 3, 0)[keep]  # [C-1, B, T, o] -> [P, o, C-1]
                w = weights.unsqueeze(1).expand(-1, keep.shape[1], -1, -1)[keep]  # [P, C-1, C']
                outs.add((e @ w).transpose(1, 2))  # rows [P*C', o]: e_t Lambda_n^(1/2)
                positions[key] += int(keep.sum())
            if progress:
                progress(len(chunk))
    finally:
        model.train(was_training)
    if not math.isfinite(log_lik):
        raise LorafleetError("the adapter's log-likelihood on the data is not finite")
    factors = {k: a.factor() for k, a in accs.items()}
    if cfg.kfac == "expand":  # Q n / T, so that (1/n) Q (x) G is (1/T) sum a a^T (x) sum e e^T
        for (name, part), count in positions.items():
            factors[(name, f"{part}_in")] = scaled(factors[(name, f"{part}_in")], n / count)
    modules = {
        name: ModuleFactors(*(factors[(name, k)] for k in ("A_in", "A_out", "B_in", "B_out")))
        for name in layers
    }
    weights, init_weights = _block_weights(layers, adapter_name, init, rows)
    block_sq = {k: float(w.pow(2).sum()) for k, w in weights.items()}
    init_sq = {k: float((weights[k] - w0).pow(2).sum()) for k, w0 in init_weights.items()}
    config = {
        "n_kfac": cfg.n_kfac,
        "threshold": cfg.threshold,
        "labels": cfg.labels,
        "seed": cfg.seed,
        "adapter_name": adapter_name,
        "kfac": cfg.kfac,
        "subset": cfg.subset,
        "rows": {name: r.tolist() for name, r in rows.items()},
    }
    return KfacFactors(
        modules,
        n,
        log_lik,
        sum(block_sq.values()),
        config,
        block_sq=block_sq,
        init_sq=init_sq,
        weights=weights,
        init_weights=init_weights,
    )


def _block_weights(layers, adapter_name, init, rows) -> tuple[dict, dict]:
    """{(module, part): oriented W} and, given `init`, {(module, part): oriented W_init}; a
    B in `rows` {module: row ids} cut to those rows."""
    weights, init_weights = {}, {}
    for name, layer in layers.items():
        for part in ("A", "B"):
            w = lora_weight(layer, part, adapter_name).detach().float().cpu()
            shape = tuple(w.shape)
            cut = rows.get(name) if part == "B" else None
            if cut is not None:
                w = w[cut]  # [len(rows), r]
            weights[(name, part)] = orient(part, w).contiguous()
            if init is None:
                continue
            w0 = init.get((strip_prefix(name), part))
            if w0 is None or tuple(w0.shape) != shape:
                raise LorafleetError(
                    f"{name}: the recorded initial lora_{part} weight is "
                    f"missing or of another shape"
                )
            w0 = w0.float() if cut is None else w0.float()[cut]
            init_weights[(name, part)] = orient(part, w0).contiguous()
    return weights, init_weights
