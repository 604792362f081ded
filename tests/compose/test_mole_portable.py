"""A portable MoLE: experts found by content hash (copied beside them, or bundled), a changed
expert still refused, `lorafleet mole bundle` writing a self-contained dir that works anywhere."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from compose_helpers import make_adapter, tiny

from lorafleet.adapters import write_adapter
from lorafleet.compose.mole import MoleError, attach_mole, load_mole, read_experts, save_mole
from lorafleet.models import load_base


@pytest.fixture(scope="module")
def trained(tokenizer, tiny_base_dir, tmp_path_factory):
    """The issue's layout: runs/adapters/{ad-lora, ad-mlp} and runs/moe over them (recorded
    paths ../adapters/...), with random input gates; plus the logits it gives."""
    fp = load_base(str(tiny_base_dir)).fingerprint
    runs = tmp_path_factory.mktemp("runs")
    specs = []
    for i, (name, targets) in enumerate(
        (("ad-lora", ["q_proj", "v_proj"]), ("ad-mlp", ["up_proj", "down_proj"]))
    ):
        adapter = make_adapter(tokenizer, seed=70 + i, r=4, lora_alpha=8, target_modules=targets)
        adapter.meta = {"base_fingerprint": fp}
        write_adapter(runs / "adapters" / name, adapter)
        specs.append((name.removeprefix("ad-"), str(runs / "adapters" / name)))
    mole = attach_mole(tiny(tokenizer), read_experts(specs), variant="input", temperature=0.7)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in mole.gates.parameters():
            p.copy_(3.0 * torch.randn(p.shape, generator=gen))
    mole.gates.eval()
    out = save_mole(runs / "moe", mole, read_experts(specs), fp)
    ids = torch.tensor([tokenizer("Two plus two is")["input_ids"]])
    with torch.no_grad():
        want = mole.model(input_ids=ids).logits
    return runs, out, fp, ids, want


def _logits(tokenizer, path, fp, ids):
    with torch.no_grad():
        return load_mole(path, tiny(tokenizer), fp).model(input_ids=ids).logits


def test_copied_beside_its_experts_works_and_a_changed_one_is_refused(tokenizer, trained, tmp_path):
    runs, moe, fp, ids, want = trained
    served = tmp_path / "served"  # DIR/ad-lora, DIR/ad-mlp, DIR/moe: the recorded paths are gone
    for name in ("ad-lora", "ad-mlp"):
        shutil.copytree(runs / "adapters" / name, served / name)
    shutil.copytree(moe, served / "moe")
    assert not (
        served / "moe" / json.loads((moe / "mole_config.json").read_text())["experts"][0]["path"]
    ).exists()
    torch.testing.assert_close(_logits(tokenizer, served / "moe", fp, ids), want, atol=0, rtol=0)

    # The experts under other names still match by hash.
    (served / "ad-lora").rename(served / "renamed")
    torch.testing.assert_close(_logits(tokenizer, served / "moe", fp, ids), want, atol=0, rtol=0)

    # Another adapter under the expert's name: a hash mismatch, refused in one line.
    other = make_adapter(tokenizer, seed=99, r=4, lora_alpha=8)
    shutil.rmtree(served / "renamed")
    write_adapter(served / "ad-lora", other)
    with pytest.raises(MoleError, match=r"expert lora \(.*ad-lora\) changed since the gates"):
        load_mole(served / "moe", tiny(tokenizer), fp)
    shutil.rmtree(served / "ad-lora")
    with pytest.raises(MoleError, match="expert lora is missing: no adapter in view"):
        load_mole(served / "moe", tiny(tokenizer), fp)


def test_bundle_serves_from_anywhere_and_refuses_what_it_cannot_do(
    run_cli, tokenizer, tiny_base_dir, trained, tmp_path
):
    runs, moe, fp, ids, want = trained
    out = tmp_path / "made" / "moe-bundled"
    code, stdout, err = run_cli("mole", "bundle", moe, "-o", out)
    assert code == 0, err
    assert f"wrote {out}" in stdout
    config = json.loads((out / "mole_config.json").read_text())
    assert [e["path"] for e in config["experts"]] == ["experts/lora", "experts/mlp"]
    assert (
        config["experts"][0]["sha256"]
        == json.loads((moe / "mole_config.json").read_text())["experts"][0]["sha256"]
    )
    assert not list(out.parent.glob(".*"))  # no temp dir left behind

    moved = tmp_path / "elsewhere" / "deep" / "m"
    moved.parent.mkdir(parents=True)
    out.rename(moved)
    torch.testing.assert_close(_logits(tokenizer, moved, fp, ids), want, atol=0, rtol=0)
    args = ["-p", "2 plus 2 is", "--no-chat", "--max-tokens", "5"]
    texts = [
        run_cli("generate", "-b", tiny_base_dir, "--mole", path, *args) for path in (moe, moved)
    ]
    assert texts[0][0] == texts[1][0] == 0, texts
    assert texts[0][1] == texts[1][1]

    # Refusals: one line, exit 2, nothing written.
    code, _, err = run_cli("mole", "bundle", moe, "-o", moved)
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    broken = tmp_path / "broken"
    shutil.copytree(moe, broken / "moe")  # its experts are not beside it, nor at the paths
    code, _, err = run_cli("mole", "bundle", broken / "moe", "-o", tmp_path / "never")
    assert code == 2 and "expert lora is missing" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "never").exists()
