r"""LoRA-Pro under DeepSpeed, unmodified: ZeRO stage 0, 1, 2 and 3 (and ZeRO-Offload of the optimizer to CPU).

LoRA-Pro updates each LoRA pair (A, B) from both factors and both gradients together. DeepSpeed's ZeRO stage 1, 2
and 3 optimizers (and its ``BF16_Optimizer``) concatenate all parameters of a param group into one flat fp32
buffer and hand each rank a slice of it, so no rank sees an (A, B) pair any more. The authors' fork of DeepSpeed
re-pairs the slices by position inside ``stage_1_and_2.py``. Here nothing of DeepSpeed is patched.

ZeRO stage 1, 2, 3: :class:`DeepSpeedLoRAProAdamW` / :class:`DeepSpeedLoRAProSGD` as the client optimizer
    Where the LoRA-Pro step runs, and why there. ``engine.step()`` (called by ``deepspeed.initialize``'s users, and
    by accelerate — hence the Hugging Face Trainer — from inside ``accelerator.backward``) runs the ZeRO
    optimizer's ``step``, which (``runtime/zero/stage_1_and_2.py``, ``stage3.py``, ``bf16_optimizer.py``):
    skips the step on fp16 overflow, computes the global norm of the *raw* gradients, unscales and clips the
    gradient of this rank's flat fp32 partition, and then calls the **client optimizer's** ``step()`` with its
    param groups holding the flat fp32 master partition (its ``.grad`` the final gradient); afterwards it copies
    the partition into the bf16/fp16 weights and all-gathers them. The client optimizer's ``step`` is therefore
    the one public extension point that sees exactly the gradients LoRA-Pro must see (averaged over ranks and
    micro-batches, clipped by their raw norm as in the single-process optimizer, never on a skipped step), under
    every stage, with and without ZeRO-Offload, and under accelerate / the Trainer too (they only call
    ``engine.step()``). A hook before ``engine.step`` using ``safe_get_full_grad`` / ``safe_set_full_grad`` would
    see the gradients before clipping (DeepSpeed would then clip by the norm of the *adjusted* gradients, not of
    the raw ones) and would advance full mode's moments on steps DeepSpeed then skips; and those functions
    refuse to run inside the step (DeepSpeed has freed the buffers they read by then).

    What the client optimizer does in that ``step``, per LoRA param group:

    1. gather: every rank writes the elements of every LoRA factor and gradient that lie in its partition into a
       zero buffer at their place in the full tensor, and one ``all_reduce`` assembles all A, B, g_A, g_B —
       DeepSpeed's own ``safe_get_full_fp32_param`` does the same per tensor. Which elements of which factor lie
       where is read from DeepSpeed's mapping objects: ``param._hp_mapping`` (ZeRO-1/2 and ``BF16_Optimizer``,
       the mapping ``safe_get_full_fp32_param`` uses) and, at ZeRO-3, the optimizer's ``grad_position`` and the
       parameter's partition rank (``param.ds_process_group``) — internal attributes, checked at every step, so
       a DeepSpeed release that changes them gets a clear error, not a wrong step (tested with 0.19.8). The
       factors are ≈ 0.3% of a 7B model, so this costs one all-reduce of twice their size;
    2. step: the pairs are split across the data-parallel ranks by whole pairs (balanced by state size, as
       ``shard_state`` does, :func:`lorapro.distributed.partition_by_cost`); each rank runs the unchanged
       :class:`lorapro.LoRAProAdamW` / :class:`lorapro.LoRAProSGD` bucket step — every mode, ``full``,
       ``efficient``, ``factored`` — on full fp32 views of the pairs it owns, keeping their state (so per-rank
       LoRA-Pro state is ≈ 1/W of the single-process state, for full mode's m × n moments too);
    3. scatter: one ``all_reduce`` of the updated factors (each rank contributes its own pairs), and every rank
       writes its slice into its fp32 master partition, which DeepSpeed then casts and all-gathers as usual.

    Non-LoRA trainable parameters (heads, biases, ``modules_to_save``) get the same plain AdamW / SGD as in the
    single-process optimizer, applied elementwise to their flat partition (so ZeRO partitions their state).
    The result equals the single-process optimizer up to the float rounding of the gradient reduction: same code,
    same state, weight decay included (tested with 2 processes: full and efficient mode at ZeRO-1, 2 and 3,
    factored mode and SGD at ZeRO-2, CPU offload at ZeRO-2 and 3, clipping with accumulation, bf16).

    Why the optimizer writes the master weights itself instead of handing adjusted gradients to DeepSpeed's
    Adam (or, for full mode, the projected Adam direction to an SGD): the bucket step is the code and state of
    the single-process optimizer, so every mode matches it exactly, one state format serves all stages, and no
    second optimizer's hyperparameters (SGD's lr, momentum, decay) have to be kept in sync. What is given up is
    DeepSpeed's fused / CPU Adam for the LoRA factors, whose elementwise Adam is a small part of a LoRA-Pro step.

ZeRO stage 0: :class:`lorapro.LoRAProAdamW` / :class:`lorapro.LoRAProSGD` as the client optimizer
    DeepSpeed does the data-parallel all-reduce, accumulation, clipping, LR scheduling and checkpoints; LoRA-Pro
    steps the real A and B (with ``"bf16"``, DeepSpeed's unfused wrapper's fp32 masters of the same shapes).
    ``LoRAProAdamW(..., shard_state=True)`` splits its state by pairs (:mod:`lorapro.distributed`). That
    wrapper calls ``step()`` once with zero gradients while it sets up, which would put every Adam bias correction
    one step late; :func:`initialize` and the Trainer path skip that call (:func:`_is_deepspeed_init_step`).

Checkpoints
    ``engine.save_checkpoint`` / ``load_checkpoint`` (and the Trainer's checkpoints) work at every stage. At ZeRO
    1-3 every rank writes its own optimizer file, holding the state of the pairs it owns (keyed by pair name), the
    state of its partition of the other parameters, and where each of those parameters lies in that partition.
    With the same number of data-parallel ranks ``engine.load_checkpoint`` resumes it. With another number
    DeepSpeed's loader refuses; :func:`load_checkpoint` (and ``lorapro train``'s resume) loads it then, at every
    stage: every rank reads every rank's file, keeps the pairs it now steps and re-slices the other parameters'
    state and DeepSpeed's fp32 masters. DeepSpeed's universal checkpoints do not carry the per-pair state and are
    refused.

What is refused, with an error naming the alternative (:func:`check_deepspeed_config`, and at the first step)
    * a plain ``LoRAProAdamW`` at ZeRO stage >= 1 (use ``DeepSpeedLoRAProAdamW`` with the same arguments);
    * an ``"optimizer"`` section in the DeepSpeed config (DeepSpeed would build its own Adam and LoRA-Pro would
      not run: remove it);
    * ``zero_optimization.elastic_checkpoint`` (it re-slices the optimizer state elementwise across ranks, which
      pair-keyed state does not survive; :func:`load_checkpoint` resumes on another number of ranks instead),
      ``checkpoint.load_universal`` (universal checkpoints drop the per-pair state), NVMe optimizer offload and
      ZeRO-3's partial offload
      (``offload_optimizer.ratio`` < 1, which steps part of the partitions with a second, built-in AdamW);
    * a LoRA param group split over several ZeRO-3 sub-groups (raise ``zero_optimization.sub_group_size``).

Usage::

    from lorapro.integrations.deepspeed import DeepSpeedLoRAProAdamW, initialize, load_checkpoint, save_checkpoint
    opt = DeepSpeedLoRAProAdamW(peft_model, lr=2e-5, mode="full")     # arguments as LoRAProAdamW
    engine, opt, _, _ = initialize(model=peft_model, optimizer=opt, config="ds_zero2.json")
    ... engine.backward(loss); engine.step() ...
    save_checkpoint(engine, "ckpt")                                   # all ranks
    load_checkpoint(engine, "ckpt")                                   # all ranks; any number of them

With the Hugging Face Trainer (``lorapro train ... train.deepspeed=ds.json``),
:func:`lorapro.integrations.transformers.lorapro_optimizer_cls_and_kwargs` picks the class from the config's stage.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from ..distributed import partition_by_cost, pair_state_numel
from ..optim import LoRAProAdamW, LoRAProSGD
from .distributed import lorapro_optimizer_of

__all__ = [
    "DeepSpeedLoRAProAdamW",
    "DeepSpeedLoRAProSGD",
    "check_deepspeed_config",
    "load_deepspeed_config",
    "zero_stage",
    "initialize",
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_world_size",
    "lorapro_optimizer_of",
]

ConfigT = Union[str, Path, Dict[str, Any]]

ZERO_ALTERNATIVE = (
    "At ZeRO stage 1, 2 or 3 use lorapro.integrations.deepspeed.DeepSpeedLoRAProAdamW (or DeepSpeedLoRAProSGD) "
    "as the client optimizer, with the arguments of LoRAProAdamW; at stage 0, LoRAProAdamW itself."
)
ZERO_STATE_KEY = "lorapro_zero"  # marks a state dict written by the ZeRO path


def load_deepspeed_config(config: ConfigT) -> Dict[str, Any]:
    """A DeepSpeed config as a dict, from a dict or a JSON file path."""
    if isinstance(config, dict):
        return config
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config '{config}' does not exist.")
    return json.loads(path.read_text())


def zero_stage(config: ConfigT) -> int:
    """The ZeRO stage of a DeepSpeed config (dict or JSON path); 0 without a ``zero_optimization`` section."""
    stage = (load_deepspeed_config(config).get("zero_optimization") or {}).get("stage", 0)
    try:
        return int(stage)
    except (TypeError, ValueError):
        raise ValueError(f"DeepSpeed config has zero_optimization.stage = {stage!r}; use 0, 1, 2 or 3.") from None


def check_deepspeed_config(config: ConfigT) -> Dict[str, Any]:
    """Raise ``ValueError`` unless LoRA-Pro can run under this DeepSpeed config; return the config as a dict.

    Accepts a dict or a JSON file path. A config without ``zero_optimization`` is stage 0. See the module notes
    for what is refused and why.
    """
    cfg = load_deepspeed_config(config)
    zero = cfg.get("zero_optimization") or {}
    stage = zero_stage(cfg)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"DeepSpeed config has zero_optimization.stage = {stage!r}; use 0, 1, 2 or 3.")
    if "optimizer" in cfg:
        raise ValueError(
            "The DeepSpeed config has an 'optimizer' section, so DeepSpeed would build its own optimizer and "
            "LoRA-Pro would not run. Remove the section; the learning rate, betas, eps and weight decay come from "
            "the LoRA-Pro optimizer (with the Trainer: from its arguments). A 'scheduler' section may stay."
        )
    devices = {key: (zero.get(key) or {}).get("device", "none") for key in ("offload_optimizer", "offload_param")}
    if stage == 0:
        for key, device in devices.items():
            if device not in (None, "none"):
                raise ValueError(
                    f"DeepSpeed config has zero_optimization.{key}.device = {device!r} at stage 0; DeepSpeed offloads "
                    "only at ZeRO stage >= 1. Set the stage to 1, 2 or 3 (with DeepSpeedLoRAProAdamW) or remove the "
                    "offload."
                )
        return cfg
    if zero.get("elastic_checkpoint"):
        raise ValueError(
            "DeepSpeed config has zero_optimization.elastic_checkpoint = true. It re-slices the optimizer state "
            "elementwise when the number of GPUs changes, which LoRA-Pro's per-pair state does not survive. Set it "
            "to false (the default): lorapro.integrations.deepspeed.load_checkpoint (and lorapro train's resume) "
            "loads LoRA-Pro's ZeRO checkpoints on another number of processes."
        )
    if devices["offload_optimizer"] not in (None, "none", "cpu"):
        raise ValueError(
            f"DeepSpeed config has zero_optimization.offload_optimizer.device = {devices['offload_optimizer']!r}: "
            "LoRA-Pro supports optimizer offload to 'cpu' (untested with NVMe swapping, whose swapped state would "
            "not include LoRA-Pro's own). Use \"device\": \"cpu\"."
        )
    ratio = (zero.get("offload_optimizer") or {}).get("ratio", 1.0)
    if devices["offload_optimizer"] == "cpu" and float(ratio) < 1.0:
        raise ValueError(
            f"DeepSpeed config has zero_optimization.offload_optimizer.ratio = {ratio}: partial offload steps part of "
            "the partitions with a built-in AdamW instead of the client optimizer, so LoRA-Pro would not run there. "
            "Remove 'ratio' (offload everything) or the offload."
        )
    if (cfg.get("checkpoint") or {}).get("load_universal"):
        raise ValueError(
            "DeepSpeed config has checkpoint.load_universal = true. A universal checkpoint (ds_to_universal) keeps "
            "DeepSpeed's per-parameter fp32 weights and Adam moments, not LoRA-Pro's per-pair state, which would be "
            "silently reset. Remove it: lorapro.integrations.deepspeed.load_checkpoint (and lorapro train's resume) "
            "loads a LoRA-Pro ZeRO checkpoint on another number of processes directly."
        )
    return cfg


def initialize(*, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: ConfigT, **kwargs: Any):
    """``deepspeed.initialize`` after :func:`check_deepspeed_config`; same return value (engine, optimizer, ...).

    At ZeRO stage >= 1 the optimizer must be a :class:`DeepSpeedLoRAProAdamW` / :class:`DeepSpeedLoRAProSGD`;
    the config gets ``zero_allow_untested_optimizer`` (DeepSpeed's opt-in for client optimizers under ZeRO) and,
    with CPU offload, ``zero_force_ds_cpu_optimizer = false`` (the opt-in for a client optimizer there).
    """
    import deepspeed

    cfg = dict(check_deepspeed_config(config))
    if lorapro_optimizer_of(optimizer) is None:
        raise TypeError("lorapro.integrations.deepspeed.initialize expects a LoRA-Pro optimizer. " + ZERO_ALTERNATIVE)
    stage = zero_stage(cfg)
    if stage >= 1:
        if not isinstance(optimizer, _ZeroStep):
            raise TypeError(f"{type(optimizer).__name__} at ZeRO stage {stage}. " + ZERO_ALTERNATIVE)
        cfg.setdefault("zero_allow_untested_optimizer", True)
        if ((cfg.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device") == "cpu":
            cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    if not isinstance(optimizer, _ZeroStep):  # (_ZeroStep.step checks for it itself)
        _skip_deepspeed_init_step(optimizer)
    return deepspeed.initialize(model=model, optimizer=optimizer, config=cfg, **kwargs)


def _is_deepspeed_init_step(opt: torch.optim.Optimizer, closure: Any) -> bool:
    """Whether this ``step()`` call is the one DeepSpeed makes while it sets up, before any backward.

    DeepSpeed's fp16/bf16 wrapper at ZeRO stage 0 (``FP16_UnfusedOptimizer.initialize_optimizer_states``; ZeRO
    1-3 no longer do this in the releases we test) sets every gradient to zero and calls the client optimizer's ``step()`` once, to
    make Adam create its state. For any Adam that call is not neutral — it counts as step 1, so every later bias
    correction is one step late (the first real update about 25% short; measured on our 2-process test: parameters
    ~15% short of the fp32 run after 4 steps, with ``torch.optim.AdamW`` as with LoRA-Pro), and weight decay is
    applied once. LoRA-Pro creates its state at the first real step, so that call is skipped: a call without a
    closure, before the optimizer has taken any step or loaded any state, with every gradient zero or missing.
    """
    if closure is not None or opt.__dict__.get("_lorapro_stepped"):
        return False
    if any(len(st) for st in opt.state.values()) or any(
        p.grad is not None and bool(p.grad.any()) for g in opt.param_groups for p in g["params"]
    ):
        opt.__dict__["_lorapro_stepped"] = True
        return False
    return True


def skipping_deepspeed_init_step(cls: type) -> Any:
    """``cls(...)`` with :func:`_skip_deepspeed_init_step` applied: what the Trainer builds at ZeRO stage 0 (it calls
    the class of ``optimizer_cls_and_kwargs`` and hands the optimizer to ``deepspeed.initialize`` itself)."""
    import functools

    @functools.wraps(cls, updated=())
    def build(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        opt = cls(*args, **kwargs)
        _skip_deepspeed_init_step(opt)
        return opt

    return build


def _skip_deepspeed_init_step(optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer.step`` skip DeepSpeed's set-up call (:func:`_is_deepspeed_init_step`) — an instance-level
    wrapper around the step it has now (a scheduler's wrapper included), for LoRA-Pro optimizers that are not a
    :class:`DeepSpeedLoRAProAdamW` / :class:`DeepSpeedLoRAProSGD` (those check in their own ``step``)."""
    import types

    inner = optimizer.step

    def step(self: torch.optim.Optimizer, closure: Any = None) -> Any:
        if _is_deepspeed_init_step(self, closure):
            return None
        return inner(closure)

    optimizer.step = types.MethodType(step, optimizer)  # type: ignore[method-assign]


