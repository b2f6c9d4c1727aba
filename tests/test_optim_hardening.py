"""The optimizers in real-world use: closures, groups added later, several adapters, non-finite gradients,
frozen halves and checkpoints from another LoRA configuration (issue 11, defects 2, 3, 5, 6, 7)."""

import copy
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from lorapro import LoRAProAdamW, LoRAProSGD, lora_pairs  # noqa: E402
from lorapro import reference as R  # noqa: E402
from toy_lora import MLP, backward, batches, peft_toy  # noqa: E402

f64 = torch.float64
KINDS = ["sgd", "full", "efficient", "factored"]


def make_model(dtype=f64, seed=0, **lora_kwargs):
    torch.manual_seed(seed)
    return peft_toy(MLP(), ["up", "mid"], dtype=dtype, **lora_kwargs)


def make_opt(kind, params, **kw):
    if kind == "sgd":
        return LoRAProSGD(params, lr=0.05, momentum=0.9, **kw)
    return LoRAProAdamW(params, lr=1e-2, mode=kind, weight_decay=0.01, **kw)


def snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def assert_same(snap_a, snap_b):
    (pa, sa), (pb, sb) = snap_a, snap_b
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))
    assert sa["state"].keys() == sb["state"].keys()
    for i, st in sa["state"].items():
        assert st.keys() == sb["state"][i].keys()
        for k, v in st.items():
            assert torch.equal(v, sb["state"][i][k]), (i, k)


# -- defect 2: step(closure) -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_step_with_closure_equals_backward_then_step_and_returns_the_loss(kind):
    data = batches(3)
    m1, m2 = make_model(), make_model()
    o1, o2 = make_opt(kind, m1), make_opt(kind, m2)
    for batch in data:
        calls = []

        def closure():
            calls.append(torch.is_grad_enabled())  # torch's contract: evaluated with autograd on
            o1.zero_grad()
            loss = nn.functional.cross_entropy(m1(batch[0]).float(), batch[1])  # as toy_lora.backward
            loss.backward()
            return loss

        loss = o1.step(closure)
        o2.zero_grad()
        expected = backward(m2, batch)
        o2.step()
        assert calls == [True]  # called once, under enable_grad although step() runs under no_grad
        assert loss.item() == expected
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
    assert max((p - q).abs().max() for p, q in zip(m1.parameters(), make_model().parameters())) > 1e-3


def test_step_without_closure_returns_none():
    model = make_model()
    opt = make_opt("full", model)
    backward(model, batches(1)[0])
    assert opt.step() is None


# -- defect 3: add_param_group ----------------------------------------------------------------------------------


def test_add_param_group_pairs_lora_factors_through_the_model():
    model = make_model()
    pairs = {p.name.split(".")[-2]: p for p in lora_pairs(model)}
    late = pairs["mid"]
    first = [p for p in model.parameters() if p.requires_grad and p is not late.A and p is not late.B]
    opt = LoRAProAdamW(first, lr=1e-2, model=model)
    opt.add_param_group({"params": [late.B, late.A], "lr": 3e-3})  # any order: paired by identity, not position
    group = opt.param_groups[-1]
    assert group["lora"] and group["scalings"] == [late.scaling] and group["pair_names"] == [late.name]
    assert group["params"][0] is late.A and group["params"][1] is late.B
    backward(model, batches(1)[0])
    expect = R.adamw_full_step(late.A.detach(), late.B.detach(), late.A.grad, late.B.grad, late.scaling, {}, lr=3e-3)
    opt.step()
    torch.testing.assert_close(late.A.detach(), expect[0], rtol=1e-12, atol=1e-14)  # LoRA-Pro, not plain AdamW (as test_optim)
    torch.testing.assert_close(late.B.detach(), expect[1], rtol=1e-12, atol=1e-14)


def test_add_param_group_errors_and_explicit_form():
    model = make_model()
    pairs = lora_pairs(model)
    rest = [p for p in model.parameters() if p.requires_grad and all(p is not q.A and p is not q.B for q in pairs)]
    opt = LoRAProAdamW([{"lora_pairs": [pairs[0]]}, {"params": rest}], lr=1e-2, model=model)
    with pytest.raises(ValueError, match="same group"):
        opt.add_param_group({"params": [pairs[1].A]})  # half a pair
    # without a model the explicit form still pairs them
    opt2 = LoRAProAdamW([{"lora_pairs": [pairs[0]]}], lr=1e-2)
    opt2.add_param_group({"lora_pairs": [(pairs[1].A, pairs[1].B, pairs[1].scaling)], "lr": 1e-3})
    assert opt2.param_groups[-1]["lora"] and opt2.param_groups[-1]["lr"] == 1e-3


# -- defect 5: several trainable adapters on one layer -------------------------------------------------------------


def _two_adapters():
    model = make_model()
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["up", "mid"]))
    return model


