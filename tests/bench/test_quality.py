"""`bench quality` and `bench precision` on a tiny base; --dtype / --quantize through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from lorafleet.bench.quality import greedy_agreement, parse_limits, parse_setting
from lorafleet.errors import LorafleetError


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_settings_and_agreement():
    assert parse_setting("bfloat16+int4") == ("bfloat16", "int4")
    assert parse_setting("int8") == ("float32", "int8")
    with pytest.raises(LorafleetError, match="unknown dtype"):
        parse_setting("float16")
    # shared prefix over n: 2/4 and 4/4 -> 0.75; one prompt of two identical
    pair = ([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 0, 4], [5, 6, 7, 8]])
    assert greedy_agreement(*pair, 4) == (0.75, 0.5)
    assert parse_limits(["bfloat16=2", "bfloat16+int8=1"]) == {
        "bfloat16+none": 2,
        "bfloat16+int8": 1,
    }
    with pytest.raises(LorafleetError, match="SETTING=PIECES"):
        parse_limits(["bfloat16"])


def test_bench_quality_on_a_tiny_base(run_cli, tiny_base_dir, tmp_path, monkeypatch):
    out_file = tmp_path / "q.json"
    args = ["bench", "quality", "--base", tiny_base_dir, "--setting", "int8", "--setting"]
    args += ["bfloat16", "--context", "64", "--tokens", "400", "--piece-tokens", "155"]
    args += ["--limit", "bfloat16=1", "--task-rows", "6", "--prompts", "2", "--prompt-tokens"]
    args += ["8", "--new-tokens", "4", "--boot", "20", "--no-peers", "--json", out_file]
    code, out, err = run_cli(*args)
    assert code == 0, err
    figures = json.loads(out_file.read_text())
    rows = {r["setting"]: r for r in figures["rows"]}
    assert set(rows) == {"float32+none", "float32+int8", "bfloat16+none"}
    ref, int8, bf16 = rows["float32+none"], rows["float32+int8"], rows["bfloat16+none"]
    assert ref["kl_mean"] == 0 and ref["same_top1"] == 1 and ref["greedy_agreement"] == 1
    # 400 scored tokens at 31 a chunk (64-token context): 13 chunks, in pieces of 5
    assert [p["chunks"] for p in figures["pieces"]] == [5, 5, 5]
    assert int8["tokens"] == 15 * 31 and int8["chunks"] == 15
    assert bf16["tokens"] == 5 * 31 and bf16["pieces"] == 1  # --limit: the first piece only
    assert 0 < int8["kl_mean"] < 0.05 and int8["kl_p99"] >= int8["kl_mean"]
    lo, hi = int8["kl_mean_ci"]
    assert lo <= int8["kl_mean"] <= hi
    assert 0.5 < int8["same_top1"] <= 1 and 0.9 < int8["ppl_ratio"] < 1.1
    assert int8["weight_mb"] < ref["weight_mb"]
    assert int8["task_rows"] == 12 and bf16["task_rows"] == 4  # a third of the rows
    assert 0 <= int8["mcnemar"]["p_value"] <= 1 and "accuracy_lower" in int8
    assert "the rule cannot be applied" in out and "verdict" not in figures
    # --only-peers needs the peers (none here): one line naming `make bench-peers`
    monkeypatch.setenv("LORAFLEET_PEERS_DIR", str(tmp_path / "no-peers"))
    code, _, err = run_cli(*args[:-3], "--only-peers", "--json", out_file)
    assert code == 2 and "make bench-peers" in err
    # --rule-only: the rule on stored figures; Q8_0's KL per piece decides who may be default
    code, _, err = run_cli(*args[:-3], "--rule-only", "--json", out_file)
    assert code == 2 and "holds no llama.cpp figures" in err
    pct = {str(f): 0.05 for f in (0.001, 0.01, 0.05, 0.1, 0.5, 0.9, 0.95, 0.99, 0.999)}
    q8 = [  # bfloat16 (first piece) is above Q8_0 there; int8 is below Q8_0 over all pieces
        {"chunks": 5, "tokens": 155, "kl_mean": bf16["kl_mean"] / 10, "kl_percentiles": pct}
    ]
    q8 += [dict(q8[0], kl_mean=1.0) for _ in range(2)]
    for piece in q8:
        piece.update({"same_top1": 0.9, "ln_ppl_ratio": 0.0, "ln_ppl_ratio_se": 0.0})
        piece.update({"ppl_q": 10.0, "ppl_base": 10.0, "kl_p99": 0.05, "kl_mean_se": 0.1})
    figures["llama_cpp"]["pieces"] = {"Q8_0": q8}
    out_file.write_text(json.dumps(figures))
    speeds = tmp_path / "p.json"
    fast = {"single_stream_vs_fp32": 2.0, "all_base_vs_fp32": 2.0}
    rows = [{"setting": k, **fast} for k in ("bfloat16+none", "float32+int8")]
    speeds.write_text(json.dumps({"rows": rows}))
    code, out, err = run_cli(*args[:-3], "--rule-only", "--speeds", speeds, "--json", out_file)
    assert code == 0, err
    verdict = json.loads(out_file.read_text())["verdict"]
    assert verdict["default"] == ("float32+none" if int8["accuracy_lower"] else "float32+int8")
    assert "> llama.cpp Q8_0's" in verdict["reasons"]["bfloat16+none"]
    assert "default by the rule" in out


def test_kl_of_a_setting_against_itself_is_zero(tiny_base_dir):
    from lorafleet.bench import quality

    engine = quality._engine(str(tiny_base_dir), "float32", "none", 2, 40, 64)
    ids = list(range(100, 132))
    piece = quality.Piece("", ids, 1, {})
    tallies = quality.kl_pass(
        {"float32+none": engine, "same": engine}, [piece], 32, {}, lambda: None
    )
    kl = tallies["same"].kl[0]
    assert len(kl) == 15 and abs(kl).max() < 1e-6 and tallies["same"].same[0].all()
    # all_logits: row j predicts token j + 1, as a plain forward of the same ids
    import torch

    with torch.no_grad():
        direct = engine.base.model(torch.tensor([ids])).logits[0].float()
    got = quality.all_logits(engine, [ids])[0]
    assert torch.allclose(got, direct, atol=1e-3)


def test_text_pieces_and_choice_prefills(tokenizer):
    from lorafleet.bench import quality

    docs = [("a", i, f"Sentence number {i} is here.") for i in range(200)]
    pieces = quality.build_pieces(tokenizer, 16, 40, 21, documents=docs)
    # 7 scored a chunk: 6 chunks for 40, 3 a piece at most -> 2 pieces of 3 chunks
    assert [p.chunks for p in pieces] == [3, 3] and all(len(p.ids) == 48 for p in pieces)
    assert pieces[0].ids == tokenizer(pieces[0].text, add_special_tokens=False)["input_ids"][:48]
    assert pieces[0].text.split(quality.SEPARATOR)[0] == "Sentence number 0 is here."
    assert not set(pieces[0].text.split(quality.SEPARATOR)) & set(pieces[1].text.split("\n\n"))
    one = {"choices": [([1, 2, 3, 7], 1), ([1, 2, 3, 8], 1)]}
    assert quality.score_sequences(one) == [([1, 2, 3], [(0, [7]), (1, [8])], 0)]
    two = {"choices": [([1, 2, 7, 9], 2), ([1, 2, 8], 1)]}
    assert quality.score_sequences(two) == [
        ([1, 2, 7, 9], [(0, [7, 9])], 1),
        ([1, 2, 8], [(1, [8])], 1),
    ]
    with pytest.raises(LorafleetError, match="too few tokens"):
        quality.build_pieces(tokenizer, 16, 10_000, 21, documents=docs[:3])


def test_bench_precision_on_a_tiny_base(run_cli, tiny_base_dir, tmp_path):
    out_file = tmp_path / "p.json"
    code, _, err = run_cli(
        "bench",
        "precision",
        "--base",
        tiny_base_dir,
        "--setting",
        "int4",
        "--setting",
        "float32+unfused",
        "--requests",
        "2",
        "--adapters",
        "2",
        "--prompt-tokens",
        "8",
        "--new-tokens",
        "3",
        "--rank",
        "2",
        "--reps",
        "1",
        "--json",
        out_file,
    )
    assert code == 0, err
    rows = {r["setting"]: r for r in json.loads(out_file.read_text())["rows"]}
    assert set(rows) == {"float32+none", "float32+int4", "float32+none+unfused"}
    assert rows["float32+none+unfused"]["adapters_tok_s"] > 0
    assert rows["float32+none"]["adapters_vs_fp32"] == 1.0
    assert rows["float32+int4"]["single_stream_tok_s"] > 0


def test_generate_in_bfloat16_and_bad_options(run_cli, tiny_base_dir):
    code, _, err = run_cli(
        "generate", "--base", tiny_base_dir, "-p", "Hi", "--max-tokens", "3", "--dtype", "bfloat16"
    )
    assert code == 0, err
    code, _, err = run_cli("generate", "--base", tiny_base_dir, "-p", "Hi", "--dtype", "fp8")
    assert code == 2 and "unknown dtype 'fp8'" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("serve", "--base", tiny_base_dir, "--quantize", "int3")
    assert code == 2 and "unknown quantisation 'int3'" in err


def _quality(run_cli, tiny_base_dir, out_file, *more):
    args = ["bench", "quality", "--base", tiny_base_dir, "--setting", "int8", "--context", "64"]
    args += ["--piece-tokens", "155", "--task-rows", "4", "--prompts", "2", "--prompt-tokens"]
    args += ["8", "--new-tokens", "4", "--boot", "20", "--no-peers", "--json", out_file, *more]
    code, out, err = run_cli(*args)
    assert code == 0, err
    return {r["setting"]: r for r in json.loads(out_file.read_text())["rows"]}, out


def test_pieces_run_one_call_each_resume_and_combine(run_cli, tiny_base_dir, tmp_path):
    whole, _ = _quality(run_cli, tiny_base_dir, tmp_path / "w.json", "--tokens", "400")
    split = tmp_path / "s.json"
    for k in range(3):  # one call per piece (the first also runs the task stage)
        rows, out = _quality(run_cli, tiny_base_dir, split, "--tokens", "400", "--pieces", str(k))
        assert rows["float32+int8"]["pieces"] == k + 1 and "accuracy" in rows["float32+int8"]
        assert out.count("checkpointed piece") == 1  # only this call's piece was scored
    folder = json.loads(split.read_text())["checkpoints"]
    assert sorted(p.name for p in (tmp_path / "s_pieces").rglob("*.npz")) == [
        f"piece00{k}.float32+int8.npz" for k in range(3)
    ]
    assert str(tmp_path / "s_pieces") in folder
    rows, out = _quality(run_cli, tiny_base_dir, split, "--tokens", "400", "--pieces", "0:")
    assert "all checkpointed already" in out and "checkpointed piece" not in out
    a, b = rows["float32+int8"], whole["float32+int8"]
    assert a["tokens"] == b["tokens"] == 15 * 31 and a["chunks"] == 15
    for key in ("kl_mean", "kl_p99", "same_top1", "ppl_ratio"):
        assert a[key] == pytest.approx(b[key], rel=1e-4), key  # float32 checkpoints
    assert a["kl_mean_ci"] == pytest.approx(b["kl_mean_ci"], rel=1e-4)
    assert a["accuracy"] == b["accuracy"] and a["mcnemar"] == b["mcnemar"]
    assert a["greedy_agreement"] == b["greedy_agreement"]
    # another text spec: its own folder; a range past the text: one line
    _quality(run_cli, tiny_base_dir, split, "--tokens", "155", "--no-tasks")
    assert len([p for p in (tmp_path / "s_pieces").iterdir() if p.is_dir()]) == 2
    code, _, err = run_cli(
        "bench",
        "quality",
        "--base",
        tiny_base_dir,
        "--tokens",
        "155",
        "--pieces",
        "4:5",
        "--no-peers",
        "--json",
        split,
    )
    assert code == 2 and "the text has 1 pieces" in err


def test_an_earlier_summary_stands_in_for_its_pieces(run_cli, tiny_base_dir, tmp_path):
    first, _ = _quality(run_cli, tiny_base_dir, tmp_path / "a.json", "--tokens", "155")
    older = json.loads((tmp_path / "a.json").read_text())
    older.pop("checkpoints")  # as a run from before checkpoints wrote it
    (tmp_path / "a.json").write_text(json.dumps(older))
    whole, _ = _quality(run_cli, tiny_base_dir, tmp_path / "w.json", "--tokens", "310")
    got, _ = _quality(
        run_cli,
        tiny_base_dir,
        tmp_path / "b.json",
        "--tokens",
        "310",
        "--pieces",
        "1",
        "--no-tasks",
        "--import-summary",
        tmp_path / "a.json",
    )
    a, w, f = got["float32+int8"], whole["float32+int8"], first["float32+int8"]
    assert a["from"] == {"summary_pieces": [0], "checkpointed_pieces": [1]}
    assert a["tokens"] == w["tokens"] == 10 * 31 and a["pieces"] == 2
    for key in ("kl_mean", "same_top1", "ppl_ratio"):  # exact, token-weighted
        assert a[key] == pytest.approx(w[key], rel=1e-4), key
    assert a["kl_p99"] == pytest.approx(w["kl_p99"], rel=0.5)  # the scaled-mixture estimate
    for key in ("kl_mean", "same_top1", "ppl_ratio"):
        lo, hi = a[f"{key}_ci"]
        assert lo <= a[key] <= hi, key
    assert a["task_rows"] == f["task_rows"] and a["accuracy"] == f["accuracy"]  # imported

    # the earlier run's pieces must be this text's first pieces (here: 4 chunks, not 5)
    def import_summary(piece_tokens: str, summary: str, out: str):
        args = ["bench", "quality", "--base", tiny_base_dir, "--context", "64", "--tokens"]
        args += ["310", "--piece-tokens", piece_tokens, "--no-peers", "--import-summary"]
        return run_cli(*args, tmp_path / summary, "--json", tmp_path / out)

    code, _, err = import_summary("124", "a.json", "c.json")
    assert code == 2 and "not the first pieces" in err
    code, _, err = import_summary("155", "w.json", "d.json")  # itself from checkpoints
    assert code == 2 and "written from checkpoints" in err