def save_checkpoint(engine: Any, save_dir: Union[str, Path], tag: Optional[str] = None, **kwargs: Any) -> Any:
    """``engine.save_checkpoint`` that first gathers a sharded LoRA-Pro state to rank 0. Call it on every rank.

    At stage 0 DeepSpeed calls ``optimizer.state_dict()`` on every rank and writes rank 0's; without
    ``shard_state`` (and at ZeRO >= 1, where every rank writes its own file) this is ``engine.save_checkpoint``.
    ``engine.load_checkpoint`` needs no help.
    """
    opt = lorapro_optimizer_of(getattr(engine, "optimizer", None))
    if opt is not None:
        opt.consolidate_state_dict(to=0)
    return engine.save_checkpoint(str(save_dir), tag=tag, **kwargs)


_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def _resolve_tag(load_dir: Union[str, Path], tag: Optional[str]) -> Optional[str]:
    if tag is not None:
        return str(tag)
    latest = Path(load_dir) / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def _optim_files(folder: Path) -> List[Path]:
    """The ZeRO optimizer files of a checkpoint folder, by data-parallel rank (model parallelism is not supported)."""
    found: Dict[int, Path] = {}
    for f in folder.iterdir():
        m = _OPTIM_FILE.match(f.name)
        if m is None:
            continue
        if int(m.group(2)) != 0:
            raise ValueError(f"{folder} holds model-parallel ZeRO files ({f.name}); LoRA-Pro supports data "
                             "parallelism only.")
        found[int(m.group(1))] = f
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"{folder} holds ZeRO optimizer files of ranks {sorted(found)}: some are missing.")
    return [found[r] for r in range(len(found))]


