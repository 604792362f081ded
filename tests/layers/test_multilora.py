"""The batched multi-adapter LoRA op and layer: both paths vs a per-row reference, PEFT parity."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import randomize_adapter
from peft import LoraConfig, MissConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

from lorafleet.adapters import adapter_from_model, attach, read_adapter, write_adapter
from lorafleet.layers import (
    MultiLoRAContext,
    MultiLoRAError,
    MultiLoRALinear,
    choose_path,
    inject_multilora,
    lora_delta,
    lora_delta_gathered,
    lora_delta_segmented,
    plan_rows,
)
from lorafleet.layers.multilora import buckets_rows
from lorafleet.models.tiny import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PATHS = {"segmented": lora_delta_segmented, "gathered": lora_delta_gathered, "auto": lora_delta}


def _stack(ranks, d_in=12, d_out=10, dtype=torch.float64, seed=0, transposed=True):
    """Slots 0..len(ranks): slot 0 zeros, slot s holds a rank ranks[s-1] adapter padded to max."""
    gen = torch.Generator().manual_seed(seed)
    r_max, slots = max(ranks), len(ranks) + 1
    A = torch.zeros(slots, r_max, d_in, dtype=dtype)
    Bt = torch.zeros(slots, r_max, d_out, dtype=dtype)
    for s, r in enumerate(ranks, start=1):
        A[s, :r] = torch.randn(r, d_in, generator=gen, dtype=dtype)
        Bt[s, :r] = torch.randn(r, d_out, generator=gen, dtype=dtype)
    scale = torch.rand(slots, generator=gen, dtype=dtype) + 0.5
    # The module's layout (a transposed view) and a plain contiguous one must agree.
    B = Bt.transpose(1, 2) if transposed else Bt.transpose(1, 2).contiguous()
    return A, B, scale


def _reference(x, A, B, scale, idx):
    out = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype)
    for i, s in enumerate(idx.tolist()):
        out[i] = scale[s] * (x[i] @ A[s].T) @ B[s].T
    return out


IDX = {
    "mixed": [0, 1, 2, 3, 1, 0, 2, 2, 3],
    "repeated": [2, 2, 2, 2, 2, 2],
    "unsorted-no-zero": [3, 1, 2, 1],
    "sorted-no-zero": [1, 1, 2, 3, 3],
    "one-row": [2],
    "one-zero-row": [0],
    "all-zero": [0, 0, 0],
    "empty": [],
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", list(IDX))
@pytest.mark.parametrize("transposed", [True, False])
def test_paths_match_per_row_reference(path, case, transposed):
    A, B, scale = _stack([4, 1, 3], transposed=transposed)  # mixed ranks, padded to 4
    idx = torch.tensor(IDX[case], dtype=torch.long)
    x = torch.randn(len(idx), A.shape[2], dtype=torch.float64)
    got = PATHS[path](x, A, B, scale, idx)
    assert got.shape == (len(idx), B.shape[1])
    torch.testing.assert_close(got, _reference(x, A, B, scale, idx), atol=1e-12, rtol=0)
    assert (got[idx == 0] == 0).all()


@pytest.mark.parametrize(
    "idx, contiguous, padded, identity",
    [
        ([1, 1, 2, 2, 3, 3], True, False, True),  # grouped in place, full groups: pure views
        ([3, 1, 2, 1, 2, 3], True, False, False),  # full groups, rows gathered
        ([1, 2, 2, 2, 3, 0], True, True, False),  # uneven groups: padded and masked
        ([1, 3, 3, 1], False, False, False),  # slots 1 and 3: weights index-selected
        ([0, 3, 1, 3, 3, 0, 1], False, True, False),
    ],
)
def test_gathered_group_layout_cases(idx, contiguous, padded, identity):
    A, B, scale = _stack([4, 1, 3])
    idx = torch.tensor(idx)
    lay = plan_rows(idx, "gathered").groups
    assert (lay.weights is not None) == contiguous
    assert (lay.pad is not None) == padded
    assert lay.identity == identity
    x = torch.randn(len(idx), A.shape[2], dtype=torch.float64)
    got = lora_delta_gathered(x, A, B, scale, idx)
    torch.testing.assert_close(got, _reference(x, A, B, scale, idx), atol=1e-12, rtol=0)


def test_paths_float32_and_scale_folded_into_b():
    A, B, scale = _stack([8, 2, 5, 8], d_in=64, d_out=48, dtype=torch.float32)
    A = A / 8  # unit-sized outputs, as in a model, so an absolute tolerance means something
    idx = torch.tensor([4, 0, 1, 1, 3, 2, 4, 0, 3, 3, 3, 3])
    x = torch.randn(len(idx), 64, generator=torch.Generator().manual_seed(3))
    expected = _reference(x.double(), A.double(), B.double(), scale.double(), idx).float()
    folded = B * scale[:, None, None]  # scale=None: already in B, as MultiLoRALinear stores it
    for fn in PATHS.values():
        torch.testing.assert_close(fn(x, A, B, scale, idx), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fn(x, A, folded, None, idx), expected, atol=1e-5, rtol=1e-5)


def test_dispatcher_picks_documented_path():
    assert choose_path(0, 0) == "none"
    assert choose_path(16, 16) == "gathered"  # decode: one row per adapter
    assert choose_path(16, 8) == "gathered"
    assert choose_path(16, 4) == "gathered"
    assert choose_path(64, 2) == "segmented"
    assert choose_path(16, 1) == "gathered"
    assert choose_path(1024, 16) == "segmented"  # prefill: 16 sequences x 64 tokens
    assert plan_rows(torch.arange(1, 17)).path == "gathered"
    assert plan_rows(torch.arange(1, 17).repeat_interleave(64)).path == "segmented"
    assert plan_rows(torch.zeros(5, dtype=torch.long)).path == "none"
    # Slot-0 rows do not count as rows needing work, and are left out of every segment.
    plan = plan_rows(torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 2, 1]))
    assert plan.path == "gathered"
    assert plan.segments == ((1, 0, 1), (2, 1, 2))
    assert plan.rows.tolist() == [9, 8]
    assert plan_rows(torch.tensor([1, 1, 2]), path="gathered").path == "gathered"
    with pytest.raises(ValueError, match="unknown path"):
        plan_rows(torch.tensor([1]), path="bogus")


def _layer(max_slots=3, max_rank=4):
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10)
    return base, MultiLoRALinear(base, MultiLoRAContext(), max_slots, max_rank)


def test_layer_equals_base_exactly_without_adapters():
    base, layer = _layer()
    assert layer.base_layer is base  # shared, not copied
    x = torch.randn(2, 5, 12)
    expected = base(x)
    assert torch.equal(layer(x), expected)  # no context set
    gen = torch.Generator().manual_seed(1)
    layer.set_slot(1, torch.randn(3, 12, generator=gen), torch.randn(10, 3, generator=gen), 2.0)
    assert torch.equal(layer(x), expected)  # a slot loaded, but no map set
    layer.context.set_slots(torch.zeros(2, 5, dtype=torch.long))
    assert torch.equal(layer(x), expected)  # every row on slot 0
    layer.context.set_slots([0, 0])  # one slot per sequence
    assert torch.equal(layer(x), expected)


def test_context_is_active_only_while_rows_may_use_an_adapter():
    base, layer = _layer()
    gen = torch.Generator().manual_seed(1)
    layer.set_slot(1, torch.randn(3, 12, generator=gen), torch.randn(10, 3, generator=gen), 2.0)
    x = torch.randn(2, 12)
    context = layer.context
    assert not context.active  # nothing set: every layer returns its base product at once
    context.set_slots([1, 0])
    assert context.active and not torch.equal(layer(x), base(x))
    context.clear()
    assert not context.active and torch.equal(layer(x), base(x))


@pytest.mark.parametrize("path", [None, "segmented", "gathered"])
def test_layer_adds_each_rows_adapter(path):
    base, layer = _layer()
    layer.context.path = path
    gen = torch.Generator().manual_seed(2)
    weights = {1: (4, 0.5), 2: (2, 3.0), 3: (1, 1.0)}
    for slot, (r, scale) in weights.items():
        A, B = torch.randn(r, 12, generator=gen), torch.randn(10, r, generator=gen)
        layer.set_slot(slot, A, B, scale)
        weights[slot] = (A, B, scale)
    layer.set_slot(3, *weights[3])  # reloading a slot overwrites it in place
    x = torch.randn(3, 4, 12)
    slots = torch.tensor([[0, 1, 2, 1], [3, 3, 3, 3], [2, 0, 1, 1]])
    layer.context.set_slots(slots)
    expected = base(x)
    for b, t in torch.cartesian_prod(torch.arange(3), torch.arange(4)).tolist():
        s = int(slots[b, t])
        if s:
            A, B, scale = weights[s]
            expected[b, t] += scale * (x[b, t] @ A.T) @ B.T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        layer.context.set_slots([2, 0, 1])  # per sequence = the same slot on every token
        per_token = layer.context.row_slots.repeat_interleave(4).reshape(3, 4)
        got = layer(x)
        layer.context.set_slots(per_token)
        torch.testing.assert_close(got, layer(x), atol=0, rtol=0)
        with pytest.raises(ValueError, match="row_slots has 5 entries"):
            layer.context.set_slots([1, 2, 3, 1, 2])
            layer(x)
        with pytest.raises(ValueError, match="slot 4 is out of range: this layer has 0..3"):
            layer.context.set_slots([1, 4, 0])
            layer(x)
        with pytest.raises(ValueError, match="slot indices must be >= 0"):
            layer.context.set_slots([1, -1, 0])
            layer(x)


def _peft_adapter(tokenizer, config, seed, where=None):
    """A PEFT adapter with random weights, exported (and, given `where`, written and read back
    as a server would load it: in memory the config holds PEFT's enums, on disk strings)."""
    peft_model = get_peft_model(tiny_llama(0, vocab_size=len(tokenizer)), config)
    randomize_adapter(peft_model, seed=seed, scale=0.2)
    adapter = adapter_from_model(peft_model)
    return adapter if where is None else read_adapter(write_adapter(where, adapter))


@pytest.fixture(scope="module")
def adapters(tokenizer, tmp_path_factory):
    """lora r=4; rslora r=8; lora r=2 on attention only, with rank and alpha patterns."""
    configs = [
        LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"),
        LoraConfig(
            r=8, lora_alpha=16, use_rslora=True, target_modules=TARGETS, task_type="CAUSAL_LM"
        ),
        LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            rank_pattern={"layers.1.self_attn.q_proj": 6},
            alpha_pattern={"v_proj": 3},
            task_type="CAUSAL_LM",
        ),
    ]
    root = tmp_path_factory.mktemp("adapters")
    return [_peft_adapter(tokenizer, c, 10 + i, root / str(i)) for i, c in enumerate(configs)]


