"""The ``lorapro train`` run an adapter came from: evaluate on the prompt it was trained on, name results after it.

``lorapro train`` writes ``RUN_DIR/config.yaml`` and saves the adapter in ``RUN_DIR/adapter`` (its checkpoints in
``RUN_DIR/checkpoint-N``), so the run of an adapter is the adapter's parent directory when that holds a
``config.yaml`` with a ``data`` section. Its ``data.template`` / ``data.prompt_format`` / ``data.prompt_field``
(and ``data.label_words`` for GLUE) are what the model learned to answer; a model evaluated on another prompt is
scored on a task it was not trained for (a model trained on ``"Question: ...\\nAnswer:"`` and asked in the Alpaca
format scores far lower, which says nothing about the optimizer).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from ..config import ConfigError

__all__ = ["TrainingRun", "find_training_run", "model_label", "slug", "warn"]


def slug(text: str) -> str:
    """``text`` as a safe file-name component."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "model"


def warn(message: str) -> None:
    print(f"lorapro eval: warning: {message}", file=sys.stderr)


@dataclass(frozen=True)
class TrainingRun:
    """A ``lorapro train`` output directory and its parsed ``config.yaml``."""

    dir: Path
    config: Mapping[str, Any]

    @property
    def data(self) -> Mapping[str, Any]:
        return self.config.get("data") or {}

    @property
    def template(self) -> str:
        return str(self.data.get("template") or "alpaca")

    def describe(self) -> str:
        """``data.template=...`` (and the format string) as written in the run's config, for messages."""
        text = f"data.template={self.template}"
        if self.template == "format":
            text += f", data.prompt_format={self.data.get('prompt_format')!r}"
        return f"{text} in {self.dir / 'config.yaml'}"

    def prompt(self, record: Mapping[str, Any], tokenizer: Any = None, instruction: Optional[str] = None) -> str:
        """The prompt the run trained on for ``record`` (an evaluation example's fields), formatted exactly as
        ``lorapro train`` does (:func:`lorapro.finetune.data.format_prompt`); ``instruction`` fills the run's
        ``data.prompt_field`` (the task's question or instruction, whatever the training data called it)."""
        from ..finetune.data import DataError, format_prompt

        fields: Dict[str, Any] = dict(record)
        field = str(self.data.get("prompt_field") or "instruction")
        if instruction is not None:
            fields[field] = instruction
        try:
            return format_prompt(
                fields,
                template=self.template,
                prompt_field=field,
                prompt_format=self.data.get("prompt_format"),
                tokenizer=tokenizer,
            )
        except DataError as e:
            raise ConfigError(
                f"Cannot build the prompt the adapter was trained on ({self.describe()}) from this benchmark's "
                f"examples: {e} Set the benchmark's prompt key (e.g. gsm8k.prompt_template) to evaluate with another "
                "prompt."
            ) from None


def find_training_run(saved: Optional[str]) -> Optional[TrainingRun]:
    """The run that saved the adapter (or, for ``method=full``, the model) directory ``saved``: its parent
    directory when that holds the run's ``config.yaml``; else None."""
    if not saved or not Path(saved).expanduser().is_dir():
        return None
    run_dir = Path(saved).expanduser().resolve().parent
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"{path}, the config of the training run of model.adapter, is not readable YAML ({e}). Repair or remove "
            "it (then the benchmark's default prompt is used)."
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("data"), dict):
        return None  # some other tool's config.yaml
    return TrainingRun(run_dir, config)


def model_label(name: str, adapter: Optional[str]) -> str:
    """A name for results: the training run's directory for what it saved (``runs/lora-pro/adapter`` ->
    ``lora-pro``, ``runs/lora-pro/checkpoint-500`` -> ``lora-pro-checkpoint-500``, ``runs/full/model`` ->
    ``full``), else the adapter's or the model's own name."""
    saved = adapter or (name if Path(name).expanduser().is_dir() else None)
    if saved is None:
        return slug(name)
    p = Path(saved).expanduser().resolve()
    if p.name in ("adapter", "model"):
        return slug(p.parent.name)
    if p.name.startswith("checkpoint-"):
        return slug(f"{p.parent.name}-{p.name}")
    return slug(p.name)
