"""Laplace predictives over restricted-label logits: linearised (GLM) and weight sampling."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lorafleet.bayes.capture import (
    Captured,
    ClassItem,
    batches,
    capture,
    class_item,
    jacobian,
    lora_layers,
    lora_weight,
)
from lorafleet.bayes.factors import sqrt_psd
from lorafleet.bayes.fit import KfacFactors
from lorafleet.bayes.posterior import orient
from lorafleet.bayes.prior import AdapterPosterior, posterior
from lorafleet.data import bos_to_add
from lorafleet.errors import LorafleetError

LINKS = ("probit", "mc")


@dataclass
class Predictions:
    """Per example: MAP logits f [N, C], the covariance of the logit contrasts f_c - f_0
    (c >= 1) [N, C-1, C-1] (None for MAP / sampling) and class probabilities [N, C]."""

    logits: torch.Tensor
    cov: torch.Tensor | None
    probs: torch.Tensor


def logit_cov(cap: Captured, post: AdapterPosterior) -> torch.Tensor:
    """J Sigma J^T for every row of a captured batch: [B, C-1, C-1], J the exact Jacobian of the
    logit contrasts w.r.t. all LoRA weights, Sigma the block-diagonal KFAC posterior covariance."""
    B, C = cap.f.shape
    cov = torch.zeros(B, C - 1, C - 1, dtype=torch.float64)
    for (name, part), block in post.blocks.items():
        J = orient(part, jacobian(cap, (name, part)))  # [B, C-1, r, d]
        phi, psi = block.features(J)  # [B, C-1, F]
        cov += torch.einsum("bcf,bef->bce", phi, phi).double()
        if psi is not None:
            cov -= torch.einsum("bcf,bef->bce", psi, psi).double()
    cov = 0.5 * (cov + cov.transpose(1, 2))
    return cov.float()


def covered_layers(model: nn.Module, factors: KfacFactors) -> dict[str, nn.Module]:
    """The model's LoRA layers that `factors` cover (all, or the subset they were fitted on);
    one-line error when the model lacks one of them."""
    layers = lora_layers(model, factors.config.get("adapter_name", "default"))
    missing = [name for name in factors.modules if name not in layers]
    if missing:
        raise LorafleetError(f"the Laplace factors name LoRA layers the model lacks: {missing[0]}")
    return {name: layers[name] for name in factors.modules}


def link_probs(
    mean: torch.Tensor,
    cov: torch.Tensor,
    link: str = "mc",
    *,
    samples: int = 2000,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Class probabilities when the contrasts g = f_{1:} - f_0 ~ N(g_MAP, cov): probit
    approximation (softmax of [0, g / sqrt(1 + pi/8 var)], MacKay's for two classes) or the
    Monte-Carlo average of softmax([0, g]). mean [N, C] logits, cov [N, C-1, C-1] -> [N, C]."""
    g = mean[:, 1:] - mean[:, :1]  # [N, C-1]
    zero = torch.zeros_like(mean[:, :1])
    if link == "probit":
        var = cov.diagonal(dim1=-2, dim2=-1).clamp_min(0)
        return torch.softmax(torch.cat([zero, g / torch.sqrt(1 + math.pi / 8 * var)], -1), -1)
    if link != "mc":
        raise ValueError(f"link must be one of {', '.join(LINKS)}, got {link!r}")
    root = sqrt_psd(cov.double()).float()  # [N, C-1, C-1]; PSD-safe where Cholesky may fail
    eps = torch.randn(samples, *g.shape, generator=generator)  # [S, N, C-1]
    gs = g + torch.einsum("nce,sne->snc", root, eps)
    return torch.softmax(torch.cat([zero.expand(samples, -1, -1), gs], -1), dim=-1).mean(0)


