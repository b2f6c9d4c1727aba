"""``lorapro sweep report DIR``: the sweep's runs as a Markdown table, a JSON summary and plots.

Everything here is computed from the runs' own ``metrics.json`` and ``train_log.jsonl`` files; ``summary.json``
holds every number the table shows (tests check the two against the run files).

Per task and method: the chosen lr (stage 1 picks it on the eval set with the search seed; stage 2 runs every seed
there), the test metrics as mean ± sample standard deviation over seeds, the difference to the first method of the
sweep (paired by seed: same seed = same data order and head initialisation), the eval-set selection metric, wall
time and peak memory per run, and the optimizer state size. Plots: the test headline metric against lr per method
(error bars where several seeds ran), training loss curves at the chosen lr (mean over seeds), and — where runs
logged it (``train.alignment_steps``) — gradient alignment with full fine-tuning over training.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from lorapro.jsonl import read_jsonl

from .runner import PairPlan, RunKey, Sweep

__all__ = ["summarize", "write_report", "export_results", "mean_sd"]

# The files of a run that describe it (no weights): copied by ``export_results``.
RUN_FILES = ("metrics.json", "train_log.jsonl", "config.yaml", "failed.json", "posteval/summary.json")

POSTEVAL_DIR = "posteval"


def mean_sd(values: Sequence[float]) -> Dict[str, Any]:
    """Mean, sample standard deviation (n − 1; 0 for one value), n and the values themselves."""
    vals = [float(v) for v in values]
    if not vals:
        return {"mean": None, "sd": None, "n": 0, "values": []}
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "sd": sd, "n": len(vals), "values": vals}


def _metric(m: Optional[Dict[str, Any]], split: str, name: str) -> Optional[float]:
    if m is None:
        return None
    v = (m.get(split) or {}).get(name)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _posteval(sweep: Sweep, key: RunKey) -> Optional[Dict[str, float]]:
    p = sweep.run_dir(key) / POSTEVAL_DIR / "summary.json"
    if not p.is_file():
        return None
    return {k: float(v) for k, v in (json.loads(p.read_text()).get("metrics") or {}).items()
            if isinstance(v, (int, float))}


def summarize(sweep: Sweep) -> Dict[str, Any]:
    """All numbers of the report, from the run files."""
    cfg = sweep.cfg
    keys = sweep.all_run_keys()
    results = sweep.results(keys)
    plans: Dict[Any, PairPlan] = sweep.plans()
    out: Dict[str, Any] = {
        "select": cfg.select, "report": list(cfg.report), "seeds": list(cfg.seeds), "final": cfg.final,
        "tasks": {},
    }
    for task in cfg.task_names():
        t_out: Dict[str, Any] = {}
        for method in cfg.methods:
            plan = plans[(task, method)]
            runs = {k: v for k, v in results.items() if k.task == task and k.method == method}
            entry: Dict[str, Any] = {
                "stage": plan.stage, "grid": plan.grid, "extensions": plan.extensions, "search_lr": plan.best_lr,
                "final_lrs": plan.final_lrs, "chosen_lr": plan.chosen_lr, "at_edge": plan.at_edge,
                "grid_points": len(cfg.grid(method)),
                "failed_runs": sorted(k.rel.name for k, v in runs.items() if v is None),
            }
            curve = []
            for lr in sorted({k.lr for k in runs}):
                at = [runs[k] for k in runs if k.lr == lr]
                curve.append({
                    "lr": lr,
                    "eval_search_seed": _metric(runs.get(RunKey(task, method, lr, cfg.seeds[0])), "eval", cfg.select),
                    "test": mean_sd([v for v in (_metric(m, "test", cfg.report[0]) for m in at) if v is not None]),
                })
            entry["lr_curve"] = curve
            lr = plan.chosen_lr
            if lr is not None:
                final = [(s, runs.get(RunKey(task, method, lr, s))) for s in cfg.seeds]
                final = [(s, m) for s, m in final if m is not None]
                entry["seeds_at_chosen_lr"] = [s for s, _ in final]
                entry["test"] = {name: mean_sd([v for v in (_metric(m, "test", name) for _, m in final)
                                                if v is not None]) for name in cfg.report}
                entry["eval"] = mean_sd([v for v in (_metric(m, "eval", cfg.select) for _, m in final)
                                         if v is not None])
                entry["wall_s"] = mean_sd([m["wall_s"] for _, m in final if "wall_s" in m])
                entry["peak_rss_mib"] = max((m.get("peak_rss_mib") or 0.0) for _, m in final) if final else None
                entry["optimizer_state_mib"] = final[0][1].get("optimizer_state_mib") if final else None
                entry["trainable_params"] = final[0][1].get("trainable_params") if final else None
                entry["steps"] = final[0][1].get("steps") if final else None
                post = [p for p in (_posteval(sweep, RunKey(task, method, lr, s)) for s, _ in final) if p]
                if post:
                    names = sorted(set().union(*post))
                    entry["posteval"] = {n: mean_sd([p[n] for p in post if n in p]) for n in names}
                entry["per_seed_test"] = {str(s): _metric(m, "test", cfg.report[0]) for s, m in final}
            t_out[method] = entry
        # paired differences against the first method (same seeds)
        ref = t_out[cfg.methods[0]]
        for method in cfg.methods[1:]:
            e = t_out[method]
            if "per_seed_test" in e and "per_seed_test" in ref:
                diffs = [e["per_seed_test"][s] - ref["per_seed_test"][s] for s in e["per_seed_test"]
                         if s in ref["per_seed_test"] and e["per_seed_test"][s] is not None
                         and ref["per_seed_test"][s] is not None]
                e["diff_vs_first"] = mean_sd(diffs)
        out["tasks"][task] = t_out
    return out


def _fmt_ms(ms: Optional[Dict[str, Any]], digits: int = 4) -> str:
    if not ms or ms.get("mean") is None:
        return "—"
    return f"{ms['mean']:.{digits}f} ± {ms['sd']:.{digits}f} (n={ms['n']})"


def _fmt_lr(lr: Optional[float]) -> str:
    return "—" if lr is None else f"{lr:.2e}"


def markdown(summary: Dict[str, Any], methods: Sequence[str], plots: Dict[str, List[str]]) -> str:
    s0 = summary["seeds"][0]
    head = summary["report"][0]
    lines = [
        "# Sweep report",
        "",
        f"Two stages. (1) lr search: every lr of each method's own grid, seed {s0}; the lr with the best eval-set "
        f"`{summary['select']}` wins (the eval set is carved from the training data; a grid whose best lr was at an "
        f"edge was extended). (2) seeds {summary['seeds']} at the chosen lr"
        + (" and its better neighbour, the final lr re-chosen on the eval mean over seeds" if summary["final"] ==
           "best_and_neighbour" else "")
        + f". Test numbers: mean ± sample sd over seeds at the chosen lr, on the held-out test set; "
        f"Δ = paired difference to `{methods[0]}` (same seeds), mean ± sd.",
        "",
    ]
    for task, t in summary["tasks"].items():
        lines += [f"## {task}", ""]
        cols = ["method", "lr (chosen)", f"test {head}"] + [f"test {n}" for n in summary["report"][1:]]
        cols += [f"Δ {head} vs {methods[0]}", f"eval {summary['select']}", "extra eval", "wall s/run",
                 "peak RSS MiB", "opt. state MiB", "lr grid"]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for m in methods:
            e = t[m]
            flag = []
            if e["at_edge"]:
                flag.append("**best at grid edge**")
            if e["grid_points"] < 4:
                flag.append(f"only {e['grid_points']} points")
            if e["extensions"]:
                flag.append(f"extended {e['extensions']}x")
            if e["failed_runs"]:
                flag.append(f"{len(e['failed_runs'])} failed")
            grid = f"{_fmt_lr(e['grid'][0])}…{_fmt_lr(e['grid'][-1])} ({len(e['grid'])})"
            if e["stage"] != "done":
                lines.append(f"| {m} | {e['stage']} | " + " | ".join(["—"] * (len(cols) - 3)) + f" | {grid} |")
                continue
            test = e["test"]
            post = e.get("posteval") or {}
            row = [m, _fmt_lr(e["chosen_lr"]), _fmt_ms(test[head])]
            row += [_fmt_ms(test[n]) for n in summary["report"][1:]]
            row += [_fmt_ms(e.get("diff_vs_first")) if m != methods[0] else "—", _fmt_ms(e["eval"])]
            row += ["; ".join(f"{k} {_fmt_ms(v, 3)}" for k, v in post.items()) or "—"]
            row += [f"{e['wall_s']['mean']:.0f}" if e["wall_s"]["mean"] is not None else "—",
                    f"{e['peak_rss_mib']:.0f}" if e["peak_rss_mib"] else "—",
                    f"{e['optimizer_state_mib']:.2f}" if e["optimizer_state_mib"] is not None else "—",
                    grid + (" — " + ", ".join(flag) if flag else "")]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        for p in plots.get(task, []):
            lines += [f"![{Path(p).stem}]({p})", ""]
    return "\n".join(lines)


def _plots(sweep: Sweep, summary: Dict[str, Any]) -> Dict[str, List[str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = sweep.cfg
    head = cfg.report[0]
    pdir = sweep.dir / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    out: Dict[str, List[str]] = {}
    for task, t in summary["tasks"].items():
        files = []
        # metric vs lr
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in cfg.methods:
            pts = [c for c in t[m]["lr_curve"] if c["test"]["n"]]
            if pts:
                line = ax.errorbar([c["lr"] for c in pts], [c["test"]["mean"] for c in pts],
                                   yerr=[c["test"]["sd"] for c in pts], marker="o", capsize=3, label=m)
                chosen = [c for c in pts if c["lr"] == t[m]["chosen_lr"]]
                if chosen:  # the lr the eval set chose: a star
                    ax.plot([chosen[0]["lr"]], [chosen[0]["test"]["mean"]], marker="*", markersize=14,
                            color=line[0].get_color(), linestyle="none")
        ax.set_xscale("log")
        files.append(_finish(plt, fig, ax, pdir / f"{task}_lr.png", "learning rate",
                             f"test {head} (mean ± sd over seeds where several ran)",
                             f"{task}: test {head} vs learning rate (star: lr chosen on the eval set)"))
        # loss curves at the chosen lr
        fig, ax = plt.subplots(figsize=(7, 4.5))
        align: Dict[str, List[Dict[str, Any]]] = {}
        for m in cfg.methods:
            lr = t[m]["chosen_lr"]
            if lr is None:
                continue
            curves = []
            for s in cfg.seeds:
                log = sweep.run_dir(RunKey(task, m, lr, s)) / "train_log.jsonl"
                if log.exists():
                    recs = read_jsonl(log)
                    curves.append({r["step"]: r["loss"] for r in recs if r.get("kind") == "train"})
                    if s == cfg.seeds[0]:
                        align[m] = [r for r in recs if r.get("kind") == "alignment"]
            steps = sorted(set().union(*curves)) if curves else []
            if steps:
                mean = [statistics.fmean(c[x] for c in curves if x in c) for x in steps]
                ax.plot(steps, mean, label=f"{m} (lr {lr:.1e})")
        files.append(_finish(plt, fig, ax, pdir / f"{task}_curves.png", "optimizer step",
                             "training loss (mean over seeds)", f"{task}: training loss at each method's chosen lr"))
        if any(align.values()):
            files.append(_alignment_plot(plt, pdir, task, align))
        out[task] = files
    return out


def _finish(plt: Any, fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str) -> str:
    """Label, save and close a one-axes figure; returns its path relative to the sweep folder."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plots/{path.name}"


