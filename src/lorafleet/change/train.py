"""Training: the editor learns to reproduce its input, then (frozen) the hypernetwork learns
pairs with the forward loss and LoRA Reverse; resumable checkpoints, a progress bar."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from lorafleet.change.edits import SEEN_TYPES, Edit
from lorafleet.change.photos import load_photos, random_crops
from lorafleet.change.sampling import train_edit
from lorafleet.change.store import ChangeConfig, build, load_weights, save_model, save_weights
from lorafleet.errors import LorafleetError
from lorafleet.fsutil import atomic_write, atomic_write_json

PHASES = ("editor", "hyper")


def apply_edits(edits: list[Edit], x: torch.Tensor) -> torch.Tensor:
    """Edit i applied to image i."""
    return torch.cat([e(x[i : i + 1]) for i, e in enumerate(edits)])


def pair_losses(editor, hyper, a, a2, cfg: ChangeConfig, b=None, b2=None) -> dict:
    """forward `|G(H(A,A'), A) - A'|^2`, reverse `|G(-H(A,A'), A') - A|^2` (the negated LoRA),
    and (when given a quad) `|G(H(A,A'), B) - B'|^2`."""
    lora = hyper(a, a2)
    out = {"forward": F.mse_loss(editor(a, lora), a2)}
    if cfg.reverse:
        out["reverse"] = F.mse_loss(editor(a2, lora, sign=-1.0), a)
    if b is not None and cfg.quad_weight > 0:
        out["quad"] = cfg.quad_weight * F.mse_loss(editor(b, lora), b2)
    return out


def batch(cfg: ChangeConfig, photos, phase: int, step: int):
    """The batch of `step` (a function of seed, phase and step only, so resuming repeats it)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + phase * 100_003 + step)
    a = random_crops(photos, cfg.batch, cfg.image_size, g)
    if phase == 0:
        return a, None
    b = random_crops(photos, cfg.batch, cfg.image_size, g)
    types = tuple(t for t in cfg.edit_types.split(",") if t) or SEEN_TYPES
    edits = [train_edit(g, types) for _ in range(cfg.batch)]
    return a, (apply_edits(edits, a), b, apply_edits(edits, b))


class Trainer:
    """Runs both phases into `out`, writing out/checkpoint/ every cfg.checkpoint_every steps."""

    def __init__(self, cfg: ChangeConfig, out: Path, resume: bool = False):
        self.cfg, self.out = cfg, Path(out)
        self.ckpt = self.out / "checkpoint"
        self.editor, self.hyper = build(cfg)
        self.phase, self.step = 0, 0
        unknown = set(filter(None, cfg.edit_types.split(","))) - set(SEEN_TYPES)
        if unknown:
            raise LorafleetError(f"not seen edit types: {', '.join(sorted(unknown))}")
        self.photos = load_photos("train")
        self.opt = self._optimizer()
        if resume and (self.ckpt / "state.json").is_file():
            self._load()
        elif (self.out / "config.json").is_file() and not resume:
            raise LorafleetError(f"{self.out} already holds a model (use --resume or a new --out)")

    def _optimizer(self):
        if self.phase == 0:
            return torch.optim.Adam(self.editor.parameters(), lr=self.cfg.editor_lr)
        self.editor.requires_grad_(False)
        return torch.optim.AdamW(self.hyper.parameters(), lr=self.cfg.lr, weight_decay=0.0)

    def _params(self):
        return (self.editor if self.phase == 0 else self.hyper).parameters()

    def _load(self):
        state = json.loads((self.ckpt / "state.json").read_text())
        if state["config"] != asdict(self.cfg):
            raise LorafleetError(f"{self.ckpt}: saved with other settings; resume with the same")
        self.phase, self.step = state["phase"], state["step"]
        load_weights(self.ckpt / "editor.safetensors", self.editor)
        load_weights(self.ckpt / "hyper.safetensors", self.hyper)
        self.opt = self._optimizer()
        self.opt.load_state_dict(torch.load(self.ckpt / "optim.pt", weights_only=True))

    def save_checkpoint(self):
        self.ckpt.mkdir(parents=True, exist_ok=True)
        save_weights(self.ckpt / "editor.safetensors", self.editor)
        save_weights(self.ckpt / "hyper.safetensors", self.hyper)
        atomic_write(self.ckpt / "optim.pt", lambda tmp: torch.save(self.opt.state_dict(), tmp))
        state = {"phase": self.phase, "step": self.step, "config": asdict(self.cfg)}
        atomic_write_json(self.ckpt / "state.json", state)

    def train_step(self) -> dict:
        a, rest = batch(self.cfg, self.photos, self.phase, self.step)
        if self.phase == 0:
            losses = {"reconstruct": F.mse_loss(self.editor(a), a)}
        else:
            a2, b, b2 = rest
            losses = pair_losses(self.editor, self.hyper, a, a2, self.cfg, b, b2)
        loss = sum(losses.values())
        self._set_lr()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self._params(), 1.0)
        self.opt.step()
        self.step += 1
        return {k: float(v.detach()) for k, v in losses.items()}

    def _set_lr(self):
        """Cosine decay to a tenth with a 5% linear warm-up (a function of the step alone)."""
        total = (self.cfg.editor_steps, self.cfg.steps)[self.phase]
        base = (self.cfg.editor_lr, self.cfg.lr)[self.phase]
        warm = max(1, total // 20)
        t = min(1.0, self.step / max(1, total))
        factor = min(1.0, (self.step + 1) / warm) * (0.55 + 0.45 * math.cos(math.pi * t))
        for group in self.opt.param_groups:
            group["lr"] = base * factor

    def run(self, progress=None, stop_after: int | None = None) -> Path:
        """Train to the end (or `stop_after` steps in this call, for tests of resuming)."""
        done = 0
        totals = (self.cfg.editor_steps, self.cfg.steps)
        while self.phase < len(PHASES):
            if self.step >= totals[self.phase]:
                self.phase, self.step = self.phase + 1, 0
                if self.phase < len(PHASES):
                    self.opt = self._optimizer()
                continue
            if stop_after is not None and done >= stop_after:
                self.save_checkpoint()
                return self.out
            losses = self.train_step()
            done += 1
            if progress is not None:
                progress(PHASES[self.phase], self.step, totals[self.phase], losses)
            if self.step % self.cfg.checkpoint_every == 0:
                self.save_checkpoint()
        self.editor.eval()
        self.hyper.eval()
        return save_model(self.out, self.cfg, self.editor, self.hyper)
