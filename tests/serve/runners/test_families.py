"""Every engine family against transformers + PEFT on a tiny random config of that family:
logits per step (1e-4, float32) and greedy tokens, with LoRAs on every target module (Phi-3's
fused qkv_proj / gate_up_proj included), rows of different adapters and the base in one batch."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers import randomize_adapter
from peft import LoraConfig, get_peft_model
from serve_helpers import RunnerCheck, engine_and_generate_greedy
from transformers import (
    ArceeConfig,
    ArceeForCausalLM,
    MinistralConfig,
    MinistralForCausalLM,
    Starcoder2Config,
    Starcoder2ForCausalLM,
)

from lorafleet.adapters import adapter_from_model, attach
from lorafleet.linear_layers import target_names
from lorafleet.models import Base, fingerprint, load_base
from lorafleet.models.tiny_common import build_tiny
from lorafleet.models.tiny_mistral import tiny_mistral, tiny_mistral_tokenizer
from lorafleet.models.tiny_phi3 import tiny_phi3, tiny_phi3_tokenizer
from lorafleet.models.tiny_qwen2 import tiny_qwen2, tiny_qwen_tokenizer
from lorafleet.models.tiny_qwen3 import tiny_qwen3
from lorafleet.serve import Engine, SamplingParams, Sequence
from lorafleet.serve.runners import (
    RUNNERS,
    LlamaRunner,
    MinistralRunner,
    MistralRunner,
    Phi3Runner,
    Qwen2Runner,
    Qwen3Runner,
)

WINDOW = 4  # shorter than most prompts, so sliding layers really slide
MIXED = ["sliding_attention", "full_attention", "sliding_attention"]
PROMPTS = [
    "the film was a delight from start to finish .",
    "how is [Anna] related to [Bob] ?",
    "yes",
    "a dull , lifeless and boring movie . the end",
    "question : answer : review : sentiment positive negative",
    "Example 1 : 2 3 4 5",
]
GREEDY = SamplingParams(max_tokens=10)


# The families the runner table serves for free (another family's runner): tiny test models.
SETTINGS = {"vocab_size": 400, "head_dim": 16, "pad_token_id": 0}


def ministral(seed: int = 0, tokenizer=None, **overrides):
    """A tiny Ministral: Mistral's layout with per-layer windows (layer_types)."""
    return build_tiny(MinistralForCausalLM, MinistralConfig, seed, SETTINGS, tokenizer, **overrides)


def starcoder2(seed: int = 0, tokenizer=None, **overrides):
    """A tiny Starcoder2: LayerNorms, biases everywhere, a GELU c_fc / c_proj MLP, windows on
    every layer."""
    return build_tiny(
        Starcoder2ForCausalLM, Starcoder2Config, seed, SETTINGS, tokenizer, **overrides
    )


def arcee(seed: int = 0, tokenizer=None, **overrides):
    """A tiny Arcee (AFM): Llama with a ReLU^2 up_proj / down_proj MLP (no gate)."""
    return build_tiny(ArceeForCausalLM, ArceeConfig, seed, SETTINGS, tokenizer, **overrides)


@dataclass(frozen=True)
class Family:
    """How to build one family's tiny test model and what the engine must make of it."""

    build: object  # (seed, tokenizer, **overrides) -> model
    tokenizer: object  # () -> tokenizer
    runner: type
    overrides: dict  # 3 layers and a 4-token window where the family has windows
    windows: list  # the runner's per-layer windows for those overrides
    # whether decode-only steps run lorafleet's decode-layer kernels (LlamaRunner.fast_decode):
    # not Qwen3 (per-head q/k norms) nor Starcoder2 (LayerNorm)
    decode_kernels: bool = True


FAMILIES = {
    "qwen2": Family(
        tiny_qwen2,
        tiny_qwen_tokenizer,
        Qwen2Runner,
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
        [None, WINDOW, WINDOW],  # layer_types from max_window_layers on
    ),
    "qwen3": Family(
        tiny_qwen3,
        tiny_qwen_tokenizer,
        Qwen3Runner,
        {"use_sliding_window": True, "sliding_window": WINDOW, "layer_types": MIXED},
        [WINDOW, None, WINDOW],
        decode_kernels=False,
    ),
    "mistral": Family(
        tiny_mistral,
        tiny_mistral_tokenizer,
        MistralRunner,
        {"sliding_window": WINDOW},
        [WINDOW] * 3,
    ),
    "ministral": Family(
        ministral,
        tiny_mistral_tokenizer,
        MinistralRunner,
        {"sliding_window": WINDOW, "layer_types": MIXED},
        [WINDOW, None, WINDOW],
    ),
    "phi3": Family(
        tiny_phi3, tiny_phi3_tokenizer, Phi3Runner, {"sliding_window": WINDOW}, [WINDOW] * 3
    ),
    "starcoder2": Family(
        starcoder2,
        tiny_mistral_tokenizer,
        MistralRunner,
        {"sliding_window": WINDOW},
        [WINDOW] * 3,
        decode_kernels=False,
    ),
    "arcee": Family(arcee, tiny_mistral_tokenizer, LlamaRunner, {}, [None] * 3),
}


