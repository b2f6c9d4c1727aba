"""``lorapro train``: build the model, the adapter and the optimizer from a :class:`TrainConfig`, then let
``transformers.Trainer`` run the loop.

The Trainer is used as is — LoRA-Pro enters through ``optimizer_cls_and_kwargs`` (see
:mod:`lorapro.integrations.transformers`), LoRA+ through ``optimizers=``, the user-facing output through two
callbacks (:mod:`lorapro.finetune.reporting`). Gradient accumulation, clipping, warm-up + cosine, bf16,
checkpoints (adapter + optimizer + scheduler + RNG state) and resuming are the Trainer's own; checkpoints are
written aside and renamed when complete (:mod:`lorapro.finetune.checkpoints`).

Output directory layout::

    output_dir/
      config.yaml            the resolved config of the run
      train_log.jsonl        one JSON object per log step (see reporting.JsonlLogger)
      loss.png               loss curve, written at the end
      adapter/               PEFT adapter: adapter_config.json + adapter_model.safetensors (+ tokenizer)
      model/                 instead of adapter/ for method=full
      initial_adapter/       PiSSA / LoRA-GA only: the adapter at initialisation, used to convert the final one
      checkpoints/checkpoint-N/   every train.save_steps steps (Trainer format + lorapro_config.yaml, resumable)
      checkpoints/.incomplete/    a checkpoint being written (removed if the save fails)
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch

from lorapro.config import ConfigError, to_dict

from .checkpoints import (
    CONFIG_NAME,
    checkpoint_problem,
    config_differences,
    latest_checkpoint,
    move_aside,
    saved_config_path,
)
from .config import RESUMABLE_KEYS, TrainConfig
from .data import PadCollator, build_datasets, build_test_dataset
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
    """The checkpoint directory to resume from (``None`` when not resuming); ``'latest'`` is looked up.

    ``latest`` skips incomplete or damaged checkpoints (with a warning); a named checkpoint that is damaged is an
    error. Either way the checkpoint's config must match this run's except for :data:`RESUMABLE_KEYS`.
    """
    r = cfg.train.resume_from_checkpoint
    if not r:
        return None
    if r == "latest":
        ckdir = Path(cfg.output_dir) / "checkpoints"
        last, skipped = latest_checkpoint(ckdir, warn=lambda msg: _say(f"warning: {msg}"))
        if last is None:
            what = "holds no complete checkpoint (" + "; ".join(skipped) + ")" if skipped else \
                "holds no checkpoint-N directory"
            raise ConfigError(
                f"train.resume_from_checkpoint=latest but {ckdir} {what}; set train.save_steps in the run you want "
                "to resume, or give a checkpoint path."
            )
        path = last
    else:
        path = Path(r)
        problem = checkpoint_problem(path) if path.is_dir() else "it is not a directory"
        if problem:
            raise ConfigError(
                f"train.resume_from_checkpoint: cannot resume from '{r}': {problem}. Give another checkpoint, or "
                "train.resume_from_checkpoint=latest for the newest complete one."
            )
    _check_resumable_config(cfg, path)
    return str(path)


def _check_resumable_config(cfg: TrainConfig, checkpoint: Path) -> None:
    """Refuse to continue a checkpoint written with another config (other than :data:`RESUMABLE_KEYS`)."""
    import yaml

    from lorapro.config import from_dict

    source = saved_config_path(checkpoint)
    if source is None:
        _say(f"warning: {checkpoint} carries no config; cannot check that it was written by this run's config.")
        return
    try:
        saved = yaml.safe_load(source.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} (the config of checkpoint {checkpoint}) is not valid YAML: {e}") from None
    try:
        saved = to_dict(from_dict(TrainConfig, saved))  # fill in defaults of keys the file does not spell out
    except ConfigError:
        pass  # written by another lorapro version: compare the keys as they are
    diffs = config_differences(saved, to_dict(cfg), RESUMABLE_KEYS)
    if diffs:
        raise ConfigError(
            f"train.resume_from_checkpoint: {checkpoint} was written by a run with another config ({source}); "
            f"resuming would mix two runs. Differences (checkpoint -> now): {'; '.join(diffs)}. Use the checkpoint's "
            f"values (e.g. lorapro train {source} train.resume_from_checkpoint={checkpoint}), or start a new run "
            f"(another output_dir, or overwrite=true). Keys that may change on resume: {', '.join(RESUMABLE_KEYS)}."
        )


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


def _check_tools(cfg: TrainConfig) -> None:
    """Optional packages the config asks for are installed (checked before anything is loaded or written)."""
    import importlib.util

    t = cfg.train
    if t.deepspeed:
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                "train.deepspeed is set but DeepSpeed is not installed: pip install 'lorapro[deepspeed]' "
                "(or pip install deepspeed), or remove train.deepspeed."
            )
        if not Path(t.deepspeed).is_file():
            raise ConfigError(f"train.deepspeed: '{t.deepspeed}' is not a file; give the path of a DeepSpeed JSON config.")
    needs = {"tensorboard": (("tensorboard", "tensorboardX"), "pip install tensorboard"),
             "wandb": (("wandb",), "pip install wandb (then wandb login)")}
    if t.report_to in needs:
        modules, install = needs[t.report_to]
        if not any(importlib.util.find_spec(m) is not None for m in modules):
            raise ConfigError(
                f"train.report_to={t.report_to} but {modules[0]} is not installed: {install}, or set "
                "train.report_to=none (the JSONL log and loss.png are always written)."
            )


def _report_callbacks(cfg: TrainConfig, out: Path) -> List[Any]:
    """TensorBoard writes to ``output_dir/tensorboard`` (from the main process only); wandb is added by the Trainer
    itself through ``report_to``."""
    if cfg.train.report_to != "tensorboard" or not _is_main_process():
        return []
    from transformers.integrations import TensorBoardCallback

    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from tensorboardX import SummaryWriter
    return [TensorBoardCallback(SummaryWriter(log_dir=str(out / "tensorboard")))]


def build_model(cfg: TrainConfig, method: Method) -> Tuple[Any, Any]:
    """The base model and tokenizer (``lorapro.models``), before any adapter."""
    from lorapro.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(
        cfg.model.name, task=cfg.model.task, num_labels=cfg.model.num_labels, dtype=_DTYPES[cfg.model.dtype]
    )
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model, tok


@contextlib.contextmanager
def peft_quietly() -> Iterator[None]:
    """Around PEFT calls that wrap a model: PEFT itself reads the model's ``is_gradient_checkpointing``, which
    transformers 5 deprecated (a FutureWarning on every call that is neither ours nor actionable by the user)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _no_embedding_lookup(model: Any) -> None:
    """Make every ``save_pretrained`` of this PEFT model skip the embedding matrices.

    With PEFT's default (``save_embedding_layers="auto"``) each save asks the hub for the base model's
    ``config.json`` to see whether the vocabulary was resized — a network look-up (and a warning when offline)
    for names such as ``smollm2-135m-instruct`` that are no hub repository. We never resize the vocabulary, so
    the answer is always "no"; say so up front. The Trainer calls ``model.save_pretrained`` itself, hence the
    bound default rather than an argument at our own call sites.
    """
    import functools

    model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)


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
        save_only_model=t.save_only_model,
        eval_strategy="steps" if (has_eval and t.eval_steps > 0) else "no",
        eval_steps=t.eval_steps if t.eval_steps > 0 else None,
        seed=cfg.seed,
        report_to="wandb" if t.report_to == "wandb" else "none",
        run_name=out.name,
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


