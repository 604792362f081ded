"""The llama.cpp peer bench without the peers built: the 'not installed' error, the conversion
inputs and driver, llama-server's command and requests, and the binding worker on a stand-in."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lorafleet.adapters import MethodConfig, adapter_from_model, new_adapter
from lorafleet.bench import peer_tools, peers
from lorafleet.errors import LorafleetError


def fake_peers(tmp_path: Path, convert_script: str = "") -> peer_tools.Peers:
    script = tmp_path / "convert_lora_to_gguf.py"
    script.write_text(convert_script)
    return peer_tools.Peers(
        root=tmp_path,
        python=Path(sys.executable),
        server=tmp_path / "srv",
        lib_dir=tmp_path,
        convert=script,
    )


def test_missing_peers_is_one_line_naming_make_bench_peers(tmp_path, run_cli):
    with pytest.raises(LorafleetError, match="make bench-peers"):
        peer_tools.require(tmp_path)
    code, out, err = run_cli("bench", "engine", "--only-peers", "--peers-dir", str(tmp_path))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "run `make bench-peers` first" in err


def test_bench_serve_peers_checks_the_build_first(tmp_path, run_cli):
    code, _, err = run_cli("bench", "serve", "--peers", "--peers-dir", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "make bench-peers" in err


def complete_build(root: Path) -> peer_tools.Peers:
    found = peer_tools.locate(root)
    for path in (found.python, found.server, found.lib_dir / "libllama.so", found.convert):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    return found


def test_locate_finds_a_complete_build(tmp_path):
    found = complete_build(tmp_path)
    assert peer_tools.require(tmp_path) == found
    assert found.binding_env()["LLAMA_CPP_LIB_PATH"] == str(found.lib_dir)


def test_serve_peer_takes_the_random_bench_adapters_only(tmp_path):
    complete_build(tmp_path)
    with pytest.raises(LorafleetError, match="not --adapters-dir"):
        peers.serve_peer("default", (1,), ["sst2"], [[1, 2]], 4, 2, 8, 1, 1, tmp_path)


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
            f.write(f"{os.getpid()}\\n")
    """)
    peers_ = fake_peers(tmp_path, script)
    jobs = [(tmp_path / f"a{i}", tmp_path / f"a{i}.gguf") for i in range(3)]
    assert peer_tools.convert(peers_, tmp_path / "base", jobs) == [out for _, out in jobs]
    for src, out in jobs:
        args = out.read_text().split()
        assert args[args.index("--base") + 1] == str(tmp_path / "base")
        assert args[args.index("--outtype") + 1] == "f32" and args[-1] == str(src)
        assert args[args.index("--outfile") + 1] == str(out) + ".tmp"  # renamed once complete
    assert len(set((tmp_path / "log").read_text().split())) == 1  # one process for all three
    assert not list(tmp_path.glob("*.tmp"))


def test_convert_failure_is_one_error_and_no_output(tmp_path):
    peers_ = fake_peers(tmp_path, "raise SystemExit('Model Foo is not supported')")
    with pytest.raises(LorafleetError, match="not supported"):
        peer_tools.convert(peers_, tmp_path, [(tmp_path / "a0", tmp_path / "a0.gguf")])
    assert not (tmp_path / "a0.gguf").exists()


def test_server_command_slots_context_and_loras(tmp_path):
    peers_ = fake_peers(tmp_path)
    loras = [tmp_path / "a0.gguf", tmp_path / "a1.gguf"]
    args = peer_tools.server_command(peers_, tmp_path / "m.gguf", loras, 32, 172, 2, 8123)
    assert args[0] == str(tmp_path / "srv")
    assert args[args.index("-np") + 1] == "32" and args[args.index("-c") + 1] == str(32 * 172)
    assert args[args.index("-t") + 1] == "2" and args[args.index("--port") + 1] == "8123"
    assert [args[i + 1] for i, a in enumerate(args) if a == "--lora"] == [str(p) for p in loras]
    assert "--lora-init-without-apply" in args  # scale 0 until a request picks one
    assert "--lora-init-without-apply" not in peer_tools.server_command(
        peers_, tmp_path / "m.gguf", [], 1, 64, 1, 1
    )
    body = peer_tools.completion_body([1, 2, 3], 16, 5)
    assert body["lora"] == [{"id": 5, "scale": 1.0}] and body["prompt"] == [1, 2, 3]
    assert body["ignore_eos"] and not body["cache_prompt"] and body["temperature"] == 0.0
    assert peer_tools.completion_body([1], 16, None)["lora"] == []


FAKE_LLAMA_CPP = """
class Llama:
    def __init__(self, model_path, n_ctx, **kw):
        self.n_ctx, self.resets = n_ctx, 0
    def reset(self):
        self.resets += 1
    def generate(self, ids, temp, top_k, reset):
        assert temp == 0.0 and not reset and self.resets
        token = len(ids)
        while True:  # never stops by itself, like the real one; 2 stands for EOS
            yield 2 if token % 3 == 0 else token
            token += 1
"""


