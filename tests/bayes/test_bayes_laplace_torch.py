"""KFAC factors, evidence and the Adam-tuned prior against laplace-torch's KronLaplace (the
library the official Laplace-LoRA code runs on), for both KFAC kinds and both weight subsets."""

from __future__ import annotations

import copy

import pytest
import torch
from bayes_helpers import random_items, tiny_lora
from laplace import KronLaplace
from laplace.curvature import CurvlinopsGGN
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lorafleet.bayes import LaplaceConfig, fit_kfac
from lorafleet.bayes.fit import last_layer
from lorafleet.bayes.prior import evidence, tune_prior
from lorafleet.errors import LorafleetError

HEAD = ("q_proj", "v_proj", "lm_head")


class Logits(nn.Module):
    """The restricted logits [B, C] at the last position, as the official code's wrapper."""

    def __init__(self, model, classes):
        super().__init__()
        self.model, self.classes = model, list(classes)

    def forward(self, x):
        return self.model(input_ids=x).logits[:, -1, self.classes]


class CutHead(nn.Module):
    """The official code's `last_layer` head, written afresh: lm_head's base rows and its LoRA B
    cut to the answer tokens, the LoRA A whole, on the last position's hidden state; only A and
    the cut B are parameters."""

    def __init__(self, model, classes):
        super().__init__()
        base = copy.deepcopy(model).get_base_model()
        head = base.get_output_embeddings()
        self.decoder = base.get_decoder().requires_grad_(False)
        self.register_buffer("weight", head.base_layer.weight[list(classes)].detach().clone())
        A, B = head.lora_A["default"].weight, head.lora_B["default"].weight
        self.A = nn.Linear(A.shape[1], A.shape[0], bias=False)
        self.B = nn.Linear(B.shape[1], len(classes), bias=False)
        self.A.weight.data = A.detach().clone()
        self.B.weight.data = B.detach()[list(classes)].clone()
        self.scale = head.scaling["default"]

    def forward(self, x):
        h = self.decoder(input_ids=x).last_hidden_state[:, -1]  # [B, hidden]
        return h @ self.weight.T + self.scale * self.B(self.A(h))


def _reference(module, items, kfac):
    X = torch.tensor([it.ids for it in items])  # all the same length: curvlinops has no mask
    y = torch.tensor([it.label for it in items])
    la = KronLaplace(
        module, "classification", backend=CurvlinopsGGN, asdl_fisher_kwargs={"kfac_approx": kfac}
    )
    la.fit(DataLoader(TensorDataset(X, y), batch_size=4))
    return la


def _assert_blocks_match(factors, la):
    """Ours (1/n) small (x) big per block, in the weight's own row-major order, against
    laplace-torch's B (x) A for the same parameter (lora_A then lora_B per module)."""
    theirs = list(la.H_facs.kfacs)
    assert len(theirs) == 2 * len(factors.modules)
    for i, m in enumerate(factors.modules.values()):
        for j, (out_f, in_f) in enumerate(((m.A_out, m.A_in), (m.B_out, m.B_in))):
            ours = torch.kron(out_f.matrix().double(), in_f.matrix().double()) / factors.n
            G, A = theirs[2 * i + j]
            ref = torch.kron(G.double(), A.double())
            assert float(ref.norm()) > 1e-3  # a non-trivial block
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("kfac", ["expand", "reduce"])
def test_all_lora_factors_evidence_and_adam_prior_match_kron_laplace(kfac):
    model = tiny_lora(seed=1)
    items = random_items(8, seed=1, classes=3, min_len=5, max_len=5)
    factors = fit_kfac(model, items, LaplaceConfig(batch_size=4, kfac=kfac))
    la = _reference(Logits(copy.deepcopy(model), items[0].classes), items, kfac)
    _assert_blocks_match(factors, la)
    factors.prior = "zero"  # the official code's prior: N(0, 1/lam), one lam
    for lam in (0.1, 1.0, 10.0):
        expected = float(la.log_marginal_likelihood(torch.tensor(lam)))
        assert evidence(factors, lam) == pytest.approx(expected, rel=1e-5)
    lam, curve = tune_prior(factors, prior="zero", search="adam")  # 100 steps, lr 0.1
    la.optimize_prior_precision(method="marglik", n_steps=100, lr=0.1)
    assert lam == pytest.approx(float(la.prior_precision), rel=1e-4)
    assert lam != pytest.approx(1.0, rel=1e-2)  # it moved from where it starts
    assert len(curve) >= 10


