"""Helpers for the Laplace-LoRA tests: a tiny LoRA model, random class items, dense oracles."""

from __future__ import annotations

import torch
from helpers import randomize_adapter
from torch.func import functional_call, jacrev

from lorafleet.adapters import MethodConfig, new_adapter
from lorafleet.bayes.capture import ClassItem, lora_layers
from lorafleet.bayes.posterior import orient
from lorafleet.models.tiny import tiny_llama

VOCAB = 512  # a small vocabulary keeps the tiny model's head cheap; token ids are drawn below it


def tiny_lora(seed: int = 0, rank: int = 4, targets=("q_proj", "v_proj"), scale: float = 0.3):
    """A tiny Llama with a random (non-zero) LoRA on `targets`, in eval mode."""
    model = new_adapter(
        tiny_llama(seed, vocab_size=VOCAB),
        MethodConfig(rank=rank, alpha=2 * rank, targets=list(targets)),
    )
    randomize_adapter(model, seed=seed + 7, scale=scale)
    return model.eval()


def random_items(n: int, *, seed: int = 0, classes: int = 2, min_len: int = 3, max_len: int = 8):
    """n ClassItems with random prompts of varied length, distinct class tokens, random labels."""
    gen = torch.Generator().manual_seed(seed)
    class_ids = tuple(range(10, 10 + classes))
    items = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        ids = torch.randint(20, VOCAB, (length,), generator=gen).tolist()
        label = int(torch.randint(0, classes, (1,), generator=gen))
        items.append(ClassItem(tuple(ids), class_ids, label))
    return items


def block_params(model) -> list[tuple[str, str, str]]:
    """(module, part, parameter name) for every LoRA block, in lora_layers order."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for module, layer in lora_layers(model).items():
        for part in ("A", "B"):
            w = (layer.lora_A if part == "A" else layer.lora_B)["default"].weight
            out.append((module, part, names[id(w)]))
    return out


def exact_jacobians(model, item: ClassItem) -> dict[tuple[str, str], torch.Tensor]:
    """d f / d W by torch.func through the model's own forward (no hooks): per block the
    oriented Jacobian flattened row-major, [C, r*d]."""
    blocks = block_params(model)
    params = {name: dict(model.named_parameters())[name].detach() for _, _, name in blocks}
    ids = torch.tensor([item.ids])
    classes = torch.tensor(item.classes)

    def f(p):
        logits = functional_call(model, p, args=(), kwargs={"input_ids": ids}).logits
        return logits[0, -1, classes]

    jac = jacrev(f)(params)  # name -> [C, *W.shape]
    return {(m, part): orient(part, jac[name]).flatten(1) for m, part, name in blocks}


def dense_ggn(model, items) -> tuple[torch.Tensor, list[tuple[str, str]], list[int]]:
    """The exact generalised Gauss-Newton sum_n J_n^T Lambda_n J_n over all LoRA weights
    (oriented blocks, row-major), with the block order and sizes."""
    rows = []
    for item in items:
        jac = exact_jacobians(model, item)
        J = torch.cat(list(jac.values()), dim=1).double()  # [C, P]
        logits = _logits(model, item)
        p = torch.softmax(logits.double(), -1)
        lam = torch.diag(p) - torch.outer(p, p)
        rows.append(J.T @ lam @ J)
    keys = list(exact_jacobians(model, items[0]))
    sizes = [v.shape[1] for v in exact_jacobians(model, items[0]).values()]
    return sum(rows), keys, sizes


@torch.no_grad()
def _logits(model, item: ClassItem) -> torch.Tensor:
    return model(input_ids=torch.tensor([item.ids])).logits[0, -1, torch.tensor(item.classes)]