class Setup:
    """One family's tokenizer, prompts, two PEFT adapters on every target and references."""

    def __init__(self, name: str):
        family = FAMILIES[name]
        self.family, self.tokenizer = family, family.tokenizer()
        self.prompt_ids = [self.tokenizer(p)["input_ids"] for p in PROMPTS]
        self.targets = target_names(self.model())
        configs = {
            "lora4": LoraConfig(r=4, lora_alpha=8, target_modules=self.targets),
            "rslora8": LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=self.targets),
        }
        self.adapters = {}
        for i, (adapter, config) in enumerate(configs.items()):
            config.task_type = "CAUSAL_LM"
            peft_model = get_peft_model(self.model(), config)
            randomize_adapter(peft_model, seed=40 + i, scale=0.2)
            self.adapters[adapter] = adapter_from_model(peft_model)
        self.refs = {None: self.model()}
        for adapter, weights in self.adapters.items():
            self.refs[adapter] = attach(self.model(), weights)

    def model(self):
        """A fresh copy of the family's seed-0 tiny test model (3 layers, its windows)."""
        return self.family.build(
            0,
            self.tokenizer,
            num_hidden_layers=3,
            max_position_embeddings=256,
            **self.family.overrides,
        )

    def engine(self, **kwargs) -> Engine:
        model = self.model()
        base = Base("tiny", model, self.tokenizer, fingerprint(model), None, False, 0.0)
        settings = {"max_slots": 2, "max_rank": 8, "max_batch_size": 4, "max_seq_len": 64}
        engine = Engine(base, **{**settings, **kwargs})
        for name, adapter in self.adapters.items():
            engine.load_adapter(name, adapter)
        return engine

    @torch.no_grad()
    def reference(self, adapter, ids, max_tokens) -> list[int]:
        x = torch.tensor([ids])
        out = self.refs[adapter].generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return out[0, x.shape[1] :].tolist()


@pytest.fixture(scope="module", params=list(FAMILIES))
def setup(request) -> Setup:
    return Setup(request.param)


def test_the_table_serves_each_family():
    for family in FAMILIES.values():
        model_type = family.build(0, vocab_size=64).config.model_type
        assert RUNNERS[model_type] is family.runner


def test_phi3_adapters_target_the_fused_projections():
    setup = Setup("phi3")
    assert set(setup.targets) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    keys = setup.adapters["lora4"].tensors
    qkv_b = keys["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"]
    assert qkv_b.shape == (4 * 16 + 2 * 2 * 16, 4)  # [H*D + 2*Hkv*D, r]: one pair for q, k, v
    assert keys["base_model.model.model.layers.0.mlp.gate_up_proj.lora_B.weight"].shape == (256, 4)


@torch.no_grad()
def test_logits_match_transformers_with_peft(setup):
    engine = setup.engine()
    assert type(engine.runner) is setup.family.runner
    assert engine.runner.windows == setup.family.windows
    assert engine.runner.fast_decode == setup.family.decode_kernels  # the built kernels (CI)
    run = RunnerCheck(engine, setup.refs, setup.prompt_ids, atol=1e-4)
    seq, check, expected = run.seq, run.check, run.expected

    a, b = seq(0, "lora4", kv_slot=2), seq(2, None, kv_slot=0)
    assert len(a.prompt_ids) > 2 * WINDOW and len(b.prompt_ids) < WINDOW
    check([a, b], [])  # a long and a short prompt packed in one forward
    c = seq(3, "rslora8", kv_slot=1)
    check([c], [a, b])  # a prefill and two decodes (KV slots 2, 0: gathered) in one step
    for _ in range(WINDOW + 1):  # b's context grows past the window while a's and c's slide
        check([], [b, c, a])  # KV slots 0, 1, 2: read as a view of the cache
    check([], [a, c])

    if any(setup.family.windows):
        # Not vacuous: the same weights without windows give other logits for a long prompt.
        engine.runner.windows = [None] * len(engine.runner.windows)
        d = seq(3, None, kv_slot=3)
        assert (engine.runner.run([d], [])[0] - expected(d)).abs().max() > 1e-2


