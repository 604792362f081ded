"""Restricted-label logits and per-row LoRA activations / output gradients, captured by hooks.

A classification example becomes a prompt plus one answer token per class (the first token of
each choice, as the model was trained to predict it); its logits f (C values) are the model's
next-token logits for those tokens at the last prompt position. The class probabilities
softmax(f) depend on f only through the C - 1 contrasts g_c = f_c - f_0 (softmax ignores a
shared shift), so curvature and uncertainty are taken over g: one backward pass per contrast
(one for a yes/no task, not two). For every LoRA Linear (lora_A, lora_B) the forward hooks keep
the input activations [B, T, d_in], and each backward pass gives the gradient of g_c w.r.t. the
Linear's output [B, T, d_out]; rows of a batch are independent, so these are per-example.
A LoRA on lm_head sees only the last prompt position (the head runs on it alone): its
activations and gradients come as [B, 1, d]. Its lora_B may be cut to the rows of the answer
tokens (`rows`): the only rows of the head the class logits depend on, as the official code's
`last_layer` head keeps them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lorafleet.adapters.methods import find_method
from lorafleet.data import Example, bos_to_add
from lorafleet.errors import LorafleetError

PARTS = ("A", "B")


@dataclass(frozen=True)
class ClassItem:
    """One example as token ids: the prompt, one answer token per class, the label (or None)."""

    ids: tuple[int, ...]
    classes: tuple[int, ...]
    label: int | None = None


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def class_item(
    tokenizer,
    prompt: str,
    choices: Sequence[str],
    label: int | None = None,
    *,
    max_length: int = 1024,
    bos: int | None = None,
    where: str = "",
) -> ClassItem:
    """Tokenise one prompt + choices as training saw them (BOS added, the prompt cut from the
    left past max_length). Choices must start with distinct tokens."""
    if not choices or len(choices) < 2:
        raise LorafleetError(f"{where or 'prompt'}: needs at least two choices")
    firsts = []
    for choice in choices:
        ids = _ids(tokenizer, choice)
        if not ids:
            raise LorafleetError(f"{where or 'prompt'}: choice {choice!r} has no tokens")
        firsts.append(ids[0])
    if len(set(firsts)) != len(firsts):
        raise LorafleetError(
            f"{where or 'prompt'}: choices {list(choices)} start with the same token; "
            "Laplace-LoRA scores each class by its first answer token"
        )
    ids = _ids(tokenizer, prompt)
    if bos is not None and ids[:1] != [bos]:
        ids = [bos, *ids]
    return ClassItem(tuple(ids[-max_length:]), tuple(firsts), label)


def class_items(
    tokenizer, examples: Sequence[Example], *, max_length: int = 1024, name: str = "data"
) -> list[ClassItem]:
    """ClassItems for a classification / multiple-choice data set; one-line errors otherwise."""
    if not examples:
        raise LorafleetError(f"{name}: no examples")
    bos = bos_to_add(tokenizer)
    items = []
    for ex in examples:
        if not ex.choices:
            raise LorafleetError(
                f"{name}: Laplace-LoRA needs classification data (examples with choices); "
                f"{ex.source or 'an example'} has none"
            )
        where = ex.source or name
        items.append(
            class_item(
                tokenizer,
                ex.prompt,
                ex.choices,
                ex.label,
                max_length=max_length,
                bos=bos,
                where=where,
            )
        )
    return items


def batches(items: Sequence[ClassItem], batch_size: int) -> Iterator[list[int]]:
    """Indices of items in batches that share a class count, in order."""
    by_count: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        by_count.setdefault(len(item.classes), []).append(i)
    for group in by_count.values():
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


def lora_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Module]:
    """The model's LoRA layers by module name; one-line error when it has none, or when its
    method's delta is not a plain s * B @ A (DoRA)."""
    from peft.tuners.lora import LoraLayer

    layers = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer) and adapter_name in getattr(m, "lora_A", {})
    }
    if not layers:
        raise LorafleetError(
            "the model has no LoRA layers: Laplace-LoRA needs a LoRA (or rsLoRA) adapter"
        )
    config = getattr(model, "peft_config", {}).get(adapter_name)
    method = find_method(config.to_dict()) if config is not None else None
    if method is not None and not method.factored:
        raise LorafleetError(
            f"{method.title} adapters are not supported by Laplace-LoRA: their delta is "
            f"{method.delta}, not s * B @ A"
        )
    for name, m in layers.items():
        if not isinstance(m.lora_A[adapter_name], nn.Linear):
            raise LorafleetError(f"{name}: only Linear LoRA layers are supported")
    return layers


def lora_weight(layer: nn.Module, part: str, adapter_name: str = "default") -> nn.Parameter:
    return (layer.lora_A if part == "A" else layer.lora_B)[adapter_name].weight


