"""The decode step's shortcuts: RoPE in four ops (q and k in one pass), decode attention by SDPA
over grouped query heads (no mask for rows of one length), equal to the plain forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from serve_helpers import record_rows, tiny_base

from lorafleet.serve import Engine, SamplingParams
from lorafleet.serve.runners.base import apply_rotary, sdpa_decode_attention
from lorafleet.serve.runners.llama import adjacent_heads, rotate, rotate_qk, signed_sin


def tables(rows: int, dim: int, dtype):
    pos = torch.arange(rows, dtype=torch.float32)[:, None] + 3
    freqs = pos / (10000 ** (torch.arange(0, dim, 2) / dim))  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
def test_rotate_is_apply_rotary_bit_for_bit(dtype, rows):
    cos, sin = tables(rows, 16, dtype)
    x = torch.randn(rows, 6, 16).to(dtype)
    assert torch.equal(rotate(x, cos, signed_sin(sin, 16)), apply_rotary(x, cos, sin))
    assert signed_sin(sin[..., :8], 16) is None  # partial rotary: apply_rotary's slicing


@pytest.mark.parametrize("rows", [1, 4])
def test_q_and_k_of_one_fused_gemm_rotate_in_one_pass(rows):
    heads, kv_heads, dim = 6, 2, 16
    y = torch.randn(rows, (heads + 2 * kv_heads) * dim)  # [q | k | v], one GEMM's output
    q, k, v = y.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k = q.view(rows, heads, dim), k.view(rows, kv_heads, dim)
    joint = adjacent_heads(q, k)
    assert joint is not None and joint.shape == (rows, heads + kv_heads, dim)
    assert adjacent_heads(q, v.view(rows, kv_heads, dim)) is None  # v does not follow q
    assert adjacent_heads(q.clone(), k.clone()) is None  # separate storages
    cos, sin = tables(rows, dim, torch.float32)
    got_q, got_k = rotate_qk(q, k, cos, signed_sin(sin, dim))
    assert torch.equal(got_q, apply_rotary(q, cos, sin))
    assert torch.equal(got_k, apply_rotary(k, cos, sin))


def reference(q, k, v, mask, scale):
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True
    )
    return o.squeeze(2)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (8, 1)])
def test_sdpa_decode_attention_equals_sdpa_per_head(dtype, tol, heads, kv_heads):
    g = torch.Generator().manual_seed(heads)
    cache = torch.randn(6, kv_heads, 20, 16, generator=g).to(dtype)
    k, v = cache[1:4, :, :12], cache[2:5, :, 3:15]  # strided views, as of the cache
    q = torch.randn(3, heads, 16, generator=g).to(dtype)
    ragged = torch.arange(12)[None, :] < torch.tensor([[12], [5], [9]])
    every = torch.ones(3, 12, dtype=torch.bool)
    for mask, given in ((ragged, ragged), (every, None)):
        got = sdpa_decode_attention(q, k, v, given, 0.25)
        want = reference(q.float(), k.float(), v.float(), mask, 0.25)
        assert got.dtype == dtype and got.shape == (3, heads, 16)
        assert (got.float() - want).abs().max() < tol


def test_bfloat16_single_rows_and_batches_give_the_same_tokens(tokenizer):
    """bfloat16 decode rows take the grouped-heads SDPA: one row alone (no mask) and a ragged
    batch (masked) agree with each other."""
    base = tiny_base(tokenizer)
    engine = Engine(base, max_slots=0, max_batch_size=4, dtype="bfloat16")
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [[5, 9, 13, 2], [7, 7, 1], [3, 4, 5, 6, 8, 10], [11]]
    alone = [engine.generate([(p, None, params)])[0].token_ids for p in prompts]
    batched = [o.token_ids for o in engine.generate([(p, None, params) for p in prompts])]
    assert batched == alone


@pytest.mark.parametrize("dtype, quantize", [("bfloat16", None), ("float32", "int4")])
def test_plain_blocks_give_the_modules_results_bit_for_bit(tokenizer, dtype, quantize):
    """With no adapter row, o_proj and the MLP run as direct calls on the base layers (plain
    or quantised linears): the logits equal those of the modules' path exactly (prefill and
    decode)."""
    from lorafleet.serve import Sequence

    engine = Engine(
        tiny_base(tokenizer), max_slots=1, max_batch_size=1, dtype=dtype, quantize=quantize
    )
    runner = engine.runner
    assert all(p is not None for p in runner.plain)

    def step_logits() -> list[torch.Tensor]:
        s = Sequence(0, [5, 9, 13, 2, 7], None, SamplingParams())
        s.kv_slot, s.lora_slot = 0, 0
        first = engine.forward([s], [])  # prefill
        s.num_cached = s.num_tokens
        s.generated.append(int(first[0].argmax()))
        return [first, engine.forward([], [s])]  # and one decode step

    fast = step_logits()
    runner.plain = [None] * len(runner.plain)  # the modules' path
    runner.stackable = False  # (kernels.decode_stack computes plain blocks only)
    slow = step_logits()
    assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))


def test_quantised_blocks_are_plain_too(tokenizer):
    from lorafleet.layers import QuantLinear

    engine = Engine(tiny_base(tokenizer), max_slots=0, max_batch_size=1, quantize="int8")
    assert all(isinstance(p[0], QuantLinear) for p in engine.runner.plain)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_through_lorafleets_gemv_matches_torchs_kernels(tokenizer, monkeypatch, dtype):
    """Decode rows' base linears and head run lorafleet's GEMV (kernels/): the same greedy
    tokens as with torch's kernels ($LORAFLEET_KERNELS=0), and the GEMV really ran."""
    from lorafleet import kernels
    from lorafleet.kernels import build

    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = [[5, 9, 13, 2], [7, 7, 1], [3, 4, 5, 6, 8, 10]]

    def tokens() -> list[list[int]]:
        kernels.reset()
        engine = Engine(tiny_base(tokenizer), max_slots=0, max_batch_size=3, dtype=dtype)
        return [o.token_ids for o in engine.generate([(p, None, params) for p in prompts])]

    calls = []
    real = kernels.linear

    def counted(x, weight, bias=None):
        calls.append(kernels.covers(x, weight))
        return real(x, weight, bias)

    monkeypatch.setattr(kernels, "linear", counted)
    ours = tokens()
    assert kernels.available() and sum(calls) > 0  # decode rows took the GEMV
    monkeypatch.setenv(build.ENV_SWITCH, "0")
    theirs = tokens()
    kernels.reset()
    assert ours == theirs