def test_greedy_matches_peft_beside_other_adapters(setup):
    engine = setup.engine()
    ids = setup.prompt_ids
    plan = [(0, None), (1, "lora4"), (3, "rslora8"), (4, "lora4"), (5, None)]
    rids = [engine.add_request(ids[i], name, GREEDY) for i, name in plan[:3]]
    outputs = {}
    for _ in range(3):
        outputs.update((o.request_id, o) for o in engine.step())
    rids += [engine.add_request(ids[i], name, GREEDY) for i, name in plan[3:]]  # join mid-run
    for _ in range(100):
        outputs.update((o.request_id, o) for o in engine.step())
        if not engine.has_unfinished():
            break
    else:
        raise AssertionError("the engine did not finish")
    for rid, (i, name) in zip(rids, plan, strict=True):
        assert outputs[rid].token_ids == setup.reference(name, ids[i], GREEDY.max_tokens), (i, name)
    # Not vacuous: on one prompt the base and each adapter give different tokens.
    answers = {
        tuple(setup.reference(name, ids[1], GREEDY.max_tokens))
        for name in (None, "lora4", "rslora8")
    }
    assert len(answers) == 3


@torch.no_grad()
def test_phi3_longrope_rows_take_their_own_sequences_factors():
    """longrope (Phi-3 128k): transformers' generate uses the long factors in a forward whose
    last position reaches original_max_position_embeddings. In one batch, a short sequence
    decoding across that limit and a long prompt each get the logits of their own run."""
    tokenizer = tiny_phi3_tokenizer()
    rope = {
        "rope_type": "longrope",
        "partial_rotary_factor": 0.75,
        "short_factor": [1.0] * 6,  # 16 * 0.75 = 12 rotary dims, 6 frequencies
        "long_factor": [8.0] * 6,
        "original_max_position_embeddings": 8,
    }

    def model():
        return tiny_phi3(
            0,
            tokenizer,
            rope_parameters=dict(rope),
            original_max_position_embeddings=8,
            max_position_embeddings=64,
        )

    short, long = (tokenizer(p)["input_ids"] for p in ("the film", PROMPTS[0]))
    assert len(short) < 6 and len(long) > 8
    steps = 6  # the short sequence's forward passes position 8 on the way

    def generated(ids):
        x = torch.tensor([ids])
        out = model().generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=steps + 1,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
        )
        return [step[0] for step in out.logits]  # [vocab] per forward, prefill first

    want = {"short": generated(short), "long": generated(long)}
    base = Base("tiny-phi3", model(), tokenizer, "x", None, False, 0.0)
    engine = Engine(base, max_slots=0, max_batch_size=2, max_seq_len=32)

    def sequences():  # the long one first: the switching short one must come back in place
        out = {"long": Sequence(0, long, None, SamplingParams())}
        out["short"] = Sequence(1, short, None, SamplingParams())
        out["long"].kv_slot, out["short"].kv_slot = 0, 1
        return out

    seqs = sequences()
    rows = engine.runner.run(list(seqs.values()), [])
    for step in range(steps + 1):
        for (name, seq), row in zip(seqs.items(), rows, strict=True):
            torch.testing.assert_close(
                row, want[name][step], atol=1e-4, rtol=0, msg=f"{name} {step}"
            )
            seq.num_cached = seq.num_tokens
            seq.generated.append(int(row.argmax()))
        if step < steps:
            rows = engine.runner.run([], list(seqs.values()))
    assert seqs["short"].num_cached > 8  # it crossed the limit
    # Not vacuous: one rotary call for the whole batch (its largest position decides) gives
    # the short sequence the long factors, and other logits.
    engine.runner.long_after = None
    rows = engine.runner.run(list(sequences().values()), [])
    assert (rows[1] - want["short"][0]).abs().max() > 1e-2


def test_real_qwen_coder_greedy_matches_generate():
    """The real Qwen2.5-Coder-0.5B-Instruct (24 layers, biased q/k/v; converted once per test
    session from the GGUF its six part packages hold)."""
    base = load_base("qwen2.5-coder-0.5b")
    assert base.model.config.model_type == "qwen2" and base.model.config.num_hidden_layers == 24
    got, expected, runner = engine_and_generate_greedy(base, "def fibonacci(n):")
    assert runner is Qwen2Runner
    assert got == expected
    assert "if n" in base.tokenizer.decode(expected)  # real code, not noise