def test_two_trainable_adapters_on_one_layer_are_refused():
    model = _two_adapters()
    assert len(lora_pairs(model)) == 2  # PEFT trains only the active adapter: one per layer is fine
    LoRAProAdamW(model)
    for name, p in model.named_parameters():
        if "second" in name:
            p.requires_grad_(True)
    with pytest.raises(ValueError, match="Several trainable LoRA adapters on one layer.*freeze the others"):
        LoRAProAdamW(model)


def test_add_param_group_with_a_second_adapter_on_a_trained_layer_is_refused():
    model = _two_adapters()
    opt = LoRAProAdamW(model)
    second = [p for n, p in model.named_parameters() if "second" in n and "mid" in n]
    for p in second:
        p.requires_grad_(True)
    with pytest.raises(ValueError, match="Several trainable LoRA adapters"):
        opt.add_param_group({"params": second})


# -- defect 6: non-finite gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["lora A", "lora B", "head"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", KINDS)
def test_nonfinite_gradient_skips_the_whole_step_with_a_warning(kind, bad, where):
    data = batches(3)
    model, clean = make_model(), make_model()
    opt, clean_opt = make_opt(kind, model), make_opt(kind, clean)
    for m, o in ((model, opt), (clean, clean_opt)):
        o.zero_grad()
        backward(m, data[0])
        o.step()
    before = snapshot(model, opt)
    opt.zero_grad()
    backward(model, data[1])
    pair = lora_pairs(model)[1]
    target = {"lora A": pair.A, "lora B": pair.B, "head": model.base_model.model.head.modules_to_save["default"].weight}
    target[where].grad[0, 0] = bad
    name = {"lora A": pair.name + ".A", "lora B": pair.name + ".B", "head": "parameter"}[where]
    with pytest.warns(RuntimeWarning, match=f"{name}.*skipped"):
        opt.step()
    assert_same(snapshot(model, opt), before)  # parameters, moments and step counts untouched
    # and training goes on as if the bad batch had never come
    for m, o in ((model, opt), (clean, clean_opt)):
        o.zero_grad()
        backward(m, data[2])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            o.step()
    assert_same(snapshot(model, opt), snapshot(clean, clean_opt))


@pytest.mark.parametrize("kind", KINDS)
def test_grad_scaler_skips_inf_steps_and_unscales_the_others(kind):
    data = batches(2, dtype=torch.float32)
    model, plain = make_model(torch.float32), make_model(torch.float32)
    opt, plain_opt = make_opt(kind, model), make_opt(kind, plain)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    before = snapshot(model, opt)
    loss = nn.functional.cross_entropy(model(data[0][0]).float(), data[0][1])
    scaler.scale(loss).backward()
    lora_pairs(model)[0].B.grad[0, 0] = float("inf")  # an fp16-style overflow
    scaler.step(opt)
    scaler.update()
    assert_same(snapshot(model, opt), before)  # GradScaler skipped optimizer.step()
    assert scaler.get_scale() == 2.0**11
    for x, y in data[1:]:
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x).float(), y)).backward()
        scaler.step(opt)
        scaler.update()
        plain_opt.zero_grad()
        backward(plain, (x, y))
        plain_opt.step()
    # the scale is a power of two, so scaling and unscaling the gradients is exact
    assert_same(snapshot(model, opt), snapshot(plain, plain_opt))


# -- defect 7: frozen halves, changed LoRA scales ---------------------------------------------------------------


def test_explicit_pair_with_a_frozen_half_is_refused():
    A = nn.Parameter(torch.randn(2, 5, dtype=f64))
    B = nn.Parameter(torch.randn(4, 2, dtype=f64), requires_grad=False)
    with pytest.raises(ValueError, match=r"B is frozen \(requires_grad=False\)"):
        LoRAProSGD([{"lora_pairs": [(A, B, 0.5)]}], lr=0.1)


@pytest.mark.parametrize("kind", KINDS)
def test_half_frozen_after_construction_is_refused_before_any_change(kind):
    model = make_model()
    opt = make_opt(kind, model)
    backward(model, batches(1)[0])
    opt.step()
    before = snapshot(model, opt)
    opt.zero_grad()
    pair = lora_pairs(model)[0]
    pair.B.requires_grad_(False)
    backward(model, batches(2)[1])
    with pytest.raises(RuntimeError, match=r"B has no gradient.*freeze both"):
        opt.step()
    assert_same(snapshot(model, opt), before)


def test_load_refuses_a_checkpoint_with_other_lora_scales():
    model = make_model()
    opt = make_opt("full", model)
    backward(model, batches(1)[0])
    opt.step()
    sd = opt.state_dict()
    other = make_model(lora_alpha=8)  # same shapes, scale 4 instead of 2
    with pytest.raises(ValueError, match=r"LoRA scales.*checkpoint 2.0, model 4.0"):
        make_opt("full", other).load_state_dict(sd)
    # same configuration: loads, and the groups keep the model's scales and names
    same = make_model()
    opt2 = make_opt("full", same)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["scalings"] == [p.scaling for p in lora_pairs(same)]
    assert opt2.param_groups[0]["pair_names"] == [p.name for p in lora_pairs(same)]
