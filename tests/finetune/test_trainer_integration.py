"""LoRA-Pro inside a plain transformers.Trainer through lorapro.integrations.transformers (no lorapro train):
both ways in, gradient accumulation, and max_grad_norm clipping the raw LoRA gradients before the LoRA-Pro step."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from lorapro import LoRAProAdamW, LoRAProSGD
from lorapro.finetune.data import PadCollator
from lorapro.integrations.transformers import create_lorapro_optimizer, lorapro_optimizer_cls_and_kwargs
from lorapro.models import load_model_and_tokenizer


def _peft_model():
    torch.manual_seed(0)  # PEFT draws lora_A from the global RNG
    base, tok = load_model_and_tokenizer("builtin:tiny-llama")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    # B = 0 at init makes the first LoRA-Pro step degenerate (g_A adjusted to 0); start from a generic point
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model, tok


def _dataset(tok, n=8):
    rows = []
    for i in range(n):
        ids = tok(f"question {i}: what is {i} times 3? answer: {3 * i}" + "!" * i)["input_ids"]
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), report_to="none", disable_tqdm=True, learning_rate=1e-2,
                lr_scheduler_type="constant", max_steps=2, per_device_train_batch_size=4, seed=0,
                dataloader_pin_memory=False, remove_unused_columns=False, save_strategy="no", logging_steps=1)
    base.update(kw)
    return TrainingArguments(**base)


def _lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_trainer_builds_lorapro_itself_and_via_factory(tmp_path):
    finals = []
    for way in ("cls_and_kwargs", "optimizers"):
        model, tok = _peft_model()
        args = _args(tmp_path / way)
        if way == "cls_and_kwargs":
            kw = dict(optimizer_cls_and_kwargs=lorapro_optimizer_cls_and_kwargs(model, args, mode="full"))
        else:
            kw = dict(optimizers=(create_lorapro_optimizer(model, args, mode="full"), None))
        trainer = Trainer(model=model, args=args, train_dataset=_dataset(tok), data_collator=PadCollator(tok.pad_token_id), **kw)
        trainer.train()
        opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        assert isinstance(opt, LoRAProAdamW)
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-2)  # taken from TrainingArguments
        assert any(g.get("lora") for g in opt.param_groups)
        finals.append(_lora_state(model))
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], rtol=0, atol=0)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """4 examples in one micro-batch == 2 micro-batches of 2 accumulated (the loss is normalised by the total
    number of target tokens across the accumulated micro-batches). LoRA-Pro SGD: its step is linear in the gradient,
    so the two runs agree to float32 rounding; Adam's first steps divide by |g| and turn rounding of near-zero
    gradient entries into O(lr) differences (seen: 9e-6 on 2 of 512 entries), which would hide nothing but noise."""
    results = []
    for micro, accum in ((4, 1), (2, 2)):
        model, tok = _peft_model()
        args = _args(tmp_path / f"{micro}", per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
                     max_steps=2, train_sampling_strategy="sequential")
        trainer = Trainer(model=model, args=args, train_dataset=_dataset(tok), data_collator=PadCollator(tok.pad_token_id),
                          optimizer_cls_and_kwargs=lorapro_optimizer_cls_and_kwargs(model, args, optimizer="sgd"))
        trainer.train()
        results.append(_lora_state(model))
    start = _lora_state(_peft_model()[0])
    for k in results[0]:
        assert not torch.equal(results[0][k], start[k]) or "lora_B" in k  # the factors moved
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-5, atol=1e-7)


def test_max_grad_norm_clips_raw_lora_grads_before_the_lorapro_step(tmp_path):
    """One Trainer step with max_grad_norm = c equals: backward, clip the global norm of the raw (g_A, g_B) to c,
    then the LoRA-Pro step — clipping happens before LoRA-Pro adjusts the gradients. LoRAProSGD is used because
    its step is proportional to the gradient (Adam's first step is nearly scale-free and would hide clipping)."""
    model, tok = _peft_model()
    manual, unclipped = copy.deepcopy(model), copy.deepcopy(model)
    data = _dataset(tok, n=4)
    c = 0.05
    args = _args(tmp_path, max_steps=1, per_device_train_batch_size=4, max_grad_norm=c, lr_scheduler_type="constant")
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=PadCollator(tok.pad_token_id),
                      optimizer_cls_and_kwargs=lorapro_optimizer_cls_and_kwargs(model, args, optimizer="sgd"))
    trainer.train()
    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), LoRAProSGD)

    batch = PadCollator(tok.pad_token_id)(data)
    for m, clip in ((manual, True), (unclipped, False)):
        opt = LoRAProSGD(m, lr=1e-2)
        m.train()
        m(**batch).loss.backward()
        if clip:
            raw_norm = torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], c)
            assert raw_norm > 10 * c  # clipping was active
        opt.step()
    got, want, other = _lora_state(model), _lora_state(manual), _lora_state(unclipped)
    start = _lora_state(_peft_model()[0])
    for k in got:
        torch.testing.assert_close(got[k] - start[k], want[k] - start[k], rtol=1e-4, atol=1e-8)
    # and the clipped step is really smaller than the unclipped one
    step = sum(float((got[k] - start[k]).norm() ** 2) for k in got) ** 0.5
    step_unclipped = sum(float((other[k] - start[k]).norm() ** 2) for k in got) ** 0.5
    assert step < step_unclipped / 5
