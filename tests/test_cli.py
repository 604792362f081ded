"""The CLI as a user meets it: help, info on a base, generation, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys


def test_help_lists_commands(run_cli):
    code, out, _ = run_cli("--help")
    assert code == 0 and "info" in out and "generate" in out


def test_info_json_on_a_tiny_base(run_cli, tiny_base_dir):
    code, out, err = run_cli("info", "--base", tiny_base_dir, "--json")
    assert code == 0, err
    base = json.loads(out)["base"]
    assert base["family"] == "llama" and base["layers"] == 2
    assert base["targets"] == {
        name: 2
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    }
    assert base["fingerprint"].startswith("llama-")


def test_info_table_on_a_tiny_base(run_cli, tiny_base_dir):
    code, out, _ = run_cli("info", "--base", tiny_base_dir)
    assert code == 0 and "fingerprint" in out and "q_proj x2" in out


def test_generate_prints_only_the_new_text(run_cli, tiny_base_dir):
    code, out, err = run_cli(
        "generate", "--base", tiny_base_dir, "-p", "Hello", "--max-tokens", "5"
    )
    assert code == 0, err
    assert "Hello" not in out and "<|im_start|>" not in out


def test_usage_errors_are_one_line_exit_2(run_cli):
    for args in (["info"], ["info", "--base", "x", "--max-rank", "zero"], ["info", "--bse", "x"]):
        code, _, err = run_cli(*args)
        assert code == 2 and len(err.strip().splitlines()) == 1, (args, err)


def test_console_script_bad_base_no_traceback(tmp_path):
    exe = [sys.executable, "-m", "lorafleet.cli"]
    proc = subprocess.run(
        [*exe, "generate", "--base", str(tmp_path / "nope"), "-p", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"lorafleet: error: {tmp_path / 'nope'}: no such file or directory"
    ]
    assert proc.stdout == ""
