"""GLUE (Wang et al. 2019) dev-set evaluation: loaders, text-to-text format, metrics.

Two kinds of model are scored:

* **text-to-text** (T5, as in the paper's GLUE table, or a decoder LM): the input is
  ``"{instruction}{sentence}\\nresult: "`` (pairs: ``"{instruction}{s1}\\n{s2}\\nresult: "``) with the LoRA-GA /
  LoRA-Pro instructions and label words below; the generated text is mapped back to a label by
  :func:`label_from_text` (an unrecognised answer is label -1 and counts as wrong);
* **encoder classifiers**: the argmax of the sequence-classification logits on the raw sentence (pair).

Metrics (``predictions``/``labels`` are integer class ids; -1 = no valid prediction):

* accuracy = (1/N) sum_i [p_i = y_i]
* Matthews correlation (CoLA), the multi-class form of Gorodkin (2004), equal to the binary
  (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) for two classes:
  MCC = (c*s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2)), with s = N, c = #correct,
  p_k = #predicted k, t_k = #true k; 0 when a factor of the denominator is 0 (as scikit-learn);
* F1 of the positive class 1 (MRPC: "equivalent") = 2 TP / (2 TP + FP + FN); 0 when TP = FP = FN = 0.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..prompts import GLUE_TASKS, GlueTask, glue_prompt

__all__ = [
    "GlueTask",
    "TASKS",
    "load_glue",
    "text_input",
    "fields_of",
    "label_from_text",
    "accuracy",
    "matthews_corrcoef",
    "f1_binary",
    "glue_metrics",
]


# The tasks' instructions and label words are shared with the training recipes (lorapro.prompts). MNLI has two dev
# sets, scored separately as in the GLUE benchmark: matched (the training genres) and mismatched (five others).
TASKS: Dict[str, GlueTask] = {
    **{k: v for k, v in GLUE_TASKS.items() if k != "mnli"},
    "mnli_matched": GLUE_TASKS["mnli"],
    "mnli_mismatched": GLUE_TASKS["mnli"],
}
# MultiNLI's genres (Williams et al. 2018): the matched dev set shares the training genres, the mismatched does not.
MNLI_GENRES = {
    "mnli_matched": {"fiction", "government", "slate", "telephone", "travel"},
    "mnli_mismatched": {"facetoface", "letters", "nineeleven", "oup", "verbatim"},
}


def _task(name: str) -> GlueTask:
    if name not in TASKS:
        raise ValueError(f"Unknown GLUE task '{name}'. Supported: {', '.join(TASKS)}.")
    return TASKS[name]


def _mnli_rows(rows: List[List[str]], task: str, p: Path) -> List[Dict[str, Any]]:
    """The examples of an MNLI dev TSV, columns found by name (dev files have label1..label5 before
    gold_label, train.tsv only label1); refuses the other dev set, told apart by its genres."""
    t = TASKS[task]
    header = rows[0] if rows else []
    need = ("genre", "sentence1", "sentence2", "gold_label")
    if not set(need) <= set(header):
        raise ValueError(
            f"{p} is not an MNLI TSV: its header {header[:6]}... lacks {[c for c in need if c not in header]}. Set "
            "data.path to GLUE's MNLI dev_matched.tsv or dev_mismatched.tsv."
        )
    col = {c: header.index(c) for c in need}
    out = []
    for lineno, row in enumerate(rows[1:], 2):
        if not row or not any(c.strip() for c in row):
            continue
        try:
            genre, label = row[col["genre"]].strip(), row[col["gold_label"]].strip()
            ex = {"text_a": row[col["sentence1"]].strip(), "text_b": row[col["sentence2"]].strip()}
            ex["label"] = t.label_words.index(label)
        except (IndexError, ValueError):
            raise ValueError(f"{p}:{lineno} is not an MNLI row (columns {list(need)}, gold label one of "
                             f"{list(t.label_words)}): {row[:4]!r}...") from None
        other = "mnli_mismatched" if task == "mnli_matched" else "mnli_matched"
        if genre in MNLI_GENRES[other]:
            raise ValueError(
                f"{p}:{lineno} has genre '{genre}', which belongs to the {other.split('_')[1]} dev set; this is not "
                f"the {task.split('_')[1]} one. Set glue.task={other} or point data.path at the other file."
            )
        out.append(ex)
    return out


def load_glue(task: str, path: str, limit: Optional[int] = None) -> List[Dict[str, Any]]:
    """Examples ``{"text_a", "text_b" (pairs), "label"}`` from a GLUE TSV in its original layout.

    sst2 ``dev.tsv`` (sentence, label; header), cola ``in_domain_dev.tsv`` (source, label, mark, sentence; no
    header), mrpc ``dev.tsv`` (Quality, #1 ID, #2 ID, #1 String, #2 String; header), qnli ``dev.tsv`` (index,
    question, sentence, label in words; header), mnli_matched / mnli_mismatched ``dev_matched.tsv`` /
    ``dev_mismatched.tsv`` (index, promptID, pairID, genre, four parse columns, sentence1, sentence2, label1..5,
    gold_label in words; header). An empty file is an error.
    """
    t = _task(task)
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"GLUE {task} file '{p}' does not exist. Set data.path to the task's dev TSV.")
    with open(p, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    out: List[Dict[str, Any]] = []
    if task.startswith("mnli"):
        out = _mnli_rows(rows, task, p)[:limit]
    else:
        if task != "cola":
            rows = rows[1:]  # header
        for lineno, row in enumerate(rows, 1 if task == "cola" else 2):
            if not row or not any(c.strip() for c in row):
                continue
            try:
                if task == "sst2":
                    ex = {"text_a": row[0].strip(), "label": int(row[1])}
                elif task == "cola":
                    ex = {"text_a": row[3].strip(), "label": int(row[1])}
                elif task == "mrpc":
                    ex = {"text_a": row[3].strip(), "text_b": row[4].strip(), "label": int(row[0])}
                else:
                    ex = {"text_a": row[1].strip(), "text_b": row[2].strip(), "label": t.label_words.index(row[3].strip())}
            except (IndexError, ValueError):
                raise ValueError(f"{p}:{lineno} is not a {task} row in the GLUE layout: {row!r}") from None
            out.append(ex)
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise ValueError(f"GLUE {task} file '{p}' holds no examples. Set data.path to the task's dev TSV.")
    return out


def fields_of(task: str, example: Dict[str, Any]) -> Dict[str, str]:
    """The example's texts under the GLUE dataset's field names (``sentence``; ``premise``, ``hypothesis``; ...),
    the names a training recipe's ``data.prompt_format`` uses."""
    t = _task(task)
    return dict(zip(t.fields, (example["text_a"], example["text_b"]) if t.pair else (example["text_a"],)))


