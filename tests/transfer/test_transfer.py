"""Trans-LoRA on tiny models: prepare -> run end to end, rejection sampling to K in both arms,
the discriminator's sizes and held-out rows, the kit's contents, resume."""

from __future__ import annotations

import importlib
import json

import pytest
from transfer_helpers import TINY_RUN

from lorafleet.adapters import load_adapter, read_adapter
from lorafleet.models import load_base
from lorafleet.transfer import PrepareConfig, RunConfig, TransferError, TransferRun, read_kit
from lorafleet.transfer.config import MIN_DISC_ROWS
from lorafleet.transfer.synth import GenerationStats

# the modules (the package's lazy names `prepare`, `run_transfer` are functions)
prepare_module = importlib.import_module("lorafleet.transfer.prepare")
run_module = importlib.import_module("lorafleet.transfer.run")

STAGES = ("generate", "filter", "label", "train")


def run_config(kit, target, out, **kw) -> RunConfig:
    values = {
        "synthetic": 6,
        "max_candidates": 12,  # keeps the tiny runs short
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
    # Rejection sampling: every candidate judged and recorded; at most K = 6 kept, all passed;
    # never more than the cap (10 x K) drawn.
    assert 1 <= len(kept) <= 6 and len(generated) <= 60
    assert all(0.0 <= r["p_real"] <= 1.0 for r in generated)
    passed = [r["input"] for r in generated if r["p_real"] >= 0.5]
    assert [r["input"] for r in kept] == passed[:6]
    assert len(kept) == 6 or len(generated) == 60  # K reached, or the cap hit
    assert [r["input"] for r in labelled] == [r["input"] for r in kept]
    assert {r["output"] for r in labelled} <= {"negative", "positive"}  # among the labels
    adapter = read_adapter(out / "adapter")
    recipe = adapter.meta["translora"]
    assert adapter.meta["base_fingerprint"] == target.fingerprint
    assert recipe["source_base"]["fingerprint"] == source.fingerprint
    assert recipe["synthetic"] == 6 and recipe["filtered"] is True
    assert recipe["kept"] == len(kept) and recipe["max_candidates"] == 60
    assert recipe["accept_rate"] == pytest.approx(len(passed) / len(generated), abs=1e-4)
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


def fake_judge_factory(pattern):
    """A `load_judge` stand-in: P(real) from `pattern` (cycled over every text it scores)."""
    count = {"n": 0}

    def load_judge(base, disc_dir, chat, kind, batch_size=16, progress=None):
        def score(texts):
            out = []
            for _ in texts:
                out.append(pattern[count["n"] % len(pattern)])
                count["n"] += 1
            return out

        return score

    return load_judge


def test_both_arms_train_on_the_same_k_rows(kit, gemma_dir, tmp_path, monkeypatch):
    """The filter keeps the first K candidates that pass (candidates drawn until K pass); the
    unfiltered arm, given the same candidates, takes the first K: both label and train K."""
    monkeypatch.setattr(run_module, "load_judge", fake_judge_factory([0.9, 0.1, 0.2]))
    out = tmp_path / "filtered"
    TransferRun(run_config(kit, gemma_dir, out, max_candidates=60)).run()
    generated = jsonl(out / "generated.jsonl")
    assert [r["p_real"] for r in generated] == [
        (0.9, 0.1, 0.2)[i % 3] for i in range(len(generated))
    ]
    kept = [r["input"] for r in jsonl(out / "filtered.jsonl")]
    assert kept == [r["input"] for r in generated][::3][:6] and len(kept) == 6
    assert len(generated) >= 16  # the 6th passing one is the 16th candidate
    state = json.loads((out / "state.json").read_text())["stages"]
    assert state["filter"]["kept"] == 6 and state["filter"]["cap_hit"] is False
    assert state["filter"]["generated"] == len(generated)
    assert state["filter"]["accept_rate"] == pytest.approx(
        sum(r["accepted"] for r in generated) / len(generated), abs=1e-4
    )
    out2 = tmp_path / "unfiltered"
    candidates = out / "generated.jsonl"
    TransferRun(run_config(kit, gemma_dir, out2, filter=False, candidates=candidates)).run()
    first = [r["input"] for r in generated][:6]
    assert [r["input"] for r in jsonl(out2 / "filtered.jsonl")] == first
    assert len(jsonl(out / "labelled.jsonl")) == len(jsonl(out2 / "labelled.jsonl")) == 6
    for run_dir in (out, out2):
        assert read_adapter(run_dir / "adapter").meta["translora"]["kept"] == 6
    assert read_adapter(out2 / "adapter").meta["translora"]["filtered"] is False


def test_the_cap_stops_generation_and_says_so(run_cli, kit, gemma_dir, tmp_path, monkeypatch):
    """A discriminator that passes one in ten: with --max-candidates 12 the run stops at 12
    candidates with 2 kept of K = 6, records cap_hit, and warns on stderr."""
    pattern = [0.9] + [0.1] * 9
    monkeypatch.setattr(run_module, "load_judge", fake_judge_factory(pattern))
    out = tmp_path / "capped"
    args = ["transfer", "run", "-k", kit, "-t", gemma_dir, "-n", "6", "-o", out, *TINY_RUN]
    code, _, err = run_cli(*args, "--max-candidates", "12")
    assert code == 0, err
    assert len(jsonl(out / "generated.jsonl")) == 12
    assert len(jsonl(out / "filtered.jsonl")) == 2
    state = json.loads((out / "state.json").read_text())["stages"]["filter"]
    assert state["cap_hit"] is True and state["kept"] == 2 and state["requested"] == 6
    assert "generation cap (12 candidates) was hit with 2 of 6" in state["note"]
    assert "warning: the generation cap (12 candidates) was hit" in err


def test_the_real_discriminator_decides_the_filter(kit, gemma_dir, tmp_path):
    """Threshold 0 passes every candidate, so the first K are kept, each with the
    discriminator's P(real). Those candidates as a pool without scores (--candidates), at a
    threshold between two of their scores: the discriminator judges them again and the first K
    at or above it are kept."""
    everything = TransferRun(run_config(kit, gemma_dir, tmp_path / "all", threshold=0.0))
    everything.generate()
    everything.filter()
    generated = jsonl(tmp_path / "all" / "generated.jsonl")
    kept = jsonl(tmp_path / "all" / "filtered.jsonl")
    assert [r["input"] for r in kept] == [r["input"] for r in generated][:6]
    p = [r["p_real"] for r in generated]
    assert all(0.0 <= x <= 1.0 for x in p)
    levels = sorted(set(p))
    assert len(levels) > 1
    middle = (levels[len(levels) // 2 - 1] + levels[len(levels) // 2]) / 2
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"input": r["input"]}) + "\n" for r in generated))
    cfg = run_config(kit, gemma_dir, tmp_path / "half", threshold=middle, candidates=pool)
    half = TransferRun(cfg)
    half.generate()
    half.filter()
    expected = [r["input"] for r in generated if r["p_real"] >= middle][:6]
    assert [r["input"] for r in jsonl(tmp_path / "half" / "filtered.jsonl")] == expected


