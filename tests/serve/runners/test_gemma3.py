"""The Gemma3 runner against transformers: logits per step, sliding windows, greedy parity."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_adapter
from peft import LoraConfig, get_peft_model
from serve_helpers import TARGETS, RunnerCheck, engine_and_generate_greedy
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel

from lorafleet.adapters import adapter_from_model, attach
from lorafleet.errors import LorafleetError
from lorafleet.models import Base, fingerprint, load_base
from lorafleet.serve import Engine, SamplingParams, runner_class
from lorafleet.serve.runners import Gemma3Runner

WINDOW = 4  # shorter than most prompts, so the sliding layers really slide
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
GREEDY = SamplingParams(max_tokens=12)


def tiny_gemma(seed: int = 0, vocab_size: int = 49152, **overrides) -> Gemma3ForCausalLM:
    """A 3-layer, 64-wide Gemma3 (sliding, full, sliding; window 4; logit soft-cap), weights
    from `seed`. Its norm weights are random too (transformers starts them at 0, which would
    hide a missing `1 +` offset)."""
    config = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": len(LAYER_TYPES),
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 24,  # not head_dim: the scale must come from it
        "sliding_window": WINDOW,
        "layer_types": LAYER_TYPES,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        "max_position_embeddings": 256,
        "final_logit_softcapping": 2.0,  # small enough to change the logits visibly
        "initializer_range": 0.1,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        **overrides,
    }
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**config))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def gemma_base(tokenizer) -> Base:
    model = tiny_gemma(0, vocab_size=len(tokenizer))
    return Base("tiny-gemma", model, tokenizer, fingerprint(model), None, False, 0.0)


@pytest.fixture(scope="module")
def gemma_adapters(tokenizer) -> dict:
    """name -> Adapter on the tiny Gemma3: lora r=4 and rslora r=8, all block linears."""
    configs = {
        "lora4": LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
        "rslora8": LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=TARGETS),
    }
    out = {}
    for i, (name, config) in enumerate(configs.items()):
        config.task_type = "CAUSAL_LM"
        peft_model = get_peft_model(tiny_gemma(0, vocab_size=len(tokenizer)), config)
        randomize_adapter(peft_model, seed=40 + i, scale=0.2)
        out[name] = adapter_from_model(peft_model)
    return out


@pytest.fixture(scope="module")
def gemma_refs(tokenizer, gemma_adapters) -> dict:
    """None or adapter name -> the transformers model (through PEFT) the engine must match."""
    refs = {None: tiny_gemma(0, vocab_size=len(tokenizer))}
    for name, adapter in gemma_adapters.items():
        refs[name] = attach(tiny_gemma(0, vocab_size=len(tokenizer)), adapter)
    return refs


@pytest.fixture
def gemma_engine(tokenizer, gemma_adapters):
    engine = Engine(
        gemma_base(tokenizer), max_slots=2, max_rank=8, max_batch_size=4, max_seq_len=64
    )
    for name, adapter in gemma_adapters.items():
        engine.load_adapter(name, adapter)
    return engine


@torch.no_grad()
def test_gemma3_runner_logits_match_transformers(gemma_engine, gemma_refs, prompt_ids):
    engine = gemma_engine
    assert isinstance(engine.runner, Gemma3Runner)
    assert engine.runner.windows == [WINDOW, None, WINDOW]

    run = RunnerCheck(engine, gemma_refs, prompt_ids)
    seq, check, expected = run.seq, run.check, run.expected

    a, b = seq(0, "lora4", kv_slot=2), seq(2, None, kv_slot=0)  # 11 tokens and 1 token
    assert len(a.prompt_ids) > 2 * WINDOW and len(b.prompt_ids) < WINDOW
    check([a, b], [])  # a long and a short prompt packed in one forward
    c = seq(4, "rslora8", kv_slot=1)
    check([c], [a, b])  # a prefill and two decodes (KV slots 2, 0: gathered) in one step
    for _ in range(WINDOW + 1):  # b's context grows past the window while a's and c's slide
        check([], [b, c, a])  # KV slots 0, 1, 2: read as a view of the cache
    check([], [a, c])

    # Not vacuous: the same weights without the window give other logits for a long prompt.
    engine.runner.windows = [None] * len(LAYER_TYPES)
    d = seq(4, None, kv_slot=3)
    full = engine.runner.run([d], [])[0]
    assert (full - expected(d)).abs().max() > 1e-2


def test_gemma3_engine_greedy_matches_generate(gemma_engine, gemma_refs, prompt_ids, tokenizer):
    engine = gemma_engine

    @torch.no_grad()
    def reference(name, ids) -> list[int]:
        x = torch.tensor([ids])
        out = gemma_refs[name].generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=GREEDY.max_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        return out[0, x.shape[1] :].tolist()

    plan = [(0, None), (1, "lora4"), (4, "rslora8"), (5, "lora4"), (3, None)]
    assert all(len(prompt_ids[i]) > WINDOW for i, _ in plan[:4])  # the last one is short
    rids = [engine.add_request(prompt_ids[i], name, GREEDY) for i, name in plan[:3]]
    outputs = {}
    for _ in range(3):
        outputs.update((o.request_id, o) for o in engine.step())
    rids += [engine.add_request(prompt_ids[i], name, GREEDY) for i, name in plan[3:]]  # join
    for _ in range(100):
        outputs.update((o.request_id, o) for o in engine.step())
        if not engine.has_unfinished():
            break
    else:
        raise AssertionError("the engine did not finish")
    for rid, (i, name) in zip(rids, plan, strict=True):
        assert outputs[rid].token_ids == reference(name, prompt_ids[i]), (i, name)
    # Not vacuous: on one prompt the base and each adapter give different tokens.
    assert len({tuple(reference(name, prompt_ids[1])) for name in (None, "lora4", "rslora8")}) == 3
    assert engine.stats()["kv_used_slots"] == 0


def test_unsupported_models_are_refused(tokenizer):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(LorafleetError) as err:
        runner_class(gpt2)
    assert str(err.value) == (
        "model type gpt2 is not supported by the engine (supported: llama, gemma3_text, "
        "qwen2, qwen3, mistral, ministral, phi3, starcoder2, arcee)"
    )
    encoder = tiny_gemma(0, vocab_size=64, use_bidirectional_attention=True)
    base = Base("gemma-encoder", encoder, tokenizer, "x", None, False, 0.0)
    with pytest.raises(LorafleetError, match="bidirectional attention"):
        Engine(base)
    assert type(encoder.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # left untouched


def test_real_gemma_270m_greedy_matches_generate():
    """The real gemma-3-270m (18 layers, window 512; converted once per test session)."""
    base = load_base("gemma-270m")
    got, expected, runner = engine_and_generate_greedy(base, "The capital of France is")
    assert runner is Gemma3Runner
    assert got == expected
