"""`lorafleet transfer run`: without the task data, move the source adapter to a target base.

Stages, each resumable (its output is written whole, then recorded in DIR/state.json):
  generate  the target base, prompted with the kit's seeds, samples N inputs -> generated.jsonl
  filter    the discriminator keeps those it judges real (--no-filter: all) -> filtered.jsonl
  label     the teacher (source base + source adapter) gives outputs       -> labelled.jsonl
  train     a LoRA on the target base learns (input, teacher output)       -> DIR/adapter/
A rerun with the same settings skips the stages already done (training resumes its checkpoints).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from lorafleet.adapters import read_adapter, write_adapter
from lorafleet.fsutil import atomic_write, atomic_write_json
from lorafleet.models import load_base
from lorafleet.models.chat import has_chat_template
from lorafleet.train import TrainConfig, Trainer, latest_checkpoint
from lorafleet.transfer.discriminator import judge
from lorafleet.transfer.kit import Kit, kit_digest, read_kit
from lorafleet.transfer.synth import generate_inputs
from lorafleet.transfer.task import TransferError
from lorafleet.transfer.teacher import label_inputs

STATE_FILE = "state.json"
STAGE_FILES = {"generate": "generated.jsonl", "filter": "filtered.jsonl", "label": "labelled.jsonl"}


@dataclass
class RunConfig:
    kit: Path
    target_base: str
    synthetic: int
    out: Path
    source_base: str | None = None  # None: the base named in the kit
    source_adapter: Path | None = None  # None: the path recorded in the kit
    filter: bool = True
    threshold: float = 0.5  # keep an input when the discriminator's P(real) >= this
    chat: bool | None = None  # None: as the kit was prepared
    steps: int = 100
    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-3
    batch_size: int = 8
    temperature: float = 0.9
    max_new_tokens: int = 96  # per synthetic input
    label_tokens: int = 64  # per teacher reply (generation tasks)
    seed: int = 0
    candidates: Path | None = None  # a generated.jsonl to reuse instead of generating

    def check(self) -> None:
        if self.synthetic < 1:
            raise TransferError(f"--synthetic must be >= 1, got {self.synthetic}")
        if not 0 <= self.threshold <= 1:
            raise TransferError(f"--threshold must be in [0, 1], got {self.threshold}")
        if self.steps < 1 or self.rank < 1 or self.batch_size < 1 or not self.lr > 0:
            raise TransferError("--steps, --rank, --batch-size and --lr must be positive")

    def settings(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("kit", "out", "source_adapter")}
        return json.loads(json.dumps(d, default=str))


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
        }
        self._finish("generate", [{"input": t} for t in texts], summary)

    def _reuse(self, path: Path) -> None:
        """The first N inputs of another run's generated.jsonl (an ablation on the same data)."""
        if not path.is_file():
            raise TransferError(f"{path}: no such candidates file (a run's generated.jsonl)")
        try:
            rows = [{"input": r["input"]} for r in read_jsonl(path)][: self.cfg.synthetic]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise TransferError(f'{path}: not a generated.jsonl (rows of {{"input"}})') from None
        if not rows:
            raise TransferError(f"{path}: no candidates")
        summary = {"requested": self.cfg.synthetic, "generated": len(rows), "from": str(path)}
        self._finish("generate", rows, summary)

    def filter(self) -> None:
        texts = [r["input"] for r in self.rows("generate")]
        if not self.cfg.filter:
            rows = [{"input": t, "p_real": None} for t in texts]
            self._finish(
                "filter",
                rows,
                {"filtered": False, "kept": len(rows), "judged": len(rows), "accept_rate": None},
            )
            return
        from tqdm.auto import tqdm

        with tqdm(total=2 * len(texts), desc="discriminator") as bar:
            p_real = judge(
                self.source,
                self.kit.discriminator,
                self.kit.chat,
                self.kit.task.kind,
                texts,
                batch_size=self.cfg.batch_size,
                progress=bar.update,
            )
        self.source = load_base(self.source_name)  # the judge attached its adapter in place
        rows = [
            {"input": t, "p_real": p}
            for t, p in zip(texts, p_real, strict=True)
            if p >= self.cfg.threshold
        ]
        if not rows:
            raise TransferError(
                f"the discriminator rejected all {len(texts)} inputs; lower --threshold, "
                "generate more, or pass --no-filter"
            )
        self._finish(
            "filter",
            rows,
            {
                "filtered": True,
                "kept": len(rows),
                "judged": len(texts),
                "accept_rate": len(rows) / len(texts),
            },
        )

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
