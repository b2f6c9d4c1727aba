"""Training and evaluation use one prompt per task (lorapro.prompts); the shipped configs agree with it."""

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from lorapro.prompts import ALPACA_NO_INPUT, GLUE_TASKS, glue_prompt  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_gsm8k_eval_prompt_is_the_training_prompt():
    from lorapro.evaluation.gsm8k import build_prompt
    from lorapro.finetune.data import format_prompt

    q = "Natalia sold clips to 48 of her friends. How many?"
    trained_on = format_prompt({"query": q}, template="alpaca", prompt_field="query")
    assert build_prompt(q) == trained_on == ALPACA_NO_INPUT.format(instruction=q)
    assert trained_on.endswith("### Response:\n")


@pytest.mark.parametrize("task", ["sst2", "cola", "mrpc", "qnli", "mnli"])
def test_glue_recipe_configs_use_the_shared_prompts(task):
    cfg = yaml.safe_load((CONFIGS / f"glue_t5_base_{task}.yaml").read_text())["data"]
    t = GLUE_TASKS[task]
    assert cfg["label_words"] == list(t.label_words)
    fields = [part.split("}")[0] for part in cfg["prompt_format"].split("{")[1:]]
    assert len(fields) == (2 if t.pair else 1)
    example = {f: f"<{f}>" for f in fields}
    assert cfg["prompt_format"].format(**example) == glue_prompt(t, *example.values())
