"""rsLoRA's defining effect on a tiny model: under alpha/r the gradient norm falls as the rank
grows; under alpha/sqrt(r) it stays about flat (same data, steps, lr, alpha, seed)."""

from __future__ import annotations

import json

from lorafleet.bench.rslora import run


def test_gradient_norms_collapse_with_rank_only_under_alpha_over_r(tiny_base_dir, tmp_path):
    figures = run(
        base=str(tiny_base_dir),
        data="sst2",
        ranks=[4, 64],
        alpha=16,
        steps=3,
        lr=1e-3,
        batch_size=4,
        max_length=64,
        train_limit=32,
        eval_limit=4,
        chat=False,
        out_dir=tmp_path / "runs",
        json_out=tmp_path / "rslora.json",
    )
    norm = {(r["method"], r["rank"]): r["grad_norm_mean"] for r in figures["rows"]}
    # alpha/r: 16x the rank gives about 1/sqrt(16) = 1/4 of the gradient norm.
    assert norm[("lora", 64)] < 0.4 * norm[("lora", 4)]
    # alpha/sqrt(r): rank-stable.
    assert 0.7 < norm[("rslora", 64)] / norm[("rslora", 4)] < 1.4
    assert json.loads((tmp_path / "rslora.json").read_text())["rows"] == figures["rows"]
