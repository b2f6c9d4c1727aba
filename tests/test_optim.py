"""LoRAProAdamW / LoRAProSGD: step by step against the float64 reference, checkpoints, dtypes, errors."""

import math

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from lorapro import LoRAProAdamW, LoRAProSGD, lora_pairs  # noqa: E402
from lorapro import reference as R  # noqa: E402
from toy_lora import MLP, backward, batches, peft_toy  # noqa: E402

f64 = torch.float64


Net = MLP


def make_model(dtype=f64, seed=0, zero_B=False, **lora_kwargs):
    torch.manual_seed(seed)
    return peft_toy(Net(), ["up", "mid", "down"], dtype=dtype, zero_B=zero_B, **lora_kwargs)


CASES = [
    ("sgd", dict(lr=0.05), "sylvester"),
    ("sgd", dict(lr=0.05, momentum=0.9, weight_decay=0.1), "symmetric"),
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True), "zero"),
    ("full", dict(lr=1e-2, weight_decay=0.05), "sylvester"),
    ("full", dict(lr=1e-2, betas=(0.8, 0.9)), "zero"),
    ("full", dict(lr=1e-2), "symmetric"),
    ("efficient", dict(lr=1e-2, weight_decay=0.05), "sylvester"),
    ("efficient", dict(lr=1e-2), "symmetric"),
    ("efficient", dict(lr=1e-2), "zero"),
]


def make_opt(kind, model, x, **hp):
    if kind == "sgd":
        return LoRAProSGD(model, x_solution=x, **hp)
    return LoRAProAdamW(model, mode=kind, x_solution=x, **hp)


def reference_step(kind, pair_state, A, B, gA, gB, s, x, hp):
    hp = dict(hp)
    if kind == "sgd":
        return R.sgd_step(A, B, gA, gB, s, pair_state, x_solution=x, **hp)
    fn = R.adamw_full_step if kind == "full" else R.adamw_efficient_step
    return fn(A, B, gA, gB, s, pair_state, x_solution=x, **hp)


@pytest.mark.parametrize("kind,hp,x", CASES)
def test_optimizer_matches_reference_step_by_step(kind, hp, x):
    model = make_model()
    opt = make_opt(kind, model, x, **hp)
    pairs = lora_pairs(model)
    ref = {p.name: (p.A.detach().clone(), p.B.detach().clone(), {}) for p in pairs}
    head = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    ref_head = {id(p): (p.detach().clone(), {}) for p in head}
    for step, batch in enumerate(batches(5)):
        opt.zero_grad()
        backward(model, batch)
        for p in pairs:
            A, B, st = ref[p.name]
            newA, newB = reference_step(kind, st, A, B, p.A.grad, p.B.grad, p.scaling, x, hp)
            ref[p.name] = (newA, newB, st)
        for p in head:
            val, st = ref_head[id(p)]
            if kind == "sgd":
                buf = st.get("buf")
                mom = hp.get("momentum", 0.0)
                d = p.grad.clone()
                if mom:
                    st["buf"] = d.clone() if buf is None else mom * buf + d
                    d = d + mom * st["buf"] if hp.get("nesterov") else st["buf"]
                ref_head[id(p)] = (val * (1 - hp["lr"] * hp.get("weight_decay", 0.0)) - hp["lr"] * d, st)
            else:
                kw = {k: v for k, v in hp.items() if k in ("lr", "betas", "weight_decay")}
                ref_head[id(p)] = (R.adamw_plain_step(val, p.grad, st, **kw), st)
        opt.step()
        for p in pairs:
            A, B, st = ref[p.name]
            # float64 against the float64 reference (eigh vs explicit inverses, batched vs one layer): measured ≤ 5e-15
            # relative; 1e-12 leaves ~100x for other BLAS builds (the 1e-9 used before sat 1e5x above the error)
            torch.testing.assert_close(p.A.detach(), A, rtol=1e-12, atol=1e-14, msg=f"A of {p.name} at step {step}")
            torch.testing.assert_close(p.B.detach(), B, rtol=1e-12, atol=1e-14, msg=f"B of {p.name} at step {step}")
            ost = opt.state[p.A]
            if kind == "full":
                assert ost["exp_avg"].shape == (p.B.shape[0], p.A.shape[1])
                torch.testing.assert_close(ost["exp_avg"], st["exp_avg"], rtol=1e-12, atol=1e-15)
                torch.testing.assert_close(ost["exp_avg_sq"], st["exp_avg_sq"], rtol=1e-12, atol=1e-17)
                assert ost["step"].item() == st["step"]
            elif kind == "efficient":
                torch.testing.assert_close(ost["exp_avg"], st["exp_avg_A"], rtol=1e-12, atol=1e-15)
                torch.testing.assert_close(opt.state[p.B]["exp_avg_sq"], st["exp_avg_sq_B"], rtol=1e-12, atol=1e-17)
            elif hp.get("momentum"):
                torch.testing.assert_close(ost["momentum_buffer"], st["buf_A"], rtol=1e-12, atol=1e-15)
        for p in head:
            torch.testing.assert_close(p.detach(), ref_head[id(p)][0], rtol=1e-12, atol=1e-14)


