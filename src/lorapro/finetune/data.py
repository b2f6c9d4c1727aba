"""Data for ``lorapro train``: read records, apply a recipe's filter, format prompts, tokenize, batch.

Accepted sources (``data.train`` / ``data.eval``):

* a local ``.json`` file: a list of records (``[{"query": ..., "response": ...}, ...]``), a mapping of id ->
  record (``{"0": {...}, "1": {...}}``), or an object whose ``"data"`` / ``"train"`` key holds such a list;
* a local ``.jsonl`` file: one JSON record per line;
* a local ``.tsv`` file: tab-separated, first row = column names (GLUE style). Files without a header row
  (CoLA) name their columns with ``data.tsv_columns``. Quotes are not special (GLUE convention);
* anything else is a Hugging Face hub dataset name (``meta-math/MetaMathQA``, ``glue`` with ``data.hub_config:
  sst2``), read with ``datasets.load_dataset(name, hub_config, split=...)`` (needs ``pip install datasets``).

Three kinds of examples, chosen by the model's task:

* ``causal-lm`` (instruction tuning): ``prompt = template(record)``, ``text = prompt + separator + response +
  EOS``; loss only on the response tokens (the prompt's tokens are labelled -100). Records whose
  ``prompt + separator + response`` is ``max_tokens`` tokens or longer are dropped, as in the authors' scripts.
* ``seq2seq`` (T5 on GLUE, text-to-text): source = template(record) truncated to ``max_length``; target = the
  label's word (``label_words``) or ``response_field``.
* ``seq-cls``: the ``text_fields`` (one or a pair) truncated to ``max_length``, integer label.

Selection follows the paper's recipes: records are read in file order, the recipe filter and the length filter
are applied, then the first ``train_size`` kept records are the training set and the next ``eval_size`` the eval
set (unless ``data.eval`` names a separate source).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from ..prompts import alpaca_prompt
from ..jsonl import iter_jsonl

__all__ = [
    "DataError",
    "TEMPLATES",
    "FILTERS",
    "read_records",
    "build_test_dataset",
    "filter_metamathqa_gsm",
    "filter_codefeedback_codeblock",
    "filter_wizardlm_no_refusal",
    "format_prompt",
    "build_datasets",
    "spec_from_config",
    "encode_record",
    "select_examples",
    "select_examples_cached",
    "TokenizedDataset",
    "PadCollator",
]


class DataError(ValueError):
    """The data source or its fields are wrong; the message says what to change."""


# ---------------------------------------------------------------------------------------------------------------
# prompt templates

# The Alpaca strings live in lorapro.prompts, shared with `lorapro eval`.

# name -> description (formatting is in format_prompt)
TEMPLATES = {
    "alpaca": "the Alpaca template: the no-input form (the paper's), the with-input form when input_field is non-empty",
    "plain": "the prompt field as is",
    "chat": "the tokenizer's chat template with one user turn (needs a tokenizer that has one)",
    "format": "data.prompt_format, a Python format string over the record's fields, e.g. 'Q: {question}\\nA:'",
}


def format_prompt(
    record: Mapping[str, Any],
    *,
    template: str,
    prompt_field: str,
    input_field: Optional[str] = None,
    prompt_format: Optional[str] = None,
    tokenizer: Any = None,
) -> str:
    """The prompt string of ``record`` under ``template`` (see :data:`TEMPLATES`)."""
    if template == "format":
        if not prompt_format:
            raise DataError("data.template is 'format' but data.prompt_format is empty; give e.g. 'Q: {question}\\nA:'.")
        try:
            return prompt_format.format(**record)
        except KeyError as e:
            raise DataError(
                f"data.prompt_format uses field {e} which the records do not have; fields: {sorted(record)}."
            ) from None
    instruction = _get(record, prompt_field, "data.prompt_field")
    if template == "plain":
        return str(instruction)
    if template == "alpaca":
        return alpaca_prompt(str(instruction), record.get(input_field) if input_field else None)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError("data.template 'chat' needs a tokenizer with a chat template; use 'alpaca' for this model.")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": str(instruction)}], tokenize=False, add_generation_prompt=True
        )
    raise DataError(f"Unknown data.template '{template}'. Choose one of: {', '.join(TEMPLATES)}.")


def _get(record: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in record:
        raise DataError(f"Records have no field '{key}' (set by {what}); their fields are: {sorted(record)}.")
    return record[key]


# ---------------------------------------------------------------------------------------------------------------
# the paper's recipe filters: record -> record (possibly edited) or None (dropped)


def filter_metamathqa_gsm(record: Mapping[str, Any], response_field: str) -> Optional[Mapping[str, Any]]:
    """MetaMathQA recipe: keep the records whose ``type`` contains "GSM" (GSM_AnsAug, GSM_Rephrased, GSM_SV,
    GSM_FOBAR); the MATH_* records are dropped."""
    return record if "GSM" in str(_get(record, "type", "the metamathqa-gsm filter")) else None


def filter_codefeedback_codeblock(record: Mapping[str, Any], response_field: str) -> Optional[Mapping[str, Any]]:
    """CodeFeedback recipe: keep answers that contain a ``` fence and cut each after its first code block.

    As in the authors' script: ``"```".join(answer.split("```")[:2]) + "```"`` — the text before the first fence,
    the first block's body and a closing fence (an unterminated block is closed).
    """
    answer = str(_get(record, response_field, "data.response_field"))
    if "```" not in answer:
        return None
    out = dict(record)
    out[response_field] = "```".join(answer.split("```")[:2]) + "```"
    return out


def filter_wizardlm_no_refusal(record: Mapping[str, Any], response_field: str) -> Optional[Mapping[str, Any]]:
    """WizardLM recipe: drop answers containing "sorry" or "as an ai" (case-insensitive)."""
    answer = str(_get(record, response_field, "data.response_field")).lower()
    return None if ("sorry" in answer or "as an ai" in answer) else record


FILTERS: Dict[str, Optional[Callable[[Mapping[str, Any], str], Optional[Mapping[str, Any]]]]] = {
    "none": None,
    "metamathqa-gsm": filter_metamathqa_gsm,
    "codefeedback-codeblock": filter_codefeedback_codeblock,
    "wizardlm-no-refusal": filter_wizardlm_no_refusal,
}


# ---------------------------------------------------------------------------------------------------------------
# reading


def _looks_local(source: str) -> bool:
    p = Path(source).expanduser()
    return (
        p.exists()
        or source.startswith((".", "/", "~"))
        or p.suffix.lower() in (".json", ".jsonl", ".tsv", ".csv")
    )


def read_records(
    source: str,
    *,
    split: str = "train",
    hub_config: Optional[str] = None,
    tsv_columns: Optional[Sequence[str]] = None,
) -> Iterator[Dict[str, Any]]:
    """Yield the records of ``source`` in order (a local file, or a hub dataset; see the module docstring)."""
    if _looks_local(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(
                f"Data file '{source}' does not exist. Give a .json / .jsonl / .tsv file or a hub dataset name."
            )
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            return iter(_read_json(path))
        if suffix == ".tsv":
            return _read_tsv(path, tsv_columns)
        raise DataError(f"Data file '{source}': unsupported extension '{suffix}'; use .json, .jsonl or .tsv.")
    return _read_hub(source, split, hub_config)


def _read_jsonl(path: Path) -> Iterator[Dict[str, Any]]:
    try:
        for _, rec in iter_jsonl(path, "Data"):
            yield rec
    except ValueError as e:
        raise DataError(str(e)) from None


def _read_json(path: Path) -> List[Dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}). For one record per line, name the file .jsonl.") from None
    if isinstance(data, dict):
        for key in ("data", "train"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            if data and all(isinstance(v, dict) for v in data.values()):
                data = list(data.values())  # {"0": {...}, "1": {...}}
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a list of JSON objects (or a mapping id -> object).")
    return data


def _read_tsv(path: Path, columns: Optional[Sequence[str]]) -> Iterator[Dict[str, Any]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = list(columns) if columns else next(reader, None)
        if header is None:
            return
        for lineno, row in enumerate(reader, 1 if columns else 2):
            if not row:
                continue
            if len(row) < len(header):
                raise DataError(
                    f"{path}:{lineno}: {len(row)} columns but the header has {len(header)} ({header}). "
                    "If the file has no header row, set data.tsv_columns."
                )
            yield dict(zip(header, row))


def _read_hub(name: str, split: str, config: Optional[str]) -> Iterator[Dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"'{name}' is not a local file, so it is read as a Hugging Face hub dataset, which needs the 'datasets' "
            "package: pip install datasets. (For a local file, check the path and the extension.)"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, unknown name, unknown split: say which source failed
        raise DataError(f"Could not load hub dataset '{name}' (config={config!r}, split={split!r}): {e}") from e
    return iter(ds)


# ---------------------------------------------------------------------------------------------------------------
# tokenization


@dataclass
class DataSpec:
    """The subset of the ``data`` config that turns records into examples (see ``finetune.config.DataConfig``)."""

    task: str
    template: str = "alpaca"
    prompt_field: str = "instruction"
    input_field: Optional[str] = None
    response_field: str = "output"
    prompt_format: Optional[str] = None
    separator: str = " "
    text_fields: Sequence[str] = ("sentence",)
    label_field: str = "label"
    label_names: Optional[Sequence[str]] = None
    label_words: Optional[Sequence[str]] = None
    filter: str = "none"
    max_tokens: int = 512
    max_length: int = 128


def _label_index(value: Any, label_names: Optional[Sequence[str]], where: str) -> int:
    if label_names:
        s = str(value)
        if s in label_names:
            return list(label_names).index(s)
    try:
        f = float(value)
        if f.is_integer():
            return int(f)
    except (TypeError, ValueError):
        pass
    raise DataError(f"{where}: label {value!r} is neither an integer nor one of data.label_names={label_names}.")


def encode_record(record: Mapping[str, Any], spec: DataSpec, tokenizer: Any) -> Optional[Dict[str, Any]]:
    """One record -> model inputs, or None when the record is dropped (filter or length)."""
    filt = FILTERS.get(spec.filter, "missing")
    if filt == "missing":
        raise DataError(f"Unknown data.filter '{spec.filter}'. Choose one of: {', '.join(FILTERS)}.")
    if filt is not None:
        record = filt(record, spec.response_field)
        if record is None:
            return None

    def prompt_of(record: Mapping[str, Any]) -> str:
        return format_prompt(
            record,
            template=spec.template,
            prompt_field=spec.prompt_field,
            input_field=spec.input_field,
            prompt_format=spec.prompt_format,
            tokenizer=tokenizer,
        )

    if spec.task == "causal-lm":
        prompt = prompt_of(record)
        response = str(_get(record, spec.response_field, "data.response_field"))
        # A rendered chat template already holds its special tokens (BOS included); adding them again would train
        # on two BOS while evaluation (and transformers' apply_chat_template(tokenize=True)) has one.
        special = spec.template != "chat"
        ids = tokenizer(prompt + spec.separator + response, add_special_tokens=special)["input_ids"]
        if len(ids) >= spec.max_tokens:  # the authors' rule: drop, never truncate, prompt+answer >= max_tokens
            return None
        n_prompt = len(tokenizer(prompt, add_special_tokens=special)["input_ids"])
        ids = list(ids) + [tokenizer.eos_token_id]
        labels = [-100] * n_prompt + ids[n_prompt:]
        if all(l == -100 for l in labels):
            return None
        return {"input_ids": ids, "labels": labels}

    if spec.task == "seq2seq":
        source = prompt_of(record)
        if spec.label_words:
            idx = _label_index(_get(record, spec.label_field, "data.label_field"), spec.label_names, "seq2seq")
            if not 0 <= idx < len(spec.label_words):
                raise DataError(f"label {idx} has no entry in data.label_words={list(spec.label_words)}.")
            target = spec.label_words[idx]
        else:
            target = str(_get(record, spec.response_field, "data.response_field"))
        ids = tokenizer(source, truncation=True, max_length=spec.max_length)["input_ids"]
        labels = tokenizer(text_target=target, truncation=True, max_length=spec.max_length)["input_ids"]
        return {"input_ids": list(ids), "labels": list(labels)}

    if spec.task == "seq-cls":
        texts = [str(_get(record, f, "data.text_fields")) for f in spec.text_fields]
        if len(texts) not in (1, 2):
            raise DataError(f"data.text_fields must name one or two fields, got {list(spec.text_fields)}.")
        enc = tokenizer(*texts, truncation=True, max_length=spec.max_length)
        label = _label_index(_get(record, spec.label_field, "data.label_field"), spec.label_names, "seq-cls")
        return {"input_ids": list(enc["input_ids"]), "labels": label}

    raise DataError(f"Unknown task '{spec.task}'.")


class TokenizedDataset(torch.utils.data.Dataset):
    """A list of already tokenized examples (``input_ids`` + ``labels``)."""

    def __init__(self, examples: List[Dict[str, Any]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return self.examples[i]

    def num_tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.examples)


def select_examples(
    records: Iterable[Mapping[str, Any]], spec: DataSpec, tokenizer: Any, counts: Sequence[Optional[int]]
) -> Tuple[List[List[Dict[str, Any]]], int]:
    """Encode records in order, skipping dropped ones, and cut the kept ones into consecutive chunks of ``counts``
    (the last may be ``None``: all the rest). Stops reading once the chunks are full. Returns (chunks, records read)."""
    if any(c is None for c in counts[:-1]):
        raise ValueError("only the last count may be None")
    total = None if (not counts or counts[-1] is None) else sum(counts)  # type: ignore[arg-type]
    kept: List[Dict[str, Any]] = []
    seen = 0
    for record in records:
        if total is not None and len(kept) >= total:
            break
        seen += 1
        ex = encode_record(record, spec, tokenizer)
        if ex is not None:
            kept.append(ex)
    chunks, start = [], 0
    for c in counts:
        end = len(kept) if c is None else start + c
        chunks.append(kept[start:end])
        start = end
    return chunks, seen


def spec_from_config(data_cfg: Any, task: str) -> DataSpec:
    """The :class:`DataSpec` of the ``data`` section of a ``TrainConfig`` for ``task``."""
    return DataSpec(
        task=task,
        template=data_cfg.template,
        prompt_field=data_cfg.prompt_field,
        input_field=data_cfg.input_field,
        response_field=data_cfg.response_field,
        prompt_format=data_cfg.prompt_format,
        separator=data_cfg.separator,
        text_fields=tuple(data_cfg.text_fields),
        label_field=data_cfg.label_field,
        label_names=tuple(data_cfg.label_names) if data_cfg.label_names else None,
        label_words=tuple(data_cfg.label_words) if data_cfg.label_words else None,
        filter=data_cfg.filter,
        max_tokens=data_cfg.max_tokens,
        max_length=data_cfg.max_length,
    )


def build_datasets(data_cfg: Any, task: str, tokenizer: Any) -> Tuple[TokenizedDataset, Optional[TokenizedDataset], str]:
    """``(train, eval or None, summary line)`` from the ``data`` section of a ``TrainConfig``."""
    spec = spec_from_config(data_cfg, task)
    separate_eval = bool(data_cfg.eval)
    counts: List[Optional[int]] = [data_cfg.train_size]
    if not separate_eval and data_cfg.eval_size:
        if data_cfg.train_size is None:
            raise DataError("data.eval_size takes records after the first data.train_size ones; set data.train_size.")
        counts.append(data_cfg.eval_size)
    chunks, seen, cache_note = select_examples_cached(data_cfg, data_cfg.train, data_cfg.train_split, spec,
                                                      tokenizer, counts)
    train = TokenizedDataset(chunks[0])
    if len(train) == 0:
        raise DataError(
            f"No training examples left from '{data_cfg.train}' ({seen} records read) after data.filter="
            f"'{data_cfg.filter}' and the length limit; check the fields and data.max_tokens."
        )
    eval_ds: Optional[TokenizedDataset] = None
    if separate_eval:
        (eval_chunk,), _, _ = select_examples_cached(data_cfg, data_cfg.eval, data_cfg.eval_split, spec, tokenizer,
                                                     [data_cfg.eval_size or None])
        eval_ds = TokenizedDataset(eval_chunk)
    elif len(chunks) > 1:
        eval_ds = TokenizedDataset(chunks[1])
    summary = f"data: {len(train)} train examples ({train.num_tokens()} tokens) from {data_cfg.train}"
    if eval_ds is not None:
        summary += f"; {len(eval_ds)} eval examples"
    return train, eval_ds, summary + cache_note


# ---------------------------------------------------------------------------------------------------------------
# tokenization cache

_CACHE_VERSION = 1
# Under torchrun the processes that do not write the cache wait for the one that does: at most _CACHE_GRACE_S for it
# to start, then as long as it is tokenizing (at most _CACHE_WAIT_S); then they tokenize themselves.
_CACHE_GRACE_S = 60.0
_CACHE_WAIT_S = float(os.environ.get("LORAPRO_TOKENIZE_WAIT_S", "3600"))


def _sha256_file(path: Path, h: Any) -> None:
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def _tokenizer_fingerprint(tokenizer: Any, h: Any) -> None:
    """Everything that decides how text becomes ids: the files ``save_pretrained`` writes (vocabulary, merges,
    normalizer, special tokens, chat template, flags such as add_bos_token)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        for f in sorted(Path(d).rglob("*")):
            if f.is_file():
                h.update(f.name.encode())
                _sha256_file(f, h)