def glm_predictive(
    model: nn.Module,
    items: Sequence[ClassItem],
    factors: KfacFactors,
    *,
    prior_precision: float | None = None,
    link: str = "mc",
    samples: int = 2000,
    batch_size: int = 8,
    seed: int = 0,
    pad: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Predictions:
    """The linearised Laplace predictive f ~ N(f_MAP, J Sigma J^T) for every item (over the
    contrasts f_c - f_0, which is all softmax sees)."""
    return glm_predictive_grid(
        model,
        items,
        factors,
        [prior_precision],
        link=link,
        samples=samples,
        batch_size=batch_size,
        seed=seed,
        pad=pad,
        progress=progress,
    )[0]


def glm_predictive_grid(
    model: nn.Module,
    items: Sequence[ClassItem],
    factors: KfacFactors,
    prior_precisions: Sequence[float | None],
    *,
    link: str = "mc",
    samples: int = 2000,
    batch_size: int = 8,
    seed: int = 0,
    pad: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[Predictions]:
    """glm_predictive for several prior precisions from one pass (the Jacobians are shared)."""
    layers = covered_layers(model, factors)
    rows = factors.rows()
    for ids in rows.values():
        outside = {c for it in items for c in it.classes} - set(ids.tolist())
        if outside:
            raise LorafleetError(
                f"the Laplace factors cover the lm_head rows of the answer tokens "
                f"{ids.tolist()} only; these choices start with token {min(outside)}"
            )
    posts = [
        posterior(factors, lam) if lam is None else AdapterPosterior(factors, lam)
        for lam in prior_precisions
    ]
    N, C = len(items), max(len(it.classes) for it in items)
    logits = torch.zeros(N, C)
    covs = [torch.zeros(N, C - 1, C - 1) for _ in posts]
    was_training = model.training
    model.eval()
    try:
        for idx in batches(items, batch_size):
            cap = capture(model, layers, [items[i] for i in idx], pad=pad, rows=rows)
            c = cap.f.shape[1]
            logits[idx, :c] = cap.f
            for k, post in enumerate(posts):
                covs[k][idx, : c - 1, : c - 1] = logit_cov(cap, post)
            if progress:
                progress(len(idx))
    finally:
        model.train(was_training)
    out = []
    for cov in covs:
        gen = torch.Generator().manual_seed(seed)
        probs = _grouped_probs(items, logits, cov, link, samples, gen)
        out.append(Predictions(logits, cov, probs))
    return out


def _grouped_probs(items, logits, cov, link, samples, gen) -> torch.Tensor:
    """link_probs per class count (padding classes get probability 0)."""
    probs = torch.zeros_like(logits)
    counts = torch.tensor([len(it.classes) for it in items])
    for c in counts.unique().tolist():
        rows = (counts == c).nonzero().squeeze(1)
        probs[rows, :c] = link_probs(
            logits[rows, :c], cov[rows, : c - 1, : c - 1], link, samples=samples, generator=gen
        )
    return probs


@torch.no_grad()
def map_predictive(
    model: nn.Module,
    items: Sequence[ClassItem],
    *,
    batch_size: int = 8,
    pad: int = 0,
    adapter_name: str = "default",
) -> Predictions:
    """Softmax of the MAP restricted logits (no uncertainty)."""
    layers = lora_layers(model, adapter_name)
    N, C = len(items), max(len(it.classes) for it in items)
    logits = torch.full((N, C), float("-inf"))
    for idx in batches(items, batch_size):
        cap = capture(model, layers, [items[i] for i in idx], with_grads=False, pad=pad)
        logits[idx, : cap.f.shape[1]] = cap.f
    return Predictions(logits, None, torch.softmax(logits, dim=-1))


@torch.no_grad()
def sampled_predictive(
    model: nn.Module,
    items: Sequence[ClassItem],
    factors: KfacFactors,
    *,
    prior_precision: float | None = None,
    samples: int = 10,
    batch_size: int = 8,
    seed: int = 0,
    pad: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Predictions:
    """Monte-Carlo over weights (not linearised): draw LoRA weights from the KFAC posterior,
    run the model, average the class probabilities. The MAP weights are restored after."""
    adapter_name = factors.config.get("adapter_name", "default")
    layers = covered_layers(model, factors)
    rows = factors.rows()
    post = posterior(factors, prior_precision)
    gen = torch.Generator().manual_seed(seed)
    saved = {
        (n, p): lora_weight(layers[n], p, adapter_name).detach().clone() for n, p in post.blocks
    }
    total = None
    try:
        for _ in range(samples):
            for (name, part), block in post.blocks.items():
                w = lora_weight(layers[name], part, adapter_name)
                delta = orient(part, block.sample(gen)).to(w.dtype).to(w.device)  # W's shape
                w.copy_(saved[(name, part)])
                if part == "B" and name in rows:  # only the answer tokens' rows are covered
                    w[rows[name].to(w.device)] += delta
                else:
                    w += delta
            probs = map_predictive(
                model, items, batch_size=batch_size, pad=pad, adapter_name=adapter_name
            ).probs
            total = probs if total is None else total + probs
            if progress:
                progress(1)
    finally:
        for (name, part), value in saved.items():
            lora_weight(layers[name], part, adapter_name).copy_(value)
    mean = map_predictive(model, items, batch_size=batch_size, pad=pad, adapter_name=adapter_name)
    return Predictions(mean.logits, None, total / samples)


def laplace_class_probs(
    model: nn.Module,
    tokenizer,
    factors: KfacFactors,
    prompt: str,
    choices: Sequence[str],
    *,
    link: str = "probit",
    samples: int = 2000,
    max_length: int = 1024,
    seed: int = 0,
) -> list[float]:
    """Laplace-LoRA class probabilities for one prompt and its choices (one per choice).

    `model` is the base with the calibrated LoRA adapter attached (PEFT, adapter "default"),
    `factors` comes from `load_factors(adapter_dir)` (its tuned prior precision is used).
    `prompt` is the exact text before the answer, chat template already applied if the adapter
    was trained with one; each choice is scored by its first token, so choices must start with
    distinct tokens (else LorafleetError). Returns the linearised-Laplace probabilities
    (probit link by default: deterministic and cheap; "mc" averages `samples` softmaxes).
    Safe to call under torch.inference_mode (it needs one backward pass per choice).
    """
    item = class_item(
        tokenizer, prompt, list(choices), max_length=max_length, bos=bos_to_add(tokenizer)
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pred = glm_predictive(model, [item], factors, link=link, samples=samples, seed=seed, pad=pad)
    return [float(p) for p in pred.probs[0]]
