"""Trans-LoRA on tiny models: prepare -> run end to end, the filter, the kit's contents, resume."""

from __future__ import annotations

import json

import pytest
from transfer_helpers import TINY_RUN

from lorafleet.adapters import load_adapter, read_adapter
from lorafleet.models import load_base
from lorafleet.transfer import RunConfig, TransferError, TransferRun, read_kit
from lorafleet.transfer import run as run_module

STAGES = ("generate", "filter", "label", "train")


def run_config(kit, target, out, **kw) -> RunConfig:
    values = {
        "synthetic": 6,
        "steps": 3,
        "rank": 4,
        "batch_size": 4,
        "max_new_tokens": 12,
        "label_tokens": 8,
    }
    return RunConfig(kit=kit, target_base=str(target), out=out, **{**values, **kw})


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_prepare_then_run_end_to_end(run_cli, kit, tmp_path, tiny_base_dir, gemma_dir):
    """`kit` comes from `lorafleet transfer prepare` on the tiny Llama; run it to a Gemma 3."""
    out = tmp_path / "run"
    info = json.loads((kit / "kit.json").read_text())
    assert 0.0 <= info["discriminator"]["held_out_accuracy"] <= 1.0
    assert info["discriminator"]["held_out_examples"] >= 2
    code, stdout, err = run_cli(
        "transfer", "run", "-k", kit, "-t", gemma_dir, "-n", "6", "-o", out, *TINY_RUN
    )
    assert code == 0, err
    assert f"wrote adapter {out / 'adapter'}" in stdout
    source, target = load_base(str(tiny_base_dir)), load_base(str(gemma_dir))
    assert len(source.tokenizer) != len(target.tokenizer)  # another tokenizer, another family
    assert target.model.config.model_type == "gemma3_text"
    generated, kept = jsonl(out / "generated.jsonl"), jsonl(out / "filtered.jsonl")
    labelled = jsonl(out / "labelled.jsonl")
    assert 1 <= len(generated) <= 6 and 1 <= len(kept) <= len(generated)
    assert [r["input"] for r in labelled] == [r["input"] for r in kept]
    assert {r["output"] for r in labelled} <= {"negative", "positive"}  # among the labels
    adapter = read_adapter(out / "adapter")
    recipe = adapter.meta["translora"]
    assert adapter.meta["base_fingerprint"] == target.fingerprint
    assert recipe["source_base"]["fingerprint"] == source.fingerprint
    assert recipe["synthetic"] == 6 and recipe["filtered"] is True
    assert recipe["accept_rate"] == pytest.approx(len(kept) / len(generated))
    load_adapter(out / "adapter", target.model, base_fingerprint=target.fingerprint)
    assert "accept_rate" in stdout and "tokens_per_s" in stdout


def test_kit_holds_no_task_rows_beyond_the_seeds(kit, task_file):
    files = sorted(str(p.relative_to(kit)) for p in kit.rglob("*") if p.is_file())
    assert files == [
        "discriminator/README.md",
        "discriminator/adapter_config.json",
        "discriminator/adapter_model.safetensors",
        "kit.json",
        "seeds.jsonl",
    ]
    rows = jsonl(task_file)
    seeds = read_kit(kit).seeds
    assert len(seeds) == 3 and all(s in rows for s in seeds)
    blob = b"".join(p.read_bytes() for p in kit.rglob("*") if p.is_file())
    others = [r["text"] for r in rows if r not in seeds]
    leaked = [t for t in others if t.encode() in blob]
    assert not leaked
    assert all(s["text"].encode() in (kit / "seeds.jsonl").read_bytes() for s in seeds)


def test_filter_drops_exactly_what_the_discriminator_rejects(kit, gemma_dir, tmp_path, monkeypatch):
    def fake_judge(base, disc_dir, chat, kind, texts, batch_size=16, progress=None):
        return [0.9 if i % 2 == 0 else 0.1 for i in range(len(texts))]

    monkeypatch.setattr(run_module, "judge", fake_judge)
    out = tmp_path / "filtered"
    TransferRun(run_config(kit, gemma_dir, out)).run()
    generated = [r["input"] for r in jsonl(out / "generated.jsonl")]
    kept = [r["input"] for r in jsonl(out / "filtered.jsonl")]
    assert kept == generated[::2]
    state = json.loads((out / "state.json").read_text())["stages"]["filter"]
    assert state["accept_rate"] == pytest.approx(len(kept) / len(generated))
    # --no-filter on the same candidates (--candidates) keeps every one.
    out2 = tmp_path / "unfiltered"
    candidates = out / "generated.jsonl"
    TransferRun(run_config(kit, gemma_dir, out2, filter=False, candidates=candidates)).run()
    assert [r["input"] for r in jsonl(out2 / "filtered.jsonl")] == generated
    assert read_adapter(out2 / "adapter").meta["translora"]["filtered"] is False


