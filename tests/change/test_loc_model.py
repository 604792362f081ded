"""LoRA of Change, the model: zero-init H is "no change", Reverse negates the LoRA, the emitted
LoRA is a PEFT adapter that PEFT loads onto the editor with the same result, held-out edits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafleet.adapters import read_adapter
from lorafleet.change.apply import edit, emit_lora, load_lora, peft_editor, save_lora
from lorafleet.change.edits import UNSEEN_TYPES
from lorafleet.change.photos import HELDOUT_PHOTOS, TRAIN_PHOTOS, load_photos, random_crops
from lorafleet.change.sampling import RANGES, train_edit, unseen_edit
from lorafleet.change.store import ChangeConfig, build
from lorafleet.change.train import Pairs, pair_losses

TINY = ChangeConfig(image_size=16, width=4, dim=16, depth=1)


def _images(n=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.rand(n, 3, size, size, generator=g)


def _randomize(hyper, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hyper.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", ["residual", "plain"])
def test_zero_init_hypernetwork_leaves_the_editor_unchanged(kind):
    editor, hyper = build(ChangeConfig(**{**TINY.__dict__, "editor": kind}))
    a, a2 = _images()
    lora = hyper(a, a2)
    assert all(bool((b == 0).all()) and bool(a_.abs().sum() > 0) for a_, b in lora.values())
    with torch.no_grad():
        torch.testing.assert_close(editor(a, lora), editor(a), atol=1e-6, rtol=0)
        torch.testing.assert_close(editor(a2, lora, sign=-1.0), editor(a2), atol=1e-6, rtol=0)
    _randomize(hyper)
    with torch.no_grad():  # the check above could fail: a trained H does change the output
        assert float((editor(a, hyper(a, a2)) - editor(a)).abs().max()) > 1e-3


def _pairs(a, a2, reverse=(True, True)):
    n = a.shape[0]
    none = torch.zeros(n, dtype=torch.bool)
    return Pairs(a, a2, a, a2, torch.tensor(reverse), none, none)


def test_reverse_loss_uses_the_negated_lora():
    editor, hyper = build(TINY)
    _randomize(hyper)
    a, a2 = _images()
    losses = pair_losses(editor, hyper, _pairs(a, a2), TINY)
    lora = hyper(a, a2)
    negated = {k: (a_, -b) for k, (a_, b) in lora.items()}
    torch.testing.assert_close(losses["reverse"], F.mse_loss(editor(a2, negated), a))
    torch.testing.assert_close(losses["forward"], F.mse_loss(editor(a, lora), a2))
    assert float((losses["reverse"] - F.mse_loss(editor(a2, lora), a)).abs().detach()) > 1e-6
    no_rev = ChangeConfig(**{**TINY.__dict__, "reverse": False})
    assert set(pair_losses(editor, hyper, _pairs(a, a2), no_rev)) == {"forward"}
    quad = ChangeConfig(**{**TINY.__dict__, "quad_weight": 0.5})
    b, b2 = _images(seed=3)
    pairs = _pairs(a, a2)
    pairs.b, pairs.b2 = b, b2
    with torch.no_grad():
        got = pair_losses(editor, hyper, pairs, quad)["quad"]
        torch.testing.assert_close(got, 0.5 * F.mse_loss(editor(b, lora), b2))


def test_emitted_lora_through_peft_equals_the_hypernetwork_path(tmp_path):
    editor, hyper = build(TINY)
    _randomize(hyper)
    a, a2 = _images(1)
    lora = emit_lora(hyper, a, a2, TINY.image_size)
    save_lora(tmp_path / "lora", lora, TINY.rank)
    query = torch.rand(1, 3, 20, 28)  # another size than the pair's: G is convolutional
    with torch.no_grad():
        direct = editor(query, lora)
        through_peft = peft_editor(editor, tmp_path / "lora")(query)
    torch.testing.assert_close(through_peft, direct, atol=1e-5, rtol=1e-5)
    assert float((direct - editor(query)).detach().abs().max()) > 1e-3
    # shapes and dtypes round-trip: PEFT's conv LoRA layout, float32, same values back
    adapter = read_adapter(tmp_path / "lora")
    assert adapter.config["r"] == TINY.rank and adapter.peft_type == "LORA"
    back, scale = load_lora(tmp_path / "lora", editor)
    assert scale == 1.0 and set(back) == set(lora) == set(editor.layer_shapes())
    for name, (a_, b) in lora.items():
        cin, cout, k = editor.layer_shapes()[name]
        key = f"base_model.model.{name}.lora_"
        assert adapter.tensors[key + "A.weight"].shape == (TINY.rank, cin, k, k)
        assert adapter.tensors[key + "B.weight"].shape == (cout, TINY.rank, 1, 1)
        assert adapter.tensors[key + "A.weight"].dtype == torch.float32
        assert torch.equal(back[name][0], a_) and torch.equal(back[name][1], b)
    torch.testing.assert_close(edit(editor, back, query), direct.clamp(0, 1))


def test_load_lora_refuses_an_adapter_for_another_editor(tmp_path):
    editor, hyper = build(TINY)
    a, a2 = _images(1)
    save_lora(tmp_path / "lora", emit_lora(hyper, a, a2, 16), TINY.rank)
    other, _ = build(ChangeConfig(image_size=16, width=6, dim=16, depth=1))
    with pytest.raises(Exception, match="do not fit this editor"):
        load_lora(tmp_path / "lora", other)


def test_photos_split_by_source_and_edits_hold_out_types_and_ranges():
    assert not set(TRAIN_PHOTOS) & set(HELDOUT_PHOTOS)
    photos = load_photos("heldout")
    assert all(p.shape[0] == 3 and 0 <= float(p.min()) <= float(p.max()) <= 1 for p in photos)
    crops = random_crops(photos, 3, 32, torch.Generator().manual_seed(0))
    assert crops.shape == (3, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    names = set()
    for _ in range(400):
        e = train_edit(g)
        while e is not None:
            names.add(e.name)
            if e.name == "hue":
                assert 20 <= abs(e.params["deg"]) <= 100
            e = e.then
    assert not names & set(UNSEEN_TYPES) and len(names) >= 12
    assert all(140 <= abs(unseen_edit(g, "hue").params["deg"]) <= 180 for _ in range(20))
    assert all(RANGES[t][0] is None for t in UNSEEN_TYPES)
