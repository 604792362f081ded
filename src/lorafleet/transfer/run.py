"""`lorafleet transfer run`: without the task data, move the source adapter to a target base.

Stages, each resumable (its output is written whole, then recorded in DIR/state.json):
  generate  the target base, prompted with the kit's seeds, samples candidates; with the filter
            it is Trans-LoRA's rejection sampling: candidates are drawn and judged by the
            discriminator until K pass (or --max-candidates were drawn)   -> generated.jsonl
  filter    the first K candidates that passed (--no-filter: the first K) -> filtered.jsonl
  label     the teacher (source base + source adapter) gives outputs       -> labelled.jsonl
  train     a LoRA on the target base learns (input, teacher output)       -> DIR/adapter/
So the filtered and unfiltered arms train on the same number K of rows (the unfiltered arm given
the filtered run's candidates with --candidates takes the first K of them).
A rerun with the same settings skips the stages already done (training resumes its checkpoints).
"""

from __future__ import annotations

import json
from pathlib import Path

from lorafleet.adapters import read_adapter, write_adapter
from lorafleet.fsutil import atomic_write, atomic_write_json
from lorafleet.models import load_base
from lorafleet.models.chat import has_chat_template
from lorafleet.train import TrainConfig, Trainer, latest_checkpoint
from lorafleet.transfer.config import RunConfig
from lorafleet.transfer.discriminator import load_judge
from lorafleet.transfer.kit import Kit, kit_digest, read_kit
from lorafleet.transfer.rejection import RejectionResult, rejection_sample
from lorafleet.transfer.synth import CandidateStream, generate_inputs
from lorafleet.transfer.task import TransferError
from lorafleet.transfer.teacher import label_inputs

