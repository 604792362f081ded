"""The MoLE reference for tests: base + per-layer gates + PEFT's own expert deltas, by hooks."""

from __future__ import annotations

import torch
from compose_helpers import peft_deltas, tiny

from lorafleet.compose.mole import read_experts
from lorafleet.layers.mole import gate_probs


def reference_logits(tokenizer, specs, gates, input_ids, keep=None):
    with torch.no_grad():
        return reference_model(tokenizer, specs, gates, keep)(input_ids=input_ids).logits


def reference_model(tokenizer, specs, gates, keep=None):
    """The tiny Llama computing base + sum_k g_k s_k B_k A_k x per layer, the deltas from
    PEFT's own layers, with plain forward hooks (no multi-LoRA op). g per linear (linear,
    input) or per block (block: computed at the block's first gated layer from its experts'
    outputs, reused by the block's other layers)."""
    model = tiny(tokenizer)
    adapters = [a.adapter for a in read_experts(specs)]
    deltas = [peft_deltas(tokenizer, a) for a in adapters]  # weight name -> [d_out, d_in]
    names = [n for ls in gates.blocks.values() for n in ls]
    block_g = {}

    def hook(name):
        unit = gates.unit_of[name]

        def fn(module, args, y):
            x = args[0]
            d = torch.stack(
                [
                    (
                        x.double() @ dk[name + ".weight"].T
                        if name + ".weight" in dk
                        else torch.zeros_like(y, dtype=torch.float64)
                    )
                    for dk in deltas
                ],
                dim=-2,
            )  # [..., K, d_out]
            flat_x, flat_d = x.reshape(-1, x.shape[-1]), d.reshape(-1, *d.shape[-2:])
            if gates.variant == "block" and name != gates.anchor[unit]:
                g = block_g[unit]
            else:
                feats = flat_d.reshape(flat_d.shape[0], -1) if gates.variant != "input" else flat_x
                feats = torch.nn.functional.normalize(feats.double(), dim=-1)
                W = gates.weight[unit.replace(".", "__")].detach().double()
                tau = gates.tau(unit)
                tau = tau.detach().double() if torch.is_tensor(tau) else tau
                g = gate_probs(feats @ W.T, tau, keep)  # [n, K]
                block_g[unit] = g
            mix = (g[:, :, None] * flat_d).sum(1).reshape(y.shape)
            return (y.double() + mix).to(y.dtype)

        return fn

    mods = dict(model.named_modules())
    for name in names:
        mods[name].register_forward_hook(hook(name))
    return model