def head_name(model: nn.Module, layers: dict[str, nn.Module]) -> str | None:
    """The name of the LoRA layer that is the model's output embeddings (lm_head), if any."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    return next((name for name, layer in layers.items() if layer is head), None)


def subset_layers(
    model: nn.Module, subset: str = "all", adapter_name: str = "default"
) -> dict[str, nn.Module]:
    """The LoRA layers a posterior over `subset` (config.SUBSETS) covers: all of them, or
    ("last_layer") only the LoRA on lm_head; one-line error when there is none."""
    layers = lora_layers(model, adapter_name)
    if subset == "all":
        return layers
    if subset != "last_layer":
        raise LorafleetError(f"subset must be one of all, last_layer, got {subset!r}")
    head = head_name(model, layers)
    if head is None:
        raise LorafleetError(
            "subset 'last_layer' needs a LoRA on lm_head (train with targets including lm_head)"
        )
    return {head: layers[head]}


def answer_rows(items: Sequence[ClassItem]) -> torch.Tensor:
    """The answer tokens' ids every item shares ([C]): the rows of lm_head the class logits
    read; one-line error when items have different answer tokens."""
    classes = {it.classes for it in items}
    if len(classes) != 1:
        raise LorafleetError(
            "a LoRA on lm_head is cut to the answer tokens' rows, so every example needs "
            f"the same choices; found {len(classes)} different sets"
        )
    return torch.tensor(next(iter(classes)), dtype=torch.long)


def _pad(items: Sequence[ClassItem], pad: int):
    longest = max(len(it.ids) for it in items)
    ids = torch.full((len(items), longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, it in enumerate(items):
        ids[row, : len(it.ids)] = torch.tensor(it.ids)
        mask[row, : len(it.ids)] = 1
    classes = torch.tensor([it.classes for it in items], dtype=torch.long)  # [B, C]
    return ids, mask, classes


def class_logits(model: nn.Module, items: Sequence[ClassItem], pad: int = 0) -> torch.Tensor:
    """f [B, C]: next-token logits of each class token at the last prompt position."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ids, mask, classes = _pad(items, pad)
    device = next(model.parameters()).device
    # Right padding keeps positions as in training; causal attention keeps pads from mattering.
    hidden = base.get_decoder()(
        input_ids=ids.to(device), attention_mask=mask.to(device)
    ).last_hidden_state  # [B, T, h]
    last = mask.sum(1) - 1  # [B]
    h = hidden[torch.arange(len(items), device=device), last.to(device)]  # [B, h]
    logits = base.get_output_embeddings()(h).float()  # [B, V]: only B rows, not B x T
    cap = getattr(base.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.gather(1, classes.to(device))


@dataclass
class Captured:
    """One batch: logits f [B, C], the prompt mask [B, T], and per LoRA Linear (module, part)
    its input activations [B, T, d_in] and the gradients of each contrast g_c = f_c - f_0
    (c = 1..C-1) w.r.t. its output [C-1, B, T, d_out] (None unless gradients were asked for)."""

    f: torch.Tensor
    mask: torch.Tensor
    acts: dict[tuple[str, str], torch.Tensor]
    grads: dict[tuple[str, str], torch.Tensor] | None

    def positions(self, key: tuple[str, str]) -> torch.Tensor:
        """The mask [B, T] of the positions `key`'s Linear saw: the prompt's, or ones [B, 1]
        for the head's single (last) position."""
        T = self.acts[key].shape[1]
        return self.mask if self.mask.shape[1] == T else torch.ones(self.mask.shape[0], T)


@contextmanager
def _hooks(layers: dict[str, nn.Module], adapter_name: str, store: dict, keep_output: bool):
    handles, flags = [], []
    for name, layer in layers.items():
        for part in PARTS:
            linear = (layer.lora_A if part == "A" else layer.lora_B)[adapter_name]

            def hook(module, inputs, output, key=(name, part)):
                store[key] = (inputs[0].detach(), output if keep_output else None)

            handles.append(linear.register_forward_hook(hook))
            if keep_output:
                flags.append((linear.weight, linear.weight.requires_grad))
                linear.weight.requires_grad_(True)  # so the outputs are in the graph
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for weight, flag in flags:
            weight.requires_grad_(flag)


def capture(
    model: nn.Module,
    layers: dict[str, nn.Module],
    items: Sequence[ClassItem],
    *,
    with_grads: bool = True,
    adapter_name: str = "default",
    pad: int = 0,
    rows: Mapping[str, torch.Tensor] | None = None,
) -> Captured:
    """Forward the batch (and one backward pass per contrast when `with_grads`), with hooks;
    `rows` {module: row ids}: that module's lora_B output gradients cut to those rows."""
    rows = rows or {}
    store: dict = {}
    _, mask, _ = _pad(items, pad)
    # The server may call this under inference_mode; gradients need it switched off here.
    with torch.inference_mode(False), torch.enable_grad() if with_grads else torch.no_grad():
        with _hooks(layers, adapter_name, store, keep_output=with_grads):
            f = class_logits(model, items, pad)
        acts = {key: _positions(act).float().cpu() for key, (act, _) in store.items()}
        if not with_grads:
            return Captured(f.detach().cpu(), mask, acts, None)
        keys = list(store)
        outputs = [store[k][1] for k in keys]
        per_class: list[list[torch.Tensor]] = []
        for c in range(1, f.shape[1]):
            gs = torch.autograd.grad(
                (f[:, c] - f[:, 0]).sum(),
                outputs,
                retain_graph=c + 1 < f.shape[1],
                allow_unused=True,
            )
            per_class.append(
                [torch.zeros_like(o) if g is None else g for g, o in zip(gs, outputs, strict=True)]
            )
    grads = {}
    for i, (name, part) in enumerate(keys):
        g = torch.stack([_positions(pc[i]) for pc in per_class])  # [C-1, B, T, d_out]
        if part == "B" and name in rows:
            g = g.index_select(-1, rows[name].to(g.device))  # [C-1, B, T, len(rows)]
        grads[(name, part)] = g.float().cpu()
    return Captured(f.detach().float().cpu(), mask, acts, grads)


def _positions(t: torch.Tensor) -> torch.Tensor:
    """[B, d] (the head's single position) -> [B, 1, d]; [B, T, d] as is."""
    return t.unsqueeze(1) if t.dim() == 2 else t


def jacobian(cap: Captured, key: tuple[str, str]) -> torch.Tensor:
    """d g_c / d W for every row and contrast: [B, C-1, d_out, d_in] (sum over positions)."""
    return torch.einsum("cbto,bti->bcoi", cap.grads[key], cap.acts[key])