def _batch(tokenizer, prompts):
    """Right-padded input_ids and attention_mask."""
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(map(len, encoded))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 2
    ids = torch.tensor([e + [pad] * (width - len(e)) for e in encoded])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded])
    return ids, mask


@torch.no_grad()
def test_mixed_batch_matches_peft_per_adapter(tokenizer, adapters):
    model = tiny_llama(0, vocab_size=len(tokenizer))
    handle = inject_multilora(model, max_slots=3, max_rank=8)
    assert len(handle.layers) == 2 * len(TARGETS)
    assert handle.layers["model.layers.1.self_attn.q_proj"].lora_A.shape == (4, 8, 64)
    for slot, adapter in enumerate(adapters, start=1):
        handle.load_slot(slot, adapter)
    assert handle.layers["model.layers.1.self_attn.q_proj"].ranks == [0, 4, 8, 6]
    assert handle.layers["model.layers.0.mlp.up_proj"].ranks == [0, 4, 8, 0]

    prompts = [
        "The film was a delight.",
        "Tell me a joke about cats and dogs please",
        "Hi",
        "The film was a delight.",
        "Two plus two is",
    ]
    ids, mask = _batch(tokenizer, prompts)
    row_slots = [0, 1, 2, 3, 1]
    references = {0: tiny_llama(0, vocab_size=len(tokenizer))}
    for slot, adapter in enumerate(adapters, start=1):
        references[slot] = attach(tiny_llama(0, vocab_size=len(tokenizer)), adapter)
    expected = {s: m(input_ids=ids, attention_mask=mask).logits for s, m in references.items()}
    # Row i of the batch against row i of the run through its own adapter, on real tokens.
    want = torch.stack([expected[slot][row] for row, slot in enumerate(row_slots)])
    real = mask.bool()
    for path in (None, "segmented", "gathered"):
        handle.context.path = path
        with handle.slots(row_slots):
            got = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0, msg=str(path))
    # The adapters differ from the base and from each other (the test is not vacuous).
    for slot in (1, 2, 3):
        assert (expected[slot][0] - expected[0][0]).abs().max() > 1e-2
    # Without a map, and after clearing a slot, the model is the base again.
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected[0])
    handle.clear_slot(2)
    with handle.slots([2] * 5):
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected[0])
    assert isinstance(handle.remove().model.layers[0].self_attn.q_proj, torch.nn.Linear)


