"""The editor G: a compact U-Net f whose convolutions take an optional per-sample LoRA; residual
(G(x) = x + f(x), the default) or plain (G(x) = f(x))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# (name, in-channel multiple, out-channel multiple) of width; "+" joins a skip connection.
BLOCKS = (
    ("enc1a", 0, 1),
    ("enc1b", 1, 1),
    ("enc2a", 1, 2),
    ("enc2b", 2, 2),
    ("mida", 2, 4),
    ("midb", 4, 4),
    ("dec2a", 6, 2),
    ("dec2b", 2, 2),
    ("dec1a", 3, 1),
    ("dec1b", 1, 1),
)
LAYERS = tuple(b[0] for b in BLOCKS) + ("out",)
MULTIPLE = 4  # input height and width must be multiples of this (two 2x poolings)

# A per-sample LoRA: {layer: (A [N, r, in, k, k], B [N, out, r])}, added as sign * scale * B(A x).
Lora = dict[str, tuple[torch.Tensor, torch.Tensor]]


def lora_conv(
    h: torch.Tensor, conv: nn.Conv2d, a: torch.Tensor, b: torch.Tensor, scale: float
) -> torch.Tensor:
    """conv(h_n) + scale * B_n(A_n(h_n)) for each sample n (A a conv like `conv` with r outputs,
    B a 1x1 conv), computed as one grouped conv with the merged kernels W + scale * B_n A_n."""
    n, c, hh, ww = h.shape
    delta = torch.einsum("nor,nrikl->noikl", b, a)
    weight = (conv.weight.unsqueeze(0) + scale * delta).reshape(-1, c, *conv.weight.shape[-2:])
    bias = conv.bias.repeat(n) if conv.bias is not None else None
    y = F.conv2d(
        h.reshape(1, n * c, hh, ww),
        weight,
        bias,
        stride=conv.stride,
        padding=conv.padding,
        groups=n,
    )
    return y.reshape(n, -1, *y.shape[-2:])


class Editor(nn.Module):
    """Image-to-image editor (3 -> 3 channels, values in [0, 1]); PEFT can target its convs.

    residual=True: G(x) = x + f(x), and f's last conv (`out`) starts at zero, so G is exactly
    the identity until `out` moves; `zero_head()` sets it back to zero after f's pre-training.
    residual=False: G(x) = f(x) (the issue-18 editor, pre-trained to copy its input).
    """

    def __init__(self, width: int = 16, residual: bool = True):
        super().__init__()
        self.width, self.residual = width, residual
        for name, cin, cout in BLOCKS:
            setattr(self, name, nn.Conv2d(max(3, cin * width), cout * width, 3, padding=1))
        # the residual head reads the last features and the input pixels themselves, so a LoRA
        # on it alone can already add any colour map (M - I) x of the input
        self.out = nn.Conv2d(width + (3 if residual else 0), 3, 1)
        if residual:
            self.zero_head()

    def zero_head(self) -> None:
        """Zero f's last conv (weight and bias): the residual G is then exactly the identity,
        and a LoRA on any conv still changes G (through `out`'s own LoRA)."""
        out = getattr(self.out, "base_layer", self.out)
        with torch.no_grad():
            out.weight.zero_()
            out.bias.zero_()

    def layer_shapes(self) -> dict[str, tuple[int, int, int]]:
        """{layer: (in channels, out channels, kernel size)} for every conv."""
        return {n: (m.in_channels, m.out_channels, m.kernel_size[0]) for n, m in self._convs()}

    def _convs(self):
        for name in LAYERS:
            module = getattr(self, name)
            yield name, getattr(module, "base_layer", module)

    def _c(self, name, h, lora, sign, scale):
        conv = getattr(self, name)
        if lora and name in lora:
            a, b = lora[name]
            return lora_conv(h, getattr(conv, "base_layer", conv), a, b, sign * scale)
        return conv(h)

    def f(
        self,
        x: torch.Tensor,
        lora: Lora | None = None,
        sign: float = 1.0,
        scale: float = 1.0,
        skip: bool = True,
    ) -> torch.Tensor:
        """The U-Net alone, [N, 3, H, W] -> [N, 3, H, W] (H, W multiples of MULTIPLE). A
        residual editor's head reads [features, x] (skip=False: [features, 0], for the
        pre-training, which must not copy x straight through)."""

        def c(name, h):
            return F.silu(self._c(name, h, lora, sign, scale))

        e1 = c("enc1b", c("enc1a", x))
        e2 = c("enc2b", c("enc2a", F.avg_pool2d(e1, 2)))
        m = c("midb", c("mida", F.avg_pool2d(e2, 2)))
        d2 = c("dec2b", c("dec2a", torch.cat([F.interpolate(m, scale_factor=2.0), e2], 1)))
        d1 = c("dec1b", c("dec1a", torch.cat([F.interpolate(d2, scale_factor=2.0), e1], 1)))
        if self.residual:
            d1 = torch.cat([d1, x if skip else torch.zeros_like(x)], 1)
        return self._c("out", d1, lora, sign, scale)

    def forward(
        self, x: torch.Tensor, lora: Lora | None = None, sign: float = 1.0, scale: float = 1.0
    ) -> torch.Tensor:
        """G(x) with the LoRA `lora` added as sign * scale * B A to each conv it names."""
        y = self.f(x, lora, sign, scale)
        return x + y if self.residual else y