def test_full_mode_first_step_from_peft_init_B_zero():
    # PEFT initialises B = 0: the first step must be finite and move B (ĝ_A = 0 exactly for X = 0).
    model = make_model(zero_B=True)
    opt = LoRAProAdamW(model, lr=1e-2, x_solution="zero")
    backward(model, batches(1)[0])
    before = [(p.A.detach().clone(), p.B.detach().clone()) for p in lora_pairs(model)]
    opt.step()
    for (A0, B0), p in zip(before, lora_pairs(model)):
        assert torch.isfinite(p.A).all() and torch.isfinite(p.B).all()
        torch.testing.assert_close(p.A.detach(), A0)  # ĝ_A = (BᵀB+δ)⁻¹ s Bᵀ D = 0
        assert (p.B.detach() - B0).abs().max() > 1e-4


def test_per_layer_scaling_alpha_pattern_and_rslora():
    model = make_model(alpha_pattern={"mid": 16})
    scal = {p.name.split(".")[-2]: p.scaling for p in lora_pairs(model)}
    assert scal == {"up": 2.0, "mid": 8.0, "down": 2.0}
    rs = make_model(use_rslora=True, r=4, lora_alpha=8)
    assert {p.scaling for p in lora_pairs(rs)} == {8 / math.sqrt(4)}
    # the optimizer uses each layer's own scale: stepping matches the reference with those scales
    opt = LoRAProSGD(model, lr=0.1)
    assert sorted(opt.param_groups[0]["scalings"]) == [2.0, 2.0, 8.0]
    pairs = lora_pairs(model)
    backward(model, batches(1)[0])
    expect = [R.sgd_step(p.A, p.B, p.A.grad, p.B.grad, p.scaling, {}, lr=0.1) for p in pairs]
    opt.step()
    for p, (A, B) in zip(pairs, expect):
        torch.testing.assert_close(p.A.detach(), A)
        torch.testing.assert_close(p.B.detach(), B)


@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_bf16_parameters_stay_finite_and_keep_dtype(mode):
    model = make_model(dtype=torch.bfloat16)
    opt = LoRAProAdamW(model, lr=1e-2, mode=mode)
    losses = []
    data = batches(1, dtype=torch.bfloat16)
    for _ in range(15):
        opt.zero_grad()
        losses.append(backward(model, data[0]))
        opt.step()
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
        assert torch.isfinite(p.float()).all()
    st = opt.state[lora_pairs(model)[0].A]
    assert st["exp_avg"].dtype == torch.float32
    assert losses[-1] < losses[0]


def test_state_dtype_bfloat16_option():
    model = make_model(dtype=torch.float32)
    opt = LoRAProAdamW(model, lr=1e-2, state_dtype=torch.bfloat16)
    backward(model, batches(1, dtype=torch.float32)[0])
    opt.step()
    st = opt.state[lora_pairs(model)[0].A]
    assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg_sq"].dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["sgd", "full", "efficient"])
