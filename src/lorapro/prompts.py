"""Prompt formats shared by training (``lorapro train``) and evaluation (``lorapro eval``) — defined once here, so a
model is evaluated with exactly the prompt it was trained on.

- Alpaca (the paper's math / code / chat recipes): the no-input form, ending in ``"### Response:\\n"``; training
  appends ``separator + response`` to it, evaluation generates from it.
- GLUE text-to-text (T5 recipes, inherited by LoRA-Pro from LoRA-GA): ``"{instruction}{text}\\nresult: "`` (pairs:
  ``"{instruction}{text_a}\\n{text_b}\\nresult: "``) with a label word as target. The recipes in
  ``configs/glue_t5_base_*.yaml`` hold it as ``data.prompt_format`` over the GLUE dataset's field names
  (:func:`glue_prompt_format`); ``scripts/sync_glue_recipes.py`` writes it there and a test checks it is current.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

__all__ = [
    "ALPACA_HEADER",
    "ALPACA_NO_INPUT",
    "ALPACA_INPUT",
    "alpaca_prompt",
    "GlueTask",
    "GLUE_TASKS",
    "glue_prompt",
    "glue_prompt_format",
]

ALPACA_HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_NO_INPUT = ALPACA_HEADER + "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: Optional[str] = None) -> str:
    """The Alpaca prompt: the no-input form, or the with-input form when ``input`` is non-empty."""
    if input:
        return ALPACA_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


@dataclass(frozen=True)
class GlueTask:
    name: str
    instruction: str
    label_words: Tuple[str, ...]  # index = label id
    fields: Tuple[str, ...]  # the text fields of the GLUE dataset's records (nyu-mll/glue), one or a pair
    metrics: Tuple[str, ...]  # the first one is the task's headline metric

    @property
    def pair(self) -> bool:
        return len(self.fields) == 2


GLUE_TASKS: Dict[str, GlueTask] = {
    "sst2": GlueTask(
        "sst2", "classify the sentiment of the text: ", ("negative", "positive"), ("sentence",), ("accuracy",)
    ),
    "cola": GlueTask(
        "cola",
        "classify the grammaticality of the text: ",
        ("unacceptable", "acceptable"),
        ("sentence",),
        ("matthews_corrcoef", "accuracy"),
    ),
    "mrpc": GlueTask(
        "mrpc",
        "classify the semantic similarity of the text: ",
        ("different", "equivalent"),
        ("sentence1", "sentence2"),
        ("f1", "accuracy"),
    ),
    "qnli": GlueTask(
        "qnli",
        "classify the semantic similarity of the question and the sentence: ",
        ("entailment", "not_entailment"),
        ("question", "sentence"),
        ("accuracy",),
    ),
    "mnli": GlueTask(
        "mnli",
        "classify the semantic similarity of the text: ",
        ("entailment", "neutral", "contradiction"),
        ("premise", "hypothesis"),
        ("accuracy",),
    ),
}


def glue_prompt_format(task: GlueTask) -> str:
    """The text-to-text prompt as a format string over the GLUE record's fields (a recipe's ``data.prompt_format``)."""
    return task.instruction + "\n".join("{" + f + "}" for f in task.fields) + "\nresult: "


def glue_prompt(task: GlueTask, text_a: str, text_b: Optional[str] = None) -> str:
    """The text-to-text prompt of one example: ``text_a`` (and ``text_b`` for a pair task) in ``task.fields`` order."""
    texts = (text_a, text_b) if task.pair else (text_a,)
    return glue_prompt_format(task).format(**dict(zip(task.fields, texts)))
