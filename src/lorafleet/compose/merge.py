"""Merge LoRA adapters exactly: linear / cat / svd over factors, TIES / DARE over dense deltas.

Each adapter i contributes w_i * s_i * B_i @ A_i per module (s_i from its own rank, alpha and
rsLoRA flag; a module it lacks contributes zero). `linear` and `cat` are exact: the weighted
factors are concatenated along the rank (`cat` keeps that concatenation, `linear` re-factors it
to the fewest ranks that hold the same delta). `svd` is the exact delta truncated to `rank`, with
the optimal (Eckart-Young) error reported. `ties`, `dare_linear`, `dare_ties` and
`magnitude_prune` apply PEFT's primitives (peft.utils.merge_utils) to the dense deltas, with each
weight's sign folded into its task vector first (so a negated task takes part in TIES' sign
election as the vector it is), then factor the result to `rank` (default: the sum of the input
ranks) and report the truncation error. Everything is computed in float64.
"""

from __future__ import annotations

import math
import time
import warnings
import zlib
from collections import Counter

import torch
from peft import LoraConfig
from peft.utils import merge_utils

from lorafleet import __version__
from lorafleet.adapters.format import Adapter, json_ready
from lorafleet.compose.deltas import (
    Factors,
    MergeError,
    adapter_factors,
    compact,
    relative_error,
    svd_factors,
)

FACTOR_METHODS = ("linear", "cat", "svd")
DENSE_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
METHODS = FACTOR_METHODS + DENSE_METHODS
SIGN_METHODS = ("total", "frequency")
DEFAULT_DENSITY = 0.5


def check_recipe(
    n: int, weights: list[float], method: str, density: float, majority_sign: str, rank
) -> None:
    """One-line errors for a bad merge recipe (before any tensor is touched)."""
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}: use one of {', '.join(METHODS)}")
    if n == 0:
        raise MergeError("no adapters to merge")
    if len(weights) != n:
        raise MergeError(f"{len(weights)} weights for {n} adapters")
    bad = [w for w in weights if not math.isfinite(float(w))]
    if bad:
        raise MergeError(f"weights must be finite numbers, got {bad[0]}")
    if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
        raise MergeError(f"--density must be in (0, 1], got {density!r}")
    if majority_sign not in SIGN_METHODS:
        raise MergeError(f"--majority-sign must be one of {', '.join(SIGN_METHODS)}")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise MergeError(f"--rank must be a positive integer, got {rank!r}")
    if rank is not None and method in ("linear", "cat"):
        raise MergeError(f"--rank does not apply to {method} (exact); use svd to truncate")


def module_seed(seed: int, module: str) -> int:
    """DARE's per-module seed: the same for a module whatever the other modules are."""
    return (int(seed) * 1_000_003 + zlib.crc32(module.encode())) % (2**63)


def combine_dense(
    deltas: list[torch.Tensor],
    weights: list[float],
    method: str,
    *,
    density: float = DEFAULT_DENSITY,
    majority_sign: str = "total",
    seed: int = 0,
) -> torch.Tensor:
    """Merge dense task vectors (same shape) with PEFT's primitive for `method` (a DENSE_METHODS
    name, or `linear` for the plain weighted sum). Weight signs are folded into the vectors."""
    signed = [d if w >= 0 else -d for d, w in zip(deltas, weights, strict=True)]
    mags = torch.tensor([abs(float(w)) for w in weights], dtype=deltas[0].dtype)
    if method == "linear":
        return merge_utils.task_arithmetic(signed, mags)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that density 1 prunes nothing
        torch.manual_seed(seed)
        if method == "ties":
            return merge_utils.ties(signed, mags, density, majority_sign)
        if method == "dare_ties":
            return merge_utils.dare_ties(signed, mags, density, majority_sign)
        if method == "dare_linear":
            return merge_utils.dare_linear(signed, mags, density)
        if method == "magnitude_prune":
            return merge_utils.magnitude_prune(signed, mags, density)
    raise MergeError(f"unknown dense merge method {method!r}: use {', '.join(DENSE_METHODS)}")


