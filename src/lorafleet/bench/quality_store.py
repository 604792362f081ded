"""bench quality's checkpoints: per piece, each setting's per-token figures and llama.cpp's
parsed summaries, written atomically after each piece, so a run can be split into one call per
piece, resumed, and its pieces combined; plus an earlier run's printed summary (pieces scored
before checkpoints existed), imported once as its pieces' stand-in.

Layout: `<folder>/<spec key>/` per text spec (base, context, tokens, piece_tokens):
spec.json; weights.json; piece<i>.<setting>.npz (the piece's Tally: per chunk, per scored
token: KL float32, same top-1 uint8, -log Q and -log P float32); piece<i>.llama.json
({name: parse_kld_output}, token ids equal to lorafleet's / compared); tasks.json
({setting: task and greedy fields});
legacy.json ({"rows": {setting: summary over its pieces}, "source": path}).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorafleet.bench.quality_stats import Tally
from lorafleet.errors import LorafleetError
from lorafleet.fsutil import atomic_write, atomic_write_json

SPEC_KEYS = ("base", "context", "tokens", "piece_tokens")
_PIECE = re.compile(r"^piece(\d+)\.(.+)\.npz$")
_LLAMA = re.compile(r"^piece(\d+)\.llama\.json$")
# Fields of a setting's row that its task / greedy stage fills (kept in tasks.json).
TASK_FIELDS = (
    "task_rows",
    "accuracy",
    "accuracy_ref",
    "accuracy_sst2",
    "accuracy_strategyqa",
    "mcnemar",
    "accuracy_lower",
    "greedy_agreement",
    "prompts_identical",
)
# Fields of an earlier run's row that describe its KL figures (imported as a summary).
SUMMARY_FIELDS = (
    "tokens",
    "chunks",
    "kl_mean",
    "kl_mean_ci",
    "kl_mean_pm",
    "kl_p99",
    "kl_p99_ci",
    "same_top1",
    "same_top1_ci",
    "ppl_ratio",
    "ppl_ratio_ci",
    "ppl",
    "ppl_ref",
)


def spec_key(spec: dict) -> str:
    """A folder name for a text spec: c<context>-t<tokens>-p<piece_tokens>-<base's name>-<hash
    of the whole spec> (the hash tells two bases of one name apart)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(str(spec["base"])).name)[:40] or "base"
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    return f"c{spec['context']}-t{spec['tokens']}-p{spec['piece_tokens']}-{name}-{digest}"


@dataclass(frozen=True)
class Store:
    """One text spec's checkpoints (see the module doc); `root` is its folder."""

    root: Path
    spec: dict

    @classmethod
    def open(cls, folder: str | Path, spec: dict) -> Store:
        """The spec's folder under `folder` (created; spec.json written on first use)."""
        spec = {k: spec[k] for k in SPEC_KEYS}
        root = Path(folder) / spec_key(spec)
        root.mkdir(parents=True, exist_ok=True)
        path = root / "spec.json"
        if path.is_file():
            if json.loads(path.read_text()) != spec:
                raise LorafleetError(f"bench quality: {path} holds another text spec")
        else:
            atomic_write_json(path, spec)
        return cls(root, spec)

    # -- lorafleet's per-token figures -------------------------------------------------------

    def piece_file(self, index: int, setting: str) -> Path:
        return self.root / f"piece{index:03d}.{setting}.npz"

    def has_piece(self, index: int, setting: str, piece_rows: dict) -> bool:
        """Is piece `index` of `setting` checkpointed? One-line error if it was cut from other
        documents (the data folder changed) than `piece_rows` says."""
        path = self.piece_file(index, setting)
        if not path.is_file():
            return False
        with np.load(path) as data:
            rows = json.loads(str(data["rows"]))
        if rows != piece_rows:
            raise LorafleetError(
                f"bench quality: {path} was cut from other documents ({rows} rows, now "
                f"{piece_rows}); move the checkpoint folder away to start again"
            )
        return True

    def save_piece(self, index: int, setting: str, tally: Tally, piece_rows: dict) -> Path:
        """One piece of one setting, atomically: every chunk's per-token figures ([C, T])."""
        path = self.piece_file(index, setting)
        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            kl=np.stack(tally.kl).astype(np.float32),  # [C, T]
            same=np.stack(tally.same).astype(np.uint8),  # [C, T]
            nll=np.stack(tally.nll).astype(np.float32),  # [C, T]
            nll_ref=np.stack(tally.nll_ref).astype(np.float32),  # [C, T]
            rows=np.asarray(json.dumps(piece_rows, sort_keys=True)),
        )
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))
        return path

    def pieces_of(self, setting: str) -> list[int]:
        """The piece indexes checkpointed for `setting`, ascending."""
        found = (_PIECE.match(p.name) for p in self.root.iterdir())
        return sorted(int(m[1]) for m in found if m and m[2] == setting)

    def settings(self) -> list[str]:
        """Settings with at least one checkpointed piece or an imported summary."""
        found = {m[2] for m in (_PIECE.match(p.name) for p in self.root.iterdir()) if m}
        return sorted(found | set(self.legacy().get("rows", {})))

    def tally(self, setting: str) -> tuple[Tally, list[int]]:
        """Every checkpointed piece of `setting` as one Tally (chunks in piece order, float64),
        and the piece indexes."""
        tally, indexes = Tally(), self.pieces_of(setting)
        for index in indexes:
            with np.load(self.piece_file(index, setting)) as data:
                for kl, same, nll, nll_ref in zip(
                    data["kl"], data["same"], data["nll"], data["nll_ref"], strict=True
                ):
                    tally.kl.append(kl.astype(np.float64))
                    tally.same.append(same.astype(bool))
                    tally.nll.append(nll.astype(np.float64))
                    tally.nll_ref.append(nll_ref.astype(np.float64))
        return tally, indexes

    # -- llama.cpp's per-piece summaries ----------------------------------------------------

    def llama_file(self, index: int) -> Path:
        return self.root / f"piece{index:03d}.llama.json"

    def save_llama(self, index: int, record: dict) -> Path:
        """{"parts": {name: parse_kld_output}, "same_ids", "compared_ids", "models"}."""
        return atomic_write_json(self.llama_file(index), record)

    def llama(self) -> dict[int, dict]:
        """Piece index -> its llama.cpp record, for every checkpointed piece."""
        found = (_LLAMA.match(p.name) for p in sorted(self.root.iterdir()))
        return {int(m[1]): json.loads((self.root / m[0]).read_text()) for m in found if m}

    # -- task accuracy / greedy agreement, and an imported summary ---------------------------

    def tasks(self) -> dict:
        """{"settings": {setting: TASK_FIELDS}, "task_counts": {task: rows}} ({} if none)."""
        path = self.root / "tasks.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def save_tasks(self, fields: dict[str, dict], task_counts: dict) -> None:
        """Merge these settings' task fields into tasks.json (atomically)."""
        old = self.tasks()
        merged = {**old.get("settings", {}), **fields}
        atomic_write_json(
            self.root / "tasks.json", {"settings": merged, "task_counts": task_counts}
        )

    def weights(self) -> dict[str, float]:
        """Setting -> its engine's weight MB (weights.json; {} if none)."""
        path = self.root / "weights.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def save_weights(self, mb: dict[str, float]) -> None:
        atomic_write_json(self.root / "weights.json", {**self.weights(), **mb})

    def legacy(self) -> dict:
        path = self.root / "legacy.json"
        return json.loads(path.read_text()) if path.is_file() else {}


