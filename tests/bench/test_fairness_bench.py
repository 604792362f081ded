"""`lorafleet bench fairness` in its smallest form on the tiny base: both servers (fcfs, fair)
start, the flood and the idle requests run, and the JSON holds both schedules' figures."""

from __future__ import annotations

import json

from lorafleet.bench import fairness


def test_fairness_bench_runs_both_schedules_and_writes_sane_figures(tiny_base_dir, tmp_path):
    out = tmp_path / "fairness.json"
    result = fairness.run(
        base=str(tiny_base_dir),
        a_requests=4,
        a_tokens=4,
        b_requests=1,
        b_every=0.2,
        b_delay=0.0,  # B's request meets the (short) flood
        b_tokens=4,
        prompt_words=8,
        idle_requests=1,
        reps=1,
        max_batch_size=2,
        threads=1,
        json_out=out,
    )
    written = json.loads(out.read_text())
    assert written.pop("machine")  # write_json adds where it ran
    assert written == json.loads(json.dumps(result))  # what it returns is what it wrote
    assert written["benchmark"] == "fairness" and written["max_batch_size"] == 2
    assert written["workload"]["a_requests"] == 4 and written["workload"]["b_requests"] == 1
    assert set(written["runs"]) == set(fairness.SCHEDULES) == {"fcfs", "fair"}
    for schedule, runs in written["runs"].items():
        assert len(runs) == 1
        run = runs[0]
        assert run["schedule"] == schedule and run["rep"] == 1 and run["b_sent"] == 1
        assert run["tokens"] == 4 * 4 + 1 * 4  # every token asked for came (ignore_eos)
        for key in ("b_ttft_p50", "b_ttft_p99", "a_ttft_p50", "idle_ttft_p50"):
            assert 0 < run[key] < run["seconds"] + 60, (schedule, key, run[key])
        assert run["b_ttft_p50"] <= run["b_ttft_p99"]
        assert run["tokens_per_s"] == run["tokens"] / run["seconds"] > 0
        medians = written["medians"][schedule]
        assert medians["tokens_per_s"] == run["tokens_per_s"]  # one rep: its own figure
    fair = written["medians"]["fair"]
    assert written["fair_b_ttft_vs_idle"] == fair["b_ttft_p50"] / fair["idle_ttft_p50"]
    ratio = fair["tokens_per_s"] / written["medians"]["fcfs"]["tokens_per_s"]
    assert written["fair_vs_fcfs_tokens_per_s"] == ratio
    assert isinstance(written["pass"], bool) and "2x idle" in written["rule"]