def _module_union(sets: list[dict[str, Factors]]) -> dict[str, tuple[int, int]]:
    shapes: dict[str, tuple[int, int]] = {}
    for i, factors in enumerate(sets):
        for module, f in factors.items():
            if shapes.setdefault(module, f.shape) != f.shape:
                raise MergeError(
                    f"{module} is {shapes[module]} in one adapter and {f.shape} in adapter "
                    f"{i + 1}: the adapters were made for different base models"
                )
    return shapes


def _concat(sets: list[dict[str, Factors]], weights: list[float], module: str) -> Factors:
    parts = [
        (w * s[module].B, s[module].A) for s, w in zip(sets, weights, strict=True) if module in s
    ]
    return Factors(B=torch.cat([b for b, _ in parts], 1), A=torch.cat([a for _, a in parts], 0))


def _progress(total: int, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="merging", unit="module", leave=False, disable=not show)


def _merge_module(sets, weights, module, shape, method, opts, rank, dense_only=False):
    """(Factors or dense tensor, error, norm) of one module's merge."""
    cat = _concat(sets, weights, module)
    if method == "cat" or (dense_only and method == "linear"):
        return (cat.dense() if dense_only else cat), 0.0, float(cat.dense().norm())
    if method in FACTOR_METHODS:
        default = max(s[module].rank for s in sets if module in s)
        f, err, norm = compact(cat, (rank or default) if method == "svd" else None)
        return (f.dense() if dense_only else f), err, norm
    zero = torch.zeros(shape, dtype=torch.float64)
    dense = [s[module].dense() if module in s else zero for s in sets]
    merged = combine_dense(
        dense,
        weights,
        method,
        seed=module_seed(opts["seed"], module),
        density=opts["density"],
        majority_sign=opts["majority_sign"],
    )
    if dense_only:
        return merged, 0.0, float(merged.norm())
    return svd_factors(merged, rank or cat.rank)


def merge_factors(
    sets: list[dict[str, Factors]],
    weights: list[float],
    method: str,
    *,
    density: float = DEFAULT_DENSITY,
    majority_sign: str = "total",
    seed: int = 0,
    rank: int | None = None,
    progress: bool = False,
    dense: bool = False,
) -> tuple[dict[str, Factors], dict]:
    """The merged {module: Factors} (or {module: dense delta} with `dense`, no truncation for
    the dense methods) and a report (relative error, the worst module and its error)."""
    check_recipe(len(sets), weights, method, density, majority_sign, rank)
    shapes = _module_union(sets)
    opts = {"density": density, "majority_sign": majority_sign, "seed": seed}
    out: dict = {}
    errors, norms, rel = [], [], {}
    with _progress(len(shapes), progress) as bar:
        for module, shape in shapes.items():
            out[module], err, norm = _merge_module(
                sets, weights, module, shape, method, opts, rank, dense_only=dense
            )
            errors.append(err)
            norms.append(norm)
            rel[module] = err / norm if norm > 0 else 0.0
            bar.update(1)
    worst = max(rel, key=rel.get) if rel else None
    report = {
        "relative_error": relative_error(errors, norms),
        "worst_module": worst,
        "worst_module_error": rel.get(worst, 0.0),
    }
    return out, report


def _common_fingerprint(adapters: list[Adapter], names: list[str]) -> str | None:
    seen = {}
    for name, a in zip(names, adapters, strict=True):
        fp = a.meta.get("base_fingerprint")
        if fp:
            seen.setdefault(fp, name)
    if len(seen) > 1:
        (fa, na), (fb, nb) = list(seen.items())[:2]
        raise MergeError(f"adapters {na} and {nb} were trained on different bases ({fa} vs {fb})")
    return next(iter(seen), None)


