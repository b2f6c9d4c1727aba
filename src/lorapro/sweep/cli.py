"""``lorapro sweep SWEEP.yaml`` / ``lorapro sweep report DIR`` / ``lorapro sweep --quick``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from lorapro.config import ConfigError, from_dict

from .config import SweepConfig

USAGE = """usage: lorapro sweep SWEEP.yaml [--dir DIR] [--jobs N] [--threads T] [--tasks T,..] [--methods M,..]
                          [--retry-failed] [--dry-run]
       lorapro sweep report DIR [--export DEST]
       lorapro sweep --quick [--dir DIR]

Compares fine-tuning methods fairly: each method gets its own learning-rate grid; stage 1 runs the grid with the
first seed and picks the lr on the eval set (carved from the training data), extending the grid when the best lr
sits at an edge; stage 2 runs every seed at the chosen lr. The report gives test-set mean ± sd over seeds.

Every run is a `lorapro train` run in its own folder under DIR/runs. Running the same command again continues a
killed sweep: finished runs are never re-run. The report (DIR/report.md, DIR/summary.json, DIR/plots/) is written
at the end, or any time with `lorapro sweep report DIR`.

  --dir DIR        sweep folder (default: runs/sweeps/<name of SWEEP.yaml>)
  --jobs N         runs at once (default 1); the CPU threads are split between them
  --threads T      threads per run (default: CPU cores / jobs)
  --tasks T,..     run only these tasks now (the others keep their runs; run without --tasks to finish them)
  --methods M,..   run only these methods now, e.g. --methods lora,lora-pro first and the rest later
  --retry-failed   run again the runs that failed (by default a failed run counts as the worst result)
  --dry-run        print what would run next and exit
  --quick          a 1-minute sweep on the built-in tiny model (2 methods x 2 lrs x 1 seed) to try the tool

Sweep file keys:
{keys}
"""


def _load(path: str) -> SweepConfig:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Sweep file '{p}' does not exist. See configs/sweeps/ for examples.")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"Sweep file '{p}' is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Sweep file '{p}' must hold a mapping of keys (base, methods, lrs, ...).")
    data["source"] = str(p)
    return from_dict(SweepConfig, data)


def _names(text: str) -> List[str]:
    """``--tasks sst2,cola`` / ``--methods lora,lora-pro``: a comma-separated list of names."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one name, comma-separated")
    return names


def _stop_on_signals() -> None:
    """SIGTERM / SIGHUP (kill, a closed terminal, a batch system's time limit) and SIGINT — which a shell leaves
    ignored for background jobs — stop the sweep like Ctrl-C: its runs are stopped and re-run next time, instead of
    being left running without a parent."""
    import signal

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, stop)


def quick_config() -> SweepConfig:
    """The --quick sweep: built-in tiny Llama on the GSM8K slice shipped with the package; seconds per run."""
    from lorapro.demo import PROMPT_FORMAT, TEST_FILE, TRAIN_FILE

    base = {
        "model": {"name": "builtin:tiny-llama", "task": "causal-lm"},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
        "optim": {"scheduler": "constant", "warmup_ratio": 0.0},
        "train": {"max_steps": 6, "global_batch_size": 4, "micro_batch_size": 4, "logging_steps": 1},
        "data": {"train": str(TRAIN_FILE), "train_size": 24, "eval_size": 8, "test": str(TEST_FILE),
                 "test_size": 8, "template": "format", "prompt_format": PROMPT_FORMAT, "prompt_field": "question",
                 "response_field": "answer", "max_tokens": 1024},
    }
    return from_dict(SweepConfig, {
        "base": base, "methods": ["lora", "lora-pro"], "lrs": {"default": [1e-3, 1e-2]}, "seeds": [0],
        "select": "loss", "report": ["loss"], "extend": 0, "tasks": {"quick": {}},
    })


def _resolved_dict(cfg: SweepConfig, base: dict) -> dict:
    from lorapro.config import to_dict

    d = to_dict(cfg)
    d["base"] = base
    d.pop("source", None)
    if cfg.eval_config:
        d["eval_config"] = str(cfg.resolve(cfg.eval_config).resolve())
    return d


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from lorapro.config import help_text

    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(keys=help_text(SweepConfig)))
        return 0 if argv else 2
    if argv[0] == "report":
        return report_main(argv[1:])
    ap = argparse.ArgumentParser(prog="lorapro sweep", add_help=False)
    ap.add_argument("config", nargs="?")
    ap.add_argument("--dir")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--retry-failed", action="store_true")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tasks", type=_names)
    ap.add_argument("--methods", type=_names)
    try:
        args = ap.parse_args(argv)
    except SystemExit:
        return 2
    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        print("lorapro sweep: --jobs and --threads must be >= 1.", file=sys.stderr)
        return 2
    import yaml

    from .report import write_report
    from .runner import Sweep, load_base, run_sweep, selection, sweep_lock

    try:
        if args.quick:
            cfg, name = quick_config(), "quick"
        elif args.config:
            cfg, name = _load(args.config), Path(args.config).stem
        else:
            raise ConfigError("give a sweep file (see configs/sweeps/), or --quick.")
        base = load_base(cfg)
        directory = Path(args.dir or Path("runs") / "sweeps" / name)
        sweep = Sweep(cfg, directory, base)
        sweep.check()
        only_t, only_m = selection(sweep, args.tasks, args.methods)
        if args.dry_run:
            for (task, method), p in sweep.plans().items():
                if task not in only_t or method not in only_m:
                    continue
                todo = ", ".join(f"lr={k.lr:.2e} seed={k.seed}" for k in p.needed) or "nothing"
                print(f"{task} {method}: {p.stage}; next: {todo}")
            return 0
        with sweep_lock(directory):
            (directory / "sweep.yaml").write_text(yaml.safe_dump(_resolved_dict(cfg, base), sort_keys=False))
            _stop_on_signals()
            run_sweep(sweep, jobs=args.jobs, threads=args.threads, retry_failed=args.retry_failed,
                      tasks=args.tasks, methods=args.methods)
            path = write_report(sweep)
    except ConfigError as e:
        print(f"lorapro sweep: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nlorapro sweep: interrupted; finished runs are kept in {args.dir or 'the sweep folder'}. Run the "
              "same command again to continue where it stopped.", file=sys.stderr)
        return 130
    print(f"sweep finished; report: {path}")
    return 0


def report_main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(prog="lorapro sweep report", add_help=True,
                                 description="Write DIR/report.md, DIR/summary.json and DIR/plots/ from the runs.")
    ap.add_argument("dir", help="a sweep folder (holds sweep.yaml)")
    ap.add_argument("--export", metavar="DEST",
                    help="also copy the report, the plots and every run's small files (metrics.json, train_log.jsonl, "
                    "config.yaml; no weights) to DEST, e.g. to commit them")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    from .report import export_results, write_report
    from .runner import Sweep

    d = Path(args.dir)
    try:
        import yaml

        p = d / "sweep.yaml"
        if not p.is_file():
            raise ConfigError(f"'{d}' is not a sweep folder (no sweep.yaml); run `lorapro sweep SWEEP.yaml` first.")
        data = yaml.safe_load(p.read_text())
        cfg = from_dict(SweepConfig, data)
        sweep = Sweep(cfg, d, dict(cfg.base))
        path = write_report(sweep)
        if args.export:
            n = export_results(sweep, Path(args.export))
            print(f"exported the report and {n} runs' files to {args.export}")
    except ConfigError as e:
        print(f"lorapro sweep report: {e}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0
