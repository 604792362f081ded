"""KFAC factors of a tiny LoRA model against brute force and the exact dense GGN."""

from __future__ import annotations

import pytest
import torch
from bayes_helpers import dense_ggn, exact_jacobians, random_items, tiny_lora

from lorafleet.bayes import FactorAccumulator, LaplaceConfig, fit_kfac
from lorafleet.bayes.capture import lora_layers
from lorafleet.errors import LorafleetError
from lorafleet.models.tiny import tiny_llama


def _brute_force_factors(model, items, kfac="reduce"):
    """Per example, unbatched and unpadded, with a zero bias b_t added to the Linear's output
    at each position t (E_t[:, c] = d f_c / d b_t) and the Linear's inputs a_t (forward hook).
    reduce: Q = sum_n a_bar a_bar^T (mean input), G = sum_n E Lambda E^T with E = sum_t E_t.
    expand: Q = sum_{n,t} a_t a_t^T times n / (positions), G = sum_{n,t} E_t Lambda E_t^T."""
    linears = {}
    for name, layer in lora_layers(model).items():
        linears[(name, "A")] = layer.lora_A["default"]
        linears[(name, "B")] = layer.lora_B["default"]
    Q = {k: 0.0 for k in linears}
    G = {k: 0.0 for k in linears}
    for item in items:
        probes, acts, handles = {}, {}, []
        for key, lin in linears.items():
            probes[key] = torch.zeros(len(item.ids), lin.out_features, requires_grad=True)

            def hook(mod, inp, out, key=key, acts=acts, probes=probes):
                acts[key] = inp[0][0].detach()  # [T, d_in]
                return out + probes[key]

            handles.append(lin.register_forward_hook(hook))
        logits = model(input_ids=torch.tensor([item.ids])).logits[0, -1, list(item.classes)]
        for h in handles:
            h.remove()
        keys = list(linears)
        E = {k: [] for k in keys}
        for c in range(len(item.classes)):
            grads = torch.autograd.grad(logits[c], [probes[k] for k in keys], retain_graph=True)
            for k, g in zip(keys, grads, strict=True):
                E[k].append(g)
        p = torch.softmax(logits.detach().double(), -1)
        lam = torch.diag(p) - torch.outer(p, p)
        for k in keys:
            Et = torch.stack(E[k], -1).double()  # [T, d_out, C]
            if kfac == "reduce":
                a = acts[k].double().mean(0)
                Q[k] = Q[k] + torch.outer(a, a)
                G[k] = G[k] + Et.sum(0) @ lam @ Et.sum(0).T
            else:
                Q[k] = Q[k] + acts[k].double().T @ acts[k].double()
                G[k] = G[k] + torch.einsum("toc,cd,tpd->op", Et, lam, Et)
    if kfac == "expand":
        positions = sum(len(item.ids) for item in items)
        Q = {k: q * len(items) / positions for k, q in Q.items()}
    return Q, G


