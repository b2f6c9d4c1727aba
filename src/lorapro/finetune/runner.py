"""``lorapro train``: build the model, the adapter and the optimizer from a :class:`TrainConfig`, then let
``transformers.Trainer`` run the loop.

The Trainer is used as is — LoRA-Pro enters through ``optimizer_cls_and_kwargs`` (see
:mod:`lorapro.integrations.transformers`), LoRA+ through ``optimizers=``, the user-facing output through two
callbacks (:mod:`lorapro.finetune.reporting`). Gradient accumulation, clipping, warm-up + cosine, bf16,
checkpoints (adapter + optimizer + scheduler + RNG state) and resuming are the Trainer's own.

Output directory layout::

    output_dir/
      config.yaml            the resolved config of the run
      train_log.jsonl        one JSON object per log step (see reporting.JsonlLogger)
      loss.png               loss curve, written at the end
      adapter/               PEFT adapter: adapter_config.json + adapter_model.safetensors (+ tokenizer)
      model/                 instead of adapter/ for method=full
      initial_adapter/       PiSSA / LoRA-GA only: the adapter at initialisation, used to convert the final one
      checkpoints/checkpoint-N/   every train.save_steps steps (Trainer format, resumable)
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch

from lorapro.config import ConfigError, to_dict

from .config import TrainConfig
from .data import PadCollator, build_datasets
from .methods import Method, get_method

__all__ = ["RunResult", "run_training", "build_model", "resolve_resume"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TASK_TYPES = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}


@dataclass
class RunResult:
    output_dir: Path
    saved_dir: Path  # adapter/ (or model/ for method=full)
    log_path: Path
    plot_path: Optional[Path]
    train_losses: List[Tuple[int, float]]
    eval_loss: Optional[float]
    wall_s: float
    model: Any = field(repr=False, default=None)
    tokenizer: Any = field(repr=False, default=None)
    train_dataset: Any = field(repr=False, default=None)
    eval_dataset: Any = field(repr=False, default=None)
    optimizer: Any = field(repr=False, default=None)  # the torch optimizer the Trainer stepped (unwrapped)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _say(msg: str) -> None:
    if _is_main_process():
        print(msg, flush=True)


def resolve_resume(cfg: TrainConfig) -> Optional[str]:
    """The checkpoint directory to resume from (``None`` when not resuming); ``'latest'`` is looked up."""
    r = cfg.train.resume_from_checkpoint
    if not r:
        return None
    if r == "latest":
        from transformers.trainer_utils import get_last_checkpoint

        ckdir = Path(cfg.output_dir) / "checkpoints"
        last = get_last_checkpoint(str(ckdir)) if ckdir.is_dir() else None
        if last is None:
            raise ConfigError(
                f"train.resume_from_checkpoint=latest but {ckdir} holds no checkpoint-N directory; "
                "set train.save_steps in the run you want to resume, or give a checkpoint path."
            )
        return last
    if not (Path(r) / "trainer_state.json").is_file():
        raise ConfigError(f"train.resume_from_checkpoint: '{r}' is not a Trainer checkpoint (no trainer_state.json).")
    return r


def _check_output_dir(cfg: TrainConfig, resuming: bool) -> Path:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir '{out}' exists and is not a directory.")
    # Under torchrun only rank 0 judges: it writes config.yaml into out/ while the other ranks may still be here.
    if _is_main_process() and out.is_dir() and any(out.iterdir()) and not (cfg.overwrite or resuming):
        raise ConfigError(
            f"output_dir '{out}' is not empty. Choose another output_dir, pass overwrite=true to write into it, or "
            "train.resume_from_checkpoint=latest to continue the run in it."
        )
    return out


def build_model(cfg: TrainConfig, method: Method) -> Tuple[Any, Any]:
    """The base model and tokenizer (``lorapro.models``), before any adapter."""
    from lorapro.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(
        cfg.model.name, task=cfg.model.task, num_labels=cfg.model.num_labels, dtype=_DTYPES[cfg.model.dtype]
    )
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model, tok


def _lora_config(cfg: TrainConfig, method: Method) -> Any:
    import peft

    targets: Any = list(cfg.lora.target_modules)
    if targets == ["all-linear"]:
        targets = "all-linear"
    kwargs = dict(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        modules_to_save=cfg.lora.modules_to_save,
        task_type=_TASK_TYPES[cfg.model.task],
    )
    kwargs.update(method.lora_kwargs)
    if method.init == "pissa":
        kwargs["init_lora_weights"] = cfg.lora.pissa_init
    elif method.init == "lora-ga":
        if not hasattr(peft, "LoraGAConfig"):
            raise ConfigError(
                f"method=lora-ga needs a PEFT release that provides LoraGAConfig; the installed peft {peft.__version__} "
                "does not. Upgrade PEFT (pip install -U peft) or choose another method."
            )
        kwargs["init_lora_weights"] = "lora_ga"
        kwargs["lora_ga_config"] = peft.LoraGAConfig()
    return peft.LoraConfig(**kwargs)


def _lora_ga_preprocess(model: Any, lora_config: Any, train_ds: Any, collator: Any, cfg: TrainConfig) -> None:
    """LoRA-GA: estimate each target layer's full gradient on the first ``lora.lora_ga_batches`` micro-batches."""
    from peft import preprocess_loraga

    loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.train.micro_batch_size, shuffle=False,
                                         collate_fn=collator)

    def train_step() -> None:
        for i, batch in enumerate(loader):
            if i >= cfg.lora.lora_ga_batches:
                break
            batch = {k: v.to(model.device) for k, v in batch.items()}
            model(**batch).loss.backward()

    preprocess_loraga(model, lora_config, train_step)