def factors_to_adapter(
    factors: dict[str, Factors],
    *,
    base_model: str | None,
    meta: dict,
    dtype: torch.dtype = torch.float32,
) -> Adapter:
    """A PEFT LoRA adapter holding exactly these deltas: per-module ranks (rank_pattern) with
    alpha = rank (scale 1), targets the exact module names."""
    from lorafleet.adapters.lora_keys import peft_key

    ranks = {m: f.rank for m, f in factors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: k for m, k in ranks.items() if k != r}
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=list(factors),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
        inference_mode=True,
    )
    tensors = {}
    for m, f in factors.items():
        tensors[peft_key(m, "A")] = f.A.to(dtype).contiguous()
        tensors[peft_key(m, "B")] = f.B.to(dtype).contiguous()
    return Adapter(config=json_ready(config.to_dict()), tensors=tensors, meta=meta)


def _out_dtype(adapters: list[Adapter]) -> torch.dtype:
    dtypes = {t.dtype for a in adapters for t in a.tensors.values()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def merge_adapters(
    adapters: list[Adapter],
    weights: list[float],
    method: str = "linear",
    *,
    density: float = DEFAULT_DENSITY,
    majority_sign: str = "total",
    seed: int = 0,
    rank: int | None = None,
    names: list[str] | None = None,
    progress: bool = False,
) -> Adapter:
    """Merge `adapters` with `weights` by `method` into one PEFT LoRA adapter (in memory; write
    it with adapters.write_adapter). Its meta carries the recipe and the merge's relative error
    under "merge". Raises MergeError (one line) for adapters or recipes that cannot merge."""
    names = names or [str(a.path.name) if a.path else f"adapter{i}" for i, a in enumerate(adapters)]
    check_recipe(len(adapters), weights, method, density, majority_sign, rank)
    fingerprint = _common_fingerprint(adapters, names)
    sets = [adapter_factors(a) for a in adapters]
    factors, report = merge_factors(
        sets,
        [float(w) for w in weights],
        method,
        density=density,
        majority_sign=majority_sign,
        seed=seed,
        rank=rank,
        progress=progress,
    )
    recipe = {
        "method": method,
        "adapters": [
            {"name": n, "path": str(a.path) if a.path else None, "weight": float(w)}
            for n, a, w in zip(names, adapters, weights, strict=True)
        ],
        **({"density": density, "seed": seed} if method in DENSE_METHODS else {}),
        **({"majority_sign": majority_sign} if method in ("ties", "dare_ties") else {}),
        **({"rank": rank} if rank is not None else {}),
        **report,
    }
    meta = {
        "method": "lora",
        "merge": recipe,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "lorafleet_version": __version__,
        **({"base_fingerprint": fingerprint} if fingerprint else {}),
    }
    base_model = adapters[0].config.get("base_model_name_or_path")
    return factors_to_adapter(factors, base_model=base_model, meta=meta, dtype=_out_dtype(adapters))


def merged_deltas(
    adapters: list[Adapter],
    weights: list[float],
    method: str = "linear",
    *,
    density: float = DEFAULT_DENSITY,
    majority_sign: str = "total",
    seed: int = 0,
    rank: int | None = None,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict]:
    """({module: merged dense delta} float64, report): what a merge adds to each base weight.
    The dense methods are not truncated here (folding into the base needs no factors)."""
    names = [str(a.path.name) if a.path else f"adapter{i}" for i, a in enumerate(adapters)]
    check_recipe(len(adapters), weights, method, density, majority_sign, rank)
    _common_fingerprint(adapters, names)
    sets = [adapter_factors(a) for a in adapters]
    return merge_factors(
        sets,
        [float(w) for w in weights],
        method,
        density=density,
        majority_sign=majority_sign,
        seed=seed,
        rank=rank,
        progress=progress,
        dense=True,
    )
