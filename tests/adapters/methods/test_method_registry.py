"""adapters.methods: every registered method declares everything in its own module, and PEFT
agrees with what it declares (config type, tensor keys and shapes); unknown names fail in one
line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from peft import PeftConfig, get_peft_model_state_dict

import lorafleet
from lorafleet.adapters import (
    PEFT_PREFIX,
    MethodConfig,
    adapter_from_model,
    new_adapter,
    split_key,
    strip_prefix,
)
from lorafleet.adapters.format import SUPPORTED_PEFT_TYPES, json_ready
from lorafleet.adapters.methods import (
    DEFAULT_ALPHA,
    DEFAULT_RANK,
    NAMES,
    Dims,
    Method,
    MethodError,
    PeftOptions,
    cli_help,
    find_method,
    get_method,
    method_of,
    peft_types,
)
from lorafleet.adapters.methods.registry import ORDER, part_suffixes, shared_parts
from lorafleet.errors import LorafleetError
from lorafleet.models.tiny import tiny_llama

RANK = 8  # divides every tiny linear (64, 32, 128), so Bat can take it too


def test_the_registry_lists_every_method_module_in_cli_order():
    assert NAMES == ORDER
    assert NAMES[:6] == ("lora", "rslora", "dora", "bone", "bat", "bilora")
    assert (DEFAULT_RANK, DEFAULT_ALPHA) == (16, 32.0)  # "A Note on LoRA"'s defaults, unchanged
    assert set(peft_types()) == set(SUPPORTED_PEFT_TYPES) >= {"LORA", "MISS"}


@pytest.mark.parametrize("name", NAMES)
def test_each_method_declares_everything(name):
    method = get_method(name)
    assert isinstance(method, Method) and method.name == name
    for text in (method.help, method.title, method.delta):
        assert text.strip() and "\n" not in text
    assert method.peft_type in peft_types()
    assert method.parts and len({p.name for p in method.parts}) == len(method.parts)
    assert callable(method.serve) or (isinstance(method.serve, str) and method.serve.strip())
    assert f"{name}: {method.help}" in cli_help()
    config = method.peft_config(PeftOptions(RANK, 16.0, ["q_proj", "v_proj"], 0.0))
    assert isinstance(config, PeftConfig)
    assert str(config.peft_type.value) == method.peft_type
    assert config.r == RANK and sorted(config.target_modules) == ["q_proj", "v_proj"]
    # A saved config reads back as this method, or (saved in another's form) as a method of
    # the same PEFT type with the same parts.
    saved = find_method(json_ready(config.to_dict()))
    assert saved is not None and saved.peft_type == method.peft_type
    assert saved is method or (method.recognises(config.to_dict()) is False)
    assert saved.parts == method.parts


def test_trainer_kinds_have_a_trainer():
    from lorafleet.train.trainers import TRAINERS

    assert {get_method(n).trainer for n in NAMES} <= set(TRAINERS)


def test_one_suffix_names_one_part_and_shared_keys_have_no_module():
    suffixes = part_suffixes()
    assert suffixes["lora_A.weight"] == "A" and suffixes["miss_block"] == "miss_block"
    for key in shared_parts():
        assert not key.startswith(PEFT_PREFIX) and split_key(key) is None


@pytest.mark.parametrize("name", NAMES)
def test_peft_writes_exactly_the_declared_parts_and_shapes(name, tokenizer):
    """A new adapter of each method, through PEFT: its state dict's keys are the method's
    parts of every adapted linear (plus its shared tensors), with the declared shapes."""
    model = tiny_llama(0, vocab_size=len(tokenizer))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    peft_model = new_adapter(model, MethodConfig(name, rank=RANK, alpha=16.0))
    method = get_method(name)
    tensors = get_peft_model_state_dict(peft_model)
    shared = {k: t for k, t in tensors.items() if k in shared_parts()}
    config = json_ready(peft_model.peft_config["default"].to_dict())
    assert find_method(config).parts == method.parts
    seen: dict[str, set[str]] = {}
    dims: dict[str, Dims] = {}
    for key, tensor in tensors.items():
        if key in shared:
            continue
        module, part = split_key(key)
        linear = linears[strip_prefix(module)]
        d = Dims(linear.out_features, linear.in_features, RANK, config)
        dims[module] = d
        declared = {p.name: p for p in method.parts}
        assert tuple(tensor.shape) == declared[part].shape(d), key
        seen.setdefault(module, set()).add(part)
    assert seen and all(parts == {p.name for p in method.parts} for parts in seen.values())
    assert set(shared) == {p.key for p in method.shared if p.required(config)}
    for part in method.shared:
        if part.key in shared:
            assert tuple(shared[part.key].shape) == part.shape(config, list(dims.values()))
    if method.recognises(config):
        assert adapter_from_model(peft_model).method == name


def test_unknown_method_is_a_one_line_error():
    for call in (lambda: get_method("lokr"), lambda: MethodConfig("lokr")):
        with pytest.raises(LorafleetError) as err:
            call()
        message = str(err.value)
        assert "unknown method 'lokr'" in message and "\n" not in message
        assert all(name in message for name in NAMES)


def test_a_config_no_method_reads_is_a_one_line_error():
    with pytest.raises(MethodError, match="no registered method reads peft_type 'LOHA'") as err:
        method_of({"peft_type": "LOHA"})
    assert "\n" not in str(err.value)
    assert find_method({"peft_type": "LOHA"}) is None
    assert find_method({"r": 4}).name == "lora"  # no peft_type: read as a LoraConfig


# The modules that read the registry instead of naming methods (the seam this package is).
READERS = (
    "adapters/format.py",
    "adapters/validate.py",
    "adapters/lora_keys.py",
    "adapters/attach.py",
    "layers/slots.py",
    "layers/linear.py",
    "train/trainers.py",
    "compose/deltas.py",
    "fed/aggregate.py",
    "bayes/capture.py",
)


@pytest.mark.parametrize("path", READERS)
def test_registry_readers_name_no_method_or_peft_type(path):
    """No string constant in code (docstrings aside) is a method's name or a PEFT type."""
    src = Path(lorafleet.__file__).parent / path
    tree = ast.parse(src.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    named = set(NAMES) | set(peft_types())
    found = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and id(node) not in docstrings and node.value in named
    ]
    assert not found, f"{path} names {found}"