def test_gate_and_up_share_one_product_where_the_gemv_runs(tokenizer):
    """Float gate/up of a plain block: one fused product for few rows (lorafleet's GEMV), two
    GEMMs above; the tokens equal an engine that fuses nothing."""
    engine = Engine(tiny_base(tokenizer), max_slots=0, max_batch_size=3, dtype="float32")
    runner = engine.runner
    assert all(g is not None and g.fused and g.quantised is None for g in runner.gate_up)
    width = runner.gate_up[0].weight.shape[1]
    assert runner.gate_up[0].gemv(torch.randn(2, width))
    assert not runner.gate_up[0].gemv(torch.randn(40, width))  # MKL's two GEMMs instead
    unfused = Engine(tiny_base(tokenizer), max_slots=0, max_batch_size=3, fuse=False)
    assert all(g is None for g in unfused.runner.gate_up)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [[5, 9, 13, 2], [7, 7, 1], [3, 4, 5, 6, 8, 10]]
    fused = [o.token_ids for o in engine.generate([(p, None, params) for p in prompts])]
    plain = [o.token_ids for o in unfused.generate([(p, None, params) for p in prompts])]
    assert fused == plain


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_adapter_rows_take_the_blocks_fused_gate_up_product(
    tokenizer, adapters, monkeypatch, dtype
):
    """Steps with rows on adapters (prefills and decodes) compute gate and up as the block's
    one fused base product plus each module's adapter terms, never as products of gate's and
    up's own weights (views of the fused one that no kernel packs); float32 tokens equal an
    engine that fuses nothing."""
    from lorafleet import kernels

    engine = Engine(tiny_base(tokenizer), max_slots=2, max_rank=8, max_batch_size=3, dtype=dtype)
    unfused = Engine(
        tiny_base(tokenizer), max_slots=2, max_rank=8, max_batch_size=3, dtype=dtype, fuse=False
    )
    for each in (engine, unfused):
        each.load_adapter("lora4", adapters["lora4"])
    parts = {id(m.weight) for _, gate, up, _ in engine.runner.plain for m in (gate, up)}
    products, linear = [], kernels.linear
    monkeypatch.setattr(
        kernels, "linear", lambda x, w, b=None: products.append(id(w)) or linear(x, w, b)
    )
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    prompts = [([5, 9, 13, 2] * 10, "lora4"), ([7, 7, 1], None), ([3, 4, 5, 6, 8, 10], "lora4")]
    requests = [(p, name, params) for p, name in prompts]
    got = [o.token_ids for o in engine.generate(requests)]
    assert products and not parts & set(products)
    want = [o.token_ids for o in unfused.generate(requests)]
    if dtype == "float32":
        assert got == want


