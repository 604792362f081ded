"""Adapter mixtures per request over HTTP: `adapters`, `mix:` model ids, LoRAX merged_adapters."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from lorafleet.errors import LorafleetError
from lorafleet.serve.api.auth import Principal
from lorafleet.serve.api.errors import APIError
from lorafleet.serve.api.state import ServerState
from lorafleet.serve.merged import MergeRecipe

MIX_PREFIX = "mix:"
STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class MixRequest:
    """What a request asked for: (adapter, weight) parts and how to combine them. `param` is
    the request field errors name (`adapters`, `model`, `parameters.merged_adapters`)."""

    parts: tuple[tuple[str, float], ...]
    param: str
    strategy: str = "linear"
    density: float = 1.0
    sign_method: str = "total"

    @property
    def label(self) -> str:
        """The metrics label: the strategy and the names (weights would explode cardinality)."""
        kind = "" if self.strategy == "linear" else f"{self.strategy}:"
        return MIX_PREFIX + kind + "+".join(name for name, _ in self.parts)


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", code="invalid_mixture", param=param)


def parse_mix_id(model: str) -> tuple[tuple[str, float], ...]:
    """`mix:a*0.7+b*0.3` -> (("a", 0.7), ("b", 0.3)); a part without `*w` has weight 1."""
    body = model[len(MIX_PREFIX) :]
    parts = []
    for chunk in body.split("+"):
        name, star, weight = chunk.strip().partition("*")
        if not name.strip():
            raise bad("model", f"{model!r} is not of the form mix:NAME*WEIGHT+NAME*WEIGHT")
        try:
            value = float(weight) if star else 1.0
        except ValueError:
            raise bad("model", f"weight {weight!r} of {name.strip()} is not a number") from None
        parts.append((name.strip(), value))
    return tuple(parts)


def check_parts(state: ServerState, who: Principal, mix: MixRequest) -> MixRequest:
    """Limits, finite weights and distinct names (400 naming the field); every part must be an
    adapter this caller may use (the same 404 as a plain request otherwise)."""
    limit = state.config.max_mixture
    if not mix.parts:
        raise bad(mix.param, "a mixture needs at least one adapter")
    if len(mix.parts) > limit:
        raise bad(
            mix.param, f"{len(mix.parts)} adapters; at most {limit} per request (--max-mixture)"
        )
    names = [name for name, _ in mix.parts]
    if len(set(names)) != len(names):
        raise bad(mix.param, f"an adapter is named twice: {names}")
    for name, weight in mix.parts:
        if not math.isfinite(weight):
            raise bad(mix.param, f"the weight of {name} must be a finite number, got {weight}")
        if name == state.config.model_name:
            raise bad(mix.param, f"{name} is the base model, not an adapter to mix")
    for name in names:
        state.resolve(name, who)  # 404 for a missing or hidden adapter
    return mix


def from_openai(state: ServerState, who: Principal, model: str, adapters) -> MixRequest | None:
    """The mixture an OpenAI request asks for (the `adapters` field or a `mix:` model id), or
    None for a plain request. With `adapters`, `model` is the base or one of the listed names."""
    if adapters is not None:
        parts = tuple((a.name, a.weight) for a in adapters)
        if model.startswith(MIX_PREFIX):
            raise bad("model", "give either a mix: model id or the adapters field, not both")
        if model != state.config.model_name and model not in {n for n, _ in parts}:
            raise bad(
                "model",
                f"with adapters, model must be the base "
                f"({state.config.model_name}) or one of the listed adapters",
            )
        return check_parts(state, who, MixRequest(parts, "adapters"))
    if model.startswith(MIX_PREFIX):
        return check_parts(state, who, MixRequest(parse_mix_id(model), "model"))
    return None


def from_lorax(state: ServerState, who: Principal, params) -> MixRequest | None:
    """The mixture of a LoRAX `parameters.merged_adapters` (weights default to 1 each, as in
    LoRAX), or None when the request has none."""
    merged = params.merged_adapters
    if merged is None:
        return None
    param = "parameters.merged_adapters"
    if params.adapter_id is not None:
        raise bad("parameters.adapter_id", "give either adapter_id or merged_adapters")
    weights = merged.weights if merged.weights is not None else [1.0] * len(merged.ids)
    if len(weights) != len(merged.ids):
        raise bad(f"{param}.weights", f"{len(weights)} weights for {len(merged.ids)} ids")
    mix = MixRequest(
        tuple(zip(merged.ids, weights, strict=True)),
        param,
        merged.merge_strategy,
        merged.density,
        merged.majority_sign_method,
    )
    return check_parts(state, who, mix)


async def engine_spec(state: ServerState, mix: MixRequest):
    """What the backend runs for `mix`: linear -> the (name, weight) pairs, computed per row
    in the batched op; other strategies -> the name of the registry's merged virtual adapter
    (merged on a worker thread the first time; a recipe that cannot merge is a 400)."""
    if mix.strategy == "linear":
        return list(mix.parts)
    registry = state.registry
    if registry is None or not registry.can_merge:
        raise bad(
            f"{mix.param}.merge_strategy",
            f"{mix.strategy} merges are not available on "
            "this server (no merge backend); use linear",
        )
    recipe = MergeRecipe(mix.parts, mix.strategy, mix.density, mix.sign_method)
    try:
        return await asyncio.to_thread(registry.merged_adapter, recipe)
    except LorafleetError as exc:
        message = f"{mix.param}: {exc}"
        raise APIError(400, message, code="merge_failed", param=mix.param) from None


def _pick(state: ServerState, who: Principal, model: str, adapters, mask):
    """openai_adapter's look-ups: ((spec, label), None) for the base, an adapter or a MoLE,
    (None, mixture) for a mixture. Blocking: naming a directory entry re-checks it if its
    files changed (state.check_entry, which may load a MoLE or LoC model from disk)."""
    state.check_entry(model, who)  # a 400 for a MoLE (or other entry) that failed its check
    if state.moles is not None and model in state.moles and state.auth.can_use(who, model):
        if adapters is not None:
            raise bad("adapters", f"{model} is a MoLE; it takes no adapters field")
        try:
            return (state.moles.spec(model, mask or ()), model), None
        except LorafleetError as exc:
            raise bad("mask", str(exc)) from None
    if mask:
        raise bad("mask", f"mask drops experts of a MoLE model; {model} is not one")
    mix = from_openai(state, who, model, adapters)
    if mix is None:
        adapter = state.resolve(model, who)
        return (adapter, adapter or state.config.model_name), None
    return None, mix


async def openai_adapter(
    state: ServerState, who: Principal, model: str, adapters, mask: list[str] | None = None
):
    """(engine adapter spec, metrics label) of an OpenAI request: the base, an adapter, a
    mixture or a MoLE (its experts `mask`ed). The look-ups run on a worker thread, never on
    the event loop (they may read a directory entry from disk)."""
    picked, mix = await asyncio.to_thread(_pick, state, who, model, adapters, mask)
    if mix is None:
        return picked
    return await engine_spec(state, mix), mix.label


async def lorax_adapter(state: ServerState, who: Principal, params):
    """(engine adapter spec, metrics label) of a LoRAX request (adapter_id or merged_adapters)."""
    mix = await asyncio.to_thread(from_lorax, state, who, params)  # may re-check entries
    if mix is None:  # one adapter, the base, or a MoLE with its experts masked
        name = params.adapter_id or state.config.model_name
        return await openai_adapter(state, who, name, None, params.mask)
    if params.mask:
        raise bad("mask", "mask drops experts of a MoLE adapter_id, not of merged_adapters")
    return await engine_spec(state, mix), mix.label
