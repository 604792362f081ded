"""What the CLI injects into a server beside backend and registry: MoLE models, an image editor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from lorafleet.serve.sequence import Mixture


class MoleModels(Protocol):
    """MoLE directories served by name (e.g. compose.mole_serve.MoleCatalog)."""

    def __contains__(self, name: str) -> bool:
        """True when `name` is a MoLE served here."""
        ...

    def names(self) -> list[str]:
        """Every MoLE's name, sorted."""
        ...

    def spec(self, name: str, mask: Sequence[str] = ()) -> Mixture:
        """What a request for MoLE `name` runs: its experts as a gated Mixture, the experts
        in `mask` dropped; a one-line LorafleetError for a mask naming no expert of it."""
        ...

    def experts(self, name: str) -> list[str]:
        """MoLE `name`'s experts, in its gates' order."""
        ...


class ImageEditors(Protocol):
    """Image editors served by name, e.g. the LoC models of the adapters directory
    (change.serving.ChangeCatalog); a request picks one with its `model` field."""

    def get(self, name: str) -> ImageEditor | None:
        """The editor named `name`, or None."""
        ...

    def names(self) -> list[str]:
        """Every editor's name, sorted."""
        ...


class ImageEditor(Protocol):
    """Edits an image the way a before/after example shows (e.g. change.serving.ChangeEditor)."""

    name: str  # the model id requests may give as `model`

    def info(self) -> dict:
        """{"model", "image_size", "min_side", "max_side", "loras": [names], "examples": [ids],
        ...}: what the playground offers."""
        ...

    def edit(
        self, image: bytes, before: bytes | None, after: bytes | None, lora: str | None
    ) -> bytes:
        """PNG bytes of the edited image; a one-line LorafleetError, starting with the field's
        name where one is at fault, for bad input. Blocking and thread-safe."""
        ...

    def example(self, example_id: str) -> dict:
        """{"id", "label", "images": {"before", "after", "image", "truth": PNG bytes}}; a
        LorafleetError for an unknown id. Blocking."""
        ...
