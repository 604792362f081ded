"""Use a trained LoC model: read/write PNGs, emit a LoRA from a pair, save it in PEFT's format,
and edit an image of any size with it."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lorafleet.adapters import Adapter, lora_pairs, module_scale, peft_key, read_adapter
from lorafleet.adapters import write_adapter as write_peft
from lorafleet.change.editor import MULTIPLE, Editor, Lora
from lorafleet.change.grid import png_writer
from lorafleet.change.hyper import HyperNet
from lorafleet.errors import LorafleetError
from lorafleet.fsutil import atomic_write

MAX_SIDE = 2048  # longer image sides are refused
MIN_SIDE = 8
MODES = ("1", "L", "LA", "P", "RGB", "RGBA")


def read_png(path: str | Path) -> torch.Tensor:
    """A PNG as float [1, 3, H, W] in [0, 1]; a one-line error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise LorafleetError(f"{path}: no such image file")
    return _decode(path, str(path))


def decode_png(data: bytes, what: str = "image") -> torch.Tensor:
    """PNG bytes (e.g. an upload) as float [1, 3, H, W] in [0, 1]; the same checks as read_png,
    the one-line errors naming `what`."""
    import io

    if not data:
        raise LorafleetError(f"{what}: empty file (send a PNG image)")
    return _decode(io.BytesIO(data), what)


def _decode(source, what: str) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as img:
            if img.format != "PNG":
                raise LorafleetError(f"{what}: not a PNG image ({img.format}); convert it to PNG")
            if img.mode not in MODES:
                raise LorafleetError(f"{what}: unsupported PNG mode {img.mode} (use RGB or L)")
            if max(img.size) > MAX_SIDE or min(img.size) < MIN_SIDE:
                w, h = img.size
                raise LorafleetError(f"{what}: {w}x{h} px; sides must be {MIN_SIDE}-{MAX_SIDE} px")
            rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        OSError,
        SyntaxError,
        ValueError,
    ) as exc:
        raise LorafleetError(f"{what}: not a readable image ({exc.__class__.__name__})") from exc
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def write_png(path: str | Path, x: torch.Tensor) -> Path:
    """Write [1, 3, H, W] in [0, 1] as an RGB PNG, atomically."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = _to_uint8(x)
    atomic_write(path, png_writer(lambda tmp: Image.fromarray(arr).save(tmp, format="PNG")))
    return path


def png_bytes(x: torch.Tensor) -> bytes:
    """[1, 3, H, W] in [0, 1] as the bytes of an RGB PNG (the same pixels write_png writes)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_to_uint8(x)).save(buf, format="PNG")
    return buf.getvalue()


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)


@torch.no_grad()
def emit_lora(hyper: HyperNet, before: torch.Tensor, after: torch.Tensor, size: int) -> Lora:
    """H(A, A') for one pair, both resized to the model's training size."""
    return hyper(resize(before, size), resize(after, size))


@torch.no_grad()
def edit(editor: Editor, lora: Lora | None, image: torch.Tensor, scale: float = 1.0):
    """G(lora, image) at the image's own size (reflect-padded to a multiple of 4, cropped back)."""
    h, w = image.shape[-2:]
    ph, pw = (-h) % MULTIPLE, (-w) % MULTIPLE
    x = F.pad(image, (0, pw, 0, ph), mode="replicate") if ph or pw else image
    return editor(x, lora, scale=scale)[..., :h, :w].clamp(0, 1)


def to_adapter(lora: Lora, rank: int, meta: dict | None = None) -> Adapter:
    """One emitted LoRA (batch of 1) as a PEFT LoRA of the editor's convs (alpha = r: scale 1)."""
    tensors = {}
    for name, (a, b) in lora.items():
        tensors[peft_key(name, "A")] = a[0].contiguous()
        tensors[peft_key(name, "B")] = b[0][..., None, None].contiguous()
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": sorted(lora),
        "bias": "none",
        "task_type": None,
        "base_model_name_or_path": None,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
    }
    return Adapter(config, tensors, {"method": "loc", **(meta or {})})


def save_lora(path: str | Path, lora: Lora, rank: int, meta: dict | None = None) -> Path:
    return write_peft(path, to_adapter(lora, rank, meta))


def load_lora(path: str | Path, editor: Editor) -> tuple[Lora, float]:
    """(LoRA as batch-of-1 tensors, its scale) from a PEFT directory, checked against `editor`."""
    adapter = read_adapter(path)
    shapes = editor.layer_shapes()
    pairs = lora_pairs(adapter.tensors)
    scales = {module_scale(adapter.config, m) for m in pairs}
    if len(scales) != 1:
        raise LorafleetError(f"{path}: layers have different LoRA scales; not a LoC adapter")
    lora = {}
    for name, (a, b) in pairs.items():
        if name not in shapes:
            raise LorafleetError(f"{path}: layer {name!r} is not a layer of this editor")
        cin, cout, k = shapes[name]
        if a.shape[1:] != (cin, k, k) or b.shape[0] != cout or b.shape[1] != a.shape[0]:
            raise LorafleetError(f"{path}: {name} has shapes that do not fit this editor")
        lora[name] = (a[None].float(), b[..., 0, 0][None].float())
    return lora, scales.pop()


def peft_editor(editor: Editor, path: str | Path) -> torch.nn.Module:
    """A copy of `editor` with the adapter at `path` loaded by PEFT itself."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(editor), str(path)).eval()
