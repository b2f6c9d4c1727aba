"""Training and evaluation use one prompt per task (lorapro.prompts); the shipped configs agree with it."""

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from lorapro.prompts import ALPACA_NO_INPUT, GLUE_TASKS, glue_prompt, glue_prompt_format  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_gsm8k_eval_prompt_is_the_training_prompt():
    from lorapro.evaluation.gsm8k import build_prompt
    from lorapro.finetune.data import format_prompt

    q = "Natalia sold clips to 48 of her friends. How many?"
    trained_on = format_prompt({"query": q}, template="alpaca", prompt_field="query")
    assert build_prompt(q) == trained_on == ALPACA_NO_INPUT.format(instruction=q)
    assert trained_on.endswith("### Response:\n")


def _sync_script():
    import importlib.util

    path = CONFIGS.parent / "scripts" / "sync_glue_recipes.py"
    spec = importlib.util.spec_from_file_location("sync_glue_recipes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task", ["sst2", "cola", "mrpc", "qnli", "mnli"])
def test_glue_recipe_configs_use_the_shared_prompts(task):
    cfg = yaml.safe_load((CONFIGS / f"glue_t5_base_{task}.yaml").read_text())["data"]
    t = GLUE_TASKS[task]
    assert cfg["label_words"] == list(t.label_words)
    assert cfg["prompt_format"] == glue_prompt_format(t), "run: python scripts/sync_glue_recipes.py"
    assert cfg["hub_config"] == task  # the fields named in the prompt are that dataset's
    example = {f: f"<{f}>" for f in t.fields}
    assert cfg["prompt_format"].format(**example) == glue_prompt(t, *example.values())


def test_glue_recipes_are_generated_from_prompts_py(tmp_path):
    """The prompt lines of the recipes are what scripts/sync_glue_recipes.py writes, and it repairs a stale copy."""
    sync = _sync_script()
    assert sync.sync(check=True) == [], "run: python scripts/sync_glue_recipes.py"
    for task in GLUE_TASKS:
        stale = (CONFIGS / f"glue_t5_base_{task}.yaml").read_text()
        stale = stale.replace("\\nresult: ", "\\nanswer: ").replace("label_words: [", "label_words: [x, ")
        (tmp_path / f"glue_t5_base_{task}.yaml").write_text(stale)
    assert len(sync.sync(tmp_path, check=True)) == len(GLUE_TASKS)
    sync.sync(tmp_path)
    for task in GLUE_TASKS:
        fixed = (tmp_path / f"glue_t5_base_{task}.yaml").read_text()
        assert fixed == (CONFIGS / f"glue_t5_base_{task}.yaml").read_text()
