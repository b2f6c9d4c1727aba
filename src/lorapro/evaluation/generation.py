"""Model loading for evaluation and batched text generation.

Generation with transformers (``backend="hf"``) is batched with **left padding and an attention mask**: every
prompt in a batch ends at the same position, so the first generated token of each row follows its own last prompt
token, and padded positions are masked out (without the mask a padded batch attends to pad tokens, which is how
one published GSM8K evaluation got 15% instead of 54%). Prompts are never truncated.

Decoding is **greedy unless ``do_sample=True`` is asked for**. The :class:`transformers.GenerationConfig` passed to
``generate`` sets every sampling-related value explicitly: transformers fills values left unset from the
checkpoint's ``generation_config.json``, which for chat models often says ``do_sample: true, temperature: 0.6``.
Only the end-of-sequence ids come from the checkpoint (they define where an answer ends).

Stop sequences end a row as soon as its generated text contains one; the text is cut before the first stop
sequence. Under ``torchrun`` / ``accelerate launch`` (``torch.distributed`` initialised), prompt ``i`` is generated
by rank ``i % world_size`` and the results are gathered on every rank in the original order.
"""

from __future__ import annotations

import os
from typing import Any, List, Optional, Sequence, Tuple

__all__ = [
    "resolve_device",
    "infer_model_task",
    "load_eval_model",
    "explicit_generation_config",
    "shard_indices",
    "merge_shards",
    "dist_info",
    "cut_at_stop",
    "generate",
    "require_vllm",
]


