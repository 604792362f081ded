"""Real photographs bundled inside scikit-image and scikit-learn, split by photo, cut into crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lorafleet.errors import LorafleetError

# Colour (and a few grey) photographs that ship in the scikit-image wheel (read from its data
# folder directly: nothing is fetched) and scikit-learn's two sample images.
TRAIN_PHOTOS = (
    "astronaut",
    "coffee",
    "rocket",
    "motorcycle_left",
    "hubble_deep_field",
    "retina",
    "ihc",
    "camera",
    "brick",
    "grass",
    "gravel",
    "coins",
)
HELDOUT_PHOTOS = ("chelsea", "sklearn:china", "sklearn:flower")
# Photos are shrunk so their short side is this many pixels before cropping.
SHORT_SIDE = 128


def _skimage_file(name: str) -> Path:
    try:
        import skimage.data
    except ImportError as exc:  # pragma: no cover - a dependency
        raise LorafleetError("scikit-image is not installed (pip install scikit-image)") from exc
    folder = Path(skimage.data.__file__).parent
    for suffix in (".png", ".jpg"):
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    raise LorafleetError(f"photo {name!r} is not bundled with scikit-image")


def _sklearn_image(name: str) -> np.ndarray:
    from sklearn.datasets import load_sample_image

    return load_sample_image(f"{name}.jpg")


def load_photo(name: str, short_side: int = SHORT_SIDE) -> torch.Tensor:
    """One bundled photo as float [3, H, W] in [0, 1], shrunk to `short_side`."""
    from PIL import Image

    if name.startswith("sklearn:"):
        img = Image.fromarray(_sklearn_image(name.split(":", 1)[1]))
    else:
        img = Image.open(_skimage_file(name))
    img = img.convert("RGB")
    scale = short_side / min(img.size)
    size = (
        max(short_side, round(img.size[0] * scale)),
        max(short_side, round(img.size[1] * scale)),
    )
    img = img.resize(size, Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def load_photos(split: str, short_side: int = SHORT_SIDE) -> list[torch.Tensor]:
    """The photos of `split` ("train" or "heldout")."""
    names = {"train": TRAIN_PHOTOS, "heldout": HELDOUT_PHOTOS}.get(split)
    if names is None:
        raise LorafleetError(f"unknown photo split {split!r} (train or heldout)")
    return [load_photo(n, short_side) for n in names]


def random_crops(
    photos: list[torch.Tensor], n: int, size: int, generator: torch.Generator
) -> torch.Tensor:
    """`n` random `size` x `size` crops [n, 3, size, size], photos picked uniformly."""
    out = torch.empty(n, 3, size, size)
    picks = torch.randint(len(photos), (n,), generator=generator)
    for i, p in enumerate(picks.tolist()):
        photo = photos[p]
        y = int(torch.randint(photo.shape[1] - size + 1, (1,), generator=generator))
        x = int(torch.randint(photo.shape[2] - size + 1, (1,), generator=generator))
        out[i] = photo[:, y : y + size, x : x + size]
    return out
