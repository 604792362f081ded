"""The server's side of a round, shared by the simulation and the Flower ServerApp: validate the
client updates, aggregate them, fold the residual into the base, evaluate, and save state.

State is saved after every round as `DIR/state/round-R/` (written to a temp dir, then renamed,
so a crash leaves the previous round intact); `resume` continues from the newest one.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lorafleet.adapters import Adapter, read_adapter, write_adapter
from lorafleet.errors import LorafleetError
from lorafleet.eval import evaluate
from lorafleet.fed.aggregate import (
    ClientUpdate,
    Dropped,
    aggregate,
    aggregation_error,
    lora_scale,
    normalise,
    validate_updates,
)
from lorafleet.fed.config import FedConfig
from lorafleet.fed.local import BaseSnapshot, load_global
from lorafleet.fed.residual import RESIDUAL_FILE, add_residuals, read_residual, write_residual
from lorafleet.fsutil import atomic_dir, atomic_write_json

STATE_DIR = "state"
METRICS_FILE = "metrics.json"
KEEP_STATES = 2


def latest_state(out: Path) -> Path | None:
    states = sorted((out / STATE_DIR).glob("round-*"), key=lambda p: int(p.name.split("-")[1]))
    states = [s for s in states if (s / "state.json").is_file()]
    return states[-1] if states else None


class FedServer:
    """Holds the global state (adapter tensors, accumulated residual, round) of a run.

    `model` is a PEFT model on the base, used to evaluate the global model; `snapshot` holds
    the base's original adapted weights."""

    def __init__(
        self,
        cfg: FedConfig,
        model,
        tokenizer,
        val_set,
        adapter_config: dict,
        tensors: dict,
        fingerprint: str,
        extra: dict | None = None,
    ):
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.val_set = val_set
        self.adapter_config = adapter_config
        self.tensors = tensors
        self.residual: dict[str, torch.Tensor] = {}
        self.fingerprint = fingerprint
        self.snapshot = BaseSnapshot(model, tensors)
        self.scale = lora_scale(adapter_config)
        self.round = 0
        self.history: list[dict] = []
        self.extra = extra or {}

    # --- start / resume --------------------------------------------------------------------
    def start(self) -> int:
        """Prepare `out`; returns the first round to run (1, or the one after a resumed one)."""
        cfg = self.cfg
        found = latest_state(cfg.out)
        if cfg.resume:
            if found is None:
                raise LorafleetError(f"{cfg.out}: no saved round to resume from")
            self._restore(found)
        elif found is not None:
            raise LorafleetError(
                f"{cfg.out} already holds a federated run (round {found.name}); pass --resume "
                "to continue it, or choose another --out"
            )
        else:
            cfg.out.mkdir(parents=True, exist_ok=True)
            self.history = [{"round": 0, **self._evaluate()}]
            self._write_outputs()
        return self.round + 1

    def _restore(self, state_dir: Path) -> None:
        state = json.loads((state_dir / "state.json").read_text())
        saved = state["config"]
        changed = [k for k in FedConfig.RESUME_KEYS if saved.get(k) != self.cfg.to_dict()[k]]
        if changed:
            raise LorafleetError(
                f"{state_dir}: --{changed[0].replace('_', '-')} differs from the saved run "
                f"({saved.get(changed[0])!r}); resume with the same settings"
            )
        self.tensors = load_file(str(state_dir / "adapter.safetensors"))
        self.residual, _ = read_residual(state_dir / RESIDUAL_FILE)
        self.round = int(state["round"])
        self.history = state["history"]
        self._load_into_model()

    def _load_into_model(self) -> None:
        self.snapshot.set(self.model, self.residual)
        load_global(self.model, self.tensors, freeze_a=True)

    # --- one round --------------------------------------------------------------------------
    def finish_round(
        self, round_: int, updates: list[ClientUpdate], failed: list[Dropped], seconds: float
    ) -> dict:
        """Validate, aggregate (if at least --min-clients are usable), evaluate, save."""
        cfg = self.cfg
        updates = sorted(updates, key=lambda u: u.client)  # aggregation order = client order
        kept, dropped = validate_updates(
            updates, self.tensors, norm_bound=cfg.norm_bound, frozen_a=cfg.aggregation == "ffa"
        )
        record: dict = {
            "round": round_,
            "clients": [u.client for u in kept],
            "dropped": [vars(d) for d in dropped],
            "failed": [vars(f) for f in failed],
        }
        if len(kept) < cfg.min_clients:
            record["skipped"] = (
                f"{len(kept)} usable client updates, fewer than --min-clients {cfg.min_clients}"
            )
        else:
            tensors = [u.tensors for u in kept]
            weights = [u.weight for u in kept]
            new, residuals = aggregate(cfg.aggregation, tensors, weights, self.scale)
            record["aggregation_error"] = aggregation_error(
                tensors, weights, new, residuals, self.scale
            )
            ws = normalise(weights)
            record["weights"] = dict(zip((u.client for u in kept), ws, strict=True))
            record["client_loss"] = sum(
                w * u.metrics.get("last_loss", float("nan")) for w, u in zip(ws, kept, strict=True)
            )
            if cfg.save_clients:
                self._save_clients(round_, kept, record["weights"])
            self.tensors = new
            self.residual = add_residuals(self.residual, residuals)
        # The model may hold a client's adapter (the simulation trains on it): score the global.
        self._load_into_model()
        record.update(self._evaluate())
        record["seconds"] = round(seconds + record.pop("eval_seconds", 0.0), 2)
        self.round = round_
        self.history.append(record)
        self._save_state()
        self._write_outputs()
        return record

    def _evaluate(self) -> dict:
        if self.val_set is None:
            return {}
        start = time.perf_counter()
        figures = evaluate(
            self.model,
            self.tokenizer,
            self.val_set,
            batch_size=self.cfg.batch_size,
            max_length=self.cfg.max_length,
        )
        figures = {k: v for k, v in figures.items() if isinstance(v, (int, float))}
        figures["eval_seconds"] = time.perf_counter() - start
        return figures

    # --- files ------------------------------------------------------------------------------
    def _adapter(self, meta: dict) -> Adapter:
        return Adapter(config=dict(self.adapter_config), tensors=dict(self.tensors), meta=meta)

    def _meta(self) -> dict:
        return {
            "base_fingerprint": self.fingerprint,
            "federated": {
                "round": self.round,
                "aggregation": self.cfg.aggregation,
                "clients": self.cfg.clients,
                "data": self.cfg.data,
                "seed": self.cfg.seed,
            },
        }

    def _save_clients(self, round_: int, updates: list[ClientUpdate], weights: dict) -> None:
        folder = self.cfg.out / f"round-{round_}"
        entries = []
        for u in updates:
            target = folder / f"client-{u.client}"
            meta = {"base_fingerprint": self.fingerprint, "client": u.client, "round": round_}
            write_adapter(target, Adapter(self.adapter_config, u.tensors, meta))
            entries.append(
                {"client": u.client, "dir": str(target.resolve()), "weight": weights[u.client]}
            )
        atomic_write_json(folder / "clients.json", entries)

    def _save_state(self) -> None:
        states = self.cfg.out / STATE_DIR
        states.mkdir(parents=True, exist_ok=True)
        with atomic_dir(states / f"round-{self.round}", prefix=".round.") as tmp:
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
            save_file(tensors, str(tmp / "adapter.safetensors"))
            write_residual(tmp / RESIDUAL_FILE, self.residual, self._meta())
            state = {"round": self.round, "config": self.cfg.to_dict(), "history": self.history}
            (tmp / "state.json").write_text(json.dumps(state, indent=2))
        old = sorted(states.glob("round-*"), key=lambda p: int(p.name.split("-")[1]))
        for path in old[:-KEEP_STATES]:
            shutil.rmtree(path, ignore_errors=True)

    def _write_outputs(self) -> None:
        out = self.cfg.out
        write_adapter(out / "global" / "adapter", self._adapter(self._meta()))
        write_residual(out / "global" / RESIDUAL_FILE, self.residual, self._meta())
        metrics = {"config": self.cfg.to_dict(), **self.extra, "rounds": self.history}
        atomic_write_json(out / METRICS_FILE, metrics)
        plot_rounds(self.history, out / "metrics.png")


def plot_rounds(history: list[dict], png: Path) -> Path | None:
    """Validation accuracy / loss of the global model per round."""
    rows = [r for r in history if "loss" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = next((m for m in ("accuracy", "exact_match") if m in rows[0]), None)
    fig, axes = plt.subplots(1, 2 if metric else 1, figsize=(9 if metric else 5, 3.5))
    axes = list(axes) if metric else [axes]
    rounds = [r["round"] for r in rows]
    axes[0].plot(rounds, [r["loss"] for r in rows], "o-")
    axes[0].set_ylabel("validation loss")
    if metric:
        axes[1].plot(rounds, [r[metric] for r in rows], "o-")
        axes[1].set_ylabel(f"validation {metric}")
    for ax in axes:
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(png)
    return png


def read_global(out: Path) -> tuple[Adapter, dict[str, torch.Tensor]]:
    """The global adapter and residual of a finished (or interrupted) run directory."""
    return read_adapter(out / "global" / "adapter"), read_residual(out / "global" / RESIDUAL_FILE)[
        0
    ]