def text_input(task: str, example: Dict[str, Any], prompt_format: Optional[str] = None) -> str:
    """The text-to-text input of an example: the LoRA-GA / LoRA-Pro prompt (:mod:`lorapro.prompts`), or
    ``prompt_format`` over the GLUE dataset's field names (:func:`fields_of`)."""
    fields = fields_of(task, example)
    if prompt_format is None:
        return glue_prompt(_task(task), *fields.values())
    try:
        return prompt_format.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"glue.prompt_format {prompt_format!r} cannot be filled from the {task} fields {list(fields)} ({e!r})."
        ) from None


def label_from_text(text: str, label_words: Sequence[str]) -> int:
    """The label whose word the generated ``text`` is (case-insensitive, surrounding punctuation ignored), or
    starts with (longest word first, so ``not_entailment`` is not read as ``entailment``); else -1."""
    norm = text.strip().lower().strip(" .,:;!\"'`")
    words = [w.lower() for w in label_words]
    if norm in words:
        return words.index(norm)
    for w in sorted(words, key=len, reverse=True):
        if norm.startswith(w) and (len(norm) == len(w) or not norm[len(w)].isalnum() and norm[len(w)] != "_"):
            return words.index(w)
    return -1


def _check(predictions: Sequence[int], labels: Sequence[int]) -> None:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels.")
    if not labels:
        raise ValueError("no examples to score.")


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    _check(predictions, labels)
    return sum(int(p == y) for p, y in zip(predictions, labels)) / len(labels)


def matthews_corrcoef(predictions: Sequence[int], labels: Sequence[int]) -> float:
    _check(predictions, labels)
    s = len(labels)
    c = sum(int(p == y) for p, y in zip(predictions, labels))
    pk = Counter(predictions)
    tk = Counter(labels)
    classes = set(pk) | set(tk)
    cov_pt = c * s - sum(pk[k] * tk[k] for k in classes)
    cov_pp = s * s - sum(pk[k] ** 2 for k in classes)
    cov_tt = s * s - sum(tk[k] ** 2 for k in classes)
    if cov_pp == 0 or cov_tt == 0:
        return 0.0
    return cov_pt / math.sqrt(cov_pp * cov_tt)


def f1_binary(predictions: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    _check(predictions, labels)
    tp = sum(int(p == positive and y == positive) for p, y in zip(predictions, labels))
    fp = sum(int(p == positive and y != positive) for p, y in zip(predictions, labels))
    fn = sum(int(p != positive and y == positive) for p, y in zip(predictions, labels))
    return 0.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


_METRICS = {"accuracy": accuracy, "matthews_corrcoef": matthews_corrcoef, "f1": f1_binary}


def glue_metrics(task: str, predictions: Sequence[int], labels: Sequence[int]) -> Dict[str, float]:
    """The task's metrics (headline first) plus the share of outputs that were not a label word."""
    t = _task(task)
    out = {m: _METRICS[m](predictions, labels) for m in t.metrics}
    out["invalid_rate"] = sum(int(p == -1) for p in predictions) / len(predictions)
    return out


def classify(model: Any, tokenizer: Any, examples: Sequence[Dict[str, Any]], batch_size: int, max_length: int, progress: bool = True) -> List[int]:
    """Argmax class of a sequence-classification model for each example (right padding, attention mask)."""
    import torch

    device = next(model.parameters()).device
    preds: List[int] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(examples), desc="classifying", unit="ex")
    old = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        with torch.inference_mode():
            for start in range(0, len(examples), batch_size):
                chunk = examples[start : start + batch_size]
                a = [e["text_a"] for e in chunk]
                b = [e["text_b"] for e in chunk] if "text_b" in chunk[0] else None
                enc = tokenizer(a, b, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
                logits = model(**enc).logits
                preds.extend(int(i) for i in logits.argmax(-1).tolist())
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        tokenizer.padding_side = old
        if bar is not None:
            bar.close()
    return preds