def _training_arguments(cfg: TrainConfig, out: Path, has_eval: bool) -> Any:
    import dataclasses

    import transformers
    from transformers import TrainingArguments

    world = int(os.environ.get("WORLD_SIZE", "1"))
    t, o = cfg.train, cfg.optim
    per_step = t.micro_batch_size * world
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) is not a multiple of micro_batch_size x processes "
            f"({t.micro_batch_size} x {world})."
        )
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    kw: dict = dict(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.global_batch_size // per_step,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=o.lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.betas[0],
        adam_beta2=o.betas[1],
        adam_epsilon=o.eps,
        max_grad_norm=o.max_grad_norm,
        lr_scheduler_type=o.scheduler,
        optim="adamw_torch",
        bf16=t.bf16,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps > 0 else "no",
        save_steps=max(t.save_steps, 1),
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if (has_eval and t.eval_steps > 0) else "no",
        eval_steps=t.eval_steps if t.eval_steps > 0 else None,
        seed=cfg.seed,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=t.dataloader_workers,
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        deepspeed=t.deepspeed,
        # without a GPU, accelerate runs the processes of torchrun as DDP on CPU (gloo) only when told to use the
        # CPU; otherwise every process would train its own copy on its own micro-batches
        use_cpu=world > 1 and not torch.cuda.is_available(),
        log_level="warning",
    )
    if t.fsdp:
        kw.update(_fsdp_arguments(world))
    mps = getattr(torch.backends, "mps", None)
    if t.bf16 and not torch.cuda.is_available() and not (mps is not None and mps.is_available()):
        kw["use_cpu"] = True  # the Trainer only allows bf16 autocast on CPU when told it runs on the CPU
    if cfg.model.gradient_checkpointing:
        kw["gradient_checkpointing"] = True
        kw["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    # transformers 5 folds warmup_ratio into warmup_steps (a float < 1 is a ratio); 4.x has warmup_ratio.
    if "warmup_ratio" in names:
        kw["warmup_ratio"] = o.warmup_ratio
    else:
        kw["warmup_steps"] = o.warmup_ratio
    kw["include_num_input_tokens_seen"] = "non_padding" if int(transformers.__version__.split(".")[0]) >= 5 else True
    if "eval_strategy" not in names:  # transformers < 4.41
        kw["evaluation_strategy"] = kw.pop("eval_strategy")
    return TrainingArguments(**kw)


def _fsdp_arguments(world: int) -> dict:
    """TrainingArguments for ``train.fsdp``: accelerate's FSDP2 plugin, ``fully_shard`` on each block the model
    names in ``_no_split_modules`` (decoder layers), then on the root. Checkpoints are sharded DCP directories
    (``torch.distributed.checkpoint``: every rank writes its shards, resume on the same world size); the Trainer
    then writes no final adapter, which :func:`_save_sharded_adapter` does."""
    if world < 2:
        raise ConfigError(
            "train.fsdp=true shards the model across processes, but this is one process. Launch with torchrun "
            "--nproc_per_node=N (or accelerate launch), or drop train.fsdp."
        )
    accel = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, ...
    if not (accel.is_available() if accel is not None else torch.cuda.is_available()):
        # accelerate turns FSDP on for accelerator backends only; on CPU the run would silently be DDP
        raise ConfigError(
            "train.fsdp=true needs GPUs: accelerate (which the Trainer uses) enables FSDP only on accelerators and "
            "would run plain DDP on CPU. On CPU drop train.fsdp (DDP, optionally optim.shard_state=true), or call "
            "torch.distributed.fsdp.fully_shard yourself and step LoRAProAdamW in your own loop (lorapro.fsdp)."
        )
    import transformers

    # transformers 5 takes fsdp=True (its strings are deprecated); 4.x takes the sharding strategy as a string
    return dict(fsdp=True if int(transformers.__version__.split(".")[0]) >= 5 else "full_shard", fsdp_config={
        "fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": True,
        "state_dict_type": "SHARDED_STATE_DICT", "cpu_ram_efficient_loading": False,
    })


def _save_sharded_adapter(model: Any, saved: Path, main: bool) -> None:
    """``train.fsdp``: gather the trainable parameters (DTensors; a collective, every rank calls it) and write the
    adapter on rank 0 in the usual PEFT format. (With FSDP's sharded checkpoints the Trainer saves no adapter, and
    its gathered variant, FULL_STATE_DICT, failed in PEFT's save_pretrained on the DTensor model in our CPU trial.)"""
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            state[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
    if main:
        model.save_pretrained(str(saved), state_dict=state)


def _accuracy(pred: Any) -> dict:
    """Classification accuracy for the Trainer's evaluation (``eval_accuracy`` in the log)."""
    import numpy as np

    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == pred.label_ids).mean())}