STATE_FILE = "state.json"
STAGE_FILES = {"generate": "generated.jsonl", "filter": "filtered.jsonl", "label": "labelled.jsonl"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


class TransferRun:
    """One `transfer run` in its directory; `run()` does the stages not done yet."""

    def __init__(self, cfg: RunConfig):
        cfg.check()
        self.cfg, self.out = cfg, Path(cfg.out)
        self.kit: Kit = read_kit(cfg.kit)
        self.adapter_dir = self.kit.source_adapter(cfg.source_adapter)
        self.source_name = cfg.source_base or self.kit.info["source_base"]["name"]
        self.chat = self.kit.chat if cfg.chat is None else cfg.chat
        self.target = load_base(cfg.target_base)
        if self.chat and not has_chat_template(self.target.tokenizer):
            raise TransferError(
                f"target base {cfg.target_base} has no chat template, and the kit's task uses "
                "chat prompts; pass --no-chat to train the target on plain prompts"
            )
        self.source = load_base(self.source_name)
        if self.source.fingerprint != self.kit.source_fingerprint:
            raise TransferError(
                f"the kit {cfg.kit} was made on another source base (fingerprint "
                f"{self.kit.source_fingerprint}); {self.source_name} is {self.source.fingerprint}"
            )
        self.state = self._open_state()

    # --- state ----------------------------------------------------------------------------
    def _open_state(self) -> dict:
        settings = {
            **self.cfg.settings(),
            "kit": kit_digest(self.kit.path),
            "target_fingerprint": self.target.fingerprint,
        }
        path = self.out / STATE_FILE
        if path.is_file():
            state = json.loads(path.read_text())
            old = state.get("settings", {})
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if diff:
                raise TransferError(
                    f"{self.out} holds a run with other settings ({', '.join(diff)}); rerun "
                    "with the same ones to resume, or choose another --out"
                )
            return state
        self.out.mkdir(parents=True, exist_ok=True)
        state = {"settings": settings, "stages": {}}
        atomic_write_json(path, state)
        return state

    def done(self, stage: str) -> bool:
        file = STAGE_FILES.get(stage)
        return stage in self.state["stages"] and (file is None or (self.out / file).is_file())

    def _finish(self, stage: str, rows: list[dict] | None, summary: dict) -> None:
        if rows is not None:
            write_jsonl(self.out / STAGE_FILES[stage], rows)
        self.state["stages"][stage] = summary
        atomic_write_json(self.out / STATE_FILE, self.state)

    def rows(self, stage: str) -> list[dict]:
        return read_jsonl(self.out / STAGE_FILES[stage])

    # --- stages ---------------------------------------------------------------------------
    def generate(self) -> None:
        cfg, kit = self.cfg, self.kit
        if cfg.candidates is not None:
            return self._reuse(Path(cfg.candidates))
        if not cfg.filter:
            return self._generate_plain()
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.synthetic, desc="accepted (rejection sampling)", unit="input")

        def show(tokens: int, seconds: float) -> None:
            bar.set_postfix(tok_s=f"{tokens / max(seconds, 1e-9):.0f}")

        score = load_judge(
            self.source, kit.discriminator, kit.chat, kit.task.kind, batch_size=cfg.batch_size
        )

        def judged(texts):
            p = score(texts)
            bar.update(min(sum(x >= cfg.threshold for x in p), bar.total - bar.n))
            return p

        stream = CandidateStream(
            self.target,
            kit.task.kind,
            kit.seed_inputs(),
            seed=cfg.seed,
            temperature=cfg.temperature,
            max_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            on_tokens=show,
        )
        try:
            result = rejection_sample(stream.next, judged, cfg.rejection())
        finally:
            bar.close()
            stream.close()
        self.source = load_base(self.source_name)  # the judge attached its adapter in place
        summary = {
            **result.summary(),
            "sampled": stream.sampled,
            "new_tokens": stream.new_tokens,
            "seconds": round(stream.seconds, 2),
            "tokens_per_s": round(stream.new_tokens / max(stream.seconds, 1e-9), 1),
            "candidates_per_s": round(result.generated / max(stream.seconds, 1e-9), 3),
        }
        if result.message():
            summary["note"] = result.message()
        self._finish("generate", result.candidates, summary)

    def _generate_plain(self) -> None:
        """--no-filter without --candidates: K distinct candidates, none judged."""
        cfg, kit = self.cfg, self.kit
        texts, gen = generate_inputs(
            self.target,
            kit.task.kind,
            kit.seed_inputs(),
            cfg.synthetic,
            seed=cfg.seed,
            temperature=cfg.temperature,
            max_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            desc="synthetic (target)",
        )
        if not texts:
            raise TransferError("the target base produced no usable input; try --temperature")
        summary = {
            "requested": cfg.synthetic,
            "generated": gen.generated,
            "sampled": gen.sampled,
            "new_tokens": gen.new_tokens,
            "seconds": round(gen.seconds, 2),
            "tokens_per_s": round(gen.tokens_per_s, 1),
            "candidates_per_s": round(gen.generated / max(gen.seconds, 1e-9), 3),
        }
        self._finish("generate", [{"input": t} for t in texts], summary)

    def _reuse(self, path: Path) -> None:
        """Another run's generated.jsonl, whole and in its order (its P(real) kept): the filter
        stage takes its first K (--no-filter) or its first K that pass."""
        if not path.is_file():
            raise TransferError(f"{path}: no such candidates file (a run's generated.jsonl)")
        try:
            rows = [{"input": r["input"], "p_real": r.get("p_real")} for r in read_jsonl(path)]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise TransferError(f'{path}: not a generated.jsonl (rows of {{"input"}})') from None
        if not rows:
            raise TransferError(f"{path}: no candidates")
        summary = {"requested": self.cfg.synthetic, "generated": len(rows), "from": str(path)}
        self._finish("generate", rows, summary)

    def filter(self) -> None:
        cfg = self.cfg
        candidates = self.rows("generate")
        if not cfg.filter:
            rows = [{"input": r["input"], "p_real": r.get("p_real")} for r in candidates]
            rows = rows[: cfg.synthetic]
            summary = {"filtered": False, "requested": cfg.synthetic, "kept": len(rows)}
            summary["accept_rate"] = None
            if len(rows) < cfg.synthetic:
                summary["note"] = f"only {len(rows)} candidates for --synthetic {cfg.synthetic}"
            self._finish("filter", rows, summary)
            return
        result = self._replay(candidates)
        if not result.kept:
            raise TransferError(
                f"the discriminator rejected all {result.generated} inputs; lower --threshold, "
                "raise --max-candidates, or pass --no-filter"
            )
        p_real = {c["input"]: c["p_real"] for c in result.candidates}
        rows = [{"input": t, "p_real": p_real[t]} for t in result.kept]
        gen = self.state["stages"]["generate"]
        if "passed" in gen:  # judged while generating: that loop's record (its cap) stands
            summary = {"filtered": True, **{k: gen[k] for k in result.summary() if k in gen}}
            note = gen.get("note")
        else:  # a reused pool: the loop over it is the record
            summary, note = {"filtered": True, **result.summary()}, result.message()
        if note:
            summary["note"] = note
        self._finish("filter", rows, summary)

    def _replay(self, candidates: list[dict]) -> RejectionResult:
        """The rejection loop over recorded candidates, in order: the P(real) they carry, the
        discriminator's for those without one (a reused --no-filter pool)."""
        unjudged = [r["input"] for r in candidates if r.get("p_real") is None]
        scored: dict[str, float] = {}
        if unjudged:
            kit = self.kit
            score = load_judge(
                self.source, kit.discriminator, kit.chat, kit.task.kind, self.cfg.batch_size
            )
            scored = dict(zip(unjudged, score(unjudged), strict=True))
            self.source = load_base(self.source_name)  # the judge attached its adapter
        texts = [r["input"] for r in candidates]
        p = {r["input"]: r["p_real"] for r in candidates if r.get("p_real") is not None}
        p.update(scored)
        position = 0

        def propose(n: int) -> list[str]:
            nonlocal position
            batch = texts[position : position + n]
            position += len(batch)
            return batch

        cap = min(self.cfg.cap, len(texts)) if self.cfg.candidates is None else len(texts)
        cfg = self.cfg.rejection(cap=max(cap, self.cfg.synthetic))
        return rejection_sample(propose, lambda batch: [p[t] for t in batch], cfg)

    def label(self) -> None:
        texts = [r["input"] for r in self.rows("filter")]
        rows = label_inputs(
            self.source,
            self.adapter_dir,
            self.kit.task,
            self.kit.chat,
            self.kit.seeds[0],
            texts,
            max_new_tokens=self.cfg.label_tokens,
            batch_size=self.cfg.batch_size,
        )
        self._finish("label", rows, {"labelled": len(rows)})

    def train(self) -> None:
        cfg, task = self.cfg, self.kit.task
        tok = self.target.tokenizer
        template = self.kit.seeds[0]
        examples = []
        for row in self.rows("label"):
            e = task.example(tok, self.chat, row["input"], template)
            examples.append(task.with_output(e, row.get("label", row["output"]), tok, self.chat))
        work = self.out / "train"
        tcfg = TrainConfig(
            base=cfg.target_base,
            data=f"translora:{task.name}",
            out=work,
            steps=cfg.steps,
            rank=cfg.rank,
            alpha=cfg.alpha,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            chat=self.chat,
            eval_limit=None,
            save_every=max(1, cfg.steps // 4),
            keep_checkpoints=1,
            resume=latest_checkpoint(work) is not None,
        )
        result = Trainer(tcfg, examples=examples).run()
        if result.get("interrupted"):
            raise TransferError(f"training stopped at step {result['steps']}; rerun to resume")
        adapter = read_adapter(work)
        adapter.meta["translora"] = self.recipe(result["steps"])
        write_adapter(self.out / "adapter", adapter)
        self._finish(
            "train",
            None,
            {
                "steps": result["steps"],
                "examples": len(examples),
                "adapter": str(self.out / "adapter"),
            },
        )

    def recipe(self, steps: int) -> dict:
        stages = self.state["stages"]
        return {
            "kit": str(Path(self.cfg.kit).resolve()),
            "kit_digest": kit_digest(self.kit.path),
            "task": self.kit.task.name,
            "source_base": self.kit.info["source_base"],
            "source_adapter": self.kit.info["source_adapter"],
            "target_base": {"name": self.cfg.target_base, "fingerprint": self.target.fingerprint},
            "synthetic": self.cfg.synthetic,
            "generated": stages["generate"]["generated"],
            "kept": stages["filter"]["kept"],
            "max_candidates": self.cfg.cap,
            "filtered": self.cfg.filter,
            "threshold": self.cfg.threshold,
            "accept_rate": stages["filter"]["accept_rate"],
            "labelled": stages["label"]["labelled"],
            "steps": steps,
            "rank": self.cfg.rank,
            "lr": self.cfg.lr,
            "seed": self.cfg.seed,
            "chat": self.chat,
        }

    def run(self) -> dict:
        for stage in ("generate", "filter", "label", "train"):
            if not self.done(stage):
                getattr(self, stage)()
        return {
            "out": str(self.out),
            "adapter": str(self.out / "adapter"),
            **{k: v for k, v in self.state["stages"].items()},
        }


def run_transfer(cfg: RunConfig) -> dict:
    return TransferRun(cfg).run()
