"""LoRA of Change, training and the CLI: a short run beats the identity baseline on held-out
photos, resuming equals an uninterrupted run, train -> apply end to end, bad inputs exit 2."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lorafleet.change.photos import load_photos, random_crops
from lorafleet.change.sampling import seen_edit
from lorafleet.change.store import ChangeConfig, load_model
from lorafleet.change.train import Trainer, apply_edits

TINY_ARGS = [
    "--steps",
    "3",
    "--editor-steps",
    "3",
    "--width",
    "4",
    "--image-size",
    "16",
    "--batch",
    "2",
    "--quiet",
]


@pytest.fixture
def one_thread():
    """One torch thread for this test only (set_num_threads is process-wide for the caller)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_short_training_beats_identity_on_held_out_photos(tmp_path, one_thread):
    cfg = ChangeConfig(
        image_size=16,
        width=8,
        dim=32,
        depth=1,
        editor_steps=20,
        steps=80,  # the residual editor's zero head: the first steps only move out's LoRA
        batch=8,
        editor_lr=5e-3,
        lr=2e-3,
        edit_types="invert",
    )
    Trainer(cfg, tmp_path / "m").run()
    _, editor, hyper = load_model(tmp_path / "m")
    g = torch.Generator().manual_seed(5)
    photos = load_photos("heldout")
    a, b = random_crops(photos, 16, 16, g), random_crops(photos, 16, 16, g)
    edits = [seen_edit(g, "invert") for _ in range(16)]
    a2, b2 = apply_edits(edits, a), apply_edits(edits, b)
    with torch.no_grad():
        loc = F.mse_loss(editor(b, hyper(a, a2)).clamp(0, 1), b2)
        pair = F.mse_loss(editor(a, hyper(a, a2)).clamp(0, 1), a2)
    identity = F.mse_loss(b, b2)
    assert float(loc) < 0.5 * float(identity)
    assert float(pair) < 0.5 * float(F.mse_loss(a, a2))


def test_resume_equals_an_uninterrupted_run(tmp_path):
    cfg = ChangeConfig(
        image_size=16,
        width=4,
        dim=16,
        depth=1,
        editor_steps=3,
        steps=4,
        batch=2,
        checkpoint_every=2,
    )
    whole = Trainer(cfg, tmp_path / "whole")
    whole.run()
    Trainer(cfg, tmp_path / "parts").run(stop_after=5)  # stops inside the hypernetwork phase
    state = json.loads((tmp_path / "parts" / "checkpoint" / "state.json").read_text())
    assert (state["phase"], state["step"]) == (1, 2)
    parts = Trainer(cfg, tmp_path / "parts", resume=True)
    parts.run()
    for x, y in zip(
        whole.hyper.state_dict().values(), parts.hyper.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(x, y)


def test_cli_train_examples_apply_and_reuse_the_lora(tmp_path, run_cli):
    model, ex = tmp_path / "m", tmp_path / "ex"
    code, out, err = run_cli(
        "change", "train", "--out", model, *TINY_ARGS, "--checkpoint-every", "2"
    )
    assert code == 0, err
    assert (model / "config.json").is_file() and (model / "checkpoint" / "state.json").is_file()
    assert run_cli("change", "examples", "--out", ex, "--edit", "tint")[0] == 0
    Image.new("RGB", (30, 22), (200, 40, 90)).save(tmp_path / "odd.png")
    args = [
        "change",
        "apply",
        "-m",
        model,
        "--example-before",
        ex / "before.png",
        "--example-after",
        ex / "after.png",
    ]
    code, out, err = run_cli(
        *args,
        "--input",
        tmp_path / "odd.png",
        "--out",
        tmp_path / "o.png",
        "--save-lora",
        tmp_path / "lora",
    )
    assert code == 0, err
    assert Image.open(tmp_path / "o.png").size == (30, 22)
    code, _, err = run_cli(
        "change",
        "apply",
        "-m",
        model,
        "--lora",
        tmp_path / "lora",
        "--image",
        tmp_path / "odd.png",
        "-o",
        tmp_path / "o2.png",
    )
    assert code == 0, err
    with Image.open(tmp_path / "o.png") as x, Image.open(tmp_path / "o2.png") as y:
        assert x.tobytes() == y.tobytes()
    code, _, err = run_cli("change", "train", "--out", model, *TINY_ARGS)
    assert code == 2 and "already holds a model" in err
    # two "seeds" under one label, scored per family with intervals
    ev = tmp_path / "ev"
    code, out, err = run_cli(
        "change", "eval", "-m", f"LoC={model}", "-m", f"LoC={model}", "--per-edit", "1", "-o", ev
    )
    assert code == 0, err
    assert "colour/tone" in out and "LoC - identity" in out
    results = json.loads((ev / "results.json").read_text())
    assert set(results["cells"]) == {"colour/tone", "filter", "geometry"}
    assert len(results["cells"]["filter"]["seen"]["LoC"]["psnr_seeds"]) == 2
    assert (ev / "grid.png").is_file()


def test_train_options_read_their_defaults_from_the_config():
    import typer

    from lorafleet.change.config import ChangeConfig
    from lorafleet.cli import app
    from lorafleet.cli.change_cmds import TRAIN_OPTIONS

    command = typer.main.get_command(app).commands["change"].commands["train"]
    defaults = {p.name: p.default for p in command.params}
    values = {s.name: defaults[s.name] for s in TRAIN_OPTIONS.specs}
    assert TRAIN_OPTIONS.build(values) == ChangeConfig()
    assert defaults["editor"] == "residual" and defaults["reverse_scope"] == "invertible"


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, run_cli):
    model = tmp_path / "m"
    assert run_cli("change", "train", "--out", model, *TINY_ARGS)[0] == 0
    (tmp_path / "text.png").write_text("not an image")
    Image.new("RGB", (20, 20)).save(tmp_path / "a.jpg", format="JPEG")
    Image.new("I;16", (20, 20)).save(tmp_path / "deep.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")
    good = tmp_path / "good.png"
    Image.new("RGB", (20, 20)).save(good)
    base = ["change", "apply", "-m", model, "--out", tmp_path / "o.png"]
    cases = {
        "not a readable image": [
            "--before",
            good,
            "--after",
            good,
            "--image",
            tmp_path / "text.png",
        ],
        "not a PNG": ["--before", tmp_path / "a.jpg", "--after", good, "--image", good],
        "sides must be": ["--before", good, "--after", good, "--image", tmp_path / "tiny.png"],
        "unsupported PNG mode": [
            "--before",
            good,
            "--after",
            tmp_path / "deep.png",
            "--image",
            good,
        ],
        "no such image": ["--before", good, "--after", good, "--image", tmp_path / "none.png"],
        "give both": ["--before", good, "--image", good],
        "either an example pair": ["--image", good],
        "not a `lorafleet change train`": ["--lora", tmp_path, "--image", good],
    }
    for needle, extra in cases.items():
        if needle.startswith("not a `"):
            code, _, err = run_cli(
                "change",
                "apply",
                "-m",
                tmp_path,
                "--out",
                tmp_path / "o.png",
                "--before",
                good,
                "--after",
                good,
                "--image",
                good,
            )
        else:
            code, _, err = run_cli(*base, *extra)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (needle, err)
    assert not (tmp_path / "o.png").exists()
