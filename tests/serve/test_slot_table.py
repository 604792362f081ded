"""The slot table alone: slot choice, reuse, refusal when full, the source's verdicts."""

from __future__ import annotations

import pytest
from serve_helpers import TARGETS

from lorafleet.adapters import Adapter
from lorafleet.errors import LorafleetError
from lorafleet.layers import inject_multilora
from lorafleet.models.tiny import tiny_llama
from lorafleet.serve import SlotTable


class Source:
    """Knows "coming" (still loading) and "a"; refuses the rest."""

    def __init__(self):
        self.asked: list[str] = []

    def prepare(self, name: str) -> str | None:
        self.asked.append(name)
        return None if name in ("coming", "a") else f"no adapter {name}"


@pytest.fixture
def table(tokenizer):
    handle = inject_multilora(tiny_llama(0, vocab_size=len(tokenizer)), TARGETS, 2, 8)
    return SlotTable(handle, 2, "fp-base")


def test_loads_into_lowest_free_slot_and_reuses_its_own(table, adapters):
    assert table.load("a", adapters["lora4"]) == 1
    assert table.load("b", adapters["rslora8"]) == 2
    assert table.load("a", adapters["attn2"]) == 1  # replaced in place
    assert table.names() == {"a": 1, "b": 2} and len(table) == 2
    with pytest.raises(LorafleetError, match="all 2 adapter slots are taken"):
        table.load("c", adapters["lora4"])
    table.unload("a")
    assert table.load("c", adapters["lora4"]) == 1 and "a" not in table
    with pytest.raises(LorafleetError, match="adapter a is not loaded"):
        table.unload("a")


def test_check_refuses_before_copying(table, adapters):
    other = adapters["lora4"]
    foreign = Adapter(config=other.config, tensors=other.tensors, meta={"base_fingerprint": "x"})
    with pytest.raises(LorafleetError, match="trained on another base"):
        table.check("f", foreign)
    table.check("f", foreign, force=True)
    with pytest.raises(LorafleetError, match="non-empty string"):
        table.check(" ", other)
    assert len(table) == 0


def test_problems_come_from_the_source_or_the_table(table, adapters):
    table.load("a", adapters["lora4"])
    assert table.problem(None) is None and table.problem("a") is None
    assert table.problem("zz") == "unknown adapter 'zz' (loaded: a)"
    assert table.problem_with(("a", "b", "c")) == "the mixture has 3 adapters; there are 2 slots"
    table.source = source = Source()
    assert table.problem("coming") is None and table.problem("zz") == "no adapter zz"
    assert table.problem("a") is None and source.asked == ["coming", "zz", "a"]
    assert table.adapter_ready("a") and table.slot_of("a") == 1 and table.slot_of(None) == 0
    assert not table.adapter_ready("coming")


def test_no_slots_refuses_loads(tokenizer, adapters):
    with pytest.raises(LorafleetError, match="no adapter slots"):
        SlotTable(None, 0, "fp").check("a", adapters["lora4"])
