"""The llama.cpp peers without the peers built: the 'not installed' errors, the build's paths,
the LoRA conversion inputs and driver, llama-server's command, the matched pairs."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from lorafleet import cpu
from lorafleet.adapters import MethodConfig, adapter_from_model, new_adapter
from lorafleet.bench import peer_tools, peers
from lorafleet.errors import LorafleetError


def fake_peers(tmp_path: Path, convert_script: str = "") -> peer_tools.Peers:
    script = tmp_path / "convert_lora_to_gguf.py"
    script.write_text(convert_script)
    return peer_tools.Peers(
        root=tmp_path, server=tmp_path / "srv", lib_dir=tmp_path, convert=script
    )


def complete_build(root: Path) -> peer_tools.Peers:
    found = peer_tools.locate(root)
    for name in peer_tools.TOOLS:
        path = getattr(found, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    (found.lib_dir / "libllama.so").write_text("")
    return found


@pytest.mark.parametrize(
    ("command", "missing"),
    [
        (("bench", "engine", "--peers"), "llama-batched-bench"),
        (("bench", "engine", "--only-peers"), "llama-batched-bench"),
        (("bench", "serve", "--peers"), "llama-server"),
    ],
)
def test_missing_peers_is_one_line_naming_the_tool_and_make_bench_peers(
    tmp_path, run_cli, command, missing
):
    code, out, err = run_cli(*command, "--peers-dir", str(tmp_path))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "run `make bench-peers` first" in err and missing in err


def test_require_checks_only_the_tools_asked_for(tmp_path):
    found = complete_build(tmp_path)
    assert peer_tools.require(tmp_path) == found
    assert found.batched_bench.name == "llama-batched-bench"
    assert found.perplexity.name == "llama-perplexity" and found.quantize.name == "llama-quantize"
    found.perplexity.unlink()
    assert peer_tools.require(tmp_path, tools=("batched_bench", "server")) == found
    with pytest.raises(LorafleetError, match="llama-perplexity at .*make bench-peers"):
        peer_tools.require(tmp_path)
    (found.lib_dir / "libllama.so").unlink()
    with pytest.raises(LorafleetError, match="libllama.so"):
        peer_tools.require(tmp_path, tools=("server",))
    with pytest.raises(ValueError, match="unknown peer tools"):
        peer_tools.require(tmp_path, tools=("llama-bench",))


def test_a_bad_setting_is_one_line_before_anything_runs(tmp_path, run_cli):
    complete_build(tmp_path)
    code, _, err = run_cli("bench", "engine", "--peers", "--peers-dir", str(tmp_path), "-s", "fp8")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "fp8" in err


def test_conversion_inputs_plain_lora_only(tiny_model):
    peft_model = new_adapter(tiny_model, MethodConfig(method="lora", rank=4, alpha=8.0))
    adapter = adapter_from_model(peft_model)
    assert peer_tools.check_convertible(adapter.config, adapter.tensors) == pytest.approx(2.0)
    for change in ({"use_rslora": True}, {"use_dora": True}, {"rank_pattern": {"q_proj": 8}}):
        with pytest.raises(LorafleetError, match="llama.cpp"):
            peer_tools.check_convertible({**adapter.config, **change}, adapter.tensors)
    extra = {
        **adapter.tensors,
        "base_model.model.lm_head.weight": next(iter(adapter.tensors.values())),
    }
    with pytest.raises(LorafleetError, match="plain LoRA A/B pairs"):
        peer_tools.check_convertible(adapter.config, extra)


def test_convert_runs_the_script_per_adapter_in_one_process_atomically(tmp_path):
    # A stand-in for convert_lora_to_gguf.py: writes its --outfile and logs its argv and pid.
    (tmp_path / "conversion.py").write_text("")  # a sibling package, as the real script has
    script = textwrap.dedent("""
        import os, sys
        from pathlib import Path
        import conversion
        args = sys.argv[1:]
        out = Path(args[args.index("--outfile") + 1])
        out.write_text(" ".join(args))
        with open(Path(args[-1]).parent / "log", "a") as f:
            f.write(f"{os.getpid()} {os.environ['PYTHONPATH'].split(os.pathsep)[0]}\\n")
    """)
    peers_ = fake_peers(tmp_path, script)
    jobs = [(tmp_path / f"a{i}", tmp_path / f"a{i}.gguf") for i in range(3)]
    assert peer_tools.convert(peers_, tmp_path / "base", jobs, "bf16") == [o for _, o in jobs]
    for src, out in jobs:
        args = out.read_text().split()
        assert args[args.index("--base") + 1] == str(tmp_path / "base")
        assert args[args.index("--outtype") + 1] == "bf16" and args[-1] == str(src)
        assert args[args.index("--outfile") + 1] == str(out) + ".tmp"  # renamed once complete
    logged = {tuple(line.split()) for line in (tmp_path / "log").read_text().splitlines()}
    assert len({pid for pid, _ in logged}) == 1  # one process for all three
    assert {path for _, path in logged} == {str(tmp_path / "gguf-py")}  # its own tree's gguf-py
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(LorafleetError, match="outtype 'q8_0'"):
        peer_tools.convert(peers_, tmp_path / "base", jobs, "q8_0")


def test_convert_failure_is_one_error_and_no_output(tmp_path):
    peers_ = fake_peers(tmp_path, "raise SystemExit('Model Foo is not supported')")
    with pytest.raises(LorafleetError, match="not supported"):
        peer_tools.convert(peers_, tmp_path, [(tmp_path / "a0", tmp_path / "a0.gguf")])
    assert not (tmp_path / "a0.gguf").exists()


def test_lora_precision_follows_the_adapters_dtype():
    assert peer_tools.lora_outtype("float32") == "f32"
    assert peer_tools.lora_outtype("torch.bfloat16") == "bf16"
    with pytest.raises(LorafleetError, match="float16"):
        peer_tools.lora_outtype("float16")


def test_server_command_slots_context_loras_then_flags(tmp_path):
    peers_ = fake_peers(tmp_path)
    loras = [tmp_path / "a0.gguf", tmp_path / "a1.gguf"]
    flags = ("-t", "2", "-kvu")
    args = peer_tools.server_command(peers_, tmp_path / "m.gguf", loras, 32, 172, 8123, flags)
    assert args[0] == str(tmp_path / "srv")
    assert args[args.index("-np") + 1] == "32" and args[args.index("-c") + 1] == str(32 * 172)
    assert args[args.index("--port") + 1] == "8123" and args[-3:] == list(flags)
    assert [args[i + 1] for i, a in enumerate(args) if a == "--lora"] == [str(p) for p in loras]
    assert "--lora-init-without-apply" in args  # scale 0 until a request picks one
    assert args[args.index("--cache-ram") + 1] == "0"
    plain = peer_tools.server_command(peers_, tmp_path / "m.gguf", [], 1, 64, 1)
    assert "--lora-init-without-apply" not in plain and "-t" not in plain


def test_base_gguf_is_the_shipped_file_and_needs_a_gguf_base(tmp_path):
    path = peers.base_gguf("default")
    assert path.suffix == ".gguf" and path.is_file()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(LorafleetError, match="GGUF base"):
        peers.base_gguf(str(tmp_path))


def test_settings_are_named_once_and_matched_by_bytes():
    assert peers.setting_name("float32+none") == "float32"
    assert peers.setting_name("bfloat16+int8") == "bfloat16+int8"
    assert peers.setting_name("float32+int8") == "int8"
    assert peers.label("bfloat16") == "lorafleet bfloat16"
    assert peers.matched_gguf("float32") == "f32" and peers.matched_gguf("bfloat16") == "bf16"
    assert peers.matched_gguf("bfloat16+int8") == "q8_0" and peers.matched_gguf("int4") is None
    with pytest.raises(LorafleetError, match="unknown"):
        peers.setting_name("fp8")


@pytest.mark.parametrize("default", ["float32+none", "bfloat16+int8"])
def test_matched_pairs_and_their_targets(default):
    pairs = peers.matched_pairs(default)
    assert [(p.setting, p.gguf) for p in pairs] == [
        ("float32", "f32"),
        ("bfloat16", "bf16"),
        ("bfloat16+int8", "q8_0"),
        (peers.setting_name(default), peers.SHIPPED),  # the user's pick vs serve's default
    ]
    assert all(p.targets == {"parallel": 1.0, "single": 0.8} for p in pairs[:3])
    assert pairs[3].targets == {"single": 0.5}
    assert pairs[0].title == "F32 / float32" and pairs[3].title.startswith("Q4_1 (shipped) / ")


def test_the_default_pair_is_what_serve_runs_with_no_flags(monkeypatch):
    import lorafleet.serve.api.config as config

    monkeypatch.setattr(config, "SERVE_DTYPE", "bfloat16")
    monkeypatch.setattr(config, "SERVE_QUANTIZE", "int4")
    assert peers.serve_default_setting() == "bfloat16+int4"
    monkeypatch.setattr(config, "SERVE_QUANTIZE", "none")
    assert peers.serve_default_setting() == "bfloat16"
    assert peers.matched_pairs(peers.serve_default_setting())[-1].setting == "bfloat16"
    monkeypatch.setattr(config, "SERVE_DTYPE", "auto")
    monkeypatch.setattr(config, "SERVE_QUANTIZE", "auto")
    monkeypatch.setattr(cpu, "native_bfloat16", lambda flags=None: True)
    assert peers.serve_default_setting() == "bfloat16"
    monkeypatch.setattr(cpu, "native_bfloat16", lambda flags=None: False)
    assert peers.serve_default_setting() == "int4"
