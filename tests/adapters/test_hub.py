"""Adapters by hub id, offline: `org/name[@revision]` parsed, read from a local copy laid out
as the hub cache (never downloaded), validated as any adapter, refused in one line when not
cached or holding pickles / code only; the CLI's --adapter (generate, info, merge)."""

from __future__ import annotations

import json

import pytest
from hub_cache import adapter_files, count_fetches, go_offline, put_repo, write_lora
from safetensors.torch import load_file

from lorafleet.adapters.hub import (
    HubAdapterError,
    HubRef,
    fetch_adapter,
    locate_adapter,
    parse_hub_ref,
)

REPO = "acme/tiny-lora"


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tokenizer) -> dict:
    """Two random LoRAs for the seed-0 tiny base (v1, v2) and one for a module it lacks."""
    root = tmp_path_factory.mktemp("hub-loras")
    return {
        "v1": write_lora(root / "v1", tokenizer, seed=1),
        "v2": write_lora(root / "v2", tokenizer, seed=2),
    }


@pytest.fixture
def hub(monkeypatch, tmp_path, loras) -> dict:
    """An offline hub cache holding acme/tiny-lora (main = v1; tag v2 = v2) and a repo with a
    pickle and code only; returns {"cache", "v1", "v2"} (the two commit hashes)."""
    cache = go_offline(monkeypatch, tmp_path)
    v1 = put_repo(cache, REPO, adapter_files(loras["v1"]))
    v2 = put_repo(cache, REPO, adapter_files(loras["v2"]), ref="v2")
    config = (loras["v1"] / "adapter_config.json").read_bytes()
    unsafe = {"adapter_config.json": config, "adapter_model.bin": b"\x80\x04.", "handler.py": b""}
    put_repo(cache, "acme/pickled", unsafe)
    monkeypatch.chdir(tmp_path)  # relative paths in these tests resolve under tmp_path
    return {"cache": cache, "v1": v1, "v2": v2}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("acme/tiny-lora", HubRef("acme/tiny-lora")),
        ("acme/tiny-lora@v2", HubRef("acme/tiny-lora", "v2")),
        ("Org.x/name_1@refs/pr/3", HubRef("Org.x/name_1", "refs/pr/3")),
        ("sst2", None),
        ("a/b/c", None),
        ("/abs/path", None),
        ("./acme/x", None),
        ("acme/..", None),
        ("../acme", None),
        ("acme/x@", None),
        ("acme/x@v1/", None),
        ("acme/x@@v1", None),
        (None, None),
    ],
)
def test_hub_ids_are_parsed(text, expected):
    assert parse_hub_ref(text) == expected
    if expected is not None:
        assert str(expected) == text


def test_fetch_reads_the_cache_and_revision_pins_the_snapshot(hub, loras):
    main = fetch_adapter(HubRef(REPO))
    assert main.name == hub["v1"] and main.parent.name == "snapshots"
    by_tag = fetch_adapter(HubRef(REPO, "v2"))
    by_commit = fetch_adapter(HubRef(REPO, hub["v2"]))
    assert by_tag == by_commit and by_tag.name == hub["v2"]
    weights = load_file(str(by_tag / "adapter_model.safetensors"))
    expected = load_file(str(loras["v2"] / "adapter_model.safetensors"))
    assert weights.keys() == expected.keys()
    assert all(weights[k].equal(expected[k]) for k in expected)


def test_not_cached_while_offline_is_one_line_naming_the_repo(hub):
    with pytest.raises(HubAdapterError) as info:
        fetch_adapter(HubRef("acme/missing"))
    message = str(info.value)
    assert "acme/missing" in message and "not in the local hub cache" in message
    assert "HF_HUB_OFFLINE" in message and "\n" not in message
    with pytest.raises(HubAdapterError, match="revision nope is not in the local hub cache"):
        fetch_adapter(HubRef(REPO, "nope"))


def test_a_repo_of_pickles_and_code_only_is_refused(hub):
    with pytest.raises(HubAdapterError) as info:
        fetch_adapter(HubRef("acme/pickled"))
    message = str(info.value)
    assert "acme/pickled" in message and "adapter_model.safetensors" in message
    assert "adapter_model.bin" in message and "handler.py" in message