def _assert_refused(handle, slot, adapter, match):
    before = handle.layers[next(iter(handle.layers))].lora_A.clone()
    with pytest.raises(MultiLoRAError, match=match) as err:
        handle.load_slot(slot, adapter)
    assert "\n" not in str(err.value)
    assert torch.equal(handle.layers[next(iter(handle.layers))].lora_A, before)  # untouched


def test_refusals(tokenizer, adapters):
    handle = inject_multilora(tiny_llama(0, vocab_size=len(tokenizer)), max_slots=2, max_rank=4)
    handle.load_slot(1, adapters[0])
    # DoRA, Bone and Bat are served (tests/serve/test_serve_methods.py); other PEFT types not.
    miss = _peft_adapter(tokenizer, MissConfig(r=4, target_modules=["q_proj"]), seed=1)
    loha = copy.copy(miss)
    loha.config = {**miss.config, "peft_type": "LOHA"}
    _assert_refused(handle, 2, loha, "peft_type LOHA cannot be served batched")
    big_bone = _peft_adapter(tokenizer, MissConfig(r=8, target_modules=["q_proj"]), seed=1)
    _assert_refused(handle, 2, big_bone, "rank 8 .* above this model's max_rank 4")
    _assert_refused(handle, 2, adapters[1], "rank 8 .* above this model's max_rank 4")
    _assert_refused(handle, 3, adapters[0], "slot 3 is out of range: use 1..2")
    _assert_refused(handle, 0, adapters[0], "slot 0 is out of range")
    saved = copy.copy(adapters[0])
    saved.config = {**adapters[0].config, "modules_to_save": ["lm_head"]}
    _assert_refused(handle, 2, saved, "modules_to_save")
    only_q = inject_multilora(tiny_llama(0, vocab_size=len(tokenizer)), ["q_proj"], 2, 4)
    not_injected = "targets model.layers.0.mlp.down_proj, which is not a multi-LoRA layer"
    _assert_refused(only_q, 1, adapters[0], not_injected)
    with pytest.raises(MultiLoRAError, match="already has multi-LoRA layers"):
        inject_multilora(only_q.model)
    with pytest.raises(MultiLoRAError, match="targets the model lacks: nope"):
        inject_multilora(tiny_llama(0, vocab_size=len(tokenizer)), ["q_proj", "nope"])