def test_binding_worker_decodes_exactly_new_tokens_per_prompt(tmp_path, monkeypatch):
    (tmp_path / "llama_cpp.py").write_text(FAKE_LLAMA_CPP)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    cfg = {
        "gguf": tmp_path / "m.gguf",
        "prompts": [[1] * 5, [1] * 7, [1] * 9],
        "single": 2,
        "new_tokens": 6,
        "threads": 1,
        "reps": 2,
        "prompt_tokens": 9,
    }
    out = peers.run_binding(fake_peers(tmp_path), cfg, limit_s=120)
    fig = out["workloads"]["single"]
    assert fig["tokens"] == 12  # 2 prompts x 6 tokens, EOS (2) not stopping them
    assert out["request0"] == [5, 2, 7, 8, 2, 10]
    assert fig["ttft_p50"] is not None and out["peak_rss_mb"] > 0


def test_base_gguf_is_the_shipped_file_and_needs_a_gguf_base(tmp_path):
    path = peers.base_gguf("default")
    assert path.suffix == ".gguf" and path.is_file()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(LorafleetError, match="GGUF base"):
        peers.base_gguf(str(tmp_path))


class FakeLlamaServer(BaseHTTPRequestHandler):
    """/completion streamed as llama-server does (SSE, `tokens` per chunk, a final stop)."""

    bodies: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeLlamaServer.bodies.append(body)
        if body["n_predict"] < 0:
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "bad n_predict"}}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        lora = body["lora"][0]["id"] if body["lora"] else 0
        chunks = [[100 * lora + i] for i in range(body["n_predict"])] + [[]]
        for i, tokens in enumerate(chunks):
            event = {"content": "x" * len(tokens), "tokens": tokens, "stop": i == len(chunks) - 1}
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()

    def log_message(self, *args):
        pass


def test_over_server_streams_every_request_and_counts_tokens():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeLlamaServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    FakeLlamaServer.bodies = []
    try:
        bodies = [peer_tools.completion_body([1, 2], 5, lora) for lora in (3, None, 1)]
        fig = asyncio.run(peers.over_server(url, bodies))
        assert fig["tokens"] == 15 and fig["request0"] == [300, 301, 302, 303, 304]
        assert fig["ttft_p50"] is not None and fig["tpot_p50"] is not None
        loras = sorted(str(b["lora"]) for b in FakeLlamaServer.bodies)
        assert loras == ["[]", "[{'id': 1, 'scale': 1.0}]", "[{'id': 3, 'scale': 1.0}]"]
        with pytest.raises(LorafleetError, match="HTTP 400"):
            asyncio.run(peers.over_server(url, [peer_tools.completion_body([1], -1, None)]))
    finally:
        server.shutdown()


def test_settings_are_labelled_and_each_is_compared_with_llama_cpp(tmp_path):
    assert peers.label("float32") == "lorafleet"
    assert peers.label("bfloat16+int8") == "lorafleet bfloat16+int8"
    with pytest.raises(LorafleetError, match="unknown"):
        peers.label("fp8")

    def fig(tok_s: float) -> dict:
        return {
            "tokens": 64,
            "tokens_per_s": tok_s,
            "ttft_p50": 0.1,
            "ttft_p99": 0.2,
            "tpot_p50": 0.01,
            "tpot_p99": 0.02,
        }

    ours = {k: fig(v) for k, v in (("all_base", 120.0), ("adapters", 100.0), ("single", 20.0))}
    faster = {k: fig(2 * v["tokens_per_s"]) for k, v in ours.items()}
    server = {
        "all_base": {**fig(60.0), "request0": [1]},
        "adapters": {**fig(40.0), "request0": [2]},
    }
    results = {
        "lorafleet": {"workloads": ours, "peak_rss_mb": 1},
        "lorafleet bfloat16": {"workloads": faster, "peak_rss_mb": 1},
        "llama.cpp": {"workloads": {"single": fig(50.0)}, "peak_rss_mb": 1},
        "llama-server": {"workloads": server, "peak_rss_mb": 1},
    }
    cfg = {
        "base": "default",
        "gguf": "m.gguf",
        "requests": 4,
        "loras": [1, 2],
        "rank": 8,
        "prompt_tokens": 8,
        "new_tokens": 16,
        "single": 1,
        "threads": 1,
    }
    out = peers._report(results, cfg, tmp_path / "peers.json")
    fp32, bf16 = (
        out["targets_by_setting"]["lorafleet"],
        out["targets_by_setting"]["lorafleet bfloat16"],
    )
    assert out["targets"] == fp32
    assert (
        fp32["single"]["lorafleet_vs_llama_cpp"] == pytest.approx(0.4) and not fp32["single"]["met"]
    )
    assert bf16["single"]["lorafleet_vs_llama_cpp"] == pytest.approx(0.8) and bf16["single"]["met"]
    assert bf16["adapters"]["lorafleet_vs_llama_cpp"] == pytest.approx(5.0)
    assert json.loads((tmp_path / "peers.json").read_text())["targets_by_setting"].keys() == {
        "lorafleet",
        "lorafleet bfloat16",
    }
