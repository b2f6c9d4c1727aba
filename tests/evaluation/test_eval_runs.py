"""`lorapro eval` on the output of `lorapro train`: the run's prompt and name, checked inputs, kept results, MNLI."""

import json
import shutil
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("peft")

from lorapro.config import load_config, to_dict  # noqa: E402
from lorapro.evaluation import glue  # noqa: E402
from lorapro.evaluation.cli import eval_main  # noqa: E402
from lorapro.evaluation.config import EvalConfig  # noqa: E402
from lorapro.evaluation.gsm8k import build_prompt  # noqa: E402
from lorapro.evaluation.training_run import find_training_run, model_label  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
GSM8K = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "Ann has 10 pens and loses 2. How many?", "answer": "10 - 2 = 8\n#### 8"},
]
FAST = ["generation.max_new_tokens=2", "generation.progress=false", "model.name=builtin:tiny-llama"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A `lorapro train` output directory of the CPU GSM8K recipe (its config.yaml as the trainer writes it) with a
    tiny-llama adapter in adapter/."""
    from peft import LoraConfig, get_peft_model

    from lorapro.finetune.config import TrainConfig
    from lorapro.models import load_model_and_tokenizer

    run = tmp_path_factory.mktemp("runs") / "smollm2-gsm8k-lorapro"
    run.mkdir()
    cfg = load_config(TrainConfig, ROOT / "configs" / "cpu_smollm2_gsm8k.yaml", ["model.name=builtin:tiny-llama"])
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    base, _ = load_model_and_tokenizer("builtin:tiny-llama")
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(run / "adapter")
    return run


@pytest.fixture
def gsm8k_file(tmp_path):
    f = tmp_path / "gsm8k.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in GSM8K))
    return f


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cpu_recipe_adapter_is_evaluated_on_its_training_prompt(run_dir, gsm8k_file, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["configs/eval/cpu_smollm2_gsm8k.yaml", f"model.adapter={run_dir / 'adapter'}", f"data.path={gsm8k_file}",
            f"output_dir={out}", *FAST]
    assert eval_main(args) == 0, capsys.readouterr().err
    prompts = [r["prompt"] for r in _rows(out / "predictions.jsonl")]
    assert prompts == [f"Question: {r['question']}\nAnswer:" for r in GSM8K]  # the recipe's, not Alpaca
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run_name"] == "gsm8k-smollm2-gsm8k-lorapro"  # the run's name, not "adapter"
    assert summary["details"]["prompt_source"].startswith("training run (data.template=format")
    assert summary["details"]["training_run"] == str(run_dir.resolve())
    assert "warning" not in capsys.readouterr().err


def test_explicit_prompt_wins_with_a_warning(run_dir, gsm8k_file, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["task=gsm8k", f"model.adapter={run_dir / 'adapter'}", f"data.path={gsm8k_file}", f"output_dir={out}",
            "gsm8k.prompt_template=Q: {question}\nA:", *FAST]
    assert eval_main(args) == 0
    err = capsys.readouterr().err
    assert "gsm8k.prompt_template differs from the prompt the adapter was trained on" in err
    assert "'Question: Tom has 3 apples and buys 4. How many?\\nAnswer:'" in err  # shows what it was trained on
    assert _rows(out / "predictions.jsonl")[0]["prompt"] == f"Q: {GSM8K[0]['question']}\nA:"


def test_adapter_without_a_run_uses_the_default_prompt(run_dir, gsm8k_file, tmp_path, capsys):
    adapter = tmp_path / "loose" / "my-adapter"
    shutil.copytree(run_dir / "adapter", adapter)
    out = tmp_path / "eval"
    assert eval_main(["task=gsm8k", f"model.adapter={adapter}", f"data.path={gsm8k_file}", f"output_dir={out}", *FAST]) == 0
    assert _rows(out / "predictions.jsonl")[0]["prompt"] == build_prompt(GSM8K[0]["question"])  # Alpaca
    assert json.loads((out / "summary.json").read_text())["run_name"] == "gsm8k-my-adapter"


def test_model_label_and_run_lookup(run_dir, tmp_path):
    assert model_label("builtin:tiny-llama", str(run_dir / "adapter")) == "smollm2-gsm8k-lorapro"
    assert model_label("m", str(run_dir / "checkpoint-20")) == "smollm2-gsm8k-lorapro-checkpoint-20"
    assert model_label("m", str(run_dir / "adapter") + "/") == "smollm2-gsm8k-lorapro"
    assert model_label("meta-llama/Llama-2-7b-hf", None) == "meta-llama-Llama-2-7b-hf"
    run = find_training_run(str(run_dir / "adapter"))
    assert run is not None and run.template == "format" and run.dir == run_dir.resolve()
    assert find_training_run(str(tmp_path)) is None and find_training_run(None) is None
    bad = tmp_path / "bad"
    (bad / "adapter").mkdir(parents=True)
    (bad / "config.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ValueError, match="not readable YAML"):
        find_training_run(str(bad / "adapter"))


def test_mt_bench_model_id_and_fastchat_answer_file_come_from_the_run(run_dir, tmp_path, capsys):
    q = tmp_path / "question.jsonl"
    q.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": ["Hi?", "And?"]}) + "\n")
    out = tmp_path / "mt"
    assert eval_main(["task=mt_bench", f"model.adapter={run_dir / 'adapter'}", f"data.path={q}", f"output_dir={out}",
                      "mt_bench.prompt_format=alpaca", *FAST]) == 0, capsys.readouterr().err
    answers = _rows(out / "model_answer" / "smollm2-gsm8k-lorapro.jsonl")
    assert [a["model_id"] for a in answers] == ["smollm2-gsm8k-lorapro"]
    assert answers == _rows(out / "answers.jsonl")
    # the recipe's "Question:/Answer:" format has no multi-turn form: said, not silently replaced
    assert "no multi-turn form" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- inputs before outputs


@pytest.mark.parametrize(
    "task, content, message",
    [
        ("gsm8k", "", "holds no records"),
        ("gsm8k", "\n\n", "holds no records"),
        ("glue", "sentence\tlabel\n", "holds no examples"),
        ("mt_bench", "", "holds no questions"),
    ],
)
def test_empty_eval_file_is_an_error_and_creates_nothing(tmp_path, capsys, task, content, message):
    data = tmp_path / ("dev.tsv" if task == "glue" else "data.jsonl")
    data.write_text(content)
    out = tmp_path / "out"
    assert eval_main([f"task={task}", f"data.path={data}", f"output_dir={out}", *FAST]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.adapter=/nonexistent/adapter", "not a PEFT adapter directory"),
        ("data.path=/nonexistent/gsm8k.jsonl", "does not exist"),
        ("gsm8k.prompt_template=Q: {q}", "whose only placeholder is {question}"),
    ],
)
def test_bad_input_fails_before_output_dir_exists(gsm8k_file, tmp_path, capsys, override, message):
    out = tmp_path / "out"
    assert eval_main(["task=gsm8k", f"data.path={gsm8k_file}", f"output_dir={out}", override, *FAST]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_earlier_results_are_never_replaced_silently(gsm8k_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["task=gsm8k", f"data.path={gsm8k_file}", f"output_dir={out}", *FAST]
    assert eval_main([*args, "run_name=first"]) == 0
    first = (out / "summary.json").read_text()
    assert eval_main([*args, "run_name=second"]) == 2
    err = capsys.readouterr().err
    assert "already holds the results of an earlier evaluation (summary.json, predictions.jsonl)" in err
    assert (out / "summary.json").read_text() == first
    assert eval_main([*args, "run_name=second", "overwrite=true"]) == 0
    assert json.loads((out / "summary.json").read_text())["run_name"] == "second"


# ------------------------------------------------------------------------------------------------------- MNLI

# GLUE's MNLI dev TSV columns (dev_matched.tsv / dev_mismatched.tsv: five annotator labels, then the gold label)
MNLI_HEADER = ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse "
               "sentence2_parse sentence1 sentence2 label1 label2 label3 label4 label5 gold_label").split()


def _mnli_tsv(path, genre, rows):
    lines = ["\t".join(MNLI_HEADER)]
    for i, (premise, hypothesis, gold) in enumerate(rows):
        parse = "( " + premise + " )"
        lines.append("\t".join([str(i), f"{i}1", f"{i}1e", genre, parse, parse, parse, parse, premise, hypothesis,
                                gold, gold, "neutral", gold, gold, gold]))
    path.write_text("\n".join(lines) + "\n")
    return path


MNLI_ROWS = [
    ("The cat sat on the mat.", "A cat is sitting.", "entailment"),
    ("He said \"no\" twice.", "He agreed.", "contradiction"),
    ("The trip took 3 hours.", "The trip was pleasant.", "neutral"),
]


def test_mnli_dev_files_load_with_label_words_and_prompt(tmp_path):
    matched = _mnli_tsv(tmp_path / "dev_matched.tsv", "fiction", MNLI_ROWS)
    mismatched = _mnli_tsv(tmp_path / "dev_mismatched.tsv", "letters", MNLI_ROWS)
    for task, path in (("mnli_matched", matched), ("mnli_mismatched", mismatched)):
        ex = glue.load_glue(task, str(path))
        assert [e["label"] for e in ex] == [0, 2, 1]  # entailment, neutral, contradiction
        assert ex[1]["text_a"] == 'He said "no" twice.' and ex[1]["text_b"] == "He agreed."
        assert glue.text_input(task, ex[0]) == (
            "classify the semantic similarity of the text: The cat sat on the mat.\nA cat is sitting.\nresult: "
        )
    assert glue.TASKS["mnli_matched"].label_words == ("entailment", "neutral", "contradiction")
    with pytest.raises(ValueError, match="belongs to the mismatched dev set.*glue.task=mnli_mismatched"):
        glue.load_glue("mnli_matched", str(mismatched))
    with pytest.raises(ValueError, match="glue.task=mnli_matched"):
        glue.load_glue("mnli_mismatched", str(matched))
    with pytest.raises(ValueError, match="not an MNLI TSV"):
        glue.load_glue("mnli_matched", str(_write(tmp_path / "sst.tsv", "sentence\tlabel\nok\t1\n")))


def _write(path, text):
    path.write_text(text)
    return path


def test_mnli_accuracy_three_classes():
    assert glue.glue_metrics("mnli_matched", [0, 1, 2, -1], [0, 2, 2, 1]) == {"accuracy": 0.5, "invalid_rate": 0.25}
    assert glue.label_from_text("Contradiction.", glue.TASKS["mnli_mismatched"].label_words) == 2


@pytest.mark.parametrize("task, genre", [("mnli_matched", "travel"), ("mnli_mismatched", "oup")])
def test_eval_mnli_end_to_end(tmp_path, capsys, task, genre):
    data = _mnli_tsv(tmp_path / "dev.tsv", genre, MNLI_ROWS)
    out = tmp_path / "out"
    args = ["task=glue", "model.name=builtin:tiny-t5", f"glue.task={task}", f"data.path={data}", f"output_dir={out}",
            "generation.max_new_tokens=3", "generation.progress=false"]
    assert eval_main(args) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    rows = _rows(out / "predictions.jsonl")
    assert [r["label"] for r in rows] == [0, 2, 1]
    assert summary["metrics"] == pytest.approx(glue.glue_metrics(task, [r["prediction"] for r in rows], [0, 2, 1]))
    assert list(summary["metrics"]) == ["accuracy", "invalid_rate"]
    assert summary["details"]["label_words"] == ["entailment", "neutral", "contradiction"]


def test_every_glue_eval_task_has_a_config_value():
    cfg = load_config(EvalConfig, None, ["task=glue", "data.path=x.tsv", "glue.task=mnli_mismatched"])
    assert cfg.glue.task in glue.TASKS


# ------------------------------------------------------------------ the paper's recipes: trained prompt == eval prompt


def _recipe_run(name):
    from lorapro.evaluation.training_run import TrainingRun

    return TrainingRun(ROOT / "runs" / name, yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text()))


def test_paper_recipes_train_on_the_benchmarks_default_prompts():
    """The 7B recipes train on Alpaca and the GLUE recipes on the LoRA-GA prompt: for their runs the prompt taken from
    config.yaml is exactly the benchmark's default (so nothing changes for the paper's numbers)."""
    from lorapro.evaluation import humaneval

    q = "Natalia sold 48 clips. How many?"
    assert _recipe_run("math_llama2_7b").prompt({"question": q}, instruction=q) == build_prompt(q)
    problem = {"prompt": 'def f(x):\n    """Add {one}."""\n'}
    instruction = humaneval.INSTRUCTION.format(prompt=problem["prompt"].strip())
    trained = _recipe_run("code_llama2_7b").prompt({}, instruction=instruction) + humaneval.RESPONSE_START
    assert trained == humaneval.build_prompt(problem)
    for task, name in (("sst2", "sst2"), ("mrpc", "mrpc"), ("qnli", "qnli"), ("mnli_matched", "mnli")):
        ex = {"text_a": "a {b}", "text_b": "c", "label": 0}
        run = _recipe_run(f"glue_t5_base_{name}")
        assert run.prompt(glue.fields_of(task, ex)) == glue.text_input(task, ex)
        assert run.data["label_words"] == list(glue.TASKS[task].label_words)


def test_chat_template_run_is_evaluated_with_one_bos(tmp_path):
    """A run trained with data.template=chat is prompted through the chat template, tokenized without adding BOS
    again (the template holds it), as training now tokenizes it."""
    from lorapro.evaluation.runner import _pick_prompts
    from lorapro.evaluation.training_run import TrainingRun
    from lorapro.models import build_byte_tokenizer

    tok = build_byte_tokenizer()
    tok.chat_template = "{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    run = TrainingRun(tmp_path, {"data": {"template": "chat", "prompt_field": "query"}})
    q = "What is 2+2?"
    prompts, special, source = _pick_prompts(
        "gsm8k.prompt_template", None, lambda: [run.prompt({"question": q}, tok, instruction=q)], lambda: ["-"], run
    )
    assert prompts == ["<s>[What is 2+2?]"] and special is False and source.startswith("training run")
    prompts, special, _ = _pick_prompts("gsm8k.prompt_template", ["Q: 1"], lambda: ["<s>[1]"], lambda: ["-"], run)
    assert prompts == ["Q: 1"] and special is True