class RowCounts(TorchDispatchMode):
    """Records the row counts of the bfloat16 matrix products it sees (mm, addmm, bmm, ...):
    the first operand's second-to-last dimension."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        name = func.__name__
        if name.split(".")[0].lstrip("_") in (
            "mm",
            "addmm",
            "addmm_",
            "bmm",
            "baddbmm",
            "baddbmm_",
        ):
            operand = args[1] if name.startswith(("addmm", "baddbmm")) else first
            if operand is not None and operand.dtype == torch.bfloat16:
                self.rows.append(operand.shape[-2])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", ["segmented", "gathered"])
def test_bfloat16_cpu_products_run_on_few_row_counts(path):
    """bfloat16 on the CPU (where oneDNN keeps memory for every row count it meets): the
    segmented path pads each product to a multiple of 16 rows, at most 256 per product, the
    gathered path each group to 1, 2, 4, 8, 16 rows or a multiple of 16; the results are the
    unpadded rows' (against float64 on the same bfloat16 inputs)."""
    A, B, scale = _stack([8, 4, 8], d_in=32, d_out=24, dtype=torch.float32)
    A, B, scale = (A / 4).bfloat16(), B.bfloat16(), scale.bfloat16()
    gen = torch.Generator().manual_seed(0)
    cases = [(n, False) for n in (1, 3, 17, 40, 300)] + [(n, True) for n in (3, 40, 300)]
    for per_slot, grouped in cases:
        if grouped:  # rows already grouped by slot, none on the base: added in place
            idx = torch.tensor([1, 2, 3]).repeat_interleave(per_slot)
        else:  # scattered rows and base rows: through the grouped buffer
            idx = torch.tensor([0, 1, 2, 3] * per_slot)
            idx = idx[torch.randperm(len(idx), generator=gen)]
        x = torch.randn(len(idx), 32, generator=gen).bfloat16()
        with RowCounts() as seen:
            got = PATHS[path](x, A, B, scale, idx)
        want = _reference(x.double(), A.double(), B.double(), scale.double(), idx)
        assert (got.double() - want).abs().max() <= 0.02 * want.abs().max()
        if path == "segmented":
            assert seen.rows and all(r % 16 == 0 and r <= 256 for r in seen.rows), seen.rows
        else:
            assert seen.rows and all(r in (1, 2, 4, 8, 16) or r % 16 == 0 for r in seen.rows)


def test_float32_products_are_not_padded():
    A, B, scale = _stack([8, 4], d_in=32, d_out=24, dtype=torch.float32)
    idx = torch.tensor([1] * 40 + [2] * 33)
    x = torch.randn(len(idx), 32)
    assert not buckets_rows(x) and buckets_rows(x.bfloat16())
    torch.testing.assert_close(
        lora_delta_segmented(x, A, B, scale, idx), _reference(x, A, B, scale, idx)
    )
