"""Where the B weights' squared norm lies: in directions the KFAC curvature pins down, or not."""

# Usage: python bench/laplace_prior_norms.py  (the sst2-64 adapter of BENCHMARKS.md, issue 20)
# Per B block, rotated into the Kronecker eigenbases, each coordinate weighted by h / (h + lam)
# (1 where the data determines it, 0 where only the prior does); gamma = the sum of the weights.
from lorafleet.adapters import load_adapter
from lorafleet.bayes.capture import class_items, lora_layers, lora_weight
from lorafleet.bayes.fit import LaplaceConfig, fit_kfac
from lorafleet.bayes.posterior import orient
from lorafleet.data import load_examples
from lorafleet.models import load_base

base = load_base("default")
tok = base.tokenizer
_, model = load_adapter("runs/laplace-prior/sst2-64", base.model)
train = load_examples("sst2", tok, split="train", chat=True, limit=64)
items = class_items(tok, train.examples, max_length=128)
f = fit_kfac(model, items, LaplaceConfig(n_kfac=16), pad=tok.pad_token_id or 0)
layers = lora_layers(model)
for lam in (6.12, 61.2):
    tot = det = gamma = 0.0
    for name, m in f.modules.items():
        small, big = m.block("B")
        X = orient("B", lora_weight(layers[name], "B").detach().float())  # [r, d]
        Xr = small.U.T @ X  # rows in small's eigenbasis
        sigma = small.s / f.n
        if big.is_dense:
            Z = Xr @ big.U
            h = sigma[:, None] * big.s[None, :]
        else:
            Zl = Xr @ big.U  # low-rank directions
            res = Xr - Zl @ big.U.T
            hl = sigma[:, None] * big.s[None, :]
            hd = sigma[:, None] * big.d[None, :]
            w = hl / (hl + lam)
            wd = hd / (hd + lam)
            tot += float(X.pow(2).sum())
            det += float((w * Zl**2).sum() + (wd * res**2).sum())
            gamma += float(w.sum() + wd.sum())
            continue
        w = h / (h + lam)
        tot += float(X.pow(2).sum())
        det += float((w * Z**2).sum())
        gamma += float(w.sum())
    print(
        f"lam {lam}: ||B||^2 {tot:.3f}, data-determined part {det:.3f} ({det / tot:.1%}), "
        f"gamma {gamma:.1f}, lam*||B||^2 {lam * tot:.1f}"
    )
