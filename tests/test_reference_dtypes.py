"""Every mode against the float64 reference where the fast path branches: bf16 optimizer state, bf16 factors, and
param groups with their own learning rates driven by an LR scheduler.

Each test is there because a one-line mutation of lorapro/optim.py passed the whole suite before it
(scripts/mutation_check.py): (a) no square root of v when the state is bf16, (b) a 3x step for A when the factors
are bf16, (c) full mode reading ``defaults["lr"]`` instead of the group's lr. Each tolerance says why it is what it is.
"""

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from lorapro import LoRAProAdamW, LoRAProSGD, lora_pairs  # noqa: E402
from lorapro import reference as R  # noqa: E402
from toy_lora import MLP, backward, batches, peft_toy  # noqa: E402

f64 = torch.float64
ADAM_MODES = ["full", "efficient", "factored"]


def make_model(dtype=f64, seed=0):
    torch.manual_seed(seed)
    return peft_toy(MLP(), ["up", "mid", "down"], dtype=dtype)


def reference_step(kind, A, B, gA, gB, s, st, **hp):
    A, B, gA, gB = (t.detach().to(f64) for t in (A, B, gA, gB))
    if kind == "sgd":
        return R.sgd_step(A, B, gA, gB, s, st, **hp)
    fn = {"full": R.adamw_full_step, "efficient": R.adamw_efficient_step, "factored": R.adamw_factored_step}[kind]
    return fn(A, B, gA, gB, s, st, **hp)


def rel_err(got, want):
    return float((got.to(f64) - want).norm() / want.norm())


@pytest.mark.parametrize("mode", ADAM_MODES)
def test_bfloat16_state_tracks_the_float64_reference(mode):
    # float32 factors, moments stored in bf16. Compared: what the steps moved, (θ_t − θ_0), against the reference's.
    # Each moment write rounds to bf16 (relative 2^-9 = 2e-3), so D = m/√v is off by up to ~4e-3 relative and the
    # movement by the same. Measured over 6 steps: 3.3e-3 (full), 2.5e-3 (efficient, factored); bound 1e-2 (3x).
    # Without the square root of v the movement is off by orders of magnitude.
    model = make_model(torch.float32)
    opt = LoRAProAdamW(model, lr=1e-2, mode=mode, state_dtype=torch.bfloat16)
    pairs = lora_pairs(model)
    start = {p.name: (p.A.detach().double().clone(), p.B.detach().double().clone()) for p in pairs}
    ref = {p.name: (*start[p.name], {}) for p in pairs}
    for batch in batches(6, dtype=torch.float32):
        opt.zero_grad()
        backward(model, batch)
        for p in pairs:
            A, B, st = ref[p.name]
            ref[p.name] = (*reference_step(mode, A, B, p.A.grad, p.B.grad, p.scaling, st, lr=1e-2), st)
        opt.step()
    assert opt.state[pairs[0].A]["exp_avg_sq" if mode != "factored" else "exp_avg_sq_row"].dtype == torch.bfloat16
    for p in pairs:
        A, B, _ = ref[p.name]
        A0, B0 = start[p.name]
        assert rel_err(p.A.detach().double() - A0, A - A0) < 1e-2, p.name
        assert rel_err(p.B.detach().double() - B0, B - B0) < 1e-2, p.name