def test_expand_and_reduce_differ_where_prompts_have_several_positions():
    model = tiny_lora(seed=1)
    items = random_items(8, seed=1, classes=3, min_len=5, max_len=5)
    expand = fit_kfac(model, items, LaplaceConfig(kfac="expand"))
    reduce = fit_kfac(model, items, LaplaceConfig(kfac="reduce"))
    name = next(iter(expand.modules))
    e, r = expand.modules[name].A_in.matrix(), reduce.modules[name].A_in.matrix()
    assert float((e - r).norm() / r.norm()) > 0.05


def test_last_layer_covers_only_the_answer_rows_of_lm_head_as_the_official_cut_head():
    model = tiny_lora(seed=2, targets=HEAD)
    items = random_items(8, seed=3, classes=3, min_len=5, max_len=5)
    factors = fit_kfac(model, items, LaplaceConfig(batch_size=4, subset="last_layer"))
    (head,) = factors.modules  # only the LoRA on lm_head
    assert head.endswith("lm_head")
    classes = list(items[0].classes)
    assert factors.config["rows"] == {head: classes} and factors.config["subset"] == "last_layer"
    m = factors.modules[head]
    assert (m.B_out.dim, m.B_in.dim) == (3, 4)  # B cut to the 3 answer rows (rank 4)
    B = model.get_base_model().get_output_embeddings().lora_B["default"].weight
    torch.testing.assert_close(factors.weights[(head, "B")], B.detach()[classes].T)
    la = _reference(CutHead(model, classes), items, "expand")
    _assert_blocks_match(factors, la)
    factors.prior = "zero"
    assert evidence(factors, 2.0) == pytest.approx(
        float(la.log_marginal_likelihood(torch.tensor(2.0))), rel=1e-5
    )


def test_all_subset_also_cuts_the_head_and_last_layer_is_its_head_part():
    model = tiny_lora(seed=2, targets=HEAD)
    items = random_items(6, seed=3, classes=3)
    full = fit_kfac(model, items, LaplaceConfig(batch_size=4))
    alone = fit_kfac(model, items, LaplaceConfig(batch_size=4, subset="last_layer"))
    assert len(full.modules) == 5 and set(full.config["rows"]) == set(alone.modules)
    view = last_layer(full)
    assert list(view.modules) == list(alone.modules) and view.config["subset"] == "last_layer"
    for key in ("A_in", "A_out", "B_in", "B_out"):
        (name,) = alone.modules
        torch.testing.assert_close(
            getattr(view.modules[name], key).matrix(), getattr(alone.modules[name], key).matrix()
        )
    assert view.theta_sq == pytest.approx(alone.theta_sq)
    assert view.n_params == alone.n_params == 4 * 64 + 3 * 4


def test_last_layer_needs_a_lora_on_lm_head_and_the_same_answer_tokens():
    with pytest.raises(LorafleetError, match="lm_head"):
        fit_kfac(tiny_lora(seed=1), random_items(2), LaplaceConfig(subset="last_layer"))
    mixed = random_items(2, classes=2) + random_items(2, classes=3)
    with pytest.raises(LorafleetError, match="same choices"):
        fit_kfac(tiny_lora(seed=1, targets=HEAD), mixed, LaplaceConfig(subset="last_layer"))
    with pytest.raises(LorafleetError, match="subset must be one of"):
        LaplaceConfig(subset="head")
    with pytest.raises(LorafleetError, match="kfac must be one of"):
        LaplaceConfig(kfac="mean")
