"""LoRA-Pro under DeepSpeed, unmodified: ZeRO stage 0 with LoRA-Pro as the client optimizer.

LoRA-Pro updates each LoRA pair (A, B) from both factors and both gradients together. DeepSpeed's ZeRO stage 1, 2
and 3 optimizers (and its ``BF16_Optimizer``) concatenate all parameters of a param group into one flat buffer and
hand each rank a slice of it, so no rank sees an (A, B) pair any more. The authors' fork of DeepSpeed re-pairs the
slices by position, which breaks when the model, the target modules or the number of GPUs change. Here instead:

What works (tested on CPU with 2 processes, ``tests/distributed/test_deepspeed.py``)
    * ``zero_optimization.stage = 0`` with ``LoRAProAdamW`` / ``LoRAProSGD`` as the client optimizer: DeepSpeed
      does the data-parallel gradient all-reduce, gradient accumulation, clipping, LR scheduling and checkpoints;
      LoRA-Pro steps the real A and B. Two processes reproduce one process with the global batch.
    * ``"bf16": {"enabled": true}`` at stage 0: DeepSpeed wraps the client optimizer in its *unfused*
      mixed-precision optimizer, which keeps one fp32 master copy per parameter with the parameter's shape —
      LoRA-Pro steps those masters, pairs intact. ``"fp16"`` takes the same wrapper in DeepSpeed's code but is
      untested here (DeepSpeed refuses fp16 on CPU). ``"torch_autocast"`` works too (parameters stay fp32).
    * The ZeRO-1 memory saving for LoRA-Pro's own state: ``LoRAProAdamW(model, ..., shard_state=True)`` (see
      :mod:`lorapro.distributed`) splits the state by whole pairs across ranks. For LoRA the trainable factors
      and their gradients are small, so ZeRO-1/2's partitioning of them would save little beyond this.

What is refused, with a clear error
    ZeRO stage 1, 2, 3 and any ``offload_optimizer`` / ``offload_param`` (which require stage >= 1):
    :func:`check_deepspeed_config` / :func:`initialize` refuse such a config before DeepSpeed starts, and if
    DeepSpeed is initialised directly, LoRA-Pro's ``step`` detects the flat buffers and raises.

Usage::

    from lorapro import LoRAProAdamW
    from lorapro.integrations.deepspeed import initialize, save_checkpoint
    opt = LoRAProAdamW(peft_model, lr=2e-5, shard_state=True)      # after deepspeed.init_distributed()
    engine, opt, _, _ = initialize(model=peft_model, optimizer=opt, config=ds_config)
    ... engine.backward(loss); engine.step() ...
    save_checkpoint(engine, "ckpt")                                # all ranks

With the Hugging Face Trainer, ``TrainingArguments(deepspeed=ds_config)`` with a stage-0 config and the LoRA-Pro
optimizer from :mod:`lorapro.integrations.transformers` is the same path;
:func:`lorapro.integrations.distributed.check_trainer_args` refuses other stages up front.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from .distributed import lorapro_optimizer_of

__all__ = ["check_deepspeed_config", "initialize", "save_checkpoint", "lorapro_optimizer_of"]

ConfigT = Union[str, Path, Dict[str, Any]]

SUPPORTED_DS = (
    "LoRA-Pro runs under DeepSpeed with zero_optimization.stage = 0 (fp32, bf16 or torch_autocast) and "
    "LoRA-Pro as the client optimizer; for ZeRO-1-style memory savings create it with "
    "LoRAProAdamW(model, ..., shard_state=True). ZeRO stages 1-3 flatten and partition the parameters, which "
    "destroys the (A, B) pairs LoRA-Pro needs, and CPU/NVMe offload requires those stages."
)


def _load_config(config: ConfigT) -> Dict[str, Any]:
    if isinstance(config, dict):
        return config
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config '{config}' does not exist.")
    return json.loads(path.read_text())


def check_deepspeed_config(config: ConfigT) -> Dict[str, Any]:
    """Raise ``ValueError`` unless LoRA-Pro can run under this DeepSpeed config; return the config as a dict.

    Accepts a dict or a JSON file path. A config without ``zero_optimization`` is stage 0.
    """
    cfg = _load_config(config)
    zero = cfg.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage not in (0, "0"):
        raise ValueError(f"DeepSpeed config has zero_optimization.stage = {stage!r}. " + SUPPORTED_DS)
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            raise ValueError(f"DeepSpeed config has zero_optimization.{key}.device = {device!r}. " + SUPPORTED_DS)
    return cfg


def initialize(*, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: ConfigT, **kwargs: Any):
    """``deepspeed.initialize`` after :func:`check_deepspeed_config`; same return value (engine, optimizer, ...)."""
    import deepspeed

    cfg = check_deepspeed_config(config)
    if lorapro_optimizer_of(optimizer) is None:
        raise TypeError("lorapro.integrations.deepspeed.initialize expects a LoRAProAdamW / LoRAProSGD optimizer.")
    return deepspeed.initialize(model=model, optimizer=optimizer, config=cfg, **kwargs)


def save_checkpoint(engine: Any, save_dir: Union[str, Path], tag: Optional[str] = None, **kwargs: Any) -> Any:
    """``engine.save_checkpoint`` that first gathers a sharded LoRA-Pro state to rank 0. Call it on every rank.

    DeepSpeed calls ``optimizer.state_dict()`` on every rank and, at stage 0, writes rank 0's; without
    ``shard_state`` this is exactly ``engine.save_checkpoint``. ``engine.load_checkpoint`` needs no help: every rank
    reads rank 0's file and a sharded optimizer keeps the pairs it owns.
    """
    opt = lorapro_optimizer_of(getattr(engine, "optimizer", None))
    if opt is not None:
        opt.consolidate_state_dict(to=0)
    return engine.save_checkpoint(str(save_dir), tag=tag, **kwargs)
