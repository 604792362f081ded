"""llama-perplexity's KL summary parsed, pieces combined, the .kld header read, and the piece
loop of bench quality run against a stand-in llama-perplexity (no llama.cpp build needed)."""

from __future__ import annotations

import math
import stat
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from lorafleet.bench import llama_ppl
from lorafleet.errors import LorafleetError

# The per-chunk table it prints first (long lines; the parser skips them).
CHUNK_TABLE = (
    "chunk             PPL               ln(PPL(Q)/PPL(base))    "
    "      KL Divergence              Δp RMS            Same top p\n"
    "   1      13.1592 ±    0.8671       0.00537 ±    0.00512    "
    "   0.00712 ±    0.00045       2.652 ±  0.170 %   96.471 ±  1.160 %\n"
    "   2      12.8801 ±    0.6012       0.00411 ±    0.00377    "
    "   0.00688 ±    0.00031       2.511 ±  0.121 %   96.667 ±  0.794 %\n"
)

# The tail of `llama-perplexity --kl-divergence` as tools/perplexity/perplexity.cpp prints it
# (kl_divergence(): LOG formats "%10.6lf ± %10.6lf", "%6.3lf ± %5.3lf %%", ...).
SAMPLE = """\
llama_context: n_ctx = 2048
kl_divergence: computing over 78 chunks, n_ctx=512, batch_size=2048, n_seq=4
kl_divergence: 3.21 seconds per pass - ETA 1.05 minutes

@@TABLE@@
====== Perplexity statistics ======
Mean PPL(Q)                   :  12.345678 ±   0.456789
Mean PPL(base)                :  12.300000 ±   0.450000
Cor(ln(PPL(Q)), ln(PPL(base))):  99.85%
Mean ln(PPL(Q)/PPL(base))     :   0.003707 ±   0.001234
Mean PPL(Q)/PPL(base)         :   1.003714 ±   0.001239
Mean PPL(Q)-PPL(base)         :   0.045678 ±   0.015000

====== KL divergence statistics ======
Mean    KLD:   0.006789 ±   0.000321
Maximum KLD:   0.456789
99.9%   KLD:   0.234567
99.0%   KLD:   0.061234
95.0%   KLD:   0.023456
90.0%   KLD:   0.014567
Median  KLD:   0.003456
10.0%   KLD:   0.000123
 5.0%   KLD:   0.000067
 1.0%   KLD:   0.000012
 0.1%   KLD:   0.000001
Minimum KLD:  -0.000002

====== Token probability statistics ======
Mean    Δp: -0.012 ± 0.034 %
Maximum Δp: 45.678%
RMS Δp    :  2.601 ± 0.090 %
Same top p: 96.078 ± 0.686 %

llama_perf_context_print:        load time =     123.45 ms
""".replace("@@TABLE@@", CHUNK_TABLE)


def test_parse_a_sample_output():
    out = llama_ppl.parse_kld_output(SAMPLE)
    assert out["chunks"] == 78 and out["n_ctx"] == 512 and out["tokens"] == 78 * 255
    assert out["kl_mean"] == 0.006789 and out["kl_mean_se"] == 0.000321
    assert out["kl_p99"] == 0.061234 and out["kl_max"] == 0.456789 and out["kl_min"] == -0.000002
    assert out["kl_percentiles"][0.5] == 0.003456 and out["kl_percentiles"][0.001] == 0.000001
    assert out["same_top1"] == pytest.approx(0.96078) and out["same_top1_se"] == pytest.approx(
        0.00686
    )
    assert out["ppl_ratio"] == 1.003714 and out["ln_ppl_ratio"] == 0.003707
    assert out["ppl_q"] == 12.345678 and out["ppl_base"] == 12.3
    with pytest.raises(LorafleetError, match="no KL summary"):
        llama_ppl.parse_kld_output(SAMPLE.split("====== Perplexity")[0])


def _piece(values: np.ndarray, same: float, ln_ratio: float, ln_se: float) -> dict:
    """What llama-perplexity would print for these per-token KL values (its own formulas)."""
    n = len(values)
    mean = values.mean()
    se = math.sqrt((np.mean(values**2) - mean**2) / (n - 1))
    fracs = dict.fromkeys(llama_ppl.PERCENTILES)
    return {
        "chunks": n // 255,
        "tokens": n,
        "kl_mean": mean,
        "kl_mean_se": se,
        "kl_percentiles": {f: float(np.percentile(values, 100 * f)) for f in fracs},
        "kl_p99": float(np.percentile(values, 99)),
        "kl_min": float(values.min()),
        "kl_max": float(values.max()),
        "same_top1": same,
        "ln_ppl_ratio": ln_ratio,
        "ln_ppl_ratio_se": ln_se,
        "ppl_q": 12.0,
        "ppl_base": 11.9,
    }