def import_summary(store: Store, earlier: dict, pieces_rows: list[dict], source: str) -> dict:
    """Take an earlier `bench quality` JSON (written before checkpoints, so summaries only) as
    the stand-in for its pieces, which must be the first pieces of this text (same base,
    context, and each piece's chunk count and rows per source; one-line error otherwise):
    each setting's KL summary (over its first `pieces` pieces) to legacy.json, its task /
    greedy fields to tasks.json (settings not there yet), and llama.cpp's per-piece summaries
    to piece<i>.llama.json (pieces not there yet; token-id agreement: the earlier run's
    overall share, spread over its pieces by their token counts). Returns legacy.json's content.
    """
    old_pieces = earlier.get("pieces") or []
    if "checkpoints" in earlier:
        raise LorafleetError(
            f"--import-summary {source}: written from checkpoints (its pieces are in them "
            "already); import only a run from before checkpoints"
        )
    if store.legacy():
        if store.legacy().get("source") == source:
            return store.legacy()  # imported already
        raise LorafleetError(
            f"--import-summary {source}: {store.root} holds another import "
            f"({store.legacy().get('source')})"
        )
    if earlier.get("base") != store.spec["base"]:
        raise LorafleetError(
            f"--import-summary {source}: base {earlier.get('base')!r}, not {store.spec['base']!r}"
        )
    if (earlier.get("text") or {}).get("context") != store.spec["context"]:
        raise LorafleetError(f"--import-summary {source}: another --context")
    mine = [{"chunks": p["chunks"], "rows": p["rows"]} for p in pieces_rows[: len(old_pieces)]]
    theirs = [{"chunks": p["chunks"], "rows": p["rows"]} for p in old_pieces]
    if not old_pieces or mine != theirs:
        raise LorafleetError(
            f"--import-summary {source}: its {len(old_pieces)} pieces are not the first pieces "
            "of this text (chunks or rows per source differ)"
        )
    n = len(old_pieces)
    rows = {}
    for row in earlier.get("rows", []):
        k = min(int(row.get("pieces", n)), n)
        if row["setting"] != "float32+none":
            summary = {f: row[f] for f in SUMMARY_FIELDS if f in row}
            rows[row["setting"]] = {**summary, "pieces": list(range(k))}
    legacy = {"source": source, "pieces": n, "rows": rows}
    weights = {r["setting"]: r["weight_mb"] for r in earlier.get("rows", []) if "weight_mb" in r}
    store.save_weights({k: v for k, v in weights.items() if k not in store.weights()})
    atomic_write_json(store.root / "legacy.json", legacy)
    have = store.tasks().get("settings", {})
    tasks = {
        r["setting"]: {f: r[f] for f in TASK_FIELDS if f in r}
        for r in earlier.get("rows", [])
        if r["setting"] not in have and "accuracy" in r
    }
    if tasks:
        store.save_tasks(tasks, earlier.get("task_rows") or {})
    llama = earlier.get("llama_cpp") or {}
    parts = llama.get("pieces") or {}
    share = float(llama.get("same_token_ids") or 0.0)
    done = store.llama()
    for i in range(n):
        if i in done or not parts or any(len(p) <= i for p in parts.values()):
            continue
        compared = old_pieces[i]["chunks"] * store.spec["context"]
        store.save_llama(
            i,
            {
                "parts": {name: p[i] for name, p in parts.items()},
                "same_ids": share * compared,
                "compared_ids": compared,
                "models": llama.get("models") or {},
                "imported_from": source,
            },
        )
    return legacy