def test_discriminator_sizes_are_enforced(tmp_path):
    """At least 128 real + 128 synthetic training inputs: the default, and the floor."""
    cfg = PrepareConfig(base="b", adapter=tmp_path, data="d", out=tmp_path / "k")
    assert cfg.real == MIN_DISC_ROWS == 128 and cfg.held_out >= 1
    cfg.check()
    with pytest.raises(TransferError, match="--real must be >= 128"):
        PrepareConfig(base="b", adapter=tmp_path, data="d", out=tmp_path / "k", real=64).check()


def test_held_out_accuracy_is_on_inputs_it_did_not_train_on(
    kit, tiny_base_dir, source_adapter, task_file, tmp_path, monkeypatch
):
    """`prepare` trains the discriminator on 128 + 128 inputs and scores `--held-out` more of
    each, disjoint from them; the kit's accuracy is the rule P(real) >= 0.5 on those."""
    trained, judged, train_texts = [], [], []
    original_train = prepare_module.train_discriminator
    original_examples = prepare_module.disc_examples

    def examples_spy(tokenizer, chat, kind, real, synthetic, seed):
        train_texts.extend([*real, *synthetic])
        return original_examples(tokenizer, chat, kind, real, synthetic, seed)

    def train_spy(base_name, out, train, **kw):
        trained.extend(train)
        return original_train(base_name, out, train, **{**kw, "steps": 1})

    def fake_load_judge(base, disc_dir, chat, kind, batch_size=16, progress=None):
        def score(texts):
            judged.append(list(texts))
            return [0.9, 0.2, 0.7, 0.4][: len(texts)]

        return score

    def fake_generate(base, kind, seeds, n, **kw):  # the split is under test, not generation
        texts = [f"generated text {i}" for i in range(n)]
        return texts, GenerationStats(n, n, n, 3 * n, 1.0)

    monkeypatch.setattr(prepare_module, "generate_inputs", fake_generate)
    monkeypatch.setattr(prepare_module, "train_discriminator", train_spy)
    monkeypatch.setattr(prepare_module, "disc_examples", examples_spy)
    monkeypatch.setattr(prepare_module, "load_judge", fake_load_judge)
    cfg = PrepareConfig(
        base=str(tiny_base_dir),
        adapter=source_adapter,
        data=str(task_file),
        out=tmp_path / "kit",
        seeds=3,
        held_out=4,
        disc_rank=4,
        batch_size=16,
        max_new_tokens=6,
    )
    report = prepare_module.prepare(cfg)
    labels = [e.label for e in trained]
    assert labels.count(0) == labels.count(1) == 128  # 128 real + 128 generated
    held_real, held_synth = judged
    assert len(held_real) == len(held_synth) == 4
    assert len(train_texts) == 256 and not set(held_real + held_synth) & set(train_texts)
    assert set(held_real) <= {r["text"] for r in jsonl(task_file)}  # real rows of the task
    # real: 0.9, 0.7 pass of four; synthetic: 0.2, 0.4 rejected of four -> 4 / 8 right
    info = json.loads((tmp_path / "kit" / "kit.json").read_text())["discriminator"]
    assert info["held_out_real_accuracy"] == 0.5 and info["held_out_synthetic_accuracy"] == 0.5
    assert info["held_out_accuracy"] == report["held_out_accuracy"] == 0.5
    assert info["train_real"] == info["train_synthetic"] == 128
    assert info["held_out_examples"] == 8


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
            TransferRun(run_config(kit, gemma_dir, out, threshold=0.0)).run()
        monkeypatch.setattr(TransferRun, killed, counted(killed))
        # Each stage ran once when it was killed and once more on the next attempt, never
        # again: the stages finished before were not recomputed.
        expected = {s: (2 if j < k else 1 if j == k else 0) for j, s in enumerate(STAGES)}
        assert calls == expected
    TransferRun(run_config(kit, gemma_dir, out, threshold=0.0)).run()
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
    line = one_line_error(*run_cli(*prep, "-a", kit / "discriminator", "--real", "64")[::2])
    assert "--real must be >= 128" in line
    line = one_line_error(
        *run_cli(*run, "-t", gemma_dir, "-n", "4", "--max-candidates", "3", "-o", tmp_path / "c")[
            ::2
        ]
    )
    assert "--max-candidates (3) must be >= --synthetic (4)" in line
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
