"""`lorafleet mole train`, `eval --mole`, `generate --mole --mask`: end to end on the tiny base."""

from __future__ import annotations

import json

import pytest
from compose_helpers import make_adapter

from lorafleet.adapters import write_adapter
from lorafleet.models import load_base


@pytest.fixture(scope="module")
def cli_experts(tokenizer, tiny_base_dir, tmp_path_factory):
    fp = load_base(str(tiny_base_dir)).fingerprint
    root = tmp_path_factory.mktemp("cli-experts")
    for i in range(2):
        adapter = make_adapter(tokenizer, seed=30 + i, r=4, lora_alpha=8)
        adapter.meta = {"base_fingerprint": fp}
        write_adapter(root / f"x{i}", adapter)
    data = root / "sums.jsonl"
    rows = [
        {"prompt": f"{a} plus {b} is", "completion": f" {a + b}"}
        for a in range(4)
        for b in range(4)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, data


def test_mole_train_eval_generate_and_mask(
    run_cli, tiny_base_dir, cli_experts, tmp_path, other_base_dir
):
    root, data = cli_experts
    out = tmp_path / "mole"
    code, stdout, err = run_cli(
        "mole",
        "train",
        "-b",
        tiny_base_dir,
        "-e",
        f"x0={root / 'x0'}",
        "-e",
        f"x1={root / 'x1'}",
        "-d",
        data,
        "-o",
        out,
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--no-chat",
        "--gate",
        "input",
    )
    assert code == 0, err
    assert (out / "gates.safetensors").is_file() and f"wrote {out}" in stdout
    assert json.loads((out / "mole_config.json").read_text())["variant"] == "input"

    code, _, err = run_cli(
        "eval",
        "-b",
        tiny_base_dir,
        "--mole",
        out,
        "-d",
        data,
        "--no-chat",
        "--limit",
        "4",
        "--json",
        tmp_path / "e.json",
    )
    assert code == 0, err
    assert json.loads((tmp_path / "e.json").read_text())["adapter"] == str(out)
    texts = []
    for mask in ([], ["--mask", "x1"], ["--mask", "x0"]):
        args = ["-p", "2 plus 2 is", "--no-chat", "--max-tokens", "6"]
        code, stdout, err = run_cli("generate", "-b", tiny_base_dir, "--mole", out, *mask, *args)
        assert code == 0, err
        texts.append(stdout)
    assert len(set(texts)) > 1  # masking an expert changes the output

    for args, message in (
        (["--mask", "nope"], "--mask nope: not an expert of this MoLE"),
        (["--mask", "x0", "--mask", "x1"], "the mask drops every expert"),
    ):
        code, _, err = run_cli("generate", "-b", tiny_base_dir, "--mole", out, *args, "-p", "hi")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("generate", "-b", tiny_base_dir, "--mask", "x0", "-p", "hi")
    assert code == 2 and "give --mole DIR" in err
    code, _, err = run_cli("generate", "-b", other_base_dir, "--mole", out, "-p", "hi")
    assert code == 2 and "gates trained on another base" in err
    code, _, err = run_cli(
        "mole", "train", "-b", tiny_base_dir, "-e", "nodir", "-d", data, "-o", tmp_path / "bad"
    )
    assert code == 2 and "--expert takes NAME=DIR" in err