def run_training(
    cfg: TrainConfig, *, extra_callbacks: Sequence[Any] = (), progress: bool = True, plot: bool = True
) -> RunResult:
    """Run one fine-tuning job described by ``cfg`` and return where everything went (plus the trained model)."""
    import transformers
    from transformers import PrinterCallback, Trainer

    t_start = time.perf_counter()
    method = get_method(cfg.method)
    resume = resolve_resume(cfg)
    out = _check_output_dir(cfg, resuming=resume is not None)
    transformers.logging.set_verbosity_warning()
    # PEFT warns on every save that a builtin:/packaged model name has no config.json to check the vocabulary
    # against; we never resize embeddings, so the warning carries no information here.
    warnings.filterwarnings("ignore", message="Could not find a config file in")
    transformers.set_seed(cfg.seed)

    # Everything that can fail on user input (model name, data path, fields) happens before output_dir is touched.
    model, tok = build_model(cfg, method)
    train_ds, eval_ds, data_summary = build_datasets(cfg.data, cfg.model.task, tok)
    collator = PadCollator(tok.pad_token_id)
    lora_config = _lora_config(cfg, method) if method.peft else None
    if cfg.train.fsdp and method.init in ("pissa", "lora-ga"):
        raise ConfigError(f"train.fsdp=true does not support method {cfg.method} (its adapter conversion at the end "
                          "needs the unsharded model); use DDP for it.")
    args = _training_arguments(cfg, out, eval_ds is not None)

    out.mkdir(parents=True, exist_ok=True)
    if _is_main_process():
        import yaml

        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    _say(data_summary)

    initial_dir: Optional[Path] = None
    if method.peft:
        import peft

        if method.init == "lora-ga":
            _lora_ga_preprocess(model, lora_config, train_ds, collator, cfg)
        model = peft.get_peft_model(model, lora_config)
        if method.init in ("pissa", "lora-ga"):
            # Save the adapter as initialised so the final one can be converted into a plain LoRA adapter for the
            # *original* base weights (PiSSA / LoRA-GA subtract B A from W0 at init).
            initial_dir = out / "initial_adapter"
            if _is_main_process() and not (initial_dir / "adapter_config.json").is_file():
                cfg_init = model.peft_config["default"].init_lora_weights
                model.peft_config["default"].init_lora_weights = True
                model.save_pretrained(str(initial_dir))
                model.peft_config["default"].init_lora_weights = cfg_init
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    _say(f"method {method.name}: {method.description}; trainable parameters {n_train:,} / {n_all:,}")

    trainer_kwargs: dict = {}
    if method.optimizer == "lorapro":
        from lorapro.integrations.transformers import lorapro_optimizer_cls_and_kwargs

        trainer_kwargs["optimizer_cls_and_kwargs"] = lorapro_optimizer_cls_and_kwargs(
            model, args, x_solution=cfg.optim.x_solution, **method.optimizer_kwargs,
            shard_state=cfg.optim.shard_state and args.world_size > 1,
        )
    elif method.optimizer == "loraplus":
        from peft.optimizers import create_loraplus_optimizer

        opt = create_loraplus_optimizer(
            model,
            optimizer_cls=torch.optim.AdamW,
            lr=cfg.optim.lr,
            loraplus_lr_ratio=cfg.lora.loraplus_lr_ratio,
            weight_decay=cfg.optim.weight_decay,
            betas=tuple(cfg.optim.betas),
            eps=cfg.optim.eps,
        )
        trainer_kwargs["optimizers"] = (opt, None)

    from .reporting import JsonlLogger, ProgressBar, plot_losses, read_log

    log_path = out / "train_log.jsonl"
    resume_step = None
    if resume is not None:
        import json

        resume_step = int(json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"])
    callbacks: List[Any] = [JsonlLogger(log_path, resume_step=resume_step)]
    if progress:
        callbacks.append(ProgressBar(desc=method.name))
    callbacks.extend(extra_callbacks)
    if method.optimizer == "lorapro" and cfg.optim.shard_state:
        from lorapro.integrations.distributed import ConsolidateStateCallback

        callbacks.append(ConsolidateStateCallback())  # complete optimizer state in every checkpoint
    if cfg.model.task == "seq-cls":
        trainer_kwargs["compute_metrics"] = _accuracy
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator,
        callbacks=callbacks,
        **trainer_kwargs,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train(resume_from_checkpoint=resume)
    eval_loss = None
    if eval_ds is not None and len(eval_ds):
        metrics = trainer.evaluate()
        eval_loss = float(metrics["eval_loss"])
        _say("eval: " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in metrics.items()
                                  if k in ("eval_loss", "eval_accuracy")))

    saved = out / ("adapter" if method.peft else "model")
    trainer.save_model(str(saved))
    main = trainer.is_world_process_zero()
    if cfg.train.fsdp:
        _save_sharded_adapter(trainer.model, saved, main)
    if main:
        if initial_dir is not None:
            model.save_pretrained(str(saved), path_initial_model_for_weight_conversion=str(initial_dir))
        tok.save_pretrained(str(saved))
    records = read_log(log_path) if log_path.exists() else []
    losses = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("kind") == "eval"]
    plot_path = None
    if main and plot and losses:
        plot_path = plot_losses({method.name: losses}, out / "loss.png",
                                title=f"{cfg.model.name} — {method.name}", eval_curves={method.name: evals})
    wall = time.perf_counter() - t_start
    if main:
        import json

        with log_path.open("a") as f:
            f.write(json.dumps({"kind": "end", "step": trainer.state.global_step, "wall_s": round(wall, 2),
                                "eval_loss": eval_loss, "saved": str(saved)}) + "\n")
    what = "adapter" if method.peft else "model"
    load = (f"PeftModel.from_pretrained(base, '{saved}')" if method.peft
            else f"AutoModel*.from_pretrained('{saved}')")
    _say(f"{what} saved to {saved}  (load with {load}; log {log_path}" + (f", plot {plot_path})" if plot_path else ")"))
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    return RunResult(out, saved, log_path, plot_path, losses, eval_loss, wall, model, tok, train_ds, eval_ds, optimizer)
