"""run_in_child: a variant's figures from its own process, its failure as a reason, a time limit."""

from __future__ import annotations

import time

from lorafleet.bench.child import run_in_child


def test_figures_come_back_with_the_childs_peak_rss():
    result = run_in_child(dict, {"tokens": 7}, limit_s=60)
    assert result["tokens"] == 7 and result["peak_rss_mb"] > 1


def test_a_raising_variant_is_a_row_with_its_reason():
    result = run_in_child(int, "seven", limit_s=60)
    assert result["error"].startswith("ValueError: invalid literal")


def test_a_variant_past_its_limit_is_stopped():
    start = time.monotonic()
    result = run_in_child(time.sleep, 60, limit_s=1)
    assert result == {"error": "no result within 1 s"}
    assert time.monotonic() - start < 30