def _alignment_plot(plt: Any, pdir: Path, task: str, align: Dict[str, List[Dict[str, Any]]]) -> str:
    """cos(method's equivalent gradient, full-FT gradient) over training, per layer type, for each method's run."""
    types = sorted({t for recs in align.values() for r in recs for t in r.get("by_type", {})})
    n = len(types) + 1
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for i, name in enumerate(["all layers"] + types):
        ax = axes[i // cols][i % cols]
        for m, recs in align.items():
            if not recs:
                continue
            own = "lorapro_cos" if "pro" in m else "lora_cos"
            xs = [r["step"] for r in recs]
            if name == "all layers":
                ys = [r[f"{own}_global"] for r in recs]
            else:
                ys = [r["by_type"].get(name, {}).get(own, float("nan")) for r in recs]
            ax.plot(xs, ys, label=m)
        ax.set_title(name, fontsize=8)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{task}: cos(update direction's equivalent gradient, full fine-tuning gradient)", fontsize=9)
    fig.tight_layout()
    f = pdir / f"{task}_alignment.png"
    fig.savefig(f, dpi=110)
    plt.close(fig)
    return f"plots/{f.name}"


def write_report(sweep: Sweep, *, plots: bool = True) -> Path:
    """Write ``report.md``, ``summary.json`` and ``plots/`` into the sweep folder; returns the report's path."""
    summary = summarize(sweep)
    files = _plots(sweep, summary) if plots else {}
    (sweep.dir / "summary.json").write_text(json.dumps(summary, indent=1))
    path = sweep.dir / "report.md"
    path.write_text(markdown(summary, sweep.cfg.methods, files))
    return path


def export_results(sweep: Sweep, dest: Path) -> int:
    """Copy ``report.md``, ``summary.json``, ``sweep.yaml``, ``plots/`` and each finished or failed run's
    :data:`RUN_FILES` (no weights: a few KB per run) to ``dest``, keeping the sweep folder's layout. Returns the number
    of runs copied."""
    import shutil

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", "summary.json", "sweep.yaml"):
        if (sweep.dir / name).is_file():
            shutil.copy2(sweep.dir / name, dest / name)
    if (sweep.dir / "plots").is_dir():
        shutil.copytree(sweep.dir / "plots", dest / "plots", dirs_exist_ok=True)
    n = 0
    for key in sweep.all_run_keys():
        src = sweep.run_dir(key)
        if not ((src / "metrics.json").is_file() or (src / "failed.json").is_file()):
            continue  # still running (or cut off): nothing final to keep
        copied = False
        for f in RUN_FILES:
            if (src / f).is_file():
                (dest / key.rel / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / f, dest / key.rel / f)
                copied = True
        n += copied
    return n
