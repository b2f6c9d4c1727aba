"""What a finished ``lorapro train`` run measured, in one file: ``output_dir/metrics.json``.

``lorapro sweep`` reads nothing else to choose learning rates and to report, so every number it shows can be traced
back to one run's file. The file is written last and atomically (temporary file + rename): a run that has a
``metrics.json`` finished; a run without one did not.

``metrics.json``::

    {"format": 1, "method": "lora-pro", "seed": 0, "lr": 3e-4, "steps": 125, "wall_s": 98.2,
     "peak_rss_mib": 1210.5, "optimizer_state_mib": 2.6, "trainable_params": 338690,
     "final_train_loss": 0.31,           # mean of the last 5 logged training losses
     "eval": {"loss": 0.30, "accuracy": 0.88, ...},    # the eval set (data.eval / data.eval_size): selection
     "test": {"loss": 0.33, "accuracy": 0.87, ...}}    # data.test: reported, never used for selection

Also here: the classification metrics of the Trainer's evaluation (accuracy; F1 of class 1 and Matthews
correlation for two classes — the GLUE metrics of :mod:`lorapro.evaluation.glue`), and the callback that logs
gradient alignment with full fine-tuning over training (``train.alignment_steps``).
"""

from __future__ import annotations

import json
import os
import re
import resource
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from transformers import TrainerCallback

from lorapro.jsonl import read_jsonl

__all__ = [
    "METRICS_FILE",
    "classification_metrics",
    "optimizer_state_bytes",
    "peak_rss_mib",
    "write_metrics",
    "read_metrics",
    "layer_type",
    "AlignmentLogger",
    "alignment_supported",
]

METRICS_FILE = "metrics.json"
METRICS_FORMAT = 1


def classification_metrics(pred: Any) -> Dict[str, float]:
    """``compute_metrics`` for sequence classification: accuracy, and for two classes F1 (class 1) and MCC."""
    import numpy as np

    from lorapro.evaluation.glue import accuracy, f1_binary, matthews_corrcoef

    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    predictions = np.argmax(logits, axis=-1).tolist()
    labels = np.asarray(pred.label_ids).tolist()
    out = {"accuracy": accuracy(predictions, labels)}
    if logits.shape[-1] == 2:
        out["f1"] = f1_binary(predictions, labels)
        out["matthews_corrcoef"] = matthews_corrcoef(predictions, labels)
    return out


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of every tensor the optimizer keeps between steps (its ``state``), counted once each."""
    seen: set = set()
    total = 0

    def walk(v: Any) -> None:
        nonlocal total
        if isinstance(v, torch.Tensor):
            key = (v.data_ptr(), v.numel(), v.dtype)
            if key not in seen:
                seen.add(key)
                total += v.numel() * v.element_size()
        elif isinstance(v, Mapping):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(getattr(optimizer, "state", {}))
    return total


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _strip_prefix(metrics: Mapping[str, Any], prefix: str) -> Dict[str, float]:
    keep = {}
    for k, v in metrics.items():
        if not k.startswith(prefix) or not isinstance(v, (int, float)):
            continue
        name = k[len(prefix):]
        if name in ("runtime", "samples_per_second", "steps_per_second", "epoch"):
            continue
        keep[name] = float(v)
    return keep


def write_metrics(path: Path, payload: Dict[str, Any]) -> None:
    """Write ``metrics.json`` atomically: a reader sees either no file or the whole file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump({"format": METRICS_FORMAT, **payload}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The run's ``metrics.json`` (``None`` when the run has not finished)."""
    p = Path(run_dir) / METRICS_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:  # cannot happen with write_metrics; a hand-edited file
        return None


def evaluation_metrics(metrics: Mapping[str, Any], prefix: str) -> Dict[str, float]:
    """``{"loss": ..., "accuracy": ...}`` from a Trainer ``evaluate()`` result with ``metric_key_prefix``."""
    return _strip_prefix(metrics, prefix + "_")


def final_train_loss(log_path: Path, last: int = 5) -> Optional[float]:
    """Mean of the last ``last`` logged training losses (one batch is noisy)."""
    if not Path(log_path).exists():
        return None
    losses = [r["loss"] for r in read_jsonl(Path(log_path)) if r.get("kind") == "train" and "loss" in r]
    return sum(losses[-last:]) / len(losses[-last:]) if losses else None


_LAYER_INDEX = re.compile(r"^.*?\.(?:layer|layers|h|block|blocks)\.\d+\.")


def layer_type(name: str) -> str:
    """A LoRA layer's type, shared by all transformer blocks: ``...layer.3.attention.self.query`` →
    ``attention.self.query``, ``...layers.0.mlp.down_proj`` → ``mlp.down_proj``."""
    return _LAYER_INDEX.sub("", name)


def alignment_supported(model: Any) -> Optional[str]:
    """Why gradient alignment cannot be measured on ``model`` (``None`` when it can): it needs plain LoRA layers
    ``W0 + s·B·A`` (not full fine-tuning, not DoRA)."""
    from lorapro.pairing import lora_pairs

    try:
        pairs = lora_pairs(model, trainable_only=False)
    except ValueError as e:
        return str(e)
    return None if pairs else "the model has no LoRA layers"


class AlignmentLogger(TrainerCallback):
    """Every ``every`` optimizer steps (and at step 0 and the end), measure on one fixed batch how close LoRA's and
    LoRA-Pro's equivalent gradients are to the full fine-tuning gradient (:func:`lorapro.diagnostics.
    measure_alignment`, cosine), per layer type, and append an ``alignment`` record to the JSONL log::

        {"kind": "alignment", "step": 20, "lorapro_cos_global": 0.41, "lora_cos_global": 0.17,
         "by_type": {"attention.self.query": {"lorapro_cos": 0.40, "lora_cos": 0.15, "layers": 6}, ...}}

    Both cosines are measured at the *current* factors of whichever method is training, so a LoRA run and a LoRA-Pro
    run can be compared on the same scale. The measurement touches no ``.grad`` and does not change the model.
    """

    def __init__(self, model: Any, batch: Dict[str, torch.Tensor], every: int, log_path: Path):
        self.model, self.batch, self.every, self.log_path = model, batch, every, Path(log_path)
        self._done: set = set()

    def _measure(self, step: int) -> None:
        if step in self._done:
            return
        self._done.add(step)
        from lorapro.diagnostics import measure_alignment

        dev = next(self.model.parameters()).device
        batch = {k: v.to(dev) for k, v in self.batch.items()}
        report = measure_alignment(self.model, batch)
        groups: Dict[str, List[Any]] = defaultdict(list)
        for layer in report.layers:
            groups[layer_type(layer.name.rsplit(".", 1)[0])].append(layer)  # drop the adapter name
        rec = {
            "kind": "alignment",
            "step": step,
            "lorapro_cos_global": report.summary["lorapro_cos_global"],
            "lora_cos_global": report.summary["lora_cos_global"],
            "by_type": {
                t: {
                    "lorapro_cos": sum(x.lorapro_cos for x in ls) / len(ls),
                    "lora_cos": sum(x.lora_cos for x in ls) / len(ls),
                    "layers": len(ls),
                }
                for t, ls in groups.items()
            },
        }
        with self.log_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and state.global_step == 0:
            self._measure(0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and state.global_step % self.every == 0:
            self._measure(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._measure(state.global_step)
