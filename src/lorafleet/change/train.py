"""Training: the editor's U-Net learns to reproduce its input (a residual editor's last conv is
then zeroed, so G alone is the identity), then, G frozen, the hypernetwork learns from pairs as
the paper trains on pairs only: the flipped pair as query/target, random exchange of <A, A'>,
the forward loss and LoRA Reverse; resumable checkpoints, a progress bar."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lorafleet.change.edits import (
    SEEN_TYPES,
    Edit,
    commutes_with_flip,
    invertible,
    reverse_applies,
)
from lorafleet.change.photos import load_photos, random_crops
from lorafleet.change.sampling import train_edit
from lorafleet.change.store import ChangeConfig, build, load_weights, save_model, save_weights
from lorafleet.errors import LorafleetError
from lorafleet.fsutil import atomic_write, atomic_write_json

PHASES = ("editor", "hyper")


def apply_edits(edits: list[Edit], x: torch.Tensor) -> torch.Tensor:
    """Edit i applied to image i."""
    return torch.cat([e(x[i : i + 1]) for i, e in enumerate(edits)])


@dataclass
class Pairs:
    """One training batch of pairs, all [N, 3, S, S]: H reads <before, after>; the LoRA is
    trained to turn `query` into `target` (and, negated, `target` back into `query` where
    `reverse` [N] bool is set); `b`, `b2` a quad's query/target (used by quad_weight only);
    `swapped`, `flipped` [N] bool record how each pair was built."""

    before: torch.Tensor
    after: torch.Tensor
    query: torch.Tensor
    target: torch.Tensor
    reverse: torch.Tensor
    swapped: torch.Tensor
    flipped: torch.Tensor
    b: torch.Tensor | None = None
    b2: torch.Tensor | None = None


def make_pairs(
    a: torch.Tensor, a2: torch.Tensor, edits: list[Edit], cfg: ChangeConfig, g: torch.Generator
) -> Pairs:
    """The paper's pair-only training batch from pairs a[i] -> a2[i] = edits[i](a[i]).

    Random exchange: where the pair may be reversed (an invertible edit, or any edit with
    reverse_scope "all"), with probability cfg.exchange H reads <A', A> and the LoRA must
    turn A' into A: the pair is the reverse edit's example. Flipped pair: the query/target
    are the horizontally flipped before/after (cfg.query "flip": for edits that commute with a
    flip, so the flipped pair shows the same edit; "flip-all": always; "pair": never).
    LoRA Reverse (cfg.reverse) applies where the pair may be reversed, except (scope
    "invertible") on involutions such as invert and flips (edits.reverse_applies)."""
    n = a.shape[0]
    inv = torch.tensor([invertible(e) for e in edits], dtype=torch.bool)
    reversible = inv if cfg.reverse_scope == "invertible" else torch.ones(n, dtype=torch.bool)
    swapped = reversible & (torch.rand(n, generator=g) < cfg.exchange)
    m = swapped.view(n, 1, 1, 1)
    before, after = torch.where(m, a2, a), torch.where(m, a, a2)
    if cfg.query == "flip":
        flipped = torch.tensor([commutes_with_flip(e) for e in edits], dtype=torch.bool)
    else:
        flipped = torch.full((n,), cfg.query == "flip-all", dtype=torch.bool)
    f = flipped.view(n, 1, 1, 1)
    query = torch.where(f, before.flip(-1), before)
    target = torch.where(f, after.flip(-1), after)
    if cfg.reverse_scope == "invertible":  # not on involutions: see edits.INVOLUTIONS
        reverse = torch.tensor([reverse_applies(e) for e in edits], dtype=torch.bool)
    else:
        reverse = torch.ones(n, dtype=torch.bool)
    reverse &= torch.tensor(cfg.reverse)
    return Pairs(before, after, query, target, reverse, swapped, flipped)


def pair_losses(editor, hyper, pairs: Pairs, cfg: ChangeConfig) -> dict:
    """forward `|G(H(A,A'), Q) - Q'|^2` (Q, Q' the query/target: the flipped pair), reverse
    `|G(-H(A,A'), Q') - Q|^2` (the negated LoRA undoes the edit) summed over the pairs marked
    reversible and divided by the batch size (so each such pair weighs as its forward term),
    and with a quad `quad_weight |G(H(A,A'), B) - B'|^2`."""
    lora = hyper(pairs.before, pairs.after)
    out = {"forward": F.mse_loss(editor(pairs.query, lora), pairs.target)}
    if cfg.reverse:
        per_pair = (editor(pairs.target, lora, sign=-1.0) - pairs.query).pow(2).mean((1, 2, 3))
        out["reverse"] = (per_pair * pairs.reverse.to(per_pair)).sum() / per_pair.shape[0]
    if pairs.b is not None and cfg.quad_weight > 0:
        out["quad"] = cfg.quad_weight * F.mse_loss(editor(pairs.b, lora), pairs.b2)
    return out


def batch(cfg: ChangeConfig, photos, phase: int, step: int):
    """The batch of `step` (a function of seed, phase and step only, so resuming repeats it):
    crops [N, 3, S, S] for the editor phase, Pairs for the hypernetwork phase."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + phase * 100_003 + step)
    a = random_crops(photos, cfg.batch, cfg.image_size, g)
    if phase == 0:
        return a
    b = random_crops(photos, cfg.batch, cfg.image_size, g)
    types = tuple(t for t in cfg.edit_types.split(",") if t) or SEEN_TYPES
    edits = [train_edit(g, types) for _ in range(cfg.batch)]
    pairs = make_pairs(a, apply_edits(edits, a), edits, cfg, g)
    b2 = apply_edits(edits, b)
    m = pairs.swapped.view(-1, 1, 1, 1)  # an exchanged pair's quad is exchanged too
    pairs.b, pairs.b2 = torch.where(m, b2, b), torch.where(m, b, b2)
    return pairs


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
        if self.editor.residual:
            # f was pre-trained to reproduce its input; G = x + f must start as the identity
            self.editor.zero_head()
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
        data = batch(self.cfg, self.photos, self.phase, self.step)
        if self.phase == 0:  # the U-Net f learns to reproduce its input (features for G)
            losses = {"reconstruct": F.mse_loss(self.editor.f(data, skip=False), data)}
        else:
            losses = pair_losses(self.editor, self.hyper, data, self.cfg)
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
