"""Structured output in the engine: per-row JSON grammars (xgrammar) beside free rows, on the
tiny model; the token masks; and the `default` model with an adapter."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from grammar_schemas import LONG, SCHEMAS

from lorafleet.errors import LorafleetError
from lorafleet.serve import SamplingParams
from lorafleet.serve.grammar import GrammarError, GrammarSpec, apply_masks
from lorafleet.serve.sequence import is_internal

PROMPT = "Answer in JSON:"


def spec(name: str) -> GrammarSpec:
    return GrammarSpec.json_schema(SCHEMAS[name])


def constrained(name: str, seed: int | None = None, max_tokens: int = 160) -> SamplingParams:
    temperature = 0.0 if seed is None else 1.0
    return SamplingParams(
        max_tokens=max_tokens, temperature=temperature, seed=seed, grammar=spec(name)
    )


def test_every_output_parses_and_validates(make_engine):
    """Five schemas, greedy and sampled, on the base and two adapters, in one batch beside free
    rows: every constrained row ends "stop" with JSON valid against its schema."""
    engine = make_engine(max_batch_size=32, max_seq_len=256)
    adapters = [None, "lora4", "rslora8"]
    reqs = [
        (PROMPT, adapters[(i + s) % 3], constrained(name, None if s == 0 else s))
        for i, name in enumerate(SCHEMAS)
        for s in range(3)
    ]
    free = [("Hello there", "attn2", SamplingParams(max_tokens=30, ignore_eos=True))]
    outs = engine.generate(reqs + free)
    assert engine.peak_running == len(reqs) + 1  # all of them shared the batch steps
    for (_, _, params), out in zip(reqs, outs, strict=False):
        assert out.finish_reason == "stop", (out.text, out.error)
        jsonschema.validate(json.loads(out.text), json.loads(params.grammar.schema))
    assert outs[-1].finish_reason == "length" and len(outs[-1].token_ids) == 30
    assert engine.grammars.compiles == len(SCHEMAS)  # compiled once per schema, then cached


def test_free_rows_get_the_same_tokens_beside_constrained_rows(make_engine):
    """Free rows (base, adapters, a seeded sampled one) give exactly their tokens alone when
    rows with different schemas and adapters share their batch steps."""
    free = [
        ("The film was a delight.", None, SamplingParams(max_tokens=12)),
        ("Tell me a joke", "lora4", SamplingParams(max_tokens=12, ignore_eos=True)),
        ("Two plus two is", "attn2", SamplingParams(max_tokens=12)),
        ("Once upon a time", "rslora8", SamplingParams(max_tokens=12, temperature=0.9, seed=3)),
    ]
    alone = [o.token_ids for o in make_engine().generate(free)]
    engine = make_engine(max_batch_size=16)
    rows = [
        (PROMPT, ["lora4", None, "attn2"][i % 3], constrained(name, i if i % 2 else None))
        for i, name in enumerate(["nested", "enum", "array", "numbers", "refs", "enum"])
    ]
    mixed = engine.generate(
        [x for pair in zip(free, rows[:4], strict=True) for x in pair] + rows[4:]
    )
    assert engine.peak_running == len(free) + len(rows)
    assert [o.token_ids for o in mixed[0:8:2]] == alone
    assert all(o.finish_reason == "stop" for o in mixed[1:8:2] + mixed[8:])


def test_a_document_that_cannot_finish_ends_with_length(make_engine):
    engine = make_engine(load=())
    grammar = GrammarSpec.json_schema(LONG)
    out = engine.generate([(PROMPT, None, SamplingParams(max_tokens=8, grammar=grammar))])[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 8
    assert out.text.startswith('{"text": "')
    with pytest.raises(ValueError):
        json.loads(out.text)  # cut off: never claimed complete


def test_stop_strings_do_not_cut_a_document(make_engine):
    """A stop string that occurs inside the document does not end it: the grammar does."""
    engine = make_engine(load=())
    params = SamplingParams(max_tokens=60, stop=['"', "e"], grammar=spec("enum"))
    out = engine.generate([(PROMPT, None, params)])[0]
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), SCHEMAS["enum"])


def test_json_object_mode_takes_any_object_and_ends_with_it(make_engine, tokenizer):
    """json_object: the matcher of a fresh engine walks any JSON object to its end (the
    document is complete at the closing brace: nothing but EOS may follow)."""
    engine = make_engine(load=())
    text = '{"a": [1, 2.5, {"b": null}], "c": "d", "e": true}'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    matcher = engine.grammars.matcher(GrammarSpec.json_object())
    assert [matcher.advance(t) for t in ids] == [False] * (len(ids) - 1) + [True]
    with pytest.raises(GrammarError, match="allows no next token"):
        engine.grammars.matcher(GrammarSpec.json_object()).advance(ids[1])  # not "{" first


def test_bad_schemas_are_refused_with_one_line():
    with pytest.raises(GrammarError, match="'not'.*properties.a"):
        GrammarSpec.json_schema({"properties": {"a": {"not": {"type": "string"}}}})
    with pytest.raises(GrammarError, match="'uniqueItems'"):
        GrammarSpec.json_schema({"type": "array", "uniqueItems": True})
    with pytest.raises(GrammarError, match="'allOf' of more than one schema"):
        GrammarSpec.json_schema({"allOf": [{"type": "object"}, {"required": []}]})
    with pytest.raises(GrammarError, match="required property 'b' .at items. is not in"):
        GrammarSpec.json_schema({"items": {"properties": {"a": {}}, "required": ["b"]}})
    with pytest.raises(GrammarError, match="'format' beside"):
        GrammarSpec.json_schema({"type": "string", "format": "email", "maxLength": 9})
    with pytest.raises(GrammarError, match="must be an object"):
        GrammarSpec.json_schema([1, 2])
    with pytest.raises(GrammarError, match="minLength 5 is greater than maxLength 2"):
        GrammarSpec.json_schema({"type": "string", "minLength": 5, "maxLength": 2}).check()
    with pytest.raises(LorafleetError, match="GrammarSpec"):
        SamplingParams(grammar={"type": "object"})


def test_the_engine_fails_only_the_row_whose_schema_it_cannot_compile(make_engine):
    engine = make_engine(load=())
    bad = GrammarSpec.json_schema({"type": "integer", "minimum": 5, "maximum": 2})
    outs = engine.generate(
        [(PROMPT, None, SamplingParams(max_tokens=4, grammar=bad)), ("Hi", None, None)]
    )
    assert outs[0].finish_reason == "error" and "minimum greater than maximum" in outs[0].error
    assert outs[1].finish_reason in ("stop", "length")


class Broken:
    """A row's matcher whose grammar engine raises in `where` ("fill": its token mask,
    "advance": taking the sampled token), as an xgrammar bug would."""

    def __init__(self, real, where: str):
        self.real, self.where = real, where
        self.vocab_size, self.stop_ids = real.vocab_size, real.stop_ids

    def fill(self, bitmask, row: int) -> None:
        if self.where == "fill":
            raise RuntimeError("the grammar engine broke filling the mask\nat some/file.cc:12")
        self.real.fill(bitmask, row)

    def advance(self, token: int) -> bool:
        if self.where == "advance":
            raise RuntimeError("the grammar engine broke taking a token")
        return self.real.advance(token)


def test_a_grammar_engine_failure_fails_its_row_alone(make_engine, monkeypatch):
    """A matcher that raises while its mask is filled or its token taken fails that row with
    an internal error (the HTTP layer's 500); the other rows, constrained or free, run on and
    the engine keeps stepping."""
    free = [("Tell me a joke", "lora4", SamplingParams(max_tokens=10, ignore_eos=True))]
    alone = make_engine().generate(free)[0].token_ids
    engine = make_engine()
    real = engine.grammars.matcher
    breaks = {spec("enum"): "fill", spec("array"): "advance"}
    monkeypatch.setattr(
        engine.grammars,
        "matcher",
        lambda s: Broken(real(s), breaks[s]) if s in breaks else real(s),
    )
    rows = [
        (PROMPT, None, constrained("enum")),
        (PROMPT, "lora4", constrained("array", seed=5)),
        (PROMPT, "attn2", constrained("nested")),
    ]
    for _ in range(2):  # the engine is not stuck after the failures: a second batch runs
        outs = engine.generate(rows + free)
        for out, where in zip(outs[:2], ["filling the mask", "taking a token"], strict=True):
            assert out.finish_reason == "error" and is_internal(out.error), out.error
            assert where in out.error and "file.cc" not in out.error  # one line
        assert outs[2].finish_reason == "stop", outs[2].error
        jsonschema.validate(json.loads(outs[2].text), SCHEMAS["nested"])
        assert outs[3].token_ids == alone
    assert engine.stats()["running"] == engine.stats()["kv_used_slots"] == 0


def test_apply_masks_matches_the_bits():
    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 4), dtype=torch.int32, generator=gen)
    bitmask[2] = 0  # a row that allows nothing is left as it is
    logits = torch.randn(3, 130, generator=gen)  # 130 > 4 * 32: tokens past the mask go
    masked = logits.clone()
    apply_masks(masked, bitmask)
    for row in range(2):
        for token in range(130):
            allowed = token < 128 and (int(bitmask[row, token // 32]) >> (token % 32)) & 1
            want = logits[row, token] if allowed else float("-inf")
            assert masked[row, token] == want
    assert torch.equal(masked[2], logits[2])


def test_default_model_with_an_adapter_gives_valid_json():
    """The real `default` model (SmolLM2-135M) with a random LoRA: a few schemas, greedy and
    sampled, all valid."""
    from helpers import randomize_adapter

    from lorafleet.adapters import MethodConfig, adapter_from_model, new_adapter
    from lorafleet.models import load_base
    from lorafleet.models.chat import chat_prompt
    from lorafleet.serve import Engine

    base = load_base("default")
    peft_model = new_adapter(base.model, MethodConfig(method="lora", rank=8, alpha=16.0))
    randomize_adapter(peft_model, seed=5, scale=0.02)
    adapter = adapter_from_model(peft_model)
    adapter.tensors = {k: v.detach().clone() for k, v in adapter.tensors.items()}
    peft_model.unload()
    engine = Engine(base, max_slots=1, max_rank=8, max_seq_len=256, max_batch_size=8)
    engine.load_adapter("task", adapter)
    ask = "Describe a person as JSON with name, address and active."
    ids = chat_prompt(base.tokenizer, [{"role": "user", "content": ask}], tokenize=True)
    reqs = [
        (ids, "task" if i % 2 == 0 else None, constrained(name, None if i < 3 else i, 96))
        for i, name in enumerate(["nested", "enum", "numbers", "array", "refs"])
    ]
    for (_, _, params), out in zip(reqs, engine.generate(reqs), strict=True):
        assert out.finish_reason == "stop", (out.text, out.error)
        jsonschema.validate(json.loads(out.text), json.loads(params.grammar.schema))