@pytest.mark.parametrize("kind", ["sgd", *ADAM_MODES])
def test_bfloat16_factors_step_like_the_float64_reference(kind):
    # bf16 factors: the step is computed in float32 and rounded to bf16 once. Each step is compared with the
    # reference step from the same bf16 values (the reference keeps its float64 moments; the optimizer's are float32
    # and differ from them by ~1e-7), so the only difference is that final rounding: half a bf16 ulp, ≤ 2^-8
    # relative (measured worst: 3.9e-3 = 2^-8). The bound rtol 2^-7 is twice that. The guard below checks that every
    # factor has entries whose step is ≥ 3x that bound, so a wrong step size (a 3x step: error 2x the step) fails.
    lr = 0.5 if kind == "sgd" else 3e-2
    rtol, atol = 2**-7, 1e-6
    model = make_model(torch.bfloat16)
    opt = (LoRAProSGD(model, lr=lr, momentum=0.9) if kind == "sgd"
           else LoRAProAdamW(model, lr=lr, mode=kind, weight_decay=0.1))
    hp = dict(lr=lr, momentum=0.9) if kind == "sgd" else dict(lr=lr, weight_decay=0.1)
    pairs = lora_pairs(model)
    states = {p.name: {} for p in pairs}
    for batch in batches(4, dtype=torch.bfloat16):
        opt.zero_grad()
        backward(model, batch)
        want = {p.name: reference_step(kind, p.A, p.B, p.A.grad, p.B.grad, p.scaling, states[p.name], **hp)
                for p in pairs}
        before = {p.name: (p.A.detach().double().clone(), p.B.detach().double().clone()) for p in pairs}
        opt.step()
        for p in pairs:
            for got, exp, old in zip((p.A, p.B), want[p.name], before[p.name]):
                assert got.dtype == torch.bfloat16
                torch.testing.assert_close(got.detach().double(), exp, rtol=rtol, atol=atol)
                assert float(((exp - old).abs() / (rtol * exp.abs() + atol)).max()) > 3  # not lost in the rounding


@pytest.mark.parametrize("kind", ["sgd", *ADAM_MODES])
def test_two_groups_with_their_own_lr_and_a_scheduler_match_the_reference(kind):
    # float64 throughout, so the optimizer and the reference agree to float64 rounding: measured ≤ 5e-14 relative,
    # bound 1e-11 (100x). Two LoRA groups and the head get different learning rates, all
    # different from the constructor's, and a scheduler changes them every step. SGD runs with dampening.
    model = make_model()
    pairs = lora_pairs(model)
    head = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    lrs = [3e-3, 2e-2, 5e-3] if kind != "sgd" else [0.02, 0.1, 0.05]
    groups = [{"lora_pairs": pairs[:1], "lr": lrs[0]}, {"lora_pairs": pairs[1:], "lr": lrs[1]},
              {"params": head, "lr": lrs[2]}]
    opt = (LoRAProSGD(groups, lr=1.0, momentum=0.9, dampening=0.3) if kind == "sgd"
           else LoRAProAdamW(groups, lr=1.0, mode=kind, weight_decay=0.05))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1.0 + t))
    group_of = {p.name: 0 if i == 0 else 1 for i, p in enumerate(pairs)}
    ref = {p.name: (p.A.detach().clone(), p.B.detach().clone(), {}) for p in pairs}
    ref_head = {id(p): (p.detach().clone(), {}) for p in head}
    for t, batch in enumerate(batches(4)):
        opt.zero_grad()
        backward(model, batch)
        for p in pairs:
            A, B, st = ref[p.name]
            lr = lrs[group_of[p.name]] / (1.0 + t)
            hp = dict(lr=lr, momentum=0.9, dampening=0.3) if kind == "sgd" else dict(lr=lr, weight_decay=0.05)
            ref[p.name] = (*reference_step(kind, A, B, p.A.grad, p.B.grad, p.scaling, st, **hp), st)
        for p in head:
            val, st = ref_head[id(p)]
            lr = lrs[2] / (1.0 + t)
            if kind == "sgd":
                st["buf"] = p.grad.clone() if "buf" not in st else 0.9 * st["buf"] + 0.7 * p.grad
                ref_head[id(p)] = (val - lr * st["buf"], st)
            else:
                ref_head[id(p)] = (R.adamw_plain_step(val, p.grad, st, lr=lr, weight_decay=0.05), st)
        opt.step()
        sched.step()
        for p in pairs:
            A, B, _ = ref[p.name]
            torch.testing.assert_close(p.A.detach(), A, rtol=1e-11, atol=1e-13, msg=f"A of {p.name}, step {t}")
            torch.testing.assert_close(p.B.detach(), B, rtol=1e-11, atol=1e-13, msg=f"B of {p.name}, step {t}")
        for p in head:
            torch.testing.assert_close(p.detach(), ref_head[id(p)][0], rtol=1e-11, atol=1e-13)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([x / 5 for x in lrs])