@pytest.mark.parametrize("kfac", ["reduce", "expand"])
def test_factors_match_brute_force_per_example_sums(kfac):
    model = tiny_lora(seed=3)
    items = random_items(10, seed=4, classes=3)
    # batched, padded, hooked
    factors = fit_kfac(model, items, LaplaceConfig(batch_size=4, kfac=kfac))
    assert factors.config["kfac"] == kfac
    Q, G = _brute_force_factors(model, items, kfac)
    assert factors.n == 10
    for name, m in factors.modules.items():
        for part, (q, g) in {"A": (m.A_in, m.A_out), "B": (m.B_in, m.B_out)}.items():
            torch.testing.assert_close(q.matrix().double(), Q[(name, part)], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(g.matrix().double(), G[(name, part)], atol=1e-4, rtol=1e-4)
    assert all(
        f.is_dense for m in factors.modules.values() for f in (m.A_in, m.A_out, m.B_in, m.B_out)
    )


def test_kfac_equals_the_exact_ggn_for_one_single_token_example():
    # One example with one position: the per-example Jacobian is exactly e a^T, so the
    # Kronecker product of the factors IS the exact GGN block (torch.func oracle).
    model = tiny_lora(seed=5)
    item = random_items(1, seed=6, classes=3, min_len=1, max_len=1)
    factors = fit_kfac(model, item)
    H, keys, sizes = dense_ggn(model, item)
    offset, scale, nontrivial = 0, float(H.abs().max()), 0
    for (name, part), size in zip(keys, sizes, strict=True):
        small, big = factors.modules[name].block(part)
        kron = torch.kron(small.matrix().double(), big.matrix().double())
        block = H[offset : offset + size, offset : offset + size]
        # (q_proj blocks are ~0 here: with one position attention ignores the query.)
        nontrivial += int(float(block.abs().max()) > 1e-3 * scale)
        torch.testing.assert_close(kron, block, atol=1e-5 * scale, rtol=1e-4)
        offset += size
    assert nontrivial >= 4  # the v_proj A and B blocks of both layers


def test_sampled_labels_average_to_the_exact_fisher():
    model = tiny_lora(seed=8)
    items = random_items(6, seed=9) * 40  # many label draws per example
    exact = fit_kfac(model, items, LaplaceConfig(labels="exact", batch_size=40))
    sampled = fit_kfac(model, items, LaplaceConfig(labels="sampled", batch_size=40, seed=1))
    name = next(iter(exact.modules))
    e, s = exact.modules[name].B_out.matrix(), sampled.modules[name].B_out.matrix()
    assert float((e - s).norm() / e.norm()) < 0.25  # Monte-Carlo error of 240 draws
    other = fit_kfac(model, items, LaplaceConfig(labels="sampled", batch_size=40, seed=2))
    assert not torch.equal(other.modules[name].B_out.matrix(), s)  # it does sample


def test_low_rank_accumulator_is_exact_at_full_rank_and_keeps_the_diagonal():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(5, 40, generator=gen) * torch.linspace(0.1, 3, 40) for _ in range(6)]
    dense = sum(b.double().T @ b.double() for b in batches)
    errors = []
    for rank in (2, 5, 10, 20, 30, 40):
        acc = FactorAccumulator(40, rank=rank)
        for b in batches:
            acc.add(b)
        f = acc.factor()
        assert f.U.shape == (40, min(rank, 40))
        # The diagonal is kept exactly whatever the rank.
        torch.testing.assert_close(
            f.matrix().diagonal().double(), dense.diagonal(), rtol=1e-4, atol=1e-3
        )
        errors.append(float((f.matrix().double() - dense).norm() / dense.norm()))
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] > 0.05 and errors[-2] < 1e-5  # 30 vectors: rank 30 already holds them all


def test_a_model_without_lora_is_refused():
    with pytest.raises(LorafleetError, match="no LoRA layers"):
        fit_kfac(tiny_llama(0, vocab_size=512), random_items(2))


def test_unlabelled_items_are_refused():
    items = [item.__class__(item.ids, item.classes, None) for item in random_items(2)]
    with pytest.raises(LorafleetError, match="labelled"):
        fit_kfac(tiny_lora(), items)


def test_exact_jacobian_helper_is_nonzero():
    # Guards the oracle itself: a zero Jacobian would make every comparison above trivial.
    jac = exact_jacobians(tiny_lora(), random_items(1)[0])
    assert all(float(j.abs().max()) > 1e-4 for j in jac.values())


def test_factors_round_trip_through_safetensors_and_refuse_a_broken_file(tmp_path):
    from lorafleet.bayes import load_factors, save_factors

    factors = fit_kfac(tiny_lora(seed=1), random_items(6), LaplaceConfig(threshold=16, n_kfac=3))
    factors.prior_precision = 2.5
    save_factors(tmp_path, factors)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    loaded = load_factors(tmp_path)
    assert (loaded.n, loaded.prior_precision, loaded.config) == (6, 2.5, factors.config)
    assert loaded.log_lik == pytest.approx(factors.log_lik)
    for name, m in factors.modules.items():
        for key in ("A_in", "A_out", "B_in", "B_out"):
            torch.testing.assert_close(
                getattr(loaded.modules[name], key).matrix(), getattr(m, key).matrix()
            )
    (tmp_path / "laplace.json").write_text("{not json")
    with pytest.raises(LorafleetError, match="invalid JSON"):
        load_factors(tmp_path)
