"""The typed config of ``lorapro train`` (one YAML file + ``key=value`` overrides; ``lorapro train --help``).

Every key is documented here once; ``--help`` prints these texts. ``lorapro.config`` does the loading, type
conversion and the "unknown key -> closest valid key" error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal, Optional

from lorapro.config import ConfigError, field

from .methods import METHODS

__all__ = ["ModelConfig", "LoraSection", "OptimConfig", "TrainSection", "DataConfig", "TrainConfig", "RESUMABLE_KEYS"]

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    name: str = field(
        "builtin:tiny-llama",
        help="model to fine-tune: a hub name (meta-llama/Llama-2-7b-hf), a local directory, or one that needs no "
        "download: smollm2-135m-instruct, all-minilm-l6-v2, builtin:tiny-llama / builtin:tiny-bert / builtin:tiny-t5",
    )
    task: Literal["causal-lm", "seq-cls", "seq2seq"] = field(
        "causal-lm", help="causal-lm (instruction tuning), seq-cls (classification head), seq2seq (T5, text-to-text)"
    )
    num_labels: Optional[int] = field(None, help="number of classes (task seq-cls)")
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        "float32",
        help="dtype the base weights are loaded in. LoRA factors are kept in float32 by PEFT either way; with "
        "method=full prefer float32 + train.bf16 (pure bf16 AdamW loses small updates)",
    )
    gradient_checkpointing: bool = field(False, help="recompute activations in backward to save memory")


@dataclass
class LoraSection:
    r: int = field(8, help="LoRA rank r")
    alpha: float = field(16.0, help="LoRA alpha; PEFT sets each layer's scale s = alpha/r (alpha/sqrt(r) with rsLoRA)")
    dropout: float = field(0.0, help="dropout on the LoRA branch input")
    target_modules: List[str] = field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        help="module names to adapt (Llama: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj), or "
        "[all-linear] for every linear layer except the output head",
    )
    modules_to_save: Optional[List[str]] = field(
        None, help="extra modules trained in full and saved with the adapter (seq-cls heads are added by PEFT)"
    )
    loraplus_lr_ratio: float = field(16.0, help="method=loraplus: lr of B = ratio x lr of A (LoRA+ paper default 16)")
    pissa_init: str = field(
        "pissa", help="method=pissa: PEFT init_lora_weights value, 'pissa' (exact SVD) or 'pissa_niter_K' (fast)"
    )
    lora_ga_batches: int = field(
        8, help="method=lora-ga: number of micro-batches whose gradients initialise the adapters"
    )


@dataclass
class OptimConfig:
    lr: float = field(2e-5, help="peak learning rate")
    weight_decay: float = field(0.0, help="decoupled weight decay")
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999], help="Adam betas (beta1, beta2)")
    eps: float = field(1e-8, help="Adam epsilon")
    x_solution: Literal["sylvester", "zero", "symmetric"] = field(
        "sylvester", help="LoRA-Pro methods: choice of the free r x r matrix X (does not change the equivalent gradient)"
    )
    max_grad_norm: float = field(
        1.0,
        help="clip the global norm of the raw trainable gradients (for LoRA: g_A, g_B) to this value before the "
        "optimizer step, i.e. before LoRA-Pro adjusts them; 0 disables clipping",
    )
    shard_state: bool = field(
        False,
        help="LoRA-Pro methods under torchrun / accelerate launch: keep each LoRA pair's optimizer state on one "
        "process only (per-process state about 1/N); checkpoints stay complete; no effect on one process",
    )
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = field(
        "cosine", help="learning-rate schedule after warm-up"
    )
    warmup_ratio: float = field(0.03, help="fraction of the optimizer steps spent in linear warm-up from 0")


@dataclass
class TrainSection:
    epochs: float = field(1.0, help="passes over the training set (ignored when max_steps > 0)")
    max_steps: int = field(-1, help="stop after this many optimizer steps (-1: use epochs)")
    global_batch_size: int = field(32, help="examples per optimizer step, over all processes")
    micro_batch_size: int = field(
        4, help="examples per forward/backward on one process; gradient accumulation = global / (micro x processes)"
    )
    bf16: bool = field(False, help="bf16 autocast (mixed precision); on CPU it is slower, use it on GPUs")
    logging_steps: int = field(1, help="log loss / lr / throughput every this many optimizer steps")
    save_steps: int = field(0, help="write a checkpoint (adapter + optimizer + scheduler + RNG) every N steps; 0: none")
    save_total_limit: Optional[int] = field(2, help="keep at most this many checkpoints (null: all)")
    eval_steps: int = field(0, help="evaluate on the eval set every N steps (0: only at the end, if there is one)")
    alignment_steps: int = field(
        0,
        help="every N optimizer steps (and at step 0 and the end), measure on one eval batch how well LoRA's and "
        "LoRA-Pro's equivalent gradients align with the full fine-tuning gradient, per layer type "
        "(lorapro.diagnostics; 'alignment' records in train_log.jsonl); 0: never. Needs data.eval",
    )
    resume_from_checkpoint: Optional[str] = field(
        None, help="continue a run: a checkpoint directory, or 'latest' for the newest one in output_dir/checkpoints"
    )
    dataloader_workers: int = field(0, help="DataLoader worker processes")
    deepspeed: Optional[str] = field(
        None, help="path of a DeepSpeed JSON config (passed to the HF Trainer; ZeRO stage 0-3, no 'optimizer' section)"
    )
    save_only_model: bool = field(
        False,
        help="checkpoints hold the trained weights only, no optimizer state: much smaller (a full-mode LoRA-Pro "
        "checkpoint of a 7B model carries ~50 GB of m x n moments) but not resumable",
    )
    report_to: Literal["none", "tensorboard", "wandb"] = field(
        "none", help="also send the logs to TensorBoard (output_dir/tensorboard) or Weights & Biases, if installed"
    )
    fsdp: bool = field(
        False, help="under torchrun / accelerate launch: shard the model with FSDP2 (fully_shard on every decoder "
        "layer, via accelerate's FSDP2 plugin); LoRA-Pro state is sharded with it, checkpoints use DCP"
    )


@dataclass
class DataConfig:
    train: str = field(
        "", help="training data: a local .json / .jsonl / .tsv file or a Hugging Face hub dataset name (required)"
    )
    train_split: str = field("train", help="split of a hub dataset used for training")
    hub_config: Optional[str] = field(None, help="config name of a hub dataset (e.g. sst2 for glue)")
    eval: Optional[str] = field(
        None, help="separate eval data (file or hub name); when empty the eval set is the eval_size records after train"
    )
    eval_split: str = field("validation", help="split of a hub dataset used for eval")
    test: Optional[str] = field(
        None,
        help="held-out test data (file or hub name), scored once at the end of training into metrics.json ('test'); "
        "never used during training or for model selection (lorapro sweep selects on the eval set)",
    )
    test_split: str = field("test", help="split of a hub dataset used as the test set")
    test_size: int = field(0, help="keep the first N test records (0: all)")
    tsv_columns: Optional[List[str]] = field(None, help="column names of a .tsv file that has no header row")
    template: Literal["alpaca", "plain", "chat", "format"] = field(
        "alpaca",
        help="prompt template: alpaca (the paper's no-input Alpaca template), plain (prompt field as is), chat (the "
        "tokenizer's chat template), format (data.prompt_format)",
    )
    prompt_format: Optional[str] = field(None, help="template=format: a Python format string over record fields")
    prompt_field: str = field("instruction", help="record field holding the instruction / question")
    input_field: Optional[str] = field(None, help="optional record field with extra input (Alpaca with-input form)")
    response_field: str = field("output", help="record field holding the answer (loss is computed on it only)")
    separator: str = field(" ", help="string put between prompt and response (the authors' scripts use one space)")
    text_fields: List[str] = field(default_factory=lambda: ["sentence"], help="seq-cls: one or two text fields")
    label_field: str = field("label", help="seq-cls / seq2seq: record field holding the label")
    label_names: Optional[List[str]] = field(
        None, help="label strings in class order (e.g. [entailment, not_entailment]) when labels are not integers"
    )
    label_words: Optional[List[str]] = field(
        None, help="seq2seq classification: target word of each class (e.g. [negative, positive])"
    )
    filter: Literal["none", "metamathqa-gsm", "codefeedback-codeblock", "wizardlm-no-refusal"] = field(
        "none",
        help="recipe filter: metamathqa-gsm (type contains GSM), codefeedback-codeblock (answers with a ``` block, cut "
        "after the first block), wizardlm-no-refusal (drop answers containing 'sorry' or 'as an ai')",
    )
    max_tokens: int = field(
        512, help="causal-lm: drop records whose prompt + separator + response is this many tokens or more"
    )
    max_length: int = field(128, help="seq-cls / seq2seq: truncate inputs to this many tokens")
    train_size: Optional[int] = field(None, help="keep the first N records that pass the filters (null: all)")
    eval_size: int = field(0, help="eval set: the next N filtered records after train_size (or the first N of data.eval)")
    cache: bool = field(
        True,
        help="keep the tokenized examples in $LORAPRO_CACHE/tokenized (default ~/.cache/lorapro) and reuse them when "
        "the data content, tokenizer, template, fields, filter and limits are the same (every torchrun process on a "
        "machine reads the one copy); false: tokenize every time",
    )


# Keys that may differ between a checkpoint's run and the run resuming it: where the run writes, how often it logs,
# evaluates and saves, and how a global batch is split over processes (same examples, same step). Any other
# difference (lr, max_steps, data, method, ...) would silently mix two runs, so resuming refuses it.
RESUMABLE_KEYS = (
    "output_dir",
    "overwrite",
    "model.gradient_checkpointing",
    "train.resume_from_checkpoint",
    "train.micro_batch_size",
    "train.logging_steps",
    "train.save_steps",
    "train.save_total_limit",
    "train.eval_steps",
    "train.dataloader_workers",
    "train.save_only_model",
    "train.report_to",
    "data.eval",
    "data.eval_split",
    "data.eval_size",
    "data.cache",
    "data.test",  # scored once after training (lorapro sweep's data.test, data.test_split, data.test_size)
    "data.test_split",
    "data.test_size",
)


# Names from transformers.TrainingArguments / PEFT / LLaMA-Factory that users type out of habit -> our key. They
# are suggested, not accepted: one spelling per setting keeps configs and their diffs readable.
HF_KEY_NAMES = {
    "learning_rate": "optim.lr",
    "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.micro_batch_size",
    "per_device_eval_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size (accumulation = global_batch_size / (micro_batch_size x "
    "processes))",
    "lr_scheduler_type": "optim.scheduler",
    "adam_beta1": "optim.betas (a list: [beta1, beta2])",
    "adam_beta2": "optim.betas (a list: [beta1, beta2])",
    "adam_epsilon": "optim.eps",
    "dataloader_num_workers": "train.dataloader_workers",
    "model_name_or_path": "model.name",
    "torch_dtype": "model.dtype",
    "lora_r": "lora.r",
    "lora_rank": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target": "lora.target_modules",
    "dataset": "data.train",
    "cutoff_len": "data.max_tokens (longer records are dropped, not truncated)",
    "max_samples": "data.train_size",
    "overwrite_output_dir": "overwrite",
}


@dataclass
class TrainConfig:
    method: str = field(
        "lora-pro",
        help="fine-tuning method: " + ", ".join(METHODS),
    )
    seed: int = field(0, help="random seed (data order, dropout, new heads); the paper reports seeds 0, 1, 2")
    output_dir: str = field("runs/lorapro", help="where the adapter, logs, plot and checkpoints go")
    overwrite: bool = field(
        False,
        help="start afresh in a non-empty output_dir: its previous contents are moved to "
        "OUTPUT_DIR.replaced-<timestamp> (never deleted); without it a non-empty output_dir is an error",
    )
    model: ModelConfig = field(default_factory=ModelConfig, help="base model")
    lora: LoraSection = field(default_factory=LoraSection, help="LoRA adapter (ignored by method=full)")
    optim: OptimConfig = field(default_factory=OptimConfig, help="optimizer and schedule")
    train: TrainSection = field(default_factory=TrainSection, help="training loop")
    data: DataConfig = field(default_factory=DataConfig, help="data source, recipe filter and prompt format")

    KEY_ALIASES = HF_KEY_NAMES  # not a field (no annotation): read by lorapro.config's unknown-key message

    def validate(self) -> None:
        if self.method not in METHODS:
            import difflib

            close = difflib.get_close_matches(self.method, list(METHODS), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"Unknown method '{self.method}'.{hint} Methods: {', '.join(METHODS)}.")
        if not self.data.train:
            raise ConfigError("data.train is required: a .json / .jsonl / .tsv file or a hub dataset name.")
        t = self.train
        if t.global_batch_size < 1 or t.micro_batch_size < 1:
            raise ConfigError("train.global_batch_size and train.micro_batch_size must be >= 1.")
        if t.global_batch_size % t.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size ({t.global_batch_size}) must be a multiple of train.micro_batch_size "
                f"({t.micro_batch_size})."
            )
        if self.model.task == "seq-cls" and not self.model.num_labels:
            raise ConfigError("model.task seq-cls needs model.num_labels.")
        if len(self.optim.betas) != 2:
            raise ConfigError(f"optim.betas must have two values, got {self.optim.betas}.")
        if not 0.0 <= self.optim.warmup_ratio < 1.0:
            raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {self.optim.warmup_ratio}.")
        if self.lora.r < 1:
            raise ConfigError(f"lora.r must be >= 1, got {self.lora.r}.")
