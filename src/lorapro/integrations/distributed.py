"""Multi-process LoRA-Pro with the Hugging Face Trainer: what is supported, and sharded-state checkpoints.

The Trainer runs data parallel by itself under ``torchrun`` / ``accelerate launch`` (DDP: gradients are averaged
before the optimizer step, so LoRA-Pro needs nothing extra). Two helpers cover the rest:

* :func:`check_trainer_args` — refuses, before training starts, the backends LoRA-Pro cannot run under: FSDP1
  (``args.fsdp`` or ``accelerate launch --use_fsdp`` without ``fsdp_version: 2``; its flat parameters hide the
  factors — FSDP2 is supported, :mod:`lorapro.fsdp`) and DeepSpeed configs LoRA-Pro cannot run under (see
  :func:`lorapro.integrations.deepspeed.check_deepspeed_config`). Called by
  :func:`lorapro.integrations.transformers.lorapro_optimizer_cls_and_kwargs`.
* :class:`ConsolidateStateCallback` — with ``shard_state=True`` every rank holds only its pairs' state; the
  Trainer calls ``optimizer.state_dict()`` on rank 0 alone when it writes ``optimizer.pt``. The callback runs on
  every rank just before each checkpoint (``on_step_end`` / ``on_epoch_end`` when ``control.should_save``, and on
  every evaluation with ``save_strategy="best"``) and gathers the state to rank 0 with
  ``optimizer.consolidate_state_dict(to=0)``, so the checkpoint holds the complete, world-size-independent state
  (``resume_from_checkpoint`` then works with any number of processes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch

__all__ = ["check_trainer_args", "trainer_deepspeed_config", "ConsolidateStateCallback", "lorapro_optimizer_of"]


def lorapro_optimizer_of(optimizer: Any) -> Optional[torch.optim.Optimizer]:
    """The LoRA-Pro optimizer inside accelerate / DeepSpeed wrappers (``.optimizer`` chains), or ``None``."""
    for _ in range(8):
        if optimizer is None:
            return None
        if hasattr(optimizer, "consolidate_state_dict") and hasattr(optimizer, "compute_dtype"):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def check_trainer_args(args: Any) -> None:
    """Raise ``ValueError`` if ``TrainingArguments`` ask for a backend LoRA-Pro does not support (FSDP1, or a
    DeepSpeed config refused by :func:`lorapro.integrations.deepspeed.check_deepspeed_config`).

    Supported: single process, DDP (``torchrun`` / ``accelerate launch``), FSDP2, DeepSpeed ZeRO stage 0-3.
    """
    from .deepspeed import check_deepspeed_config

    fsdp = getattr(args, "fsdp", None)
    if (fsdp or _truthy("ACCELERATE_USE_FSDP")) and _fsdp_version(args) != 2:
        raise ValueError(
            f"FSDP1 is enabled ({'fsdp=' + repr(fsdp) if fsdp else 'ACCELERATE_USE_FSDP'}): its flat parameters hide "
            "the LoRA factors that LoRA-Pro pairs. Use FSDP2 — fsdp_config={'fsdp_version': 2} in TrainingArguments, "
            "fsdp_version: 2 in the accelerate config, or train.fsdp=true with lorapro train — or plain data "
            "parallel with the optimizer option shard_state=True."
        )
    config = trainer_deepspeed_config(args)
    if config is not None:
        check_deepspeed_config(config)


def trainer_deepspeed_config(args: Any) -> Optional[Dict[str, Any]]:
    """The DeepSpeed config the Trainer will use (from ``args.deepspeed`` or ``accelerate launch --use_deepspeed``),
    or ``None`` without DeepSpeed."""
    from .deepspeed import load_deepspeed_config

    ds = getattr(args, "deepspeed", None)
    if ds:
        hf_ds = getattr(args, "hf_deepspeed_config", None)
        config = getattr(hf_ds, "config", None) if hf_ds is not None else None
        return config if isinstance(config, dict) else load_deepspeed_config(ds)
    if _truthy("ACCELERATE_USE_DEEPSPEED"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if config_file and Path(config_file).is_file():
            return load_deepspeed_config(config_file)
        return {"zero_optimization": {"stage": int(stage or 0)}}
    return None


def _fsdp_version(args: Any) -> int:
    """The FSDP version the Trainer / accelerate will use: ``fsdp_config["fsdp_version"]`` or accelerate's
    ``FSDP_VERSION`` environment variable; 1 (their default) when neither says."""
    config = getattr(args, "fsdp_config", None) or {}
    version = config.get("fsdp_version", config.get("version")) if isinstance(config, dict) else None
    return int(version or os.environ.get("FSDP_VERSION", "1") or 1)


try:  # the callback needs transformers; the rest of this module does not
    from transformers import TrainerCallback as _CallbackBase
except ImportError:  # pragma: no cover - transformers is an optional dependency
    _CallbackBase = object  # type: ignore[assignment,misc]


class ConsolidateStateCallback(_CallbackBase):  # type: ignore[valid-type,misc]
    """Gather a sharded LoRA-Pro optimizer state to rank 0 right before the Trainer writes a checkpoint.

    Harmless without ``shard_state`` (``consolidate_state_dict`` is then a no-op). Add it to ``Trainer(callbacks=
    [...])``; ``lorapro train`` does so when ``optim.shard_state`` is on.
    """

    @staticmethod
    def _consolidate(optimizer: Any) -> None:
        opt = lorapro_optimizer_of(optimizer)
        if opt is not None:
            opt.consolidate_state_dict(to=0)

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if control.should_save:
            self._consolidate(optimizer)

    def on_epoch_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if control.should_save:
            self._consolidate(optimizer)

    def on_evaluate(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if str(getattr(args.save_strategy, "value", args.save_strategy)) == "best":
            self._consolidate(optimizer)  # whether this evaluation triggers a save is decided after it
