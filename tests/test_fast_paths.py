"""The fast paths' own choices: automatic Gram precision, torch's fused AdamW kernel, chunked buckets.

Each is checked against the float64 reference or against the path it replaces, with a case where the choice
matters (an ill-conditioned B, a dtype the fused kernel refuses, a bucket split into several chunks).
"""

import pytest
import torch

from lorapro import LoRAProAdamW, LoRAProSGD
from lorapro import functional as F
from lorapro import _perf
from lorapro import optim as O
from lorapro import reference as R

f64 = torch.float64


def _pair(m, n, r, cond_B, seed):
    """Factors with a B whose Gram matrix BᵀB has condition number ≈ cond_B, and gradients of a random G."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n, generator=g, dtype=f64) / n**0.5
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=f64))
    V, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=f64))
    sv = torch.logspace(0, -0.5 * torch.log10(torch.tensor(cond_B, dtype=f64)).item(), r, dtype=f64) * 0.05
    B = U @ torch.diag(sv) @ V.T
    G = torch.randn(m, n, generator=g, dtype=f64) * 1e-2
    s = 2.0
    return A, B, s * B.T @ G, s * G @ A.T, s


def _adjusted(pairs, compute_dtype, dtype=torch.float32):
    A, B, gA, gB = (torch.stack([p[i] for p in pairs]).to(dtype) for i in range(4))
    s = torch.tensor([p[4] for p in pairs], dtype=f64)
    AG, BG = F.pack(A, B, gA, gB)
    grams, gA_At, Bt_gB = F.packed_gram_inverses(AG, BG, 1e-8, compute_dtype)
    return F.adjusted_gradients_packed(grams, AG, BG, s.to(grams.BtB.dtype), "sylvester", gA_At, Bt_gB)


def _rel_err(out, pairs):
    errs = []
    for i, p in enumerate(pairs):
        ref = R.adjusted_gradients(p[0], p[1], p[2], p[3], p[4], 1e-8, "sylvester")
        errs.append(max(float((o[i].double() - r).norm() / r.norm()) for o, r in zip(out, ref)))
    return errs


def test_automatic_gram_precision_refines_only_ill_conditioned_layers():
    # One bucket: a well-conditioned layer and one with cond(BᵀB) = 1e6, where float32 Gram matrices go wrong.
    pairs = [_pair(300, 200, 4, 10.0, seed=0), _pair(300, 200, 4, 1e6, seed=1)]
    auto = _rel_err(_adjusted(pairs, None), pairs)
    fp32 = _rel_err(_adjusted(pairs, torch.float32), pairs)
    exact = _rel_err(_adjusted(pairs, torch.float64), pairs)  # float64 Gram matrices of float32 factors
    assert fp32[1] > 1e-2  # the case matters: float32 Gram matrices get the ill-conditioned layer wrong
    assert auto[1] < 1e-4 and exact[1] < 1e-4  # ... the automatic policy re-forms them in float64
    assert max(auto[0], exact[0], fp32[0]) < 2e-6  # the well-conditioned layer is accurate to float32 rounding
    # Which Gram matrices the policy used: float32 products for layer 0, float64 ones for layer 1.
    B = torch.stack([p[1] for p in pairs]).float()
    AG, BG = F.pack(torch.stack([p[0] for p in pairs]).float(), B, torch.stack([p[2] for p in pairs]).float(),
                    torch.stack([p[3] for p in pairs]).float())
    grams, _, _ = F.packed_gram_inverses(AG, BG, 1e-8, None)
    assert grams.BtB.dtype == f64
    assert torch.equal(grams.BtB[0], (B[0].T @ BG[0]).double()[:, :4])
    assert torch.equal(grams.BtB[1], B[1].double().T @ B[1].double())
    assert grams.lam_B[1, -1] / grams.lam_B[1, 0] > F.GRAM_FP32_MAX_COND > grams.lam_B[0, -1] / grams.lam_B[0, 0]


def test_automatic_gram_precision_with_float64_factors_is_exact():
    pairs = [_pair(40, 30, 3, 1e6, seed=2)]
    errs = _rel_err(_adjusted(pairs, None, dtype=f64), pairs)
    assert max(errs) < 1e-9


def _toy_pairs(dtype, n_pairs=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n_pairs):
        A = torch.nn.Parameter((torch.randn(3, 12, generator=g) * 0.3).to(dtype))
        B = torch.nn.Parameter((torch.randn(16, 3, generator=g) * 0.3).to(dtype))
        pairs.append((A, B, 1.5))
    return pairs


def _run(pairs, make_opt, steps=4, seed=1):
    opt = make_opt([{"lora_pairs": pairs}])
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for A, B, _ in pairs:
            A.grad = torch.randn(A.shape, generator=g).to(A.dtype) * 1e-2
            B.grad = torch.randn(B.shape, generator=g).to(B.dtype) * 1e-2
        opt.step()
    return [t.detach().clone() for A, B, _ in pairs for t in (A, B)], opt


@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_fused_adamw_kernel_equals_the_foreach_path(dtype, monkeypatch):
    make = lambda groups: LoRAProAdamW(groups, lr=1e-2, mode="efficient", weight_decay=0.1)  # noqa: E731
    fused, opt = _run(_toy_pairs(dtype), make)
    assert _perf.fused_adamw_ok([opt.param_groups[0]["params"][0]])  # the fused kernel did run here
    monkeypatch.setattr(_perf, "HAS_FUSED_CPU_ADAMW", False)
    foreach, _ = _run(_toy_pairs(dtype), make)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    for a, b in zip(fused, foreach):
        torch.testing.assert_close(a, b, **tol)
    assert not torch.equal(fused[0], _toy_pairs(dtype)[0][0])  # and the parameters did move


def test_bfloat16_factors_take_the_foreach_path_and_track_float32():
    make = lambda groups: LoRAProAdamW(groups, lr=1e-2, mode="efficient")  # noqa: E731
    bf16, opt = _run(_toy_pairs(torch.bfloat16), make)
    assert not _perf.fused_adamw_ok(opt.param_groups[0]["params"][:1] + [opt.state[opt.param_groups[0]["params"][0]]["exp_avg"]])
    fp32, _ = _run([(A.detach().float().requires_grad_(), B.detach().float().requires_grad_(), s)
                    for A, B, s in _toy_pairs(torch.bfloat16)], make)
    for a, b in zip(bf16, fp32):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("cls,kw", [(LoRAProAdamW, dict(mode="efficient")), (LoRAProAdamW, dict(mode="full")),
                                    (LoRAProAdamW, dict(mode="factored")), (LoRAProSGD, dict(momentum=0.9))])
def test_chunked_buckets_equal_one_batched_call(cls, kw, monkeypatch):
    make = lambda groups: cls(groups, lr=1e-2, **kw)  # noqa: E731
    whole, _ = _run(_toy_pairs(f64), make)
    monkeypatch.setattr(_perf, "CPU_BUCKET_BYTES", 1)  # one pair per chunk: five chunks instead of one bucket
    assert len(O._LoRAProBase._buckets([(j, A, B, s) for j, (A, B, s) in enumerate(_toy_pairs(f64))])) == 5
    chunked, _ = _run(_toy_pairs(f64), make)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