def checkpoint_world_size(load_dir: Union[str, Path], tag: Optional[str] = None) -> Optional[int]:
    """The number of data-parallel processes that wrote a DeepSpeed ZeRO (stage >= 1) checkpoint: its number of
    ``zero_pp_rank_*_optim_states.pt`` files. ``None`` for a stage-0 checkpoint or when there is none."""
    tag = _resolve_tag(load_dir, tag)
    folder = Path(load_dir) / tag if tag is not None else None
    if folder is None or not folder.is_dir():
        return None
    return len(_optim_files(folder)) or None


_ZERO3_STATES = ("module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                 "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "skipped_steps",
                 "global_steps", "global_samples", "dp_world_size", "mp_world_size")


@torch.no_grad()
def _load_zero3_model(engine: Any, folder: Path, saved: int, masters: Dict[str, torch.Tensor],
                      load_module_strict: bool = True,
                      load_lr_scheduler_states: bool = True, load_optimizer_states: bool = True,
                      load_module_only: bool = False, custom_load_fn: Any = None) -> Tuple[str, Dict[str, Any]]:
    """ZeRO-3 on another number of ranks: what ``engine.load_checkpoint(..., load_optimizer_states=False)`` loads,
    done here because DeepSpeed reads the model file of this rank's number and copies its saved slice of every
    frozen weight as it is (see :func:`load_checkpoint`). Every weight's slice is cut from the full weight:
    frozen ones from all ranks' ``frozen_param_fragments``, trainable ones (their bf16/fp32 copies) from the fp32
    ``masters`` (which :func:`load_checkpoint` then writes into the optimizer's partitions)."""
    if custom_load_fn is not None:
        raise ValueError("load_checkpoint: custom_load_fn is not supported when a ZeRO-3 checkpoint changes the "
                         "number of processes.")
    files = [folder / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(saved)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{folder} lacks the ZeRO-3 model-states files {missing}.")
    states = [torch.load(f, map_location="cpu", weights_only=False, mmap=True) for f in files]
    ckpt = states[0]
    if ckpt.get("data_sampler") is not None or ckpt.get("random_ltd") is not None:
        raise ValueError("load_checkpoint: a ZeRO-3 checkpoint with curriculum learning / random-LTD state cannot "
                         "change the number of processes; resume with the number that wrote it.")
    opt = engine.optimizer
    opt.checkpoint_event_prologue()  # every parameter partitioned (as DeepSpeed's own load does)
    rank = dist.get_rank(group=opt.dp_process_group)
    names = set()
    for name, p in engine.module.named_parameters():
        names.add(name)
        if p.requires_grad:
            value = masters[name]
        else:
            pieces = [st["frozen_param_fragments"][name] for st in states]
            value = torch.cat([t.flatten() for t in pieces])[:math.prod(_full_shape(p))]
        if hasattr(p, "ds_id"):
            n = p.ds_tensor.numel()
            piece = value.flatten()[rank * n:(rank + 1) * n]
            p.ds_tensor.data.zero_()
            p.ds_tensor.data[:piece.numel()].copy_(piece)
        else:
            p.data.copy_(value.view(p.shape))
    module = ckpt["module"]
    for name, b in engine.module.named_buffers():
        if name in module:
            b.copy_(module[name])
    if load_module_strict:
        unknown = [k for k in module if k not in names and k not in dict(engine.module.named_buffers())]
        if unknown:
            raise ValueError(f"The checkpoint's module has entries this model lacks: {unknown[:5]}")
    opt.checkpoint_event_epilogue()  # persistent parameters gathered again
    if load_module_only:
        return str(files[0]), {}
    if load_lr_scheduler_states and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    engine.global_steps = ckpt["global_steps"]
    engine.global_samples = ckpt.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = ckpt["skipped_steps"]
    engine.loaded_checkpoint_mp_world_size = ckpt["mp_world_size"]
    engine.loaded_checkpoint_dp_world_size = ckpt["dp_world_size"]
    return str(files[0]), {k: v for k, v in ckpt.items() if k not in _ZERO3_STATES}


def load_checkpoint(engine: Any, load_dir: Union[str, Path], tag: Optional[str] = None, **kwargs: Any) -> Any:
    """``engine.load_checkpoint`` that also resumes a LoRA-Pro ZeRO checkpoint on another number of processes.

    Same arguments and return value as ``engine.load_checkpoint``; call it on every rank. With the number of
    processes that wrote the checkpoint (or at stage 0, or with ``load_optimizer_states=False``) it *is*
    ``engine.load_checkpoint``. Otherwise DeepSpeed's own loader refuses ("Automatic adjustment of ZeRO's
    optimizer state partitioning with a new world size is not currently supported"), so the load is done in
    three parts, every one of them exact:

    1. ``engine.load_checkpoint(..., load_optimizer_states=False)``: the model (its bf16/fp32 weights), the LR
       scheduler, the step counters and the client state, which DeepSpeed loads on any number of processes at
       ZeRO-1/2. At ZeRO-3 DeepSpeed cannot (each rank reads the model file of its own rank number, missing when
       the number grew, and copies its saved slice of every frozen weight as it is, of the wrong size when the
       number shrank), so :func:`_load_zero3_model` loads the same things, each weight's new slice cut from the
       full weight;
    2. the fp32 master weights of the trainable parameters, from all ranks' partitions by DeepSpeed's own
       consolidation (``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``) written into
       this rank's partition with ``deepspeed.utils.safe_set_full_fp32_param`` (so bf16 runs resume from the fp32
       masters, not from their bf16 copies);
    3. the optimizer state, from every rank's ``*_optim_states.pt``: :meth:`DeepSpeedLoRAProAdamW.load_zero_shards`
       (LoRA pairs by name, each now kept by the rank that steps it; the other parameters' moments re-sliced
       elementwise).

    Not restored on another number of processes: fp16's dynamic loss scale (it restarts from the config's
    initial scale; bf16 and fp32 have none). Refused there: curriculum-learning / random-LTD state and
    ``custom_load_fn`` at ZeRO-3. Memory: every rank reads all ranks' optimizer files (memory-mapped; LoRA-sized
    state) and, at ZeRO-3, each frozen weight whole, one at a time. DeepSpeed's universal checkpoints
    (``ds_to_universal`` + ``"checkpoint": {"load_universal": true}``) do not carry LoRA-Pro's pair state and are
    refused by :func:`check_deepspeed_config`.
    """
    ours = lorapro_optimizer_of(getattr(engine, "optimizer", None))
    tag = _resolve_tag(load_dir, tag)
    saved = checkpoint_world_size(load_dir, tag)
    world = getattr(engine, "seq_dp_world_size", None) or engine.dp_world_size  # what DeepSpeed compares
    if (saved is None or saved == world or not isinstance(ours, _ZeroStep)
            or not kwargs.get("load_optimizer_states", True) or kwargs.get("load_module_only", False)):
        return engine.load_checkpoint(str(load_dir), tag=tag, **kwargs)
    from deepspeed.utils import safe_set_full_fp32_param
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = Path(load_dir) / tag
    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(load_dir), tag=tag, exclude_frozen_parameters=True,
                                                    lazy_mode=True)  # ZeRO-3: gathered one tensor at a time
    masters = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            if name not in fp32:
                raise ValueError(f"The checkpoint in {folder} has no fp32 weights for trainable parameter '{name}'.")
            masters[name] = fp32[name] if torch.is_tensor(fp32[name]) else fp32[name].contiguous()
    if engine.zero_optimization_partition_weights():
        load_path, client_state = _load_zero3_model(engine, folder, saved, masters, **kwargs)
    else:
        kwargs["load_optimizer_states"] = False
        load_path, client_state = engine.load_checkpoint(str(load_dir), tag=tag, **kwargs)
        if load_path is None:
            return load_path, client_state
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            safe_set_full_fp32_param(p, masters[name])
    shards = []
    for f in _optim_files(folder):
        zsd = torch.load(f, map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
        shards.append(zsd.get("base_optimizer_state", zsd.get("optimizer_state_dict")))
    if any(isinstance(sd, list) for sd in shards):
        raise ValueError(f"{folder} is an elastic ZeRO checkpoint (zero_optimization.elastic_checkpoint), which "
                         "LoRA-Pro does not write; it cannot be loaded here.")
    ours.load_zero_shards(shards)
    return load_path, client_state


# ----------------------------------------------------------------------------------------------------------------
# ZeRO stage 1-3: where each factor's elements lie in DeepSpeed's flat fp32 partitions

# (offset in the flat partition, offset in the flattened full factor, number of elements) of a factor's local slice
_Slice = Tuple[int, int, int]


def _full_shape(p: torch.Tensor) -> Tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 replaces .data by an empty placeholder


def _layout_error(detail: str) -> RuntimeError:
    return RuntimeError(
        f"DeepSpeed's partition layout is not the one LoRA-Pro reads ({detail}). It is read from ZeRO-1/2's "
        "param._hp_mapping and ZeRO-3's grad_position (tested with DeepSpeed 0.19); please report your DeepSpeed "
        "version. Meanwhile ZeRO stage 0 with LoRAProAdamW(..., shard_state=True) works."
    )


def _local_slices(factors: Sequence[torch.Tensor], flat: torch.Tensor, group_index: int
                  ) -> Tuple[List[Optional[_Slice]], Any]:
    """This rank's slice of each factor in ``flat`` (the fp32 partition DeepSpeed passed to ``step``), and the
    process group across which the slices are spread."""
    try:
        return _read_slices(factors, flat, group_index)
    except (AttributeError, KeyError, IndexError, TypeError) as e:  # DeepSpeed internals changed
        raise _layout_error(f"{type(e).__name__}: {e}") from e


def _read_slices(factors: Sequence[torch.Tensor], flat: torch.Tensor, group_index: int
                 ) -> Tuple[List[Optional[_Slice]], Any]:
    p0 = factors[0]
    if hasattr(p0, "ds_id"):  # ZeRO-3: rank k holds elements [k·n, (k + 1)·n) of each parameter, n = partition size
        opt = p0._z3_optimizer
        out: List[Optional[_Slice]] = []
        for p in factors:
            sub, dest, n = opt.grad_position[opt.get_param_id(p)]
            if opt.fp32_partitioned_groups_flat[sub] is not flat:
                raise ValueError(
                    "A param group is split over several ZeRO-3 sub-groups, which DeepSpeed steps one at a time, so "
                    "the (A, B) pairs are not all available in one step (and a checkpoint's partitions cannot be "
                    "matched by group). Raise zero_optimization.sub_group_size above the number of trainable "
                    "parameters of a group (e.g. 1e9, DeepSpeed's default)."
                )
            start = dist.get_rank(group=p.ds_process_group) * n
            numel = max(0, min(n, p.ds_numel - start))
            out.append((dest, start, numel) if numel else None)
        return out, p0.ds_process_group
    if hasattr(p0, "_hp_mapping"):  # ZeRO-1/2, BF16_Optimizer
        out = []
        for p in factors:
            m = p._hp_mapping
            if m is None:
                out.append(None)
                continue
            if m.param_group_index != group_index or m.hp_fragment.untyped_storage().data_ptr() != \
                    flat.untyped_storage().data_ptr():
                raise _layout_error("a factor's fp32 fragment is not in its param group's partition")
            out.append((m.hp_fragment_address.start, m.lp_fragment_address.start, m.hp_fragment_address.numel))
        return out, p0._dp_group
    raise _layout_error("the factors carry neither _hp_mapping nor ds_id")


class _GatheredGroup:
    """Full fp32 copies of one LoRA group's factors and gradients, and which rank steps which pair.

    One buffer ``[A, B of every pair | their gradients]``, pairs ordered by owner rank so each rank's pairs are one
    contiguous range; the views into it are the tensors the LoRA-Pro bucket step updates (and keys its state by).
    """

    def __init__(self, factors: List[torch.Tensor], mode: Optional[str], process_group: Any) -> None:
        self.group = process_group
        self.rank, world = dist.get_rank(group=process_group), dist.get_world_size(group=process_group)
        shapes = [_full_shape(p) for p in factors]
        n_pairs = len(factors) // 2
        costs = [pair_state_numel(mode, shapes[2 * j + 1][0], shapes[2 * j][1], shapes[2 * j][0]) for j in range(n_pairs)]
        self.owners = partition_by_cost(costs, world)
        self.offsets: List[int] = [0] * len(factors)
        total, lo, hi = 0, None, 0
        for j in sorted(range(n_pairs), key=lambda j: (self.owners[j], j)):
            if self.owners[j] == self.rank and lo is None:
                lo = total
            for i in (2 * j, 2 * j + 1):
                self.offsets[i] = total
                total += math.prod(shapes[i])
            if self.owners[j] == self.rank:
                hi = total
        self.own_range = (lo or 0, hi)  # this rank's pairs: buf[lo:hi]
        self.total, self.shapes = total, shapes
        self.buf: Optional[torch.Tensor] = None
        self.views: List[torch.Tensor] = []

    def ensure_buffer(self, device: torch.device) -> None:
        if self.buf is not None and self.buf.device == device:
            return
        self.buf = torch.zeros(2 * self.total, dtype=torch.float32, device=device)
        self.views = []
        for off, shape in zip(self.offsets, self.shapes):
            numel = math.prod(shape)
            v = self.buf[off:off + numel].view(shape)
            v.grad = self.buf[self.total + off:self.total + off + numel].view(shape)
            self.views.append(v)

    def gather(self, flat: torch.Tensor, slices: List[Optional[_Slice]]) -> None:
        """Assemble every factor and gradient from the ranks' slices (one all-reduce)."""
        self.ensure_buffer(flat.device)
        buf, total = self.buf, self.total
        buf.zero_()
        dst, src = [], []
        for off, sl in zip(self.offsets, slices):
            if sl is None:
                continue
            at, full_at, numel = sl
            dst += [buf[off + full_at:off + full_at + numel], buf[total + off + full_at:total + off + full_at + numel]]
            src += [flat.detach()[at:at + numel], flat.grad[at:at + numel]]
        if dst:
            torch._foreach_copy_(dst, src)
        dist.all_reduce(buf, group=self.group)

    def scatter(self, flat: torch.Tensor, slices: List[Optional[_Slice]]) -> None:
        """Every rank's updated pairs to every rank (one all-reduce), then this rank's slices into ``flat``."""
        lo, hi = self.own_range
        params = self.buf[:self.total]
        params[:lo].zero_()
        params[hi:].zero_()
        dist.all_reduce(params, group=self.group)
        dst, src = [], []
        for off, sl in zip(self.offsets, slices):
            if sl is not None:
                at, full_at, numel = sl
                dst.append(flat.detach()[at:at + numel])
                src.append(params[off + full_at:off + full_at + numel])
        if dst:
            torch._foreach_copy_(dst, src)


class _ZeroStep:
    """The ZeRO path of :class:`DeepSpeedLoRAProAdamW` / :class:`DeepSpeedLoRAProSGD` (see the module notes).

    Mixed in before the LoRA-Pro optimizer class, whose bucket steps, plain-parameter steps and state layout it
    reuses unchanged; with intact param groups (no ZeRO, stage 0) it is that optimizer.
    """

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("shard_state"):
            raise ValueError(
                f"{type(self).__name__} splits its state by LoRA pairs across the data-parallel ranks by itself "
                "under ZeRO; drop shard_state=True (it is for LoRAProAdamW under DDP or ZeRO stage 0)."
            )
        super().__init__(params, *args, **kwargs)  # type: ignore[call-arg]
        # The model's factors of each LoRA group, kept before DeepSpeed replaces group["params"] by its partition;
        # "zero_index" names the group inside DeepSpeed (its param groups keep our order).
        self._zero_factors: Dict[int, List[torch.Tensor]] = {}
        self._zero_params: Dict[int, List[torch.Tensor]] = {}  # every group's model parameters, in group order
        for gi, group in enumerate(self.param_groups):  # type: ignore[attr-defined]
            group["zero_index"] = gi
            self._zero_params[gi] = list(group["params"])
            if group["lora"]:
                self._zero_factors[gi] = list(group["params"])
        self._gathered: Dict[int, _GatheredGroup] = {}
        self._pending_pair_state: Dict[str, Dict[str, Dict[str, Any]]] = {}  # loaded, not yet placed
        self._pending_world: Optional[int] = None

    @staticmethod
    def _zero_partitioned(group: Dict[str, Any]) -> bool:
        params = group["params"]
        return len(params) != 2 * len(group["scalings"]) or any(p.dim() != 2 for p in params)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        groups = self.param_groups  # type: ignore[attr-defined]
        if not any(g["lora"] and self._zero_partitioned(g) for g in groups):
            # stage 0 / no DeepSpeed: the factors themselves. Only here is the set-up call looked for: every rank
            # holds the same full gradients, so all ranks agree; a rank's ZeRO partition can hold only exactly-zero
            # gradients at a real first step (the A factors while B = 0), and skipping there would desynchronise.
            if _is_deepspeed_init_step(self, closure):  # type: ignore[arg-type]
                return None  # DeepSpeed's zero-gradient set-up call: not a training step
            return super().step(closure)  # type: ignore[misc]
        if closure is not None:
            raise TypeError(f"{type(self).__name__}.step() does not take a closure.")
        for group in groups:
            if not group["lora"]:
                self._step_plain_group(group)  # type: ignore[attr-defined]  # elementwise: partitions as tensors
                continue
            flats = [p for p in group["params"] if p.numel() > 0]
            if not flats:
                continue  # ZeRO-3 steps one sub-group at a time and empties the others' params meanwhile
            if len(flats) != 1 or flats[0].grad is None:
                raise _layout_error(f"{len(flats)} partitions in a LoRA param group, expected one with a gradient")
            self._zero_lora_step(group, flats[0])
        return None

    def _zero_lora_step(self, group: Dict[str, Any], flat: torch.Tensor) -> None:
        gi = group["zero_index"]
        factors = self._zero_factors[gi]
        slices, process_group = _local_slices(factors, flat, gi)
        gathered = self._gathered.get(gi)
        if gathered is None:
            gathered = self._gathered[gi] = _GatheredGroup(factors, group.get("mode"), process_group)
        gathered.gather(flat, slices)
        self._apply_pending_state(group, gathered)
        views = gathered.views
        pairs = [(j, views[2 * j], views[2 * j + 1], float(s)) for j, s in enumerate(group["scalings"])
                 if gathered.owners[j] == gathered.rank]
        for bucket in self._buckets(pairs):  # type: ignore[attr-defined]
            self._step_lora_bucket(group, bucket)  # type: ignore[attr-defined]
        gathered.scatter(flat, slices)

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def _pair_views(self) -> Dict[torch.Tensor, Tuple[str, str]]:
        """View tensor -> (pair name, "A" / "B") for the pairs this rank steps."""
        out = {}
        for gi, gathered in self._gathered.items():
            names = self._group_by_index(gi)["pair_names"]
            for j, name in enumerate(names):
                if gathered.owners[j] == gathered.rank:
                    out[gathered.views[2 * j]] = (name, "A")
                    out[gathered.views[2 * j + 1]] = (name, "B")
        return out

    def _group_by_index(self, gi: int) -> Dict[str, Any]:
        for g in self.param_groups:  # type: ignore[attr-defined]
            if g.get("zero_index") == gi:
                return g
        raise KeyError(gi)

    def _partition_of(self, gi: int) -> Optional[torch.Tensor]:
        """The flat fp32 partition DeepSpeed keeps for param group ``gi`` on this rank (the tensor our state of a
        non-LoRA group is keyed by); ``None`` when the group is not partitioned (no ZeRO)."""
        params = self._zero_params[gi]
        if not params:
            return None
        p0 = params[0]
        if hasattr(p0, "ds_id"):  # ZeRO-3 empties group["params"] between steps: look the partition up
            opt = p0._z3_optimizer
            subs = {opt.grad_position[opt.get_param_id(p)][0] for p in params}
            if len(subs) != 1:
                raise ValueError(
                    "A param group is split over several ZeRO-3 sub-groups, so its checkpointed partitions cannot be "
                    "matched by group. Raise zero_optimization.sub_group_size above the number of trainable "
                    "parameters of a group (e.g. 1e9, DeepSpeed's default)."
                )
            return opt.fp32_partitioned_groups_flat[subs.pop()]
        if not hasattr(p0, "_hp_mapping"):
            return None
        flats = [p for p in self._group_by_index(gi)["params"] if p.numel() > 0]
        if len(flats) != 1:
            raise _layout_error(f"{len(flats)} partitions in param group {gi}, expected one")
        return flats[0]

    def _plain_fragments(self) -> Dict[str, Dict[str, Any]]:
        """Where each parameter of each non-LoRA group lies in this rank's partition of the group: ``{group index:
        {"numel": partition size, "shapes": [...], "slices": [(offset in partition, offset in the flattened
        parameter, count) or None, ...]}}``. Saved with the state so that another number of ranks can re-slice it."""
        out: Dict[str, Dict[str, Any]] = {}
        for gi, params in self._zero_params.items():
            if gi in self._zero_factors or not params:
                continue
            flat = self._partition_of(gi)
            if flat is None:
                continue
            slices, _ = _local_slices(params, flat, gi)
            out[str(gi)] = {"numel": flat.numel(), "shapes": [list(_full_shape(p)) for p in params],
                            "slices": [list(sl) if sl is not None else None for sl in slices]}
        return out

    def state_dict(self) -> Dict[str, Any]:
        """The optimizer state. Under ZeRO: this rank's partitions' state as usual, plus under ``"lorapro_zero"``
        the state of the LoRA pairs this rank steps (by pair name), the world size, and where each non-LoRA
        parameter lies in this rank's partitions (so :func:`load_checkpoint` can re-slice it for another world
        size)."""
        if not self._gathered and not self._pending_pair_state:
            return super().state_dict()  # type: ignore[misc]
        views = self._pair_views()
        full = self.state  # type: ignore[has-type]
        self.state = defaultdict(dict, {k: v for k, v in full.items() if k not in views})
        try:
            sd = torch.optim.Optimizer.state_dict(self)  # type: ignore[arg-type]
        finally:
            self.state = full
        pairs: Dict[str, Dict[str, Any]] = dict(self._pending_pair_state)
        for v, (name, half) in views.items():
            if full.get(v):
                pairs.setdefault(name, {})[half] = full[v]
        world = (dist.get_world_size(group=next(iter(self._gathered.values())).group) if self._gathered
                 else self._pending_world)
        sd[ZERO_STATE_KEY] = {"pairs": pairs, "world_size": world, "plain": self._plain_fragments()}
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`; under ZeRO, the one this rank saved (same world size; for
        another world size :func:`load_checkpoint` reads every rank's file and calls :meth:`load_zero_shards`)."""
        zero = state_dict.get(ZERO_STATE_KEY)
        if zero is None:
            super().load_state_dict(state_dict)  # type: ignore[misc]
            return
        world = dist.get_world_size() if dist.is_initialized() else 1
        if zero["world_size"] != world:
            raise ValueError(
                f"This LoRA-Pro ZeRO state dict was saved by {zero['world_size']} data-parallel processes and is "
                f"being loaded by {world}: each process saved the state of the LoRA pairs it stepped and of its "
                "partition of the other parameters. To resume a DeepSpeed checkpoint on another number of processes, "
                "load it with lorapro.integrations.deepspeed.load_checkpoint(engine, dir), which reads every "
                "process's file and re-slices the state (lorapro train does this when resuming)."
            )
        rest = {k: v for k, v in state_dict.items() if k != ZERO_STATE_KEY}
        super().load_state_dict(rest)  # type: ignore[misc]
        self._pending_pair_state = {name: dict(halves) for name, halves in zero["pairs"].items()}
        self._pending_world = zero["world_size"]
        for gi, gathered in self._gathered.items():  # already stepping: apply now
            self._apply_pending_state(self._group_by_index(gi), gathered)

    @torch.no_grad()
    def load_zero_shards(self, shards: Sequence[Dict[str, Any]]) -> None:
        """Load the state dicts that *all* ranks of a ZeRO run saved (:meth:`state_dict` of rank 0, 1, ... of any
        number of ranks) into this rank of the current run.

        LoRA pairs: the state of every saved pair is kept by name until the first step, where each rank keeps
        the pairs it now owns (:meth:`_apply_pending_state`). Other parameters: their elementwise state (Adam's
        moments, SGD's momentum) is cut from each saved rank's partition by the recorded slices and written into
        this rank's partition at the parameter's new place; step counts are taken from rank 0. Hyperparameters
        (lr, betas, ...) come from rank 0's param groups. DeepSpeed's fp32 master weights are not here:
        :func:`load_checkpoint` restores them.
        """
        if not shards:
            raise ValueError("load_zero_shards needs the state dict of every saved rank; got none.")
        zeros = [sd.get(ZERO_STATE_KEY) for sd in shards]
        if any(z is None for z in zeros):
            if all(z is None for z in zeros) and not any(sd.get("state") for sd in shards):
                return  # saved before any step: nothing to re-slice
            raise ValueError(
                "These optimizer state dicts were not all written by DeepSpeedLoRAProAdamW / DeepSpeedLoRAProSGD under "
                "ZeRO (no 'lorapro_zero' entry), so they cannot be re-sliced for another number of processes."
            )
        if any(z["world_size"] != len(shards) for z in zeros):
            raise ValueError(
                f"Got {len(shards)} ranks' state dicts, but they say they were saved by "
                f"{sorted({z['world_size'] for z in zeros})} processes: a rank's file is missing or from another run."
            )
        groups = self.param_groups  # type: ignore[attr-defined]
        saved_groups = shards[0]["param_groups"]
        if len(saved_groups) != len(groups):
            raise ValueError(f"The checkpoint has {len(saved_groups)} param groups, this optimizer {len(groups)}.")
        for gi, (group, saved) in enumerate(zip(groups, saved_groups)):
            for key in ("lora", "mode", "pair_names"):
                if group.get(key) != saved.get(key):
                    raise ValueError(
                        f"Param group {gi}: the checkpoint has {key}={saved.get(key)!r}, this optimizer "
                        f"{group.get(key)!r}. Create the optimizer (and the adapter) as the checkpoint was saved with."
                    )
            if any(not math.isclose(float(a), float(b), rel_tol=1e-12)
                   for a, b in zip(saved.get("scalings", []), group.get("scalings", []))):
                raise ValueError(
                    f"Param group {gi}: the LoRA scales (lora_alpha / r) changed since the checkpoint was saved. "
                    "Resume with the LoRA configuration the checkpoint was trained with, or start a fresh optimizer."
                )
            group.update({k: v for k, v in saved.items() if k not in ("params", "zero_index")})
        pairs: Dict[str, Dict[str, Any]] = {}
        for z in zeros:
            pairs.update({name: dict(halves) for name, halves in z["pairs"].items()})
        self._pending_pair_state = pairs
        self._pending_world = dist.get_world_size() if dist.is_initialized() else 1
        for gi, params in self._zero_params.items():
            if gi not in self._zero_factors:
                self._load_plain_group(gi, params, shards, zeros)
        for gi, gathered in self._gathered.items():  # already stepping: apply now
            self._apply_pending_state(self._group_by_index(gi), gathered)

    def _load_plain_group(self, gi: int, params: List[torch.Tensor], shards: Sequence[Dict[str, Any]],
                          zeros: Sequence[Dict[str, Any]]) -> None:
        flat = self._partition_of(gi)
        saved_states = []
        for sd, z in zip(shards, zeros):
            frag = z.get("plain", {}).get(str(gi))
            idx = sd["param_groups"][gi]["params"]
            state = sd["state"].get(idx[0]) if len(idx) == 1 else None
            if state and frag is None:
                raise ValueError(
                    f"Param group {gi}'s state in the checkpoint carries no partition layout (a checkpoint written "
                    "before LoRA-Pro recorded it); resume it with the number of processes that wrote it."
                )
            if state:
                if frag["shapes"] != [list(_full_shape(p)) for p in params]:
                    raise ValueError(f"Param group {gi} of the checkpoint has parameters of shapes {frag['shapes']}, "
                                     "this model others: the checkpoint is of another model.")
                saved_states.append((state, frag))
        if not saved_states or flat is None:
            return
        slices, _ = _local_slices(params, flat, gi)
        new: Dict[str, Any] = {}
        for key, value in saved_states[0][0].items():
            if not (torch.is_tensor(value) and value.dim() == 1 and value.numel() == saved_states[0][1]["numel"]):
                new[key] = value.clone() if torch.is_tensor(value) else value  # a step count: the same on every rank
                continue
            out = torch.zeros(flat.shape, dtype=value.dtype, device=flat.device)
            for state, frag in saved_states:  # copy the overlap of each saved piece with this rank's piece
                src = state[key]
                for sl_new, sl_old in zip(slices, frag["slices"]):
                    if sl_new is None or sl_old is None:
                        continue
                    (at, full_at, numel), (o_at, o_full_at, o_numel) = sl_new, sl_old
                    lo, hi = max(full_at, o_full_at), min(full_at + numel, o_full_at + o_numel)
                    if lo < hi:
                        out[at + lo - full_at:at + hi - full_at] = src[o_at + lo - o_full_at:o_at + hi - o_full_at]
            new[key] = out
        self.state[flat] = new  # type: ignore[has-type]

    def _apply_pending_state(self, group: Dict[str, Any], gathered: _GatheredGroup) -> None:
        if not self._pending_pair_state:
            return
        for j, name in enumerate(group["pair_names"]):
            halves = self._pending_pair_state.pop(name, None)
            if halves is None or gathered.owners[j] != gathered.rank:
                continue
            for k, half in enumerate(("A", "B")):
                v = gathered.views[2 * j + k]
                self.state[v] = {  # type: ignore[has-type]
                    key: (t.detach().to(device=v.device if key != "step" else t.device).clone() if torch.is_tensor(t)
                          else t)
                    for key, t in halves.get(half, {}).items()
                }


class DeepSpeedLoRAProAdamW(_ZeroStep, LoRAProAdamW):
    """:class:`lorapro.LoRAProAdamW` as DeepSpeed's client optimizer at ZeRO stage 1, 2 or 3 (same arguments,
    except ``shard_state``: under ZeRO the pairs are always split across ranks). See the module notes."""


class DeepSpeedLoRAProSGD(_ZeroStep, LoRAProSGD):
    """:class:`lorapro.LoRAProSGD` as DeepSpeed's client optimizer at ZeRO stage 1, 2 or 3 (see the module notes)."""