def _source_fingerprint(source: str, split: str, data_cfg: Any, h: Any) -> bool:
    """Hash the content of a local data file (its path does not matter), or a hub dataset's own fingerprint.
    False when the source cannot be fingerprinted (then nothing is cached)."""
    h.update(json.dumps([split, data_cfg.hub_config, data_cfg.tsv_columns]).encode())
    if _looks_local(source):
        path = Path(source).expanduser()
        if not path.is_file():
            return False  # read_records says what is wrong
        h.update(path.suffix.lower().encode())
        _sha256_file(path, h)
        return True
    try:
        import datasets

        fingerprint = getattr(datasets.load_dataset(source, data_cfg.hub_config, split=split), "_fingerprint", None)
    except Exception:  # read_records reports the problem
        return False
    if not fingerprint:
        return False
    h.update(str(fingerprint).encode())
    return True


def _pack(examples: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    """Examples as flat tensors (loadable with ``weights_only=True``). Causal-LM labels are the input ids with a
    masked prompt, so only the length of the mask is stored for them."""
    ids = [e["input_ids"] for e in examples]
    out = {
        "lengths": torch.tensor([len(x) for x in ids], dtype=torch.int64),
        "input_ids": torch.tensor([t for x in ids for t in x], dtype=torch.int64),
    }
    labels = [e["labels"] for e in examples]
    if labels and not isinstance(labels[0], (list, tuple)):
        out["label"] = torch.tensor([int(v) for v in labels], dtype=torch.int64)
        return out
    starts = []
    for x, lab in zip(ids, labels):
        k = next((i for i, v in enumerate(lab) if v != -100), len(lab))
        if len(lab) != len(x) or list(lab[k:]) != list(x[k:]):
            starts = None
            break
        starts.append(k)
    if starts is not None:
        out["label_start"] = torch.tensor(starts, dtype=torch.int64)
    else:
        out["label_lengths"] = torch.tensor([len(v) for v in labels], dtype=torch.int64)
        out["labels"] = torch.tensor([t for v in labels for t in v], dtype=torch.int64)
    return out


def _split(flat: torch.Tensor, lengths: torch.Tensor) -> List[List[int]]:
    values, out, i = flat.tolist(), [], 0
    for n in lengths.tolist():
        out.append(values[i : i + n])
        i += n
    return out


def _unpack(packed: Dict[str, torch.Tensor]) -> List[Dict[str, Any]]:
    ids = _split(packed["input_ids"], packed["lengths"])
    if "label" in packed:
        labels: List[Any] = packed["label"].tolist()
    elif "label_start" in packed:
        labels = [[-100] * k + x[k:] for x, k in zip(ids, packed["label_start"].tolist())]
    else:
        labels = _split(packed["labels"], packed["label_lengths"])
    return [{"input_ids": x, "labels": y} for x, y in zip(ids, labels)]


def tokenized_cache_dir() -> Path:
    """Where :func:`select_examples_cached` keeps its files: ``lorapro.models.cache_dir() / "tokenized"``."""
    from ..models import cache_dir

    return cache_dir() / "tokenized"


def _cache_writer() -> bool:
    """One process per machine writes the cache (LOCAL_RANK 0 under torchrun; RANK 0 on one machine); the others
    wait for its file instead of tokenizing the same records again."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))) == 0


def select_examples_cached(
    data_cfg: Any, source: str, split: str, spec: DataSpec, tokenizer: Any, counts: Sequence[Optional[int]]
) -> Tuple[List[List[Dict[str, Any]]], int, str]:
    """:func:`select_examples` on ``read_records(source)``, reusing an earlier run's result when ``data.cache`` is
    on and nothing that decides it changed. Returns ``(chunks, records read, note for the summary line)``.

    The key hashes the data itself (file content, or a hub dataset's fingerprint), the tokenizer's saved files,
    the :class:`DataSpec` (template, fields, filter, length limits), the requested counts and the source of this
    module and of ``lorapro.prompts`` (so a change to how records are encoded never serves stale examples). Files
    live in ``$LORAPRO_CACHE/tokenized`` (default ``~/.cache/lorapro/tokenized``); delete them at any time.
    """
    import hashlib
    import time

    def compute() -> Tuple[List[List[Dict[str, Any]]], int]:
        records = read_records(source, split=split, hub_config=data_cfg.hub_config, tsv_columns=data_cfg.tsv_columns)
        return select_examples(records, spec, tokenizer, counts)

    h = hashlib.sha256(f"lorapro-tokenized-v{_CACHE_VERSION}".encode())
    if not getattr(data_cfg, "cache", False) or not _source_fingerprint(source, split, data_cfg, h):
        return (*compute(), "")
    from ..prompts import __file__ as prompts_file

    for code in (__file__, prompts_file):
        _sha256_file(Path(code), h)
    _tokenizer_fingerprint(tokenizer, h)
    h.update(json.dumps([dataclasses.asdict(spec), list(counts)], sort_keys=True, default=list).encode())
    path = tokenized_cache_dir() / f"{h.hexdigest()[:32]}.pt"

    writing = path.with_name(path.name + ".writing")  # exists while the writer tokenizes
    start = time.monotonic()
    while True:
        if path.is_file():
            try:
                packed = torch.load(path, weights_only=True)
                chunks = [_unpack(c) for c in packed["chunks"]]
                return chunks, int(packed["seen"]), f" (tokenized examples from cache {path})"
            except Exception:  # a damaged cache file is no reason to fail: tokenize again and replace it
                break
        waited = time.monotonic() - start
        # The writer has not started (grace), or is tokenizing (up to the limit): wait. A writer that cannot
        # write (read-only cache) never creates the marker, so the others tokenize after the grace period.
        if _cache_writer() or waited >= _CACHE_WAIT_S or (waited >= _CACHE_GRACE_S and not writing.exists()):
            break
        time.sleep(0.5)
    if not _cache_writer():
        return (*compute(), "")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writing.write_text(str(os.getpid()))
    except OSError:  # a read-only or full cache directory must not stop training
        return (*compute(), "")
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        chunks, seen = compute()
        try:
            torch.save({"chunks": [_pack(c) for c in chunks], "seen": seen}, tmp)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            return chunks, seen, ""
    finally:
        writing.unlink(missing_ok=True)
    return chunks, seen, f" (tokenized; cached in {path})"


def build_test_dataset(data_cfg: Any, task: str, tokenizer: Any) -> Optional[TokenizedDataset]:
    """The held-out test set of ``data.test`` (``None`` when not set), encoded exactly like the training data."""
    if not data_cfg.test:
        return None
    spec = spec_from_config(data_cfg, task)
    records = read_records(data_cfg.test, split=data_cfg.test_split, hub_config=data_cfg.hub_config,
                           tsv_columns=data_cfg.tsv_columns)
    (chunk,), seen = select_examples(records, spec, tokenizer, [data_cfg.test_size or None])
    if not chunk:
        raise DataError(f"data.test '{data_cfg.test}' gave no examples ({seen} records read); check the file and fields.")
    return TokenizedDataset(chunk)


class PadCollator:
    """Pads ``input_ids`` (with the pad id) and sequence ``labels`` (with -100) to the longest in the batch (right
    padding) and builds the attention mask. Integer labels (classification) become a 1-D tensor."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def _len(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return n if not m else ((n + m - 1) // m) * m

    def __call__(self, batch: Sequence[Mapping[str, Any]]) -> Dict[str, torch.Tensor]:
        n = self._len(max(len(e["input_ids"]) for e in batch))
        ids = torch.full((len(batch), n), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, e in enumerate(batch):
            ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"], dtype=torch.long)
            mask[i, : len(e["input_ids"])] = 1
        out = {"input_ids": ids, "attention_mask": mask}
        first = batch[0]["labels"]
        if isinstance(first, (list, tuple)):
            m = self._len(max(len(e["labels"]) for e in batch))
            labels = torch.full((len(batch), m), -100, dtype=torch.long)
            for i, e in enumerate(batch):
                labels[i, : len(e["labels"])] = torch.tensor(e["labels"], dtype=torch.long)
            out["labels"] = labels
        else:
            out["labels"] = torch.tensor([int(e["labels"]) for e in batch], dtype=torch.long)
        return out
