"""``lorapro train CONFIG.yaml [key=value ...]`` — one entry point for every recipe and method."""

from __future__ import annotations

import errno
import sys
from typing import List, Optional

from lorapro.config import ConfigError, help_text, load_config

from .config import TrainConfig
from .methods import methods_table

USAGE = """usage: lorapro train CONFIG.yaml [key=value ...]
       lorapro train key=value ...            (no file: defaults + overrides)

Fine-tunes a model as CONFIG.yaml says; key=value pairs override the file (dotted keys for sections,
e.g. method=lora optim.lr=1e-4 train.max_steps=100 lora.target_modules=[q_proj,v_proj]).
Shipped recipes are in configs/ (the paper's: math, code, chat, glue; small CPU ones: cpu_*).

methods:
{methods}

keys:
{keys}
"""


def usage() -> str:
    return USAGE.format(methods=methods_table(), keys=help_text(TrainConfig))


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(usage())
        return 0
    path = None
    if argv and "=" not in argv[0]:
        path, argv = argv[0], argv[1:]
    try:
        cfg = load_config(TrainConfig, path, argv)
    except ConfigError as e:
        print(f"lorapro train: {e}", file=sys.stderr)
        return 2

    from ..distributed import finish_process_group
    from ..models import ModelLoadError
    from .data import DataError
    from .runner import run_training

    try:
        run_training(cfg)
    except (ConfigError, DataError, ModelLoadError, FileNotFoundError) as e:
        print(f"lorapro train: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _say_stopped(cfg, "interrupted (Ctrl-C)")
        return 130
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        _say_stopped(cfg, f"stopped: the disk is full ({e})")
        return 1
    finish_process_group()  # under torchrun: all ranks done, then the process group is torn down cleanly
    return 0


def _say_stopped(cfg: TrainConfig, why: str) -> None:
    """Where a stopped run can be continued from, and the command that does it (main process only)."""
    import os
    from pathlib import Path

    from .checkpoints import latest_checkpoint, resume_command

    if int(os.environ.get("RANK", "0")) != 0:
        return
    out = Path(cfg.output_dir)
    last, _ = latest_checkpoint(out / "checkpoints", warn=lambda msg: None)
    if last is None:
        hint = (
            f"no complete checkpoint was written in {out / 'checkpoints'}, so there is nothing to resume"
            + (" (set train.save_steps to write checkpoints)." if cfg.train.save_steps <= 0 else ".")
        )
    else:
        hint = f"the last complete checkpoint is {last}; continue with:\n  {resume_command(out)}"
    print(f"\nlorapro train: {why}; {hint}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