def test_decode_only_steps_take_the_decode_layer_kernels(
    tokenizer, adapters, prompt_ids, monkeypatch
):
    """With the kernels built, a decode-only step (rows on adapters and on the base together,
    KV slots in and out of order) calls kernels.decode_attention once per layer, and every
    row's logits equal transformers + PEFT's to 1e-5 (float32); a step with a prefill row
    takes the torch path."""
    from serve_helpers import RunnerCheck

    from lorafleet import kernels
    from lorafleet.adapters import attach
    from lorafleet.models.tiny import tiny_llama

    calls = record_rows(monkeypatch, kernels, "decode_attention")
    engine = Engine(tiny_base(tokenizer), max_slots=3, max_rank=8, max_batch_size=3)
    assert engine.runner.fast_decode
    refs = {None: tiny_llama(0, vocab_size=len(tokenizer))}
    for name in ("lora4", "rslora8"):
        engine.load_adapter(name, adapters[name])
        refs[name] = attach(tiny_llama(0, vocab_size=len(tokenizer)), adapters[name])
    run = RunnerCheck(engine, refs, prompt_ids)
    a, b, c = run.seq(0, "lora4", kv_slot=2), run.seq(1, None, kv_slot=0), run.seq(4, "rslora8", 1)
    layers = engine.base.model.config.num_hidden_layers
    with torch.no_grad():
        run.check([a, b, c], [])
        assert not calls  # prefill: the torch path
        run.check([], [b, c, a])  # KV slots 0, 1, 2
        run.check([], [a, c])  # KV slots 2, 1
    assert calls == [3] * layers + [2] * layers


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_layer_kernels_give_the_torch_paths_tokens(tokenizer, dtype):
    """Greedy tokens of a ragged batch with the decode-layer kernels and without them
    (runner.fast_decode off: torch's ops, as where no compiler is)."""
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = [[5, 9, 13, 2], [7, 7, 1], [3, 4, 5, 6, 8, 10]]
    outputs = []
    for fast in (True, False):
        engine = Engine(tiny_base(tokenizer), max_slots=0, max_batch_size=3, dtype=dtype)
        assert engine.runner.fast_decode
        engine.runner.fast_decode = fast
        outputs.append([o.token_ids for o in engine.generate([(p, None, params) for p in prompts])])
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_products_run_the_packed_copies_and_give_the_same_tokens(
    tokenizer, monkeypatch, dtype
):
    """The engine packs its dense base weights (kernels.pack); steps of more rows than the
    GEMV's (prefills, 8 decode rows) run through the copies, with the tokens of an engine
    whose copies were dropped (torch's F.linear)."""
    from lorafleet.kernels import packed

    if not packed.supported():
        pytest.skip("this torch has no oneDNN")
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [[5, 9, 13, 2], [7, 7, 1], [3, 4, 5, 6, 8, 10], [11], [2, 3], [9] * 7, [4, 1], [8]]
    calls = record_rows(monkeypatch, packed, "onednn_linear")
    outputs = []
    for keep in (True, False):
        engine = Engine(tiny_base(tokenizer), max_slots=0, max_batch_size=8, dtype=dtype)
        assert engine.stats()["packed_weight_bytes"] > 0
        if not keep:
            packed.unpack_all()
        before = len(calls)
        outputs.append([o.token_ids for o in engine.generate([(p, None, params) for p in prompts])])
        assert (len(calls) > before) == keep
    packed.unpack_all()
    assert outputs[0] == outputs[1]


def tiny_family_base(family: str, tokenizer):
    """A tiny seed-0 base of `family`: Llama, Qwen2 (q/k/v bias), Mistral (a 4-token window)."""
    from lorafleet.models import Base, fingerprint
    from lorafleet.models.tiny_mistral import tiny_mistral, tiny_mistral_tokenizer
    from lorafleet.models.tiny_qwen2 import tiny_qwen2, tiny_qwen_tokenizer

    if family == "llama":
        return tiny_base(tokenizer)
    if family == "qwen2":
        tokenizer = tiny_qwen_tokenizer()
        model = tiny_qwen2(0, tokenizer, num_hidden_layers=3)
    else:
        tokenizer = tiny_mistral_tokenizer()
        model = tiny_mistral(0, tokenizer, num_hidden_layers=3, sliding_window=4)
    return Base("tiny", model, tokenizer, fingerprint(model), None, False, 0.0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_decode_stack_equals_the_kernels_called_layer_by_layer(tokenizer, family, dtype):
    """kernels.decode_stack (every layer in one call, few rows on the base) gives the logits of
    the same kernels called from Python layer by layer, bit for bit, over steps whose rows
    slide past a window (Mistral) and add a q/k/v bias (Qwen2)."""
    from lorafleet.serve import Sequence

    base = tiny_family_base(family, tokenizer)
    engine = Engine(base, max_slots=0, max_batch_size=3, max_seq_len=64, dtype=dtype)
    runner = engine.runner
    assert runner.fast_decode and runner.stackable
    prompts = [[5, 9, 13, 2, 7, 8, 3], [7, 7, 1], [3, 4]]

    def decode_logits() -> list[torch.Tensor]:
        seqs = []
        for i, prompt in enumerate(prompts):
            s = Sequence(i, prompt, None, SamplingParams())
            s.kv_slot, s.lora_slot = i, 0
            seqs.append(s)
        logits = engine.forward(seqs, [])  # prefill, then 6 decode steps of ragged rows
        out = []
        for _ in range(6):
            for s, row in zip(seqs, logits, strict=True):
                s.num_cached = s.num_tokens
                s.generated.append(int(row.argmax()))
            logits = engine.forward([], seqs)
            out.append(logits)
        return out

    stacked = decode_logits()
    runner.stackable = False
    layered = decode_logits()
    assert all(torch.equal(a, b) for a, b in zip(stacked, layered, strict=True))
