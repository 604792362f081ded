"""Save and load KFAC factors next to the adapter: laplace.safetensors + laplace.json (atomic)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorafleet.adapters.format import INIT_NAME, WEIGHTS_NAME
from lorafleet.adapters.lora_keys import lora_pairs
from lorafleet.bayes.config import EVIDENCE_FORMS, PRIORS
from lorafleet.bayes.factors import Factor
from lorafleet.bayes.fit import KfacFactors, ModuleFactors
from lorafleet.errors import LorafleetError
from lorafleet.fsutil import atomic_write, atomic_write_json

FACTORS_NAME = "laplace.safetensors"
INFO_NAME = "laplace.json"
FORMAT = "lorafleet-laplace-kfac"
FACTOR_KEYS = ("A_in", "A_out", "B_in", "B_out")


def read_init(adapter_dir: str | Path) -> dict[tuple[str, str], torch.Tensor] | None:
    """{(module, part): initial weight} from the adapter's lora_init.safetensors; None if absent."""
    file = Path(adapter_dir) / INIT_NAME
    if not file.is_file():
        return None
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LorafleetError(f"{file}: not a valid safetensors file ({exc})") from exc
    pairs = lora_pairs(tensors, strict=False)
    return {(m, part): w for m, (a, b) in pairs.items() for part, w in (("A", a), ("B", b))}


def _keyed(blocks: dict) -> dict:
    return {f"{name}|{part}": v for (name, part), v in blocks.items()}


def _unkeyed(blocks: dict | None) -> dict:
    return {tuple(k.rsplit("|", 1)): float(v) for k, v in (blocks or {}).items()}


def adapter_digest(adapter_dir: str | Path) -> str | None:
    """sha256 of the adapter's weights file, so stale factors are noticed."""
    file = Path(adapter_dir) / WEIGHTS_NAME
    if not file.is_file():
        return None
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_factors(adapter_dir: str | Path, factors: KfacFactors, extra: dict | None = None) -> Path:
    """Write the factors beside the adapter; the JSON goes last and names the weights' hash."""
    adapter_dir = Path(adapter_dir)
    tensors = {}
    for name, m in factors.modules.items():
        for key in FACTOR_KEYS:
            f: Factor = getattr(m, key)
            for part in ("U", "s", "d"):
                tensors[f"{name}.{key}.{part}"] = getattr(f, part).contiguous().float()
    for tag, blocks in (("w", factors.weights), ("w0", factors.init_weights)):
        for (name, part), w in blocks.items():
            tensors[f"{name}.{tag}.{part}"] = w.contiguous().float()
    atomic_write(adapter_dir / FACTORS_NAME, lambda tmp: save_file(tensors, tmp))
    info = {
        "format": FORMAT,
        "version": 1,
        "n": factors.n,
        "log_lik": factors.log_lik,
        "theta_sq": factors.theta_sq,
        "n_params": factors.n_params,
        "prior_precision": factors.prior_precision,
        "prior": factors.prior,
        "evidence_form": factors.evidence_form,
        "prior_ratios": factors.ratios,
        "block_sq": _keyed(factors.block_sq),
        "init_sq": _keyed(factors.init_sq),
        "config": factors.config,
        "modules": list(factors.modules),
        "adapter_sha256": adapter_digest(adapter_dir),
        **(extra or {}),
    }
    atomic_write_json(adapter_dir / INFO_NAME, info)
    return adapter_dir / FACTORS_NAME


def load_factors(adapter_dir: str | Path, *, check_adapter: bool = True) -> KfacFactors:
    """Read factors written by save_factors; one-line errors for missing, broken or stale ones."""
    adapter_dir = Path(adapter_dir)
    info_file, tensor_file = adapter_dir / INFO_NAME, adapter_dir / FACTORS_NAME
    if not info_file.is_file() or not tensor_file.is_file():
        missing = info_file if not info_file.is_file() else tensor_file
        raise LorafleetError(
            f"{missing}: missing; fit the Laplace factors of {adapter_dir} first "
            "(`lorafleet calibrate`)"
        )
    try:
        info = json.loads(info_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LorafleetError(f"{info_file}: invalid JSON ({exc})") from exc
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise LorafleetError(f"{info_file}: not a lorafleet Laplace factors file")
    if check_adapter and info.get("adapter_sha256") != adapter_digest(adapter_dir):
        raise LorafleetError(
            f"{info_file}: fitted for other adapter weights; run `lorafleet calibrate` again"
        )
    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LorafleetError(f"{tensor_file}: not a valid safetensors file ({exc})") from exc
    modules = {}
    for name in info.get("modules", []):
        try:
            parts = [
                Factor(*(tensors[f"{name}.{key}.{p}"] for p in ("U", "s", "d")))
                for key in FACTOR_KEYS
            ]
        except KeyError as exc:
            raise LorafleetError(f"{tensor_file}: missing tensor {exc.args[0]}") from exc
        if not all(bool(torch.isfinite(t).all()) for f in parts for t in (f.U, f.s, f.d)):
            raise LorafleetError(f"{tensor_file}: non-finite values in the factors of {name}")
        modules[name] = ModuleFactors(*parts)
    if not modules:
        raise LorafleetError(f"{info_file}: lists no modules")
    lam = info.get("prior_precision")
    if lam is not None and not (isinstance(lam, (int, float)) and lam > 0 and math.isfinite(lam)):
        raise LorafleetError(f"{info_file}: prior_precision must be positive, got {lam!r}")
    prior = info.get("prior", "zero")
    if prior not in PRIORS:
        raise LorafleetError(f"{info_file}: unknown prior {prior!r}")
    form = info.get("evidence_form", "mode")
    if form not in EVIDENCE_FORMS:
        raise LorafleetError(f"{info_file}: unknown evidence form {form!r}")
    weights, init_weights = _weights(tensors, modules, "w"), _weights(tensors, modules, "w0")
    return KfacFactors(
        modules,
        int(info["n"]),
        float(info["log_lik"]),
        float(info["theta_sq"]),
        dict(info.get("config") or {}),
        None if lam is None else float(lam),
        block_sq=_unkeyed(info.get("block_sq")),
        init_sq=_unkeyed(info.get("init_sq")),
        weights=weights,
        init_weights=init_weights,
        prior=prior,
        evidence_form=form,
        ratios={k: float(v) for k, v in (info.get("prior_ratios") or {}).items()},
    )


def _weights(tensors: dict, modules: dict, tag: str) -> dict:
    """{(module, part): oriented weight} saved under `tag` ({} for files written before)."""
    found = {
        (name, part): tensors[f"{name}.{tag}.{part}"]
        for name in modules
        for part in ("A", "B")
        if f"{name}.{tag}.{part}" in tensors
    }
    return found if len(found) == 2 * len(modules) else {}


def read_info(adapter_dir: str | Path) -> dict:
    """The laplace.json of an adapter directory ({} when there is none)."""
    file = Path(adapter_dir) / INFO_NAME
    try:
        return json.loads(file.read_text()) if file.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def val_tuned_prior(adapter_dir: str | Path) -> float | None:
    """The prior precision with the lowest validation NLL when calibrate saw validation data
    (laplace.json's tuning.val_grid), else None."""
    grid = (read_info(adapter_dir).get("tuning") or {}).get("val_grid") or []
    return min(grid, key=lambda row: row["nll"])["prior_precision"] if grid else None
