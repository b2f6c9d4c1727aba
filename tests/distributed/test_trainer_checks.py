"""The Trainer path refuses FSDP1 and the DeepSpeed configs LoRA-Pro cannot run under, accepts FSDP2, and picks the
ZeRO optimizer for ZeRO stage 1-3 (no processes)."""

from types import SimpleNamespace

import pytest
from torch import nn

from lorapro.integrations.deepspeed import check_deepspeed_config
from lorapro.integrations.distributed import check_trainer_args, lorapro_optimizer_of, trainer_deepspeed_config


def args(**kw):
    base = dict(fsdp=[], deepspeed=None, learning_rate=1e-3, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                adam_epsilon=1e-8)
    base.update(kw)
    return SimpleNamespace(**base)


def test_plain_and_stage0_are_accepted(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    check_trainer_args(args())
    cfg = tmp_path / "ds.json"
    cfg.write_text('{"zero_optimization": {"stage": 0}, "bf16": {"enabled": "auto"}}')
    check_trainer_args(args(deepspeed=str(cfg)))
    assert check_deepspeed_config({"train_batch_size": 8}) == {"train_batch_size": 8}  # no ZeRO section: stage 0


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_stages_get_the_zero_optimizer(stage):
    pytest.importorskip("transformers")
    from lorapro.integrations.deepspeed import DeepSpeedLoRAProAdamW, DeepSpeedLoRAProSGD
    from lorapro.integrations.transformers import lorapro_optimizer_cls_and_kwargs

    from dist_toy import make_model

    a = args(deepspeed={"zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu"}}})
    check_trainer_args(a)
    cls, kwargs = lorapro_optimizer_cls_and_kwargs(make_model(), a, shard_state=True)
    assert cls is DeepSpeedLoRAProAdamW and "shard_state" not in kwargs  # ZeRO always splits the state by pairs
    assert lorapro_optimizer_cls_and_kwargs(make_model(), a, optimizer="sgd")[0] is DeepSpeedLoRAProSGD
    cls, kwargs = lorapro_optimizer_cls_and_kwargs(make_model(), args(deepspeed={}), shard_state=True)
    assert cls.__name__ == "LoRAProAdamW" and kwargs["shard_state"] is True  # stage 0


@pytest.mark.parametrize("zero,match", [
    ({"stage": 0, "offload_param": {"device": "nvme"}}, "offload_param.*stage >= 1"),
    ({"stage": 2, "elastic_checkpoint": True}, "elastic_checkpoint.*load_checkpoint.*another number"),
    ({"stage": 3, "offload_optimizer": {"device": "nvme"}}, "offload_optimizer.device = 'nvme'.*'cpu'"),
    ({"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.3}}, "ratio = 0.3.*built-in AdamW"),
])
def test_deepspeed_configs_lorapro_cannot_run_under_are_refused(zero, match):
    with pytest.raises(ValueError, match=match):
        check_deepspeed_config({"zero_optimization": zero})


def test_a_deepspeed_optimizer_section_is_refused(tmp_path):
    cfg = tmp_path / "ds.json"
    cfg.write_text('{"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}')
    with pytest.raises(ValueError, match="'optimizer' section.*Remove"):
        check_trainer_args(args(deepspeed=str(cfg)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_trainer_args(args(deepspeed=str(tmp_path / "missing.json")))


def test_fsdp_is_refused_from_args_and_from_accelerate_launch(monkeypatch):
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    with pytest.raises(ValueError, match="FSDP.*shard_state=True"):
        check_trainer_args(args(fsdp=["full_shard", "auto_wrap"]))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="ACCELERATE_USE_FSDP"):
        check_trainer_args(args())


def test_fsdp2_is_accepted_fsdp1_names_fsdp2(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    check_trainer_args(args(fsdp="full_shard", fsdp_config={"fsdp_version": 2}))
    with pytest.raises(ValueError, match="FSDP1.*fsdp_version': 2"):
        check_trainer_args(args(fsdp="full_shard", fsdp_config={"fsdp_version": 1}))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch --use_fsdp --fsdp_version 2
    monkeypatch.setenv("FSDP_VERSION", "2")
    check_trainer_args(args())


def test_accelerate_launch_deepspeed_stage_from_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert trainer_deepspeed_config(args()) == {"zero_optimization": {"stage": 2}}
    check_trainer_args(args())
    cfg = tmp_path / "ds.json"
    cfg.write_text('{"zero_optimization": {"stage": 2, "elastic_checkpoint": true}}')
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(cfg))  # the file wins over the stage variable
    with pytest.raises(ValueError, match="elastic_checkpoint"):
        check_trainer_args(args())


def test_transformers_factory_runs_the_check():
    pytest.importorskip("transformers")
    from lorapro.integrations.transformers import lorapro_optimizer_cls_and_kwargs

    with pytest.raises(ValueError, match="FSDP"):
        lorapro_optimizer_cls_and_kwargs(nn.Linear(2, 2), args(fsdp="full_shard"))


def test_lorapro_optimizer_is_found_inside_wrappers():
    from dist_toy import make_model, make_opt

    opt = make_opt("full", make_model())
    wrapped = SimpleNamespace(optimizer=SimpleNamespace(optimizer=opt))  # e.g. accelerate over DeepSpeed's wrapper
    assert lorapro_optimizer_of(wrapped) is opt
    assert lorapro_optimizer_of(SimpleNamespace(optimizer=None)) is None


def _zero_grad_step(model, opt):
    """Zero gradients on every trainable parameter, one step(): (did a parameter move, was any state created)."""
    import torch

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    moved = any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    return moved, any(len(st) for st in opt.state.values())


@pytest.mark.parametrize("zero", [0, 2])
def test_deepspeeds_zero_gradient_set_up_step_is_not_a_training_step(zero):
    """DeepSpeed's fp16/bf16 wrapper at stage 0 sets every gradient to zero and calls step() once while it sets up;
    counted, it would put every Adam bias correction one step late and apply weight decay once. The optimizers the
    Trainer path builds (DeepSpeedLoRAProAdamW at ZeRO >= 1) skip that call, and only that one."""
    import torch

    from lorapro import LoRAProAdamW
    from lorapro.integrations.transformers import lorapro_optimizer_cls_and_kwargs

    from dist_toy import make_model

    model = make_model()
    assert _zero_grad_step(model, LoRAProAdamW(model, lr=1e-2, weight_decay=0.1)) == (True, True)  # plain: counted
    model = make_model()
    build, kwargs = lorapro_optimizer_cls_and_kwargs(
        model, args(deepspeed={"zero_optimization": {"stage": zero}}, weight_decay=0.1, learning_rate=1e-2))
    opt = build(kwargs.pop("model"), **kwargs)
    assert _zero_grad_step(model, opt) == (False, False), type(opt).__name__
    torch.manual_seed(0)
    for p in model.parameters():  # a real gradient: a real step, and from then on every call counts
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    opt.step()
    assert {float(st["step"]) for st in opt.state.values() if "step" in st} == {1.0}
    assert _zero_grad_step(model, opt)[1]
    assert {float(st["step"]) for st in opt.state.values() if "step" in st} == {2.0}
