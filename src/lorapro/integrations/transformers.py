"""LoRA-Pro in ``transformers.Trainer`` — no Trainer subclass, no fork.

Two ways in, both public Trainer extension points:

1. **Let the Trainer build it** (recommended: the Trainer's scheduler, gradient accumulation, clipping, bf16,
   checkpointing and ``resume_from_checkpoint`` all stay on their normal paths)::

       from lorapro.integrations.transformers import lorapro_optimizer_cls_and_kwargs
       trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
                         optimizer_cls_and_kwargs=lorapro_optimizer_cls_and_kwargs(peft_model, args))

   The Trainer calls ``LoRAProAdamW(peft_model, lr=..., ...)`` inside ``create_optimizer`` (it pops the
   ``"model"`` entry of the kwargs and passes it as the first argument, the path it uses for LOMO), then wraps it
   with its own LR scheduler. The learning rate, weight decay, betas and eps come from ``args``.

2. **Build it yourself** and hand it over; the Trainer still creates the scheduler from ``args``::

       opt = create_lorapro_optimizer(peft_model, args)
       trainer = Trainer(model=peft_model, args=args, train_dataset=ds, optimizers=(opt, None))

What the Trainer does around the step, and why it is right for LoRA-Pro:

* ``max_grad_norm`` clips the global norm of the *raw* gradients of all trainable parameters (for LoRA layers
  g_A and g_B) before ``optimizer.step()``; LoRA-Pro then turns the clipped g_A, g_B into the adjusted
  gradients. Clipping multiplies every g_A, g_B by the same factor c <= 1 and LoRA-Pro's equivalent gradient is
  linear in them, so the step sees c * g~ — the clipped equivalent gradient.
* gradient accumulation sums g_A, g_B over micro-batches before the step — LoRA-Pro is linear in them.
* ``bf16=True`` autocasts the forward pass; LoRA factors stay fp32 (PEFT), the LoRA-Pro algebra runs in ≥ fp32.
* checkpoints hold ``optimizer.state_dict()`` (tensors and numbers only) so ``resume_from_checkpoint``
  continues the moments exactly.
* multi-process (``torchrun`` / ``accelerate launch``): the Trainer's DDP averages gradients before the step.
  ``shard_state=True`` (an override here) splits the LoRA-Pro state across ranks; add
  :class:`lorapro.integrations.distributed.ConsolidateStateCallback` so checkpoints hold the complete state.
* DeepSpeed (``TrainingArguments(deepspeed=...)``): the Trainer hands this optimizer to DeepSpeed as the client
  optimizer. At ZeRO stage 0 that is LoRAProAdamW itself; at stage 1-3, which flatten and partition the
  parameters, :func:`lorapro_optimizer_cls_and_kwargs` returns :class:`lorapro.integrations.deepspeed.
  DeepSpeedLoRAProAdamW`, which reassembles the pairs inside DeepSpeed's step (tested in ``tests/distributed``).
  FSDP1's flat parameters hide the pairs and are refused with a clear error when the optimizer is built
  (:func:`lorapro.integrations.distributed.check_trainer_args`), as are DeepSpeed configs LoRA-Pro cannot run under.
* FSDP2 (``fsdp_config={"fsdp_version": 2}``; ``lorapro train`` sets it with ``train.fsdp=true``): accelerate
  shards the model and swaps the optimizer's parameters for the sharded DTensors in place, keeping the LoRA
  groups' [A0, B0, ...] layout; LoRA-Pro steps them as in :mod:`lorapro.fsdp`, and checkpoints go through
  torch's ``get_optimizer_state_dict`` / ``set_optimizer_state_dict``. accelerate enables FSDP on accelerators only.

Weight decay: passing the model lets LoRA-Pro find every LoRA pair itself; ``args.weight_decay`` is then applied
to all trainable parameters (the Trainer's no-decay group for biases/LayerNorm is not used). The paper's recipes
use weight decay 0.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple, Type

import torch

__all__ = ["lorapro_optimizer_cls_and_kwargs", "create_lorapro_optimizer", "lorapro_optimizer_kwargs"]


def lorapro_optimizer_kwargs(args: Any = None, **overrides: Any) -> Dict[str, Any]:
    """Optimizer hyperparameters taken from ``transformers.TrainingArguments`` (lr, weight decay, betas, eps),
    updated with ``overrides`` (``mode=``, ``x_solution=``, ``lr=``, ...)."""
    kwargs: Dict[str, Any] = {}
    if args is not None:
        kwargs = dict(
            lr=args.learning_rate,
            weight_decay=args.weight_decay,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
        )
    kwargs.update(overrides)
    return kwargs


def _optimizer_class(optimizer: str) -> Type[torch.optim.Optimizer]:
    from lorapro import LoRAProAdamW, LoRAProSGD

    classes = {"adamw": LoRAProAdamW, "sgd": LoRAProSGD}
    if optimizer not in classes:
        raise ValueError(f"optimizer must be one of {sorted(classes)}, got {optimizer!r}.")
    return classes[optimizer]


def lorapro_optimizer_cls_and_kwargs(
    model: torch.nn.Module, args: Any = None, *, optimizer: str = "adamw", **overrides: Any
) -> Tuple[Callable[..., torch.optim.Optimizer], Dict[str, Any]]:
    """``(LoRAProAdamW, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    Args:
        model: the PEFT model given to the Trainer (its LoRA layers become LoRA-Pro pairs).
        args: the ``TrainingArguments`` (lr, weight_decay, adam_beta1/2, adam_epsilon are read from it).
        optimizer: ``"adamw"`` (:class:`lorapro.LoRAProAdamW`) or ``"sgd"`` (:class:`lorapro.LoRAProSGD`).
        overrides: further optimizer arguments, e.g. ``mode="efficient"``, ``x_solution="zero"``.

    The Trainer removes ``"model"`` from the returned dict when it builds the optimizer, so build a fresh tuple for
    each Trainer.
    """
    cls = _optimizer_class(optimizer)
    stage0: Any = None
    if args is not None:
        from .distributed import check_trainer_args, trainer_deepspeed_config

        check_trainer_args(args)  # FSDP and DeepSpeed configs LoRA-Pro cannot run under are refused here
        ds_config = trainer_deepspeed_config(args)
        if ds_config is not None:
            from .deepspeed import DeepSpeedLoRAProAdamW, DeepSpeedLoRAProSGD, skipping_deepspeed_init_step, zero_stage

            if zero_stage(ds_config) >= 1:  # the pairs are reassembled from DeepSpeed's partitions in step()
                cls = DeepSpeedLoRAProSGD if optimizer == "sgd" else DeepSpeedLoRAProAdamW
                overrides.pop("shard_state", None)  # under ZeRO the state is always split by pairs
            else:  # stage 0: the optimizer itself, skipping the zero-gradient step DeepSpeed's fp16/bf16
                # wrapper takes while it sets up (lorapro.integrations.deepspeed._is_deepspeed_init_step)
                stage0 = skipping_deepspeed_init_step(cls)
    kwargs = lorapro_optimizer_kwargs(args, **overrides)
    if issubclass(cls, _optimizer_class("sgd")):
        kwargs.pop("betas", None)
        kwargs.pop("eps", None)
    kwargs["model"] = model
    return stage0 or cls, kwargs


def create_lorapro_optimizer(
    model: torch.nn.Module, args: Any = None, *, optimizer: str = "adamw", **overrides: Any
) -> torch.optim.Optimizer:
    """A ready LoRA-Pro optimizer for ``Trainer(optimizers=(optimizer, None))`` (the Trainer adds its scheduler)."""
    cls, kwargs = lorapro_optimizer_cls_and_kwargs(model, args, optimizer=optimizer, **overrides)
    return cls(kwargs.pop("model"), **kwargs)