def dist_info() -> Tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` unless ``torch.distributed`` is initialised."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(device: str) -> Any:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(device)


def infer_model_task(name: str, requested: str = "auto", classifier: bool = False) -> str:
    """The ``lorapro.models`` task for ``name``: the requested one, or seq-cls / seq2seq / causal-lm."""
    if requested != "auto":
        return requested
    if classifier:
        return "seq-cls"
    from ..models import BUILTIN_MODELS, PACKAGED_MODELS, resolve_model_path

    key = name.lower()
    if key in BUILTIN_MODELS:
        return BUILTIN_MODELS[key][0]
    if key in PACKAGED_MODELS:
        return PACKAGED_MODELS[key][2][0]
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(resolve_model_path(name))
        return "seq2seq" if getattr(cfg, "is_encoder_decoder", False) else "causal-lm"
    except Exception:  # noqa: BLE001 - let the loader report a missing model properly
        return "causal-lm"


def load_eval_model(
    name: str,
    adapter: Optional[str] = None,
    *,
    task: str = "causal-lm",
    num_labels: Optional[int] = None,
    dtype: str = "float32",
    device: str = "auto",
    merge_adapter: bool = False,
    trust_remote_code: bool = False,
    init_seed: int = 0,
) -> Tuple[Any, Any]:
    """Base model from :func:`lorapro.models.load_model_and_tokenizer`, plus an optional PEFT adapter, in eval mode."""
    import torch

    from ..models import load_model_and_tokenizer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model, tok = load_model_and_tokenizer(
        name,
        task=task,
        num_labels=num_labels,
        dtype=torch_dtype,
        init_seed=init_seed,
        trust_remote_code=trust_remote_code,
    )
    if adapter:
        from pathlib import Path

        if not (Path(adapter).expanduser() / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"model.adapter '{adapter}' is not a PEFT adapter directory (no adapter_config.json). Give the "
                "directory that `save_pretrained` of a PeftModel wrote, or model.adapter=null for the base model."
            )
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(Path(adapter).expanduser()), is_trainable=False)
        if merge_adapter:
            model = model.merge_and_unload()
    model.to(resolve_device(device))
    model.eval()
    return model, tok


def explicit_generation_config(
    tokenizer: Any,
    model: Any,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_return_sequences: int = 1,
) -> Any:
    """A ``GenerationConfig`` with every decoding knob set, so nothing is inherited from the checkpoint.

    Greedy: ``argmax`` at every step (``do_sample=False, num_beams=1``, no penalties). Sampling: temperature,
    top-p and top-k as given, nothing else.
    """
    from transformers import GenerationConfig

    eos: List[int] = []
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        for t in source if isinstance(source, (list, tuple)) else [source]:
            if t is not None and int(t) not in eos:
                eos.append(int(t))
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_length=0,
        do_sample=do_sample,
        num_beams=1,
        num_beam_groups=1,
        temperature=float(temperature) if do_sample else 1.0,
        top_p=float(top_p) if do_sample else 1.0,
        top_k=int(top_k) if do_sample else 50,  # ignored when greedy; 50 is the library default (no warning)
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        length_penalty=1.0,
        no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0,
        diversity_penalty=0.0,
        renormalize_logits=False,
        num_return_sequences=num_return_sequences,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos or None,
        use_cache=True,
    )


def shard_indices(n: int, rank: int, world_size: int) -> List[int]:
    """The prompts rank ``rank`` generates: ``rank, rank + world_size, ...`` (balanced to within one)."""
    return list(range(rank, n, world_size))


def merge_shards(n: int, shards: Sequence[Tuple[Sequence[int], Sequence[Any]]]) -> List[Any]:
    """Put ``[(indices, outputs), ...]`` gathered from all ranks back into prompt order; every index exactly once."""
    out: List[Any] = [None] * n
    seen = [False] * n
    for indices, outputs in shards:
        if len(indices) != len(outputs):
            raise RuntimeError("a rank returned a different number of outputs than prompts.")
        for i, o in zip(indices, outputs):
            if seen[i]:
                raise RuntimeError(f"prompt {i} was generated by two ranks.")
            seen[i] = True
            out[i] = o
    missing = [i for i, s in enumerate(seen) if not s]
    if missing:
        raise RuntimeError(f"no rank generated prompts {missing[:5]}...")
    return out


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest stop sequence."""
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


def _stop_criteria(tokenizer: Any, prompt_len: int, stops: Sequence[str]) -> Any:
    import torch
    from transformers import StoppingCriteria

    window = max(len(s) for s in stops) + 8  # a stop string of L characters spans at most L tokens

    class StopOnStrings(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
            new = input_ids[:, prompt_len:]
            tail = new[:, -window:] if new.shape[1] > window else new
            texts = tokenizer.batch_decode(tail, skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stops) for t in texts], dtype=torch.bool, device=input_ids.device)

    return StopOnStrings()


def require_vllm() -> Any:
    """Import vLLM or explain how to proceed without it."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise RuntimeError(
            "generation.backend=vllm was asked for, but vLLM is not installed in this environment. Install it "
            "(pip install vllm, needs a CUDA GPU) or use generation.backend=hf."
        ) from None
    return vllm


def _generate_hf(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    settings: Any,
    stops: Sequence[str],
    add_special_tokens: bool,
    desc: str,
    show_progress: bool,
) -> List[List[str]]:
    import torch

    is_enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    device = next(model.parameters()).device
    gen_cfg = explicit_generation_config(
        tokenizer,
        model,
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        num_return_sequences=settings.num_samples,
    )
    # Longest prompts first: less padding per batch, and an out-of-memory error shows up in the first batch.
    lengths = [len(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    results: List[Optional[List[str]]] = [None] * len(prompts)
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc=desc, unit="prompt", dynamic_ncols=True)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "right" if is_enc_dec else "left"
    try:
        with torch.inference_mode():
            for start in range(0, len(order), settings.batch_size):
                idx = order[start : start + settings.batch_size]
                enc = tokenizer(
                    [prompts[i] for i in idx],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=add_special_tokens,
                ).to(device)
                prompt_len = 1 if is_enc_dec else enc["input_ids"].shape[1]  # decoder starts with one start token
                criteria = []
                if stops:
                    from transformers import StoppingCriteriaList

                    criteria = StoppingCriteriaList([_stop_criteria(tokenizer, prompt_len, stops)])
                out = model.generate(
                    input_ids=enc["input_ids"],
                    attention_mask=enc["attention_mask"],
                    generation_config=gen_cfg,
                    stopping_criteria=criteria or None,
                )
                texts = tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
                n = settings.num_samples
                for j, i in enumerate(idx):
                    results[i] = [cut_at_stop(t, stops) for t in texts[j * n : (j + 1) * n]]
                if bar is not None:
                    bar.update(len(idx))
    finally:
        tokenizer.padding_side = old_side
        if bar is not None:
            bar.close()
    return [r if r is not None else [] for r in results]


def _generate_vllm(model_name: str, adapter: Optional[str], prompts: Sequence[str], settings: Any, stops: Sequence[str], dtype: str) -> List[List[str]]:
    vllm = require_vllm()
    from ..models import resolve_model_path

    path = resolve_model_path(model_name)
    llm = vllm.LLM(model=path, dtype=dtype, enable_lora=adapter is not None, seed=settings.seed)
    params = vllm.SamplingParams(
        n=settings.num_samples,
        temperature=settings.temperature if settings.do_sample else 0.0,
        top_p=settings.top_p if settings.do_sample else 1.0,
        top_k=settings.top_k if (settings.do_sample and settings.top_k > 0) else -1,
        max_tokens=settings.max_new_tokens,
        stop=list(stops) or None,
        seed=settings.seed,
    )
    lora = None
    if adapter:
        from vllm.lora.request import LoRARequest

        lora = LoRARequest("adapter", 1, adapter)
    outs = llm.generate(list(prompts), params, lora_request=lora)
    return [[cut_at_stop(o.text, stops) for o in out.outputs] for out in outs]


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    settings: Any,
    stops: Sequence[str] = (),
    *,
    add_special_tokens: bool = True,
    desc: str = "generating",
    vllm_model: Optional[Tuple[str, Optional[str], str]] = None,
) -> List[List[str]]:
    """``settings.num_samples`` completions for every prompt, in prompt order, on every rank.

    ``settings`` is a :class:`lorapro.evaluation.config.GenerationConfigSection` (or anything with its fields).
    ``vllm_model`` = ``(model name, adapter dir, dtype)`` when ``settings.backend == "vllm"``.
    """
    stops = [s for s in stops if s]
    if settings.backend == "vllm":
        if vllm_model is None:
            raise ValueError("backend=vllm needs vllm_model=(name, adapter, dtype).")
        return _generate_vllm(vllm_model[0], vllm_model[1], prompts, settings, stops, vllm_model[2])

    import torch

    rank, world = dist_info()
    if settings.do_sample:
        torch.manual_seed(settings.seed + rank)
    mine = shard_indices(len(prompts), rank, world)
    local = _generate_hf(
        model,
        tokenizer,
        [prompts[i] for i in mine],
        settings,
        stops,
        add_special_tokens,
        desc if world == 1 else f"{desc} (rank {rank}/{world})",
        show_progress=settings.progress and rank == 0,
    )
    if world == 1:
        return local
    import torch.distributed as dist

    gathered: List[Any] = [None] * world
    dist.all_gather_object(gathered, (mine, local))
    return merge_shards(len(prompts), gathered)


