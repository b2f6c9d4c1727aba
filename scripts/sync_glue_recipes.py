"""Write the GLUE text-to-text prompt and label words of ``lorapro.prompts`` into the T5 GLUE recipes.

The recipes (``configs/glue_t5_base_{task}.yaml``) train with ``data.template: format``; their ``prompt_format``
and ``label_words`` lines are generated here from :data:`lorapro.prompts.GLUE_TASKS`, the definitions
``lorapro eval`` uses, so training and evaluation cannot drift apart. ``tests/test_prompts.py`` fails when a
recipe is not what this script writes.

    python scripts/sync_glue_recipes.py          # rewrite the two lines of every recipe
    python scripts/sync_glue_recipes.py --check  # exit 1 and name the recipes that are out of date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import List

from lorapro.prompts import GLUE_TASKS, glue_prompt_format

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def recipe_text(text: str, task: str) -> str:
    """``text`` (a recipe's YAML) with its ``prompt_format`` and ``label_words`` lines generated for ``task``."""
    t = GLUE_TASKS[task]
    # a JSON string is a valid double-quoted YAML scalar, escapes included
    text, n1 = re.subn(r"(?m)^(\s*prompt_format:).*$", lambda m: f"{m.group(1)} {json.dumps(glue_prompt_format(t))}", text)
    text, n2 = re.subn(r"(?m)^(\s*label_words:).*$", lambda m: f"{m.group(1)} [{', '.join(t.label_words)}]", text)
    if (n1, n2) != (1, 1):
        raise ValueError(f"the {task} recipe needs exactly one data.prompt_format and one data.label_words line.")
    return text


def sync(configs: Path = CONFIGS, check: bool = False) -> List[Path]:
    """The recipes that were (``check``: would be) changed."""
    changed = []
    for task in GLUE_TASKS:
        path = configs / f"glue_t5_base_{task}.yaml"
        old = path.read_text(encoding="utf-8")
        new = recipe_text(old, task)
        if new != old:
            changed.append(path)
            if not check:
                path.write_text(new, encoding="utf-8")
    return changed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report recipes that are out of date (exit 1)")
    args = parser.parse_args()
    changed = sync(check=args.check)
    for path in changed:
        print(f"{'out of date' if args.check else 'rewrote'}: {path}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