def run_training(
    cfg: TrainConfig, *, extra_callbacks: Sequence[Any] = (), progress: bool = True, plot: bool = True
) -> RunResult:
    """Run one fine-tuning job described by ``cfg`` and return where everything went (plus the trained model)."""
    import transformers
    from transformers import PrinterCallback

    from .checkpoints import CheckpointTrainer

    t_start = time.perf_counter()
    method = get_method(cfg.method)
    _check_tools(cfg)
    resume = resolve_resume(cfg)
    out = _check_output_dir(cfg, resuming=resume is not None)
    transformers.logging.set_verbosity_warning()
    transformers.set_seed(cfg.seed)

    # Everything that can fail on user input (model name, data path, fields) happens before output_dir is touched.
    model, tok = build_model(cfg, method)
    train_ds, eval_ds, data_summary = build_datasets(cfg.data, cfg.model.task, tok)
    test_ds = build_test_dataset(cfg.data, cfg.model.task, tok)
    if test_ds is not None:
        data_summary += f"; {len(test_ds)} test examples (scored once at the end)"
    if cfg.train.alignment_steps > 0 and eval_ds is None:
        raise ConfigError(
            "train.alignment_steps measures LoRA layers on an eval batch: it needs data.eval (or data.eval_size); "
            "set train.alignment_steps=0 otherwise."
        )
    collator = PadCollator(tok.pad_token_id)
    lora_config = _lora_config(cfg, method) if method.peft else None
    if cfg.train.fsdp and method.init in ("pissa", "lora-ga"):
        raise ConfigError(f"train.fsdp=true does not support method {cfg.method} (its adapter conversion at the end "
                          "needs the unsharded model); use DDP for it.")
    args = _training_arguments(cfg, out, eval_ds is not None)

    import yaml

    config_text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    with args.main_process_first(desc="output_dir"):  # under torchrun the others wait until rank 0 has set it up
        if _is_main_process() and cfg.overwrite and out.is_dir() and any(out.iterdir()) and not (
            resume is not None and Path(resume).resolve().is_relative_to(out.resolve())
        ):
            # A fresh run must not share its checkpoints/ with the old one (resume_from_checkpoint=latest would
            # pick those), and nothing a user made is deleted: the old contents move aside in one rename.
            _say(f"overwrite=true: moved the previous contents of {out} to {move_aside(out)} (delete it when not "
                 "needed)")
        out.mkdir(parents=True, exist_ok=True)
        if _is_main_process():
            (out / "config.yaml").write_text(config_text)
    _say(data_summary)

    initial_dir: Optional[Path] = None
    if method.peft:
        import peft

        if method.init == "lora-ga":
            _lora_ga_preprocess(model, lora_config, train_ds, collator, cfg)
        with peft_quietly():
            model = peft.get_peft_model(model, lora_config)
        _no_embedding_lookup(model)
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
    callbacks.extend(_report_callbacks(cfg, out))
    callbacks.extend(extra_callbacks)
    if method.optimizer == "lorapro" and cfg.optim.shard_state:
        from lorapro.integrations.distributed import ConsolidateStateCallback

        callbacks.append(ConsolidateStateCallback())  # complete optimizer state in every checkpoint
    if cfg.train.alignment_steps > 0:
        from .metrics import AlignmentLogger, alignment_supported

        why_not = alignment_supported(model)
        if why_not:
            _say(f"train.alignment_steps: not measured for method {method.name} ({why_not})")
        else:
            probe = collator([eval_ds[i] for i in range(min(16, len(eval_ds)))])
            callbacks.append(AlignmentLogger(model, probe, cfg.train.alignment_steps, log_path))
    if cfg.model.task == "seq-cls":
        from .metrics import classification_metrics

        trainer_kwargs["compute_metrics"] = classification_metrics
    trainer = CheckpointTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator,
        callbacks=callbacks,
        checkpoint_files={CONFIG_NAME: config_text},
        **trainer_kwargs,
    )
    trainer.remove_callback(PrinterCallback)
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        for cb in callbacks:
            if isinstance(cb, ProgressBar):
                cb.close()
    from . import metrics as run_metrics

    eval_loss = None
    scores: dict = {}
    for name, ds in (("eval", eval_ds), ("test", test_ds)):
        if ds is None or not len(ds):
            continue
        m = run_metrics.evaluation_metrics(trainer.evaluate(eval_dataset=ds, metric_key_prefix=name), name)
        scores[name] = m
        if name == "eval":
            eval_loss = m["loss"]
        _say(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))

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
    if main:
        run_metrics.write_metrics(out / run_metrics.METRICS_FILE, {
            "method": method.name, "seed": cfg.seed, "lr": cfg.optim.lr, "steps": trainer.state.global_step,
            "wall_s": round(wall, 2), "peak_rss_mib": round(run_metrics.peak_rss_mib(), 1),
            "optimizer_state_mib": round(run_metrics.optimizer_state_bytes(
                getattr(trainer.optimizer, "optimizer", trainer.optimizer)) / 2**20, 3),
            "trainable_params": n_train,
            "final_train_loss": run_metrics.final_train_loss(log_path),
            **scores,
        })
    what = "adapter" if method.peft else "model"
    load = (f"PeftModel.from_pretrained(base, '{saved}')" if method.peft
            else f"AutoModel*.from_pretrained('{saved}')")
    _say(f"{what} saved to {saved}  (load with {load}; log {log_path}" + (f", plot {plot_path})" if plot_path else ")"))
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    return RunResult(out, saved, log_path, plot_path, losses, eval_loss, wall, model, tok, train_ds, eval_ds, optimizer)