def test_a_local_directory_wins_and_the_hub_is_opt_in(hub, tmp_path, monkeypatch):
    calls = count_fetches(monkeypatch)
    local = tmp_path / "acme" / "tiny-lora"
    local.mkdir(parents=True)
    assert locate_adapter("acme/tiny-lora", hub=True).resolve() == local
    assert calls == []  # the local directory was taken without asking the hub
    with pytest.raises(HubAdapterError, match="acme/other.*turn on --hub-adapters"):
        locate_adapter("acme/other", hub=False)
    assert locate_adapter("not/a/hub-id", hub=True).name == "hub-id"  # read_adapter says more
    assert locate_adapter(f"{REPO}@v2", hub=True).name == hub["v2"]
    assert len(calls) == 1


def _cli(run_cli, command, base, *args):
    """(exit code, stdout, stderr) of `lorafleet COMMAND --base BASE ARGS...`."""
    return run_cli(command, "--base", base, *args)


def _generate(run_cli, base, adapter, *extra):
    args = ("--adapter", adapter, "--prompt", "Hello there", "--max-tokens", "6", "--no-chat")
    return _cli(run_cli, "generate", base, *args, *extra)


def test_generate_with_a_hub_adapter_equals_the_local_directory(hub, run_cli, tiny_base_dir, loras):
    code, from_hub, err = _generate(run_cli, tiny_base_dir, REPO, "--hub-adapters")
    assert code == 0, err
    code, from_dir, err = _generate(run_cli, tiny_base_dir, loras["v1"])
    assert code == 0, err
    assert from_hub == from_dir and from_hub.strip()
    code, pinned, err = _generate(run_cli, tiny_base_dir, f"{REPO}@v2", "--hub-adapters")
    code2, v2_dir, _ = _generate(run_cli, tiny_base_dir, loras["v2"])
    assert code == code2 == 0 and pinned == v2_dir


@pytest.mark.parametrize(
    ("adapter", "flag", "needles"),
    [
        ("acme/missing", True, ["acme/missing", "not in the local hub cache", "HF_HUB_OFFLINE"]),
        ("acme/pickled", True, ["acme/pickled", "adapter_model.bin", "safetensors"]),
        (REPO, False, [REPO, "no such adapter directory", "--hub-adapters"]),
    ],
)
def test_the_cli_refuses_in_one_line(hub, run_cli, tiny_base_dir, adapter, flag, needles):
    extra = ["--hub-adapters"] if flag else []
    code, _, err = _cli(run_cli, "info", tiny_base_dir, "--adapter", adapter, *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert all(needle in err for needle in needles), err


def test_a_hub_adapter_is_validated_against_the_base(
    hub, run_cli, tiny_base_dir, tmp_path, tokenizer
):
    # A LoRA whose rank is above --max-rank: refused as the same directory would be.
    big = write_lora(tmp_path / "big", tokenizer, seed=3, rank=8)
    put_repo(hub["cache"], "acme/big", adapter_files(big))
    args = ("--adapter", "acme/big", "--hub-adapters", "--max-rank", "4")
    code, _, err = _cli(run_cli, "info", tiny_base_dir, *args)
    assert code == 2 and "rank 8" in err and "above the limit of 4" in err, err
    code, out, err = _cli(
        run_cli, "info", tiny_base_dir, "--adapter", "acme/big", "--hub-adapters", "--json"
    )
    assert code == 0, err
    report = json.loads(out)["adapter"]
    assert report["rank"] == 8 and "models--acme--big/snapshots/" in report["path"]


def test_merge_takes_hub_adapters(hub, run_cli, tiny_base_dir, loras, tmp_path):
    out_hub, out_dir = tmp_path / "from-hub", tmp_path / "from-dirs"
    code, _, err = _cli(
        run_cli,
        "merge",
        tiny_base_dir,
        "-a",
        f"a={REPO}:0.5",
        "-a",
        f"b={REPO}@v2:0.5",
        "--method",
        "cat",
        "--hub-adapters",
        "--out",
        out_hub,
    )
    assert code == 0, err
    code, _, err = _cli(
        run_cli,
        "merge",
        tiny_base_dir,
        "-a",
        f"a={loras['v1']}:0.5",
        "-a",
        f"b={loras['v2']}:0.5",
        "--method",
        "cat",
        "--out",
        out_dir,
    )
    assert code == 0, err
    merged = load_file(str(out_hub / "adapter_model.safetensors"))
    expected = load_file(str(out_dir / "adapter_model.safetensors"))
    assert merged.keys() == expected.keys()
    assert all(merged[k].equal(expected[k]) for k in expected)
