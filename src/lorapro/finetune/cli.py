"""``lorapro train CONFIG.yaml [key=value ...]`` — one entry point for every recipe and method."""

from __future__ import annotations

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
    from .data import DataError
    from .runner import run_training

    try:
        run_training(cfg)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"lorapro train: {e}", file=sys.stderr)
        return 2
    finish_process_group()  # under torchrun: all ranks done, then the process group is torn down cleanly
    return 0


if __name__ == "__main__":
    sys.exit(main())
