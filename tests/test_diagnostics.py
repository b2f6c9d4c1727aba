"""Gradient-alignment diagnostics against gradients computed by making W0 trainable."""

import math

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from lorapro import lora_pairs  # noqa: E402
from lorapro import reference as R  # noqa: E402
from lorapro.diagnostics import format_alignment_table, full_weight_gradients, measure_alignment  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(6, 12)
        self.down = nn.Linear(12, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.down(torch.tanh(self.up(x)))
        h = self.down(torch.tanh(self.up(h)))  # each layer called twice: G sums over both calls
        return self.head(h)


def make(seed=0, r=2):
    torch.manual_seed(seed)
    model = peft.get_peft_model(Net().double(), peft.LoraConfig(r=r, lora_alpha=4, lora_dropout=0.1,
                                                                target_modules=["up", "down"]))
    with torch.no_grad():
        for p in lora_pairs(model):
            p.B.normal_(0, 0.5)
    return model


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(5, 4, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (5, 4), generator=g).view(-1)


def _loss3d(model, b):
    x, y = b
    return nn.functional.cross_entropy(model(x).reshape(-1, 3), y)


def test_hook_gradients_equal_w0_grad():
    model = make()
    b = batch()
    got = full_weight_gradients(model, b, _loss3d)
    # ground truth: make W0 trainable and let autograd compute ∂L/∂W0 (eval mode: no dropout)
    model.eval()
    bases = {p.name: p.module.base_layer.weight for p in lora_pairs(model)}
    for w in bases.values():
        w.requires_grad_(True)
    _loss3d(model, b).backward()
    for name, w in bases.items():
        torch.testing.assert_close(got[name].double(), w.grad, rtol=1e-5, atol=1e-7)
    # no .grad of the LoRA factors was touched by the diagnostics call before backward
    assert all(p.A.grad is not None for p in lora_pairs(model))


def test_alignment_numbers_match_reference_formulas():
    model = make(seed=1)
    b = batch()
    report = measure_alignment(model, b, _loss3d)
    model.eval()
    pairs = lora_pairs(model)
    for w in [p.module.base_layer.weight for p in pairs]:
        w.requires_grad_(True)
    _loss3d(model, b).backward()
    for layer, p in zip(report.layers, pairs):
        G = p.module.base_layer.weight.grad
        gA, gB = p.A.grad, p.B.grad  # autograd's LoRA gradients (dropout off)
        hA, hB = R.adjusted_gradients(p.A.detach(), p.B.detach(), gA, gB, p.scaling, 1e-8, "sylvester")
        g_pro = R.equivalent_gradient(p.A.detach(), p.B.detach(), hA, hB, p.scaling)
        g_lora = R.lora_equivalent_gradient(p.A.detach(), p.B.detach(), gA, gB, p.scaling)
        cos = lambda a: float((a * G).sum() / (a.norm() * G.norm()))  # noqa: E731
        assert layer.lorapro_cos == pytest.approx(cos(g_pro), rel=1e-4)
        assert layer.lora_cos == pytest.approx(cos(g_lora), rel=1e-4)
        assert layer.lorapro_rel_error == pytest.approx(float((g_pro - G).norm() / G.norm()), rel=1e-4)
        assert layer.lora_rel_error == pytest.approx(float((g_lora - G).norm() / G.norm()), rel=1e-4)
        # LoRA-Pro's g̃ is the least-squares projection: never worse than LoRA's best rescaling (sin of its angle)
        assert layer.lorapro_rel_error <= math.sqrt(max(0.0, 1 - layer.lora_cos**2)) + 1e-6
    s = report.summary
    assert s["layers"] == 2
    assert s["lorapro_cos_mean"] == pytest.approx(sum(L.lorapro_cos for L in report.layers) / 2)
    assert s["lorapro_cos_global"] > s["lora_cos_global"]


def test_full_rank_adapter_matches_full_finetuning():
    model = make(seed=2, r=6)  # r = min(m, n) for "down" (12→6) and "up" (6→12)
    report = measure_alignment(model, batch(), _loss3d, delta=1e-14)
    for layer in report.layers:
        assert layer.lorapro_cos == pytest.approx(1.0, abs=1e-6)
        assert layer.lorapro_rel_error < 1e-5


def test_table_and_errors():
    model = make()
    report = measure_alignment(model, batch(), _loss3d)
    table = format_alignment_table(report)
    assert "base_model.model.up.default" in table and "all layers as one vector" in table
    assert len(table.splitlines()) == 2 + 2 + 2
    with pytest.raises(ValueError, match="No LoRA layers"):
        measure_alignment(Net(), batch(), _loss3d)
    assert report.to_dict()["summary"]["layers"] == 2
    assert model.training  # mode restored
