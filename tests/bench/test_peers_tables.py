"""The peer tables' logic without llama.cpp: llama-batched-bench's output (a sample captured
from the real tool), the interleaving, the median / min / load summaries, the matched-pair
rows, llama-server's candidate selection and the shared HTTP client."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lorafleet.bench import peers, peers_http, peers_inproc
from lorafleet.bench.peers_batched import (
    batched_bench_command,
    buffer_mib,
    figures,
    parse_table,
    run_measured,
)
from lorafleet.bench.peers_config import TARGETS, PeerTableConfig
from lorafleet.bench.peers_runs import interleave, ratio, summarise_reps, verdict
from lorafleet.errors import LorafleetError

SAMPLE = Path(__file__).parent / "fixtures" / "llama_batched_bench.txt"


# -- llama-batched-bench -------------------------------------------------------------------------


def test_batched_bench_rows_and_memory_parse_from_the_real_output():
    text = SAMPLE.read_text()
    rows = parse_table(text)
    assert [(r["pp"], r["tg"], r["pl"]) for r in rows] == [(100, 64, 1), (100, 64, 32)]
    assert rows[1]["n_kv"] == 32 * (100 + 64) and isinstance(rows[1]["t_pp"], float)
    for row in rows:
        fig = figures(row)
        assert fig["tokens"] == row["pl"] * 64 and fig["parallel"] == row["pl"]
        assert fig["seconds"] == pytest.approx(row["t_pp"] + row["t_tg"])
        assert fig["gen_tok_s"] == pytest.approx(row["pl"] * 64 / (row["t_pp"] + row["t_tg"]))
        assert fig["gen_tok_s"] < row["s_tg"]  # the prefill is in the wall time
        assert fig["prefill_tok_s"] == row["s_pp"] and fig["decode_tok_s"] == row["s_tg"]
        # the tool's own rates agree with its own times
        assert row["s_pp"] == pytest.approx(row["pl"] * 100 / row["t_pp"], rel=0.02)
    memory = buffer_mib(text)
    assert {"weights_mib", "kv_mib", "compute_mib"} <= set(memory)
    assert all(v > 0 for v in memory.values())
    with pytest.raises(LorafleetError, match="no result row.*unable to load"):
        parse_table("main: error: unable to load model\n")


def test_buffer_sizes_add_up_per_kind():
    text = (
        "load_tensors:   CPU_Mapped model buffer size =    92.00 MiB\n"
        "load_tensors:   CPU_REPACK model buffer size =    10.50 MiB\n"
        "llama_kv_cache:        CPU KV buffer size =   164.00 MiB\n"
        "llama_adapter_lora_init_impl:   CPU_Mapped LoRA buffer size =     4.25 MiB\n"
    )
    assert buffer_mib(text) == {"weights_mib": 102.5, "kv_mib": 164.0, "lora_mib": 4.25}


def test_batched_bench_command_prefills_every_prompt_in_one_batch():
    args = batched_bench_command(Path("bb"), Path("m.gguf"), 100, 64, (1, 32), 2)

    def value(flag):
        return args[args.index(flag) + 1]

    assert args[:3] == ["bb", "-m", "m.gguf"]
    assert value("-b") == "4096" and value("-ub") == "512" and value("-fa") == "on"
    assert value("-c") == str(32 * 164) and value("-npl") == "1,32"
    assert value("-npp") == "100" and value("-ntg") == "64"
    assert value("-t") == "2" and value("-tb") == "2"
    small = batched_bench_command(Path("bb"), Path("m.gguf"), 10, 4, (1, 4), 1)
    assert small[small.index("-b") + 1] == "2048"
    with pytest.raises(LorafleetError, match="below 32 x 100"):
        batched_bench_command(Path("bb"), Path("m.gguf"), 100, 64, (1, 32), 2, batch=2048)


def test_a_child_is_measured_by_its_own_peak_rss_and_killed_past_its_time():
    grow = "x = bytearray(120 * 2**20); x[::4096] = b'1' * len(x[::4096]); print('done')"
    done = run_measured([sys.executable, "-c", grow], timeout=60)
    assert done["returncode"] == 0 and "done" in done["output"]
    assert done["peak_rss_mb"] >= 120
    slow = run_measured([sys.executable, "-c", "import time; time.sleep(60)"], timeout=0.5)
    assert slow["returncode"] == -9 and slow["seconds"] < 30


# -- repetitions ---------------------------------------------------------------------------------


def test_systems_alternate_within_each_repetition():
    assert interleave(["a", "b", "a", "c"], 2) == [
        (0, "a"),
        (0, "b"),
        (0, "c"),
        (1, "a"),
        (1, "b"),
        (1, "c"),
    ]
    pairs = peers.matched_pairs("bfloat16+int8")  # the default shares its engine with a pair
    assert peers_inproc.systems_of(pairs) == [
        "lorafleet float32",
        "llama.cpp F32",
        "lorafleet bfloat16",
        "llama.cpp BF16",
        "lorafleet bfloat16+int8",
        "llama.cpp Q8_0",
        "llama.cpp Q4_1 (shipped)",
    ]


def test_reps_summary_median_min_max_and_load_per_run():
    runs = [
        {"gen_tok_s": 30.0, "decode_tok_s": None, "load1": 1.5},
        {"gen_tok_s": 10.0, "decode_tok_s": 4.0, "load1": 2.0},
        {"gen_tok_s": 20.0, "decode_tok_s": 6.0, "load1": 0.5},
        {"gen_tok_s": 25.0, "decode_tok_s": 8.0, "load1": 1.0},
    ]
    out = summarise_reps(runs, ("gen_tok_s", "decode_tok_s", "prefill_tok_s"))
    assert out["reps"] == 4 and out["load1"] == [1.5, 2.0, 0.5, 1.0]
    assert out["gen_tok_s"] == {"median": 22.5, "min": 10.0, "max": 30.0, "n": 4}
    assert out["decode_tok_s"] == {"median": 6.0, "min": 4.0, "max": 8.0, "n": 3}
    assert out["prefill_tok_s"]["median"] is None and out["prefill_tok_s"]["n"] == 0
    assert ratio(out["gen_tok_s"], {"median": 45.0}) == pytest.approx(0.5)
    assert ratio(out["gen_tok_s"], out["prefill_tok_s"]) is None
    assert verdict(1.0, 1.0) == "met" and verdict(0.99, 1.0) == "not met"
    assert verdict(None, 1.0) == "n/a"


def test_engine_figures_split_prefill_and_decode():
    summary = {"seconds": 10.0, "tokens": 32 * 64, "ttft_p99": 2.0}
    fig = peers_inproc.engine_figures(summary, 32, 100)
    assert fig["gen_tok_s"] == pytest.approx(204.8)
    assert fig["prefill_tok_s"] == pytest.approx(1600.0)
    assert fig["decode_tok_s"] == pytest.approx((2048 - 32) / 8.0)


def test_adapter_slot_bytes_count_the_stacks(tiny_model):
    from lorafleet.layers.slots import inject_multilora

    assert peers_inproc.adapter_slot_bytes(tiny_model) == 0
    inject_multilora(tiny_model, ["q_proj"], 3, 4)
    layers = [m for m in tiny_model.modules() if hasattr(m, "lora_Bt")]
    slots = 3 + 1  # slot 0 is the base's (no adapter)
    want = sum(4 * (slots * 4 * (m.lora_A.shape[-1] + m.lora_Bt.shape[-1]) + slots) for m in layers)
    assert layers and peers_inproc.adapter_slot_bytes(tiny_model) == want


def test_pair_rows_take_the_ratio_of_medians_and_judge_each_target():
    pairs = peers.matched_pairs("float32")[::3]  # F32 / float32 and Q4_1 / float32

    def fig(median):
        return {"gen_tok_s": {"median": median, "min": median - 1, "max": median + 1, "n": 5}}

    summary = {
        "lorafleet float32|32": http_summary(320.0),
        "llama.cpp F32|32": http_summary(300.0),
        "lorafleet float32|1": http_summary(40.0),
        "llama.cpp F32|1": http_summary(72.0),
        "llama.cpp Q4_1 (shipped)|32": http_summary(160.0),
        "llama.cpp Q4_1 (shipped)|1": http_summary(80.0),
    }
    bytes_per_token = {"lorafleet float32": 513 * 2**20, "llama.cpp F32": 514 * 2**20}
    f32, q41 = peers_inproc.pair_rows(pairs, summary, 32, bytes_per_token)
    assert f32["parallel"]["ratio"] == pytest.approx(320 / 300)
    assert f32["parallel"]["verdict"] == "met" and f32["parallel"]["target"] == 1.0
    assert (
        f32["single"]["ratio"] == pytest.approx(40 / 72) and f32["single"]["verdict"] == "not met"
    )
    assert f32["lorafleet_mib_per_token"] == 513 and f32["llama_cpp_mib_per_token"] == 514
    assert q41["parallel"]["verdict"] == "no target" and q41["single"]["target"] == 0.5
    assert q41["single"]["verdict"] == "met"  # 40 / 80 = 0.5
    assert q41["llama_cpp_mib_per_token"] is None


def test_peer_table_config_refuses_bad_sizes():
    assert PeerTableConfig().reps == 5 and PeerTableConfig().requests == 32
    with pytest.raises(LorafleetError, match="--reps"):
        PeerTableConfig(reps=0)
    with pytest.raises(LorafleetError, match="--new-tokens"):
        PeerTableConfig(new_tokens=1)
    assert TARGETS["http_adapters"] == 2.0 and TARGETS["matched_parallel"] == 1.0


# -- llama-server's configuration ----------------------------------------------------------------


def test_knobs_are_the_issues_candidates():
    names = [k.name for k in peers_http.knobs(1, 2)]
    assert names == ["-b 512 -ub 512 -fa on", "samplers top_k, top_k 1", "--poll 0", "-kvu", "-t 2"]
    assert "-t 2" not in [k.name for k in peers_http.knobs(2, 2)]


def test_combined_candidate_merges_flags_and_request_fields():
    batch, topk, _, _, cores = peers_http.knobs(1, 2)
    both = peers_http.combine("x", 1, [batch, topk])
    assert both.flags == ("-t", "1", "-tb", "1", "-b", "512", "-ub", "512", "-fa", "on")
    assert both.body == {"temperature": 0.0, "samplers": ["top_k"], "top_k": 1}
    assert peers_http.combine("y", 1, [cores]).flags == ("-t", "2", "-tb", "2")
    assert peers_http.combine("defaults", 1, []).body == {"temperature": 0.0}


def test_tuning_keeps_the_fastest_and_tries_the_winners_together(capsys):
    speed = {"-b": 5.0, "top_k": 2.0, "--poll": -1.0, "-kvu": 0.0}

    def measure(cand):  # each knob adds its own speed-up to 100 tok/s
        text = " ".join(cand.flags) + json.dumps(cand.body)
        return 100.0 + sum(v for k, v in speed.items() if k in text)

    out = peers_http.tune(2, 2, measure)
    assert list(out["results"]) == [
        "defaults",
        "-b 512 -ub 512 -fa on",
        "samplers top_k, top_k 1",
        "--poll 0",
        "-kvu",
        "-b 512 -ub 512 -fa on + samplers top_k, top_k 1",
    ]
    assert out["best"] == "-b 512 -ub 512 -fa on + samplers top_k, top_k 1"
    assert out["results"][out["best"]] == 107.0 and "--poll" not in out["candidate"].flags
    assert peers_http.winners({"defaults": 1.0, "a": 1.0, "b": 2.0}, "defaults") == ["b"]
    assert peers_http.best({"a": 2.0, "b": 2.0, "c": 1.0}) == "a"


# -- the shared HTTP client ----------------------------------------------------------------------


def test_request_bodies_differ_only_in_how_the_adapter_is_named():
    ours = peers_http.request_body("lorafleet", [1, 2], 8, 3, None)
    theirs = peers_http.request_body("llama-server", [1, 2], 8, 3, {"top_k": 1})
    shared = {"prompt", "max_tokens", "ignore_eos", "stream", "stream_options", "temperature"}
    assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}
    assert ours["model"] == "a3" and "lora" not in ours
    assert theirs["lora"] == [{"id": 3, "scale": 1.0}] and theirs["cache_prompt"] is False
    assert theirs["top_k"] == 1
    assert peers_http.request_body("lorafleet", [1], 8, None, None)["model"] == "base"
    assert peers_http.request_body("llama-server", [1], 8, None, None)["lora"] == []
    prompts = [[i] for i in range(5)]
    kinds = {
        kind: peers_http.workload_bodies("llama-server", kind, prompts, 4, 2, None)
        for kind in peers_http.WORKLOADS
    }
    assert [b["lora"] for b in kinds["adapters"]][:3] == [
        [{"id": 0, "scale": 1.0}],
        [{"id": 1, "scale": 1.0}],
        [{"id": 0, "scale": 1.0}],
    ]
    assert all(b["lora"] == [] for b in kinds["all_base"]) and len(kinds["all_base"]) == 5
    assert len(kinds["single"]) == 1 and kinds["single"][0]["prompt"] == [0]


class FakeOpenAI(BaseHTTPRequestHandler):
    """/v1/completions streamed as both servers do: a text chunk per token, then usage."""

    short = False

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["max_tokens"] < 0:
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "bad max_tokens"}}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        n = body["max_tokens"] - (1 if FakeOpenAI.short else 0)
        for _ in range(n):
            self.wfile.write(f"data: {json.dumps({'choices': [{'text': 'x'}]})}\n\n".encode())
        usage = {"choices": [], "usage": {"completion_tokens": n}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())

    def log_message(self, *args):
        pass


def test_the_client_counts_tokens_and_refuses_short_answers():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        bodies = [peers_http.request_body("lorafleet", [1, 2], 5, i, None) for i in range(3)]
        fig = asyncio.run(peers_http.send_all(url, bodies, "lorafleet"))
        assert fig["tokens"] == 15 and fig["gen_tok_s"] > 0
        assert fig["ttft_p50"] is not None and fig["tpot_p50"] is not None
        FakeOpenAI.short = True
        with pytest.raises(LorafleetError, match="4 tokens, asked 5"):
            asyncio.run(peers_http.send_all(url, bodies[:1], "llama-server"))
        FakeOpenAI.short = False
        bad = peers_http.request_body("llama-server", [1], -1, None, None)
        with pytest.raises(LorafleetError, match="llama-server HTTP 400"):
            asyncio.run(peers_http.send_all(url, [bad], "llama-server"))
    finally:
        server.shutdown()


def http_summary(median: float) -> dict:
    """One system's summary of one workload (peers_runs.summarise_reps's shape)."""
    return {"gen_tok_s": {"median": median}, "ttft_p50": {"median": 1.0}, "load1": [1.0]}


def test_http_rows_judge_the_adapters_workload_only():
    summary = {
        "adapters|lorafleet": http_summary(300.0),
        "adapters|llama-server": http_summary(100.0),
        "all_base|lorafleet": http_summary(200.0),
        "all_base|llama-server": http_summary(150.0),
        "single|lorafleet": http_summary(40.0),
        "single|llama-server": http_summary(100.0),
    }
    rows = {r["workload"]: r for r in peers_http.table_rows(summary)}
    assert rows["adapters"]["ratio"] == pytest.approx(3.0) and rows["adapters"]["verdict"] == "met"
    assert rows["all_base"]["verdict"] == "no target" and rows["single"]["target"] is None


def test_base_rows_also_face_a_llama_server_without_loras():
    """llama-server computes every LoRA it has loaded for every token: the base-only rows also
    run on one without LoRAs (the adapters row cannot), and get a ratio against it."""
    assert peers_http.NO_LORAS not in peers_http.systems("adapters")
    assert (
        peers_http.systems("all_base")[-1]
        == peers_http.systems("single")[-1]
        == "llama-server-no-loras"
    )

    summary = {
        "adapters|lorafleet": http_summary(300.0),
        "adapters|llama-server": http_summary(100.0),
        "all_base|lorafleet": http_summary(200.0),
        "all_base|llama-server": http_summary(20.0),
        "all_base|llama-server-no-loras": http_summary(250.0),
    }
    rows = {r["workload"]: r for r in peers_http.table_rows(summary)}
    assert rows["all_base"]["ratio"] == pytest.approx(10.0)
    assert rows["all_base"]["ratio_no_loras"] == pytest.approx(0.8)
    assert rows["adapters"]["ratio_no_loras"] is None and rows["single"]["ratio"] is None
