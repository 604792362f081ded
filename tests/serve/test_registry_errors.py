"""The registry refuses bad adapters, bad names and paths, and removing adapters in use."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, MissConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from serve_helpers import GREEDY, peft_adapter, run_to_end

from lorafleet.adapters import Adapter, read_adapter, write_adapter
from lorafleet.adapters.format import CONFIG_NAME, WEIGHTS_NAME
from lorafleet.errors import LorafleetError
from lorafleet.models import fingerprint
from lorafleet.models.tiny import tiny_llama


def write_nan(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    file = dst / WEIGHTS_NAME
    with safe_open(str(file), framework="pt") as f:
        header = f.metadata()
    tensors = load_file(str(file))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(file), metadata=header)


@pytest.fixture
def bad_dir(tmp_path, tokenizer, disk, base_fp) -> Path:
    """lora4 plus one broken adapter per problem (directory name -> expected message part)."""
    root = tmp_path / "adapters"
    root.mkdir()
    shutil.copytree(disk / "lora4", root / "lora4")
    shutil.copytree(disk / "lora4", root / "badjson")
    (root / "badjson" / CONFIG_NAME).write_text("{not json")
    write_nan(disk / "lora4", root / "nan")
    good = read_adapter(disk / "lora4")
    other_fp = fingerprint(tiny_llama(1, vocab_size=len(tokenizer)))
    write_adapter(
        root / "otherbase", Adapter(good.config, good.tensors, {"base_fingerprint": other_fp})
    )
    shapes = dict(good.tensors)
    key = sorted(k for k in shapes if "lora_A" in k)[0]
    shapes[key] = torch.zeros(4, 65)
    write_adapter(root / "badshape", Adapter(good.config, shapes, dict(good.meta)))
    configs = {
        "bigrank": LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj"]),
        # DoRA and Bone are served (test_serve_methods.py); above max_rank they are not.
        "bigdora": LoraConfig(r=16, lora_alpha=8, use_dora=True, target_modules=["q_proj"]),
        "bigbone": MissConfig(r=16, target_modules=["q_proj"]),
    }
    for i, (name, config) in enumerate(configs.items()):
        write_adapter(root / name, peft_adapter(tokenizer, config, 50 + i, base_fp))
    return root


BAD = {
    "badjson": "invalid JSON",
    "nan": "non-finite",
    "otherbase": "trained on another base",
    "badshape": "has shape (4, 65)",
    "bigrank": "rank 16",
    "bigdora": "rank 16",
    "bigbone": "rank 16",
}


def test_bad_adapters_fail_only_their_requests(make, bad_dir, prompts, expected, reads):
    engine, registry = make(bad_dir)
    plan = [("lora4", 0), (None, 1)] + [(n, i % 6) for n in BAD for i in range(2)]
    outs = engine.generate([(prompts[i], n, GREEDY) for n, i in plan])
    for out, (name, i) in zip(outs, plan, strict=True):
        if name in BAD:
            assert out.finish_reason == "error" and out.token_ids == []
            assert f"adapter {name!r} cannot be served" in out.error
            assert BAD[name] in out.error, out.error
            assert "\n" not in out.error and str(bad_dir) not in out.error  # relative paths
        else:
            assert out.finish_reason == "length" and out.token_ids == expected[(name, i)]
    # Two requests each, one read each; a later request fails at once, without a read.
    assert sorted(reads.names()) == sorted(["lora4", *BAD])
    late = engine.generate([(prompts[0], "nan", GREEDY)])[0]
    assert BAD["nan"] in late.error and len(reads) == len(BAD) + 1
    assert registry.state("nan") == "failed" and registry.stats()["failures"] == len(BAD)
    # Fixing the files clears the failure at once (no waiting for it to expire).
    shutil.copy(bad_dir / "lora4" / CONFIG_NAME, bad_dir / "badjson" / CONFIG_NAME)
    fixed = engine.generate([(prompts[3], "badjson", GREEDY)])[0]
    assert fixed.finish_reason == "length" and fixed.token_ids == expected[("lora4", 3)]


def test_names_and_paths_are_checked(make, disk, tmp_path):
    root = tmp_path / "adapters"
    shutil.copytree(disk / "lora4", root / "group" / "tenant1")
    shutil.copytree(disk / "lora4b", root / "group" / "tenant2")
    shutil.copytree(disk / "attn2", tmp_path / "outside")
    (root / "link").symlink_to(tmp_path / "outside")
    engine, registry = make(root)
    assert registry.names() == ["link"]  # group/ holds no adapter_config.json itself
    for name in ["../x", "", "a/b", "x" * 65, "..", ".", "a b", None, "é"]:
        with pytest.raises(LorafleetError, match="invalid adapter name"):
            registry.add(name, "group/tenant1")
    for path in [
        tmp_path / "outside",
        "../outside",
        root / "group" / ".." / ".." / "outside",
        "link",
    ]:
        with pytest.raises(LorafleetError, match="outside the adapters directory"):
            registry.add("out", path)
    with pytest.raises(LorafleetError, match="not an adapter directory"):
        registry.add("group", "group")
    registry.add("tenant1", "group/tenant1")
    registry.add("tenant1", root / "group" / "tenant1")  # the same again: fine
    assert registry.names() == ["link", "tenant1"]  # a symlink placed in the dir by its owner
    with pytest.raises(LorafleetError, match="already registered"):
        registry.add("tenant1", "group/tenant2")
    assert "invalid adapter name" in registry.prepare("../etc")
    assert registry.prepare("nope") == "unknown adapter 'nope'"
    out = engine.generate([([1, 2, 3], "../../etc/passwd", GREEDY), ([1, 2, 3], "tenant1", GREEDY)])
    assert "invalid adapter name" in out[0].error and out[1].finish_reason == "length"
    # Without an adapters dir, add() takes any adapter directory (the operator's choice).
    _, free = make(None)
    free.add("anywhere", tmp_path / "outside")
    assert free.names() == ["anywhere"]


def test_remove_is_refused_while_in_use(make, prompts, expected):
    engine, registry = make(max_batch_size=1)
    first = engine.add_request(prompts[0], "lora4", GREEDY)
    second = engine.add_request(prompts[1], "lora4", GREEDY)
    registry.wait(10)
    engine.step()
    with pytest.raises(LorafleetError, match="in use by 2 request"):  # one running, one waiting
        registry.remove("lora4")
    outputs = run_to_end(engine)
    assert outputs[first].token_ids == expected[("lora4", 0)]
    assert outputs[second].token_ids == expected[("lora4", 1)]
    registry.remove("lora4")
    assert "lora4" not in engine.loaded_adapters() and "lora4" not in registry.names()
    assert registry.prepare("lora4") == "unknown adapter 'lora4'"
    with pytest.raises(LorafleetError, match="unknown adapter"):
        registry.remove("lora4")
    registry.add("lora4", "lora4")  # back, from the same directory
    out = engine.generate([(prompts[2], "lora4", GREEDY)])[0]
    assert out.token_ids == expected[("lora4", 2)]
