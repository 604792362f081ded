"""LoRA of Change behind `lorafleet serve --change DIR`: PNG bytes in, PNG bytes out."""

from __future__ import annotations

import re
from pathlib import Path

from lorafleet.change import apply as ap
from lorafleet.change.edits import OPS
from lorafleet.change.sampling import RANGES
from lorafleet.change.store import load_model
from lorafleet.errors import LorafleetError

LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
UNSEEN = "unseen:"  # example ids: "hue" (a training-range edit) or "unseen:hue" (held out)


def example_ids() -> list[str]:
    """Every example `lorafleet change examples` can cut: seen ranges, then held-out ones."""
    seen = [n for n in OPS if RANGES[n][0] is not None]
    return seen + [UNSEEN + n for n in OPS if RANGES[n][1] is not None]


def is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


class ChangeEditor:
    """One trained LoC model (and optionally a folder of LoRAs saved by `change apply
    --save-lora`) as the server's image editor (serve.api.image_edits.ImageEditor).
    Inference only, no shared mutable state: safe to call from several threads; blocking."""

    def __init__(self, model: str | Path, loras: str | Path | None = None, name: str | None = None):
        self.cfg, self.editor, self.hyper = load_model(model)
        self.name = name or Path(model).resolve().name
        if loras is not None and not Path(loras).is_dir():
            raise LorafleetError(f"{loras}: no such LoRA directory")
        self.loras_dir = Path(loras) if loras is not None else None
        self._examples: dict[tuple, dict] = {}  # (id, seed) -> example, a few KB each

    def lora_names(self) -> list[str]:
        """The saved LoRAs a request may name (sub-directories holding a PEFT adapter)."""
        if self.loras_dir is None:
            return []
        found = self.loras_dir.iterdir()
        return sorted(p.name for p in found if LORA_NAME.match(p.name) and is_adapter(p))

    def info(self) -> dict:
        return {
            "model": self.name,
            "image_size": self.cfg.image_size,
            "rank": self.cfg.rank,
            "min_side": ap.MIN_SIDE,
            "max_side": ap.MAX_SIDE,
            "loras": self.lora_names(),
            "examples": example_ids(),
        }

    def edit(
        self,
        image: bytes,
        before: bytes | None = None,
        after: bytes | None = None,
        lora: str | None = None,
    ) -> bytes:
        """PNG of G(H(before, after), image), or G(saved LoRA, image); a one-line
        LorafleetError (naming the field) for bad input. The same result as `change apply`."""
        if (before is None) != (after is None):
            raise LorafleetError("give both before and after (the example pair)")
        if (before is None) == (lora is None):
            raise LorafleetError("give either an example pair (before and after) or lora")
        x = ap.decode_png(image, "image")
        if lora is not None:
            if lora not in self.lora_names():
                raise LorafleetError(f"lora: no saved LoRA named {lora!r}")
            delta, scale = ap.load_lora(self.loras_dir / lora, self.editor)
        else:
            pair = ap.decode_png(before, "before"), ap.decode_png(after, "after")
            delta, scale = ap.emit_lora(self.hyper, *pair, self.cfg.image_size), 1.0
        return ap.png_bytes(ap.edit(self.editor, delta, x, scale))

    def example(self, example_id: str, seed: int = 0) -> dict:
        """{"id", "label", "images": {"before", "after", "image", "truth": PNG bytes}}."""
        from lorafleet.change.run import example_images

        if example_id not in example_ids():
            raise LorafleetError(f"unknown example {example_id!r}")
        if (example_id, seed) in self._examples:
            return self._examples[example_id, seed]
        unseen = example_id.startswith(UNSEEN)
        label, images = example_images(example_id.removeprefix(UNSEEN), unseen, seed)
        found = {
            "id": example_id,
            "label": label,
            "images": {k: ap.png_bytes(v) for k, v in images.items()},
        }
        self._examples[example_id, seed] = found
        return found


class ChangeCatalog:
    """The LoC models inside a server's adapters directory (`lorafleet change train` dirs),
    served at POST /v1/images/edits by `model` (serve.api.injected.ImageEditors); one kind of
    the registry's directory entries (serve.entries.EntryKind): each model is loaded when it
    appears or changes, and one that cannot be (a corrupt config or weights) is the
    registry's unavailable entry, with its one-line reason."""

    kind = "change"
    label = "LoC model"
    usage = "a LoRA of Change image model: send it to POST /v1/images/edits as `model`"
    pool = False

    def __init__(self, engine=None, registry=None):
        self.editors: dict[str, ChangeEditor] = {}
        if registry is not None:
            registry.add_kind(self)

    def claims(self, path: Path) -> bool:
        weights = ("editor.safetensors", "hyper.safetensors")
        return (path / "config.json").is_file() and any((path / w).is_file() for w in weights)

    def check(self, name: str, path: Path) -> tuple:
        try:
            self.editors[name] = ChangeEditor(path, name=name)
        except LorafleetError:
            raise
        except Exception as exc:  # e.g. safetensors' own error for a corrupt file
            raise LorafleetError(f"{path}: cannot load the LoC model ({exc})") from exc
        return ()

    def drop(self, name: str) -> None:
        self.editors.pop(name, None)

    def get(self, name: str) -> ChangeEditor | None:
        return self.editors.get(name)

    def names(self) -> list[str]:
        return sorted(self.editors)
