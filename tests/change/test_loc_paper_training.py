"""LoRA of Change as the paper trains it (issue 29): the residual editor is exactly the identity
at init and after its pre-training, the flipped pair is the query/target, <A, A'> is exchanged
at random, LoRA Reverse (and the exchange) only on invertible edits (Reverse not on
involutions), results per family."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorafleet.change.config import ChangeConfig
from lorafleet.change.edits import (
    EXPRESSIBLE,
    FAMILIES,
    INVERTIBLE,
    OPS,
    SEEN_TYPES,
    UNSEEN_TYPES,
    Edit,
    commutes_with_flip,
    invertible,
)
from lorafleet.change.evaluate import BASELINES, summarise
from lorafleet.change.sampling import CONDITIONS, RANGES, eval_edits, seen_edit, unseen_edit
from lorafleet.change.store import build, load_model
from lorafleet.change.train import Trainer, apply_edits, make_pairs, pair_losses
from lorafleet.errors import LorafleetError

TINY = ChangeConfig(image_size=16, width=4, dim=16, depth=1)


def _cfg(**kw) -> ChangeConfig:
    return ChangeConfig(**{**TINY.__dict__, **kw})


def _edit(name: str, g: torch.Generator) -> Edit:
    return seen_edit(g, name) if RANGES[name][0] is not None else unseen_edit(g, name)


def test_residual_editor_is_exactly_the_identity_at_init_and_after_pretraining(tmp_path):
    x = torch.rand(3, 3, 16, 16)
    editor, _ = build(TINY)
    with torch.no_grad():
        assert torch.equal(editor(x), x)
        plain, _ = build(_cfg(editor="plain"))
        assert not torch.allclose(plain(x), x, atol=1e-2)  # the check can fail
    cfg = _cfg(editor_steps=4, steps=1, batch=2)
    trainer = Trainer(cfg, tmp_path / "m")
    trainer.run(stop_after=3)  # the U-Net's pre-training moves its last conv off zero ...
    assert float(trainer.editor.out.weight.detach().abs().max()) > 0
    trainer.run()  # ... which is zeroed when the hypernetwork phase starts
    _, editor, hyper = load_model(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(editor(x), x)
        assert float((editor(x, hyper(x, 1 - x)) - x).abs().max()) > 0  # a LoRA still edits


def test_flip_equivariance_and_invertibility_tables_match_the_edits():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    for name in OPS:
        e = _edit(name, g)
        commutes = torch.allclose(e(x.flip(-1)), e(x).flip(-1), atol=1e-5)
        assert commutes_with_flip(e) == commutes, name
    assert not INVERTIBLE & {"grayscale", "posterize", "blur", "edges", "emboss", "pixelate"}
    assert invertible(Edit("saturation", {"factor": 0.5}))
    assert not invertible(Edit("saturation", {"factor": 0.05}))
    assert not invertible(Edit("hue", {"deg": 30.0}, then=Edit("blur", {"sigma": 1.0})))
    # a global map is undone by its inverse (the reverse edit the exchange trains on)
    for e, inverse in [
        (Edit("brightness", {"delta": 0.1}), Edit("brightness", {"delta": -0.1})),
        (Edit("hue", {"deg": 40.0}), Edit("hue", {"deg": -40.0})),
        (Edit("shift", {"dx": 3, "dy": -2}), Edit("shift", {"dx": -3, "dy": 2})),
    ]:
        y = x.clamp(0.2, 0.8)
        torch.testing.assert_close(inverse(e(y)), y, atol=1e-5, rtol=0)


def _batch(names, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    edits = [_edit(n, g) for n in names]
    a = torch.rand(len(names), 3, 16, 16, generator=g)
    a2 = apply_edits(edits, a)
    return a, a2, edits, make_pairs(a, a2, edits, cfg, g)


def test_the_flipped_pair_is_query_and_target_where_the_edit_commutes_with_a_flip():
    names = ["hue", "blur", "flip_h", "shift", "rot90"]
    a, a2, edits, p = _batch(names, _cfg(exchange=0.0))
    assert p.flipped.tolist() == [True, True, True, False, False]
    assert torch.equal(p.before, a) and torch.equal(p.after, a2)  # H reads the pair itself
    for i, e in enumerate(edits):
        if p.flipped[i]:
            assert torch.equal(p.query[i], a[i].flip(-1))
            assert torch.equal(p.target[i], a2[i].flip(-1))
            # the flipped pair shows the same edit: target = edit(query)
            torch.testing.assert_close(
                p.target[i : i + 1], e(p.query[i : i + 1]), atol=1e-5, rtol=0
            )
        else:
            assert torch.equal(p.query[i], a[i]) and torch.equal(p.target[i], a2[i])
    assert bool(_batch(names, _cfg(exchange=0.0, query="flip-all"))[3].flipped.all())
    p = _batch(names, _cfg(exchange=0.0, query="pair"))[3]
    assert not bool(p.flipped.any()) and torch.equal(p.query, a)


def test_exchange_swaps_before_and_after_on_invertible_pairs_only():
    names = ["hue", "brightness", "blur", "grayscale"]
    a, a2, _, p = _batch(names, _cfg(exchange=1.0))
    assert p.swapped.tolist() == [True, True, False, False]
    for i in range(4):
        src, dst = (a2[i], a[i]) if p.swapped[i] else (a[i], a2[i])
        assert torch.equal(p.before[i], src) and torch.equal(p.after[i], dst)
        # the LoRA of <A', A> must turn (flipped) A' into (flipped) A: the reverse edit
        assert torch.equal(p.query[i], src.flip(-1)) and torch.equal(p.target[i], dst.flip(-1))
    assert bool(_batch(names, _cfg(exchange=1.0, reverse_scope="all"))[3].swapped.all())
    swaps = [_batch(["hue"] * 50, _cfg(), seed=s)[3].swapped.float().mean() for s in range(8)]
    assert 0.4 < float(torch.stack(swaps).mean()) < 0.6  # probability 0.5
    assert not bool(_batch(["hue"] * 20, _cfg(exchange=0.0))[3].swapped.any())


def test_lora_reverse_applies_to_invertible_edits_only():
    editor, hyper = build(TINY)
    with torch.no_grad():
        for p_ in hyper.parameters():
            p_.add_(0.05 * torch.randn(p_.shape, generator=torch.Generator().manual_seed(1)))
    names = ["hue", "blur", "sharpen", "pixelate"]
    _, _, _, p = _batch(names, _cfg())
    assert p.reverse.tolist() == [True, False, True, False]
    with torch.no_grad():
        got = pair_losses(editor, hyper, p, TINY)["reverse"]
        lora = hyper(p.before, p.after)
        per = (editor(p.target, lora, sign=-1.0) - p.query).pow(2).mean((1, 2, 3))
    torch.testing.assert_close(got, (per[0] + per[2]) / 4)
    involutions = _batch(["invert", "flip_h"], _cfg(exchange=1.0))[3]
    assert involutions.swapped.all() and not involutions.reverse.any()  # their own inverse
    only_lossy = _batch(["blur", "edges", "grayscale"], _cfg())[3]
    assert float(pair_losses(editor, hyper, only_lossy, TINY)["reverse"].detach()) == 0.0
    every = _batch(names, _cfg(reverse_scope="all"))[3]
    assert bool(every.reverse.all())
    assert not bool(_batch(names, _cfg(reverse=False))[3].reverse.any())


def test_bad_settings_are_one_line_errors():
    for kw, needle in [
        ({"editor": "big"}, "editor 'big'"),
        ({"query": "mirror"}, "query 'mirror'"),
        ({"exchange": 1.5}, "exchange 1.5"),
        ({"reverse_scope": "some"}, "reverse_scope"),
        ({"image_size": 12}, "image_size 12"),
    ]:
        with pytest.raises(LorafleetError, match=needle):
            _cfg(**kw)
    old = ChangeConfig.from_dict({"seed": 3, "reverse": True})  # issue-18 model dirs
    assert (old.editor, old.query, old.exchange, old.seed) == ("plain", "pair", 0.0, 3)


def test_every_family_has_seen_and_held_out_types_and_results_are_per_family():
    g = torch.Generator().manual_seed(0)
    evaluated = eval_edits(g)
    for fam in FAMILIES:
        conditions = {c for f, c, _ in evaluated if f == fam}
        assert {"seen", "unseen type"} <= conditions, fam
    assert {e.name for _, c, e in evaluated if c == "unseen type"} == set(UNSEEN_TYPES)
    assert not set(UNSEEN_TYPES) & set(SEEN_TYPES)
    assert "geometry" not in EXPRESSIBLE and set(EXPRESSIBLE) < set(FAMILIES)
    rng = np.random.default_rng(0)
    rows = []
    for fam, condition, e in evaluated * 4:
        loc = [20 + rng.normal(), 21 + rng.normal()]  # two seeds
        psnr = {"LoC": loc, "G alone": [18.0, 18.0], "identity": [18.0], "copy": [9.0]}
        psnr["difference"] = [18.0]
        rows.append(
            {
                "family": fam,
                "condition": condition,
                "edit": e.name,
                "psnr": psnr,
                "ssim": {m: 0.5 for m in psnr},
            }
        )
    out = summarise(rows, ["LoC"])
    assert set(out["cells"]) == set(FAMILIES)
    cell = out["cells"]["colour/tone"]["seen"]
    assert cell["n"] == 4 * sum(1 for f, c, _ in evaluated if (f, c) == ("colour/tone", "seen"))
    assert len(cell["LoC"]["psnr_seeds"]) == 2 and cell["identity"]["psnr"] == 18.0
    for by_condition in out["diffs"].values():
        assert set(by_condition) <= set(CONDITIONS)
        for d in by_condition.values():
            assert set(d) == {f"LoC - {b}" for b in BASELINES}
            lo, hi = d["LoC - identity"]["ci95"]
            assert lo <= d["LoC - identity"]["mean"] <= hi and lo < hi
    lo, hi = out["diffs"]["colour/tone"]["seen"]["LoC - identity"]["ci95"]
    assert lo < 2.5 < hi and hi - lo < 1.0  # the true difference, a narrow interval
    assert any(k.startswith("geometry/unseen type/flip_v") for k in out["edits"])