def test_save_load_continue_equals_uninterrupted_bit_for_bit(kind, tmp_path):
    data = batches(6, dtype=torch.float32)
    hp = dict(lr=0.05, momentum=0.9) if kind == "sgd" else dict(lr=1e-2, weight_decay=0.01)

    def run(model, opt, bs):
        for b in bs:
            opt.zero_grad()
            backward(model, b)
            opt.step()

    m1 = make_model(dtype=torch.float32)
    o1 = make_opt(kind, m1, "sylvester", **hp)
    run(m1, o1, data)

    m2 = make_model(dtype=torch.float32)
    o2 = make_opt(kind, m2, "sylvester", **hp)
    run(m2, o2, data[:3])
    torch.save({"model": m2.state_dict(), "optim": o2.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # tensors and numbers only
    m3 = make_model(dtype=torch.float32, seed=123)
    m3.load_state_dict(ckpt["model"])
    o3 = make_opt(kind, m3, "sylvester", **hp)
    o3.load_state_dict(ckpt["optim"])
    run(m3, o3, data[3:])
    for (n1, p1), (n3, p3) in zip(m1.named_parameters(), m3.named_parameters()):
        assert n1 == n3
        assert torch.equal(p1, p3), n1


def test_load_keeps_fp32_moments_of_bf16_factors():
    model = make_model(dtype=torch.bfloat16)
    opt = LoRAProAdamW(model, lr=1e-2)
    backward(model, batches(1, dtype=torch.bfloat16)[0])
    opt.step()
    sd = opt.state_dict()
    opt2 = LoRAProAdamW(model, lr=1e-2)
    opt2.load_state_dict(sd)
    a = lora_pairs(model)[0].A
    assert opt2.state[a]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt2.state[a]["exp_avg"], opt.state[a]["exp_avg"])


def test_load_rejects_other_mode():
    model = make_model()
    opt = LoRAProAdamW(model, mode="full")
    with pytest.raises(ValueError, match="mode"):
        LoRAProAdamW(model, mode="efficient").load_state_dict(opt.state_dict())


def test_pairs_without_grad_are_skipped():
    model = make_model()
    opt = LoRAProAdamW(model, lr=1e-2)
    pairs = lora_pairs(model)
    backward(model, batches(1)[0])
    pairs[1].A.grad = None
    pairs[1].B.grad = None
    before = (pairs[1].A.detach().clone(), pairs[1].B.detach().clone())
    opt.step()
    assert torch.equal(pairs[1].A, before[0]) and torch.equal(pairs[1].B, before[1])
    assert len(opt.state[pairs[1].A]) == 0
    assert opt.state[pairs[0].A]["step"].item() == 1


def test_lr_scheduler_drives_the_step():
    model = make_model()
    opt = LoRAProSGD(model, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)  # lr 0 ⇒ nothing moves
    before = [p.detach().clone() for p in model.parameters()]
    backward(model, batches(1)[0])
    opt.step()
    sched.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(g["lr"] == 0.0 for g in opt.param_groups)


def test_param_groups_with_model_pairs_by_lookup():
    # the transformers.Trainer form: plain groups (weight decay split) + model= to find the pairs
    model = make_model()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if "bias" not in n]
    no_decay = [p for n, p in trainable if "bias" in n]
    opt = LoRAProAdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                       lr=1e-3, model=model)
    lora_groups = [g for g in opt.param_groups if g["lora"]]
    assert len(lora_groups) == 1 and len(lora_groups[0]["scalings"]) == 3
    assert lora_groups[0]["weight_decay"] == 0.1
    plain = sum(len(g["params"]) for g in opt.param_groups if not g["lora"])
    assert plain == len(trainable) - 6