def test_combining_pieces_is_the_token_weighted_figure():
    rng = np.random.default_rng(0)
    a = rng.exponential(0.01, 255 * 40)
    b = rng.exponential(0.02, 255 * 20)
    pieces = [_piece(a, 0.97, 0.004, 0.001), _piece(b, 0.94, 0.010, 0.002)]
    got = llama_ppl.combine(pieces)
    pooled = np.concatenate([a, b])
    assert got["tokens"] == len(pooled) and got["chunks"] == 60 and got["pieces"] == 2
    assert got["kl_mean"] == pytest.approx(pooled.mean(), rel=1e-12)
    se = math.sqrt((np.mean(pooled**2) - pooled.mean() ** 2) / (len(pooled) - 1))
    assert got["kl_mean_se"] == pytest.approx(se, rel=1e-9)
    assert got["same_top1"] == pytest.approx((0.97 * len(a) + 0.94 * len(b)) / len(pooled))
    ln = (0.004 * len(a) + 0.010 * len(b)) / len(pooled)
    assert got["ppl_ratio"] == pytest.approx(math.exp(ln))
    assert got["kl_max"] == pooled.max()
    # p99 from the printed percentiles: close to the pooled one (exact for equal pieces)
    assert got["kl_p99"] == pytest.approx(np.percentile(pooled, 99), rel=0.05)
    same = llama_ppl.combine([pieces[0], pieces[0]])
    assert same["kl_p99"] == pytest.approx(pieces[0]["kl_p99"], rel=1e-6)
    assert llama_ppl.combine([pieces[0]])["kl_mean_se"] == pytest.approx(pieces[0]["kl_mean_se"])


def test_kld_file_header_and_size(tmp_path):
    path = tmp_path / "x.kld"
    ids = list(range(2 * 8))
    path.write_bytes(b"_logits_" + struct.pack("<Iii", 8, 10, 2) + struct.pack("<16i", *ids))
    assert llama_ppl.read_kld_tokens(path) == (8, 10, ids)
    (tmp_path / "bad.kld").write_bytes(b"nonsense" + bytes(12))
    with pytest.raises(LorafleetError, match="not a llama-perplexity"):
        llama_ppl.read_kld_tokens(tmp_path / "bad.kld")
    # SmolLM2: 49,152 vocab -> ~98 KB per scored token, ~2 GB for 78 chunks of 512
    size = llama_ppl.kld_file_bytes(512, 78, 49_152)
    assert 1.9e9 < size < 2.0e9 and llama_ppl.scored_per_chunk(512) == 255


FAKE = """\
import struct, sys
args = sys.argv[1:]
kld = args[args.index("--kl-divergence-base") + 1]
ctx = int(args[args.index("-c") + 1])
if "--kl-divergence" not in args:
    chunks = int(args[args.index("--chunks") + 1])
    text = open(args[args.index("-f") + 1], encoding="utf-8").read()
    ids = [int(t) for t in text.split()][: ctx * chunks]
    with open(kld, "wb") as f:
        f.write(b"_logits_" + struct.pack("<Iii", ctx, 10, chunks))
        f.write(struct.pack(f"<{len(ids)}i", *ids))
    print("saved")
else:
    model = args[args.index("-m") + 1]
    scale = {"q4": 3.0, "q8": 1.0, "bf16": 0.5}[model.rsplit("/", 1)[-1]]
    with open(kld, "rb") as f:
        f.read(8)
        n_ctx, _, chunks = struct.unpack("<Iii", f.read(12))
    sample = open(sys.argv[0] + ".sample", encoding="utf-8").read()
    sample = sample.replace("78 chunks", f"{chunks} chunks")
    sample = sample.replace("Mean    KLD:   0.006789", f"Mean    KLD:   {0.006789 * scale:.6f}")
    print(sample)
"""


def test_the_piece_loop_against_a_stand_in_llama_perplexity(tmp_path, monkeypatch):
    from lorafleet.bench import quality
    from lorafleet.bench.peer_tools import Peers

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "llama-perplexity"
    tool.write_text(f"#!{sys.executable}\n" + FAKE)
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    (bin_dir / "llama-perplexity.sample").write_text(SAMPLE)
    peers = Peers(tmp_path, bin_dir / "llama-server", bin_dir, tmp_path / "c.py", perplexity=tool)
    models = {"F32": Path("f32"), "Q4_1": Path("q4"), "Q8_0": Path("q8"), "BF16": Path("bf16")}
    monkeypatch.setattr(quality, "llama_models", lambda p, b: models)
    ids = list(range(8 * 3))
    pieces = [
        quality.Piece(" ".join(map(str, ids)), ids, 3, {"x": 1}),
        quality.Piece(" ".join(map(str, ids[:16])) + " 99 99", ids[:16], 2, {"x": 1}),
    ]
    ticks, saved = [], {}
    quality.llama_pass(
        peers,
        "default",
        dict(enumerate(pieces)),
        8,
        1,
        10,
        lambda: ticks.append(1),
        saved.__setitem__,
    )
    assert len(ticks) == 2 * 4 and sorted(saved) == [0, 1]
    assert sum(r["same_ids"] for r in saved.values()) == 24 + 16
    assert sum(r["compared_ids"] for r in saved.values()) == 24 + 16
    assert set(saved[0]["models"]) == set(models)
    parts = {name: [saved[i]["parts"][name] for i in (0, 1)] for name in quality.LLAMA_ROWS}
    assert set(parts) == {"Q4_1", "Q8_0", "BF16"} and len(parts["Q8_0"]) == 2
    rows = {name: llama_ppl.combine(p) for name, p in parts.items()}
    assert rows["Q8_0"]["kl_mean"] == pytest.approx(0.006789)
    assert rows["Q4_1"]["kl_mean"] == pytest.approx(3 * 0.006789)
    assert rows["Q8_0"]["chunks"] == 5 and rows["Q8_0"]["pieces"] == 2
    assert not list((tmp_path / "quality").iterdir())  # the .kld files are gone
