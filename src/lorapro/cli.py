"""The one ``lorapro`` command. Each subcommand lives in its own module and is imported only when used, so
``import lorapro`` stays torch-only and ``lorapro --help`` is instant."""

from __future__ import annotations

import importlib
import sys
from typing import List, Optional

# subcommand -> (module, function, one-line description)
COMMANDS = {
    "train": ("lorapro.finetune.cli", "main", "fine-tune a model from a YAML config (any method: lora, lora-pro, ...)"),
    "export": ("lorapro.finetune.export", "main", "merge a trained adapter into its base model and save the result"),
    "demo": ("lorapro.demo", "main", "the CPU demo: LoRA vs LoRA-Pro on SmolLM2-135M with a GSM8K slice"),
    "eval": ("lorapro.evaluation.cli", "eval_main", "evaluate a model (+ optional adapter) from a YAML config"),
    "score": ("lorapro.evaluation.cli", "score_main", "score completions produced elsewhere (humaneval, gsm8k)"),
    "sweep": ("lorapro.sweep.cli", "main", "compare methods fairly: per-method lr grids, seeds, a report"),
    "compare": ("lorapro.evaluation.cli", "compare_main", "put several evaluation results side by side"),
}

USAGE = "usage: lorapro COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(
    f"  {name:<8} {desc}" for name, (_, _, desc) in COMMANDS.items()
) + "\n\nRun `lorapro COMMAND --help` for the options of one command."


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"lorapro: unknown command '{name}'.{hint}\n\n{USAGE}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:  # a missing optional dependency, most likely
        print(
            f"lorapro {name}: could not import {module_name} ({e}).\n"
            "Install the extras it needs: pip install 'lorapro[train,eval]'",
            file=sys.stderr,
        )
        return 2
    return int(getattr(module, func_name)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
