"""What the user sees during ``lorapro train``: a progress bar, a JSONL log, a loss-curve PNG.

Both are ``transformers.TrainerCallback``s (the Trainer's public extension point) and act on the main process
only (``state.is_world_process_zero``), so a distributed run logs once.

JSONL log format, one object per line:

* ``{"kind": "train", "step": 10, "epoch": 0.1, "loss": 1.23, "lr": 2e-05, "grad_norm": 0.8, "tokens": 40960,
  "tokens_per_s": 512.0, "elapsed_s": 80.1}``
* ``{"kind": "eval", "step": 10, "eval_loss": 1.30, ...}``
* ``{"kind": "test", "step": 100, "test_loss": 1.31, ...}`` (data.test, once after training)
* ``{"kind": "alignment", "step": 10, ...}`` (train.alignment_steps, see lorapro.finetune.metrics.AlignmentLogger)
* ``{"kind": "end", "step": 100, "train_runtime_s": ..., "adapter": "..."}``
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from transformers import TrainerCallback

__all__ = ["ProgressBar", "JsonlLogger", "read_log", "plot_losses"]


class ProgressBar(TrainerCallback):
    """tqdm bar over optimizer steps; the postfix shows the last loss, lr and tokens/s; tqdm shows the ETA.
    Every evaluation (periodic and final) gets its own bar over the eval batches."""

    def __init__(self, desc: str = "train"):
        self.desc = desc
        self.bar = None
        self.eval_bar = None
        self._t0 = None
        self._tok0 = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc, dynamic_ncols=True)
            self._t0 = time.perf_counter()
            self._tok0 = int(getattr(state, "num_input_tokens_seen", 0) or 0)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        post: Dict[str, str] = {}
        if "loss" in logs:
            post["loss"] = f"{logs['loss']:.4f}"
        if "learning_rate" in logs:
            post["lr"] = f"{logs['learning_rate']:.2e}"
        if "eval_loss" in logs:
            post["eval_loss"] = f"{logs['eval_loss']:.4f}"
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0) - self._tok0
        dt = time.perf_counter() - (self._t0 or time.perf_counter())
        if tokens > 0 and dt > 0:
            post["tok/s"] = f"{tokens / dt:.0f}"
        self.bar.set_postfix(post, refresh=False)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.eval_bar is None:
            from tqdm.auto import tqdm

            total = len(eval_dataloader) if eval_dataloader is not None and hasattr(eval_dataloader, "__len__") else None
            self.eval_bar = tqdm(total=total, desc=f"{self.desc} eval", leave=self.bar is None, dynamic_ncols=True)
        self.eval_bar.update(1)

    def on_evaluate(self, args, state, control, **kwargs):
        self._close_eval()

    def _close_eval(self) -> None:
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """End the bar (also called when training stops on an exception, so the bar's last redraw comes before
        the error message rather than after it)."""
        self._close_eval()
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class JsonlLogger(TrainerCallback):
    """Appends every Trainer log (train loss, lr, grad norm, throughput; eval loss) to a JSONL file.

    On resume, records after the checkpoint's step are dropped first, so the log reads like one run.
    """

    def __init__(self, path: Path, resume_step: Optional[int] = None):
        self.path = Path(path)
        self.resume_step = resume_step
        self._t0: Optional[float] = None
        self._last: Tuple[float, int] = (0.0, 0)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.resume_step is not None and self.path.exists():
            kept = [r for r in read_log(self.path) if r.get("step", 0) <= self.resume_step and r.get("kind") != "end"]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif self.resume_step is None:
            self.path.write_text("")
        self._t0 = time.perf_counter()
        self._last = (self._t0, int(getattr(state, "num_input_tokens_seen", 0) or 0))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now = time.perf_counter()
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        rec: Dict[str, Any] = {"step": state.global_step, "epoch": round(float(state.epoch or 0.0), 6)}
        if "eval_loss" in logs:
            rec["kind"] = "eval"
            rec.update({k: v for k, v in logs.items() if k.startswith("eval_")})
        elif "test_loss" in logs:  # data.test, scored once after training
            rec["kind"] = "test"
            rec.update({k: v for k, v in logs.items() if k.startswith("test_")})
        elif "loss" in logs:
            rec["kind"] = "train"
            rec["loss"] = float(logs["loss"])
            rec["lr"] = float(logs.get("learning_rate", float("nan")))
            if "grad_norm" in logs:
                rec["grad_norm"] = float(logs["grad_norm"])
            rec["tokens"] = tokens
            dt = now - self._last[0]
            if dt > 0 and tokens > self._last[1]:
                rec["tokens_per_s"] = round((tokens - self._last[1]) / dt, 2)
            self._last = (now, tokens)
        else:  # the Trainer's final summary (train_runtime, ...)
            rec["kind"] = "summary"
            rec.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str))})
        rec["elapsed_s"] = round(now - (self._t0 or now), 3)
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")


def read_log(path: Path) -> List[Dict[str, Any]]:
    """The records of a JSONL training log."""
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def plot_losses(
    curves: Dict[str, List[Tuple[int, float]]],
    path: Path,
    *,
    title: str = "training loss",
    eval_curves: Optional[Dict[str, List[Tuple[int, float]]]] = None,
) -> Path:
    """Write a PNG with one training-loss curve per entry of ``curves`` (label -> [(step, loss)]), plus dashed
    eval-loss curves if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    colors: Dict[str, Any] = {}  # a run's eval points share its training curve's colour
    for label, pts in curves.items():
        pts = [(s, l) for s, l in pts if l is not None and math.isfinite(l)]
        if pts:
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"{label} (train)", linewidth=1.4)
            colors[label] = line.get_color()
    for label, pts in (eval_curves or {}).items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--o", label=f"{label} (eval)", markersize=5,
                    color=colors.get(label))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