def test_the_real_discriminator_decides_the_filter(kit, gemma_dir, tmp_path):
    """Threshold 0 keeps every candidate and records the discriminator's P(real); a threshold
    at their median keeps exactly the candidates scored at or above it."""
    everything = TransferRun(run_config(kit, gemma_dir, tmp_path / "all", threshold=0.0))
    everything.generate()
    everything.filter()
    scored = jsonl(tmp_path / "all" / "filtered.jsonl")
    generated = [r["input"] for r in jsonl(tmp_path / "all" / "generated.jsonl")]
    assert [r["input"] for r in scored] == generated
    p = [r["p_real"] for r in scored]
    assert all(0.0 <= x <= 1.0 for x in p)
    middle = sorted(p)[len(p) // 2]
    half = TransferRun(run_config(kit, gemma_dir, tmp_path / "half", threshold=middle))
    half.generate()
    half.filter()
    kept = jsonl(tmp_path / "half" / "filtered.jsonl")
    assert kept == [r for r in scored if r["p_real"] >= middle]
    assert 0 < len(kept) < len(scored) or len(set(p)) == 1


def test_resume_after_a_kill_in_each_stage(kit, gemma_dir, tmp_path, monkeypatch):
    out = tmp_path / "resume"
    calls = {s: 0 for s in STAGES}
    originals = {s: getattr(TransferRun, s) for s in STAGES}

    def counted(stage):
        def method(self):
            calls[stage] += 1
            return originals[stage](self)

        return method

    for stage in STAGES:
        monkeypatch.setattr(TransferRun, stage, counted(stage))
    for k, killed in enumerate(STAGES):

        def boom(self, stage=killed):
            calls[stage] += 1
            raise RuntimeError(f"killed in {stage}")

        monkeypatch.setattr(TransferRun, killed, boom)
        with pytest.raises(RuntimeError, match=killed):
            TransferRun(run_config(kit, gemma_dir, out)).run()
        monkeypatch.setattr(TransferRun, killed, counted(killed))
        # Each stage ran once when it was killed and once more on the next attempt, never
        # again: the stages finished before were not recomputed.
        expected = {s: (2 if j < k else 1 if j == k else 0) for j, s in enumerate(STAGES)}
        assert calls == expected
    TransferRun(run_config(kit, gemma_dir, out)).run()
    assert calls == {"generate": 2, "filter": 2, "label": 2, "train": 2}
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_a_rerun_with_other_settings_is_refused(kit, gemma_dir, tmp_path, monkeypatch):
    out = tmp_path / "r"
    monkeypatch.setattr(TransferRun, "run", lambda self: {})
    TransferRun(run_config(kit, gemma_dir, out))
    with pytest.raises(TransferError, match="other settings"):
        TransferRun(run_config(kit, gemma_dir, out, synthetic=7))


def one_line_error(code, err) -> str:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorafleet: error:"), err
    return lines[0]


def test_bad_inputs_exit_2_with_one_line(
    run_cli, kit, tmp_path, tiny_base_dir, other_base_dir, gemma_dir, gemma_plain_dir, task_file
):
    run = ["transfer", "run", "-k", kit, "-o", tmp_path / "r", *TINY_RUN]
    # the kit was made on another source base
    line = one_line_error(
        *run_cli(*run, "-t", gemma_dir, "-n", "4", "--source-base", other_base_dir)[::2]
    )
    assert "another source base" in line
    # missing source adapter (moved away), or another adapter in its place
    line = one_line_error(
        *run_cli(*run, "-t", gemma_dir, "-n", "4", "--source-adapter", tmp_path / "gone")[::2]
    )
    assert "source adapter not found" in line
    wrong = kit / "discriminator"
    line = one_line_error(
        *run_cli(*run, "-t", gemma_dir, "-n", "4", "--source-adapter", wrong)[::2]
    )
    assert "not the source adapter" in line
    # a target base without a chat template, for a kit made with chat prompts
    line = one_line_error(*run_cli(*run, "-t", gemma_plain_dir, "-n", "4")[::2])
    assert "no chat template" in line and "--no-chat" in line
    # N < 1
    line = one_line_error(*run_cli(*run, "-t", gemma_dir, "-n", "0")[::2])
    assert "--synthetic must be >= 1" in line
    # not a kit
    line = one_line_error(
        *run_cli(
            "transfer", "run", "-k", tmp_path, "-t", gemma_dir, "-n", "4", "-o", tmp_path / "r2"
        )[::2]
    )
    assert "not a Trans-LoRA kit" in line
    # prepare: missing adapter, no seeds, an unknown task
    prep = ["transfer", "prepare", "-b", tiny_base_dir, "-d", task_file, "-o", tmp_path / "k"]
    line = one_line_error(*run_cli(*prep, "-a", tmp_path / "nope")[::2])
    assert "no such adapter directory" in line
    line = one_line_error(*run_cli(*prep, "-a", kit / "discriminator", "--seeds", "0")[::2])
    assert "--seeds must be >= 1" in line
    line = one_line_error(
        *run_cli(
            "transfer",
            "prepare",
            "-b",
            tiny_base_dir,
            "-a",
            kit / "discriminator",
            "-d",
            "nosuchtask",
            "-o",
            tmp_path / "k",
        )[::2]
    )
    assert "nosuchtask" in line
    assert not (tmp_path / "r").exists() or not (tmp_path / "r" / "adapter").exists()