def test_explicit_pairs_for_hand_written_lora():
    torch.manual_seed(0)
    A = nn.Parameter(torch.randn(2, 5, dtype=f64))
    B = nn.Parameter(torch.randn(4, 2, dtype=f64))
    W0 = torch.randn(4, 5, dtype=f64)
    bias = nn.Parameter(torch.zeros(4, dtype=f64))
    opt = LoRAProSGD([{"lora_pairs": [(A, B, 0.5)]}, {"params": [bias]}], lr=0.1)
    x = torch.randn(3, 5, dtype=f64)
    ((x @ (W0 + 0.5 * B @ A).T + bias) ** 2).sum().backward()
    eA, eB = R.sgd_step(A.detach(), B.detach(), A.grad, B.grad, 0.5, {}, lr=0.1)
    eb = bias.detach() - 0.1 * bias.grad
    opt.step()
    torch.testing.assert_close(A.detach(), eA)
    torch.testing.assert_close(B.detach(), eB)
    torch.testing.assert_close(bias.detach(), eb)


# -- errors: each says what is wrong and what to do ------------------------------------------------------------


def test_error_no_lora_layers():
    with pytest.raises(ValueError, match="No LoRA layers found"):
        LoRAProAdamW(Net())
    with pytest.raises(ValueError, match="No LoRA layers found"):
        LoRAProAdamW(Net().parameters())


def test_error_one_half_frozen():
    model = make_model()
    lora_pairs(model)[0].B.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        LoRAProAdamW(model)


def test_error_shape_mismatch_and_swapped_factors():
    A = nn.Parameter(torch.randn(2, 5))
    B = nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match="shape mismatch"):
        LoRAProSGD([{"lora_pairs": [(A, B, 1.0)]}])


def test_error_pair_split_across_groups():
    model = make_model()
    p = lora_pairs(model)[0]
    rest = [q for q in model.parameters() if q.requires_grad and q is not p.B]
    with pytest.raises(ValueError, match="same group"):
        LoRAProAdamW([{"params": rest}, {"params": [p.B], "lr": 0.1}], model=model)


def test_error_sparse_gradients():
    model = make_model()
    opt = LoRAProAdamW(model)
    backward(model, batches(1)[0])
    p = lora_pairs(model)[0]
    p.A.grad = p.A.grad.to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "learning rate"),
        (dict(betas=(1.0, 0.999)), "beta parameter at index 0"),
        (dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
        (dict(eps=-1e-8), "epsilon"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(mode="fast"), "mode"),
        (dict(x_solution="qr"), "x_solution"),
        (dict(delta=0.0), "delta"),
        (dict(compute_dtype=torch.float16), "compute_dtype"),
    ],
)
def test_error_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAProAdamW(make_model(), **kwargs)


def test_error_dora_and_conv_layers_are_refused():
    torch.manual_seed(0)
    dora = peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["mid"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        LoRAProAdamW(dora)

    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x)

    conv = peft.get_peft_model(ConvNet(), peft.LoraConfig(r=2, target_modules=["conv"]))
    with pytest.raises(ValueError, match="not Linear"):
        LoRAProAdamW(conv)


def test_rank_pattern_gives_per_layer_ranks_and_steps_like_the_reference():
    model = make_model(rank_pattern={"mid": 4}, alpha_pattern={"mid": 8})
    pairs = {p.name.split(".")[-2]: p for p in lora_pairs(model)}
    assert pairs["mid"].A.shape[0] == 4 and pairs["up"].A.shape[0] == 2
    assert pairs["mid"].scaling == 2.0 and pairs["up"].scaling == 2.0
    opt = LoRAProAdamW(model, lr=1e-2)  # two ranks => two buckets
    backward(model, batches(1)[0])
    expect = {n: R.adamw_full_step(p.A, p.B, p.A.grad, p.B.grad, p.scaling, {}, lr=1e-2) for n, p in pairs.items()}
    opt.step()
    for n, p in pairs.items():
        torch.testing.assert_close(p.A.detach(), expect[n][0], rtol=1e-12, atol=1e-14)  # as above
        torch.testing.assert_close(p.B.detach(), expect[n][1], rtol=1e-12, atol=1e-14)
