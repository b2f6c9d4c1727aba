"""MT-Bench (Zheng et al. 2023, arXiv 2306.05685) the way FastChat's ``llm_judge`` runs it, standard library only.

Answers: both turns of each of the 80 questions, the second turn conditioned on the model's own first answer,
written in FastChat's answer-file format (one JSON object per line)::

    {"question_id": 81, "answer_id": "...", "model_id": "...", "choices": [{"index": 0, "turns": [a1, a2]}],
     "tstamp": 1700000000.0}

Single-answer grading (FastChat ``gen_judgment.py --mode single``): turn 1 is judged with the ``single-v1`` prompt,
turn 2 with ``single-v1-multi-turn``; questions of the categories math, reasoning and coding use
``single-math-v1`` / ``single-math-v1-multi-turn`` with the GPT-4 reference answers. Every judgement is one chat
completion (system prompt + user prompt, temperature 0, ``max_tokens`` 2048) from an OpenAI-compatible
``/v1/chat/completions`` endpoint. The rating is parsed as FastChat does: the first ``[[x]]``, else the first
``[x]``, else -1. The MT-Bench score is the mean of all ratings that are not -1 (also per turn and per category).

Robustness: transient failures (network errors, timeouts, HTTP 408/409/429/5xx, unreadable responses) are retried
with exponential back-off; every finished judgement is appended to a JSONL cache (flushed and fsynced) before the
next one is counted, so a crash loses no finished judgement and a rerun asks only for the missing ones. The cache
key includes a hash of the exact judge prompt, so regenerated answers are judged again.

Differences from FastChat, on purpose: answers are decoded greedily for every category unless sampling is
configured (FastChat samples writing/roleplay at temperature 0.7 and stem/humanities at 0.1); after the retries
are exhausted the run stops with an error instead of recording ``$ERROR$`` with score -1.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..prompts import ALPACA_HEADER
from ..jsonl import read_jsonl

__all__ = [
    "NEED_REF_CATS",
    "ALPACA_HEADER",
    "JudgeError",
    "load_questions",
    "load_judge_prompts",
    "load_reference_answers",
    "find_sidecar",
    "conversation_prompt",
    "answer_record",
    "parse_rating",
    "JudgeTask",
    "make_judge_tasks",
    "ChatClient",
    "JudgementCache",
    "judge_all",
    "summarize",
]

NEED_REF_CATS = ("math", "reasoning", "coding")

_ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


class JudgeError(RuntimeError):
    """The judge endpoint failed for good (after retries) or rejected the request."""


def load_questions(path: str, limit: Optional[int] = None) -> List[Dict[str, Any]]:
    """MT-Bench questions (``question_id``, ``category``, ``turns``)."""
    qs = read_jsonl(path, "MT-Bench question")
    if not qs:
        raise ValueError(f"MT-Bench question file '{path}' holds no questions. Set data.path to FastChat's question.jsonl.")
    for q in qs:
        if not {"question_id", "category", "turns"} <= set(q):
            raise ValueError(f"{path}: a question lacks question_id/category/turns; is this MT-Bench question.jsonl?")
    return qs[:limit] if limit else qs


def load_judge_prompts(path: str) -> Dict[str, Dict[str, Any]]:
    return {p["name"]: p for p in read_jsonl(path, "judge prompt")}


def load_reference_answers(path: str) -> Dict[int, Dict[str, Any]]:
    return {r["question_id"]: r for r in read_jsonl(path, "reference answer")}


def find_sidecar(question_file: str, names: Sequence[str]) -> Optional[str]:
    """The first of ``names`` that exists next to ``question_file`` (or one directory up, FastChat's layout)."""
    base = Path(question_file).expanduser().parent
    for d in (base, base.parent):
        for n in names:
            if (d / n).is_file():
                return str(d / n)
    return None


def conversation_prompt(
    turns: Sequence[str],
    answers: Sequence[str],
    tokenizer: Any = None,
    fmt: str = "alpaca",
    system_prompt: Optional[str] = None,
) -> str:
    """The prompt for the next answer: user ``turns`` so far and the model's ``answers`` to all but the last."""
    if len(answers) != len(turns) - 1:
        raise ValueError("need exactly one answer fewer than turns.")
    if fmt == "chat_template":
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        for i, t in enumerate(turns):
            messages.append({"role": "user", "content": t})
            if i < len(answers):
                messages.append({"role": "assistant", "content": answers[i]})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = [system_prompt or ALPACA_HEADER]
    for i, t in enumerate(turns):
        parts.append(f"### Instruction:\n{t}")
        # the open turn ends like the training prompt (lorapro.prompts.ALPACA_NO_INPUT): "### Response:\n"
        parts.append(f"### Response:\n{answers[i]}" if i < len(answers) else "### Response:\n")
    return "\n\n".join(parts)


def answer_record(question_id: int, model_id: str, turns: Sequence[str]) -> Dict[str, Any]:
    """One line of a FastChat answer file."""
    return {
        "question_id": question_id,
        "answer_id": uuid.uuid4().hex[:22],
        "model_id": model_id,
        "choices": [{"index": 0, "turns": [t.strip() for t in turns]}],
        "tstamp": time.time(),
    }


def parse_rating(judgment: str) -> float:
    """FastChat's rule: the first ``[[x]]``, else the first ``[x]``, else -1."""
    match = _ONE_SCORE.search(judgment) or _ONE_SCORE_BACKUP.search(judgment)
    if not match:
        return -1
    return ast.literal_eval(match.group(1))


@dataclass(frozen=True)
class JudgeTask:
    question_id: int
    category: str
    turn: int
    prompt_name: str
    system_prompt: str
    user_prompt: str

    def key(self, model_id: str, judge_model: str) -> str:
        digest = hashlib.sha256((self.system_prompt + "\x00" + self.user_prompt).encode()).hexdigest()[:16]
        return f"{model_id}|{judge_model}|{self.prompt_name}|{self.question_id}|{self.turn}|{digest}"


def make_judge_tasks(
    questions: Sequence[Mapping[str, Any]],
    answers: Mapping[int, Mapping[str, Any]],
    judge_prompts: Mapping[str, Mapping[str, Any]],
    references: Mapping[int, Mapping[str, Any]],
) -> List[JudgeTask]:
    """Both turns of every question, with FastChat's prompt choice and formatting."""
    tasks = []
    for q in questions:
        qid = q["question_id"]
        if qid not in answers:
            raise ValueError(f"no answer for question {qid} in the answer file.")
        a = answers[qid]["choices"][0]["turns"]
        needs_ref = q["category"] in NEED_REF_CATS
        kwargs: Dict[str, str] = {}
        if needs_ref:
            if qid not in references:
                raise ValueError(
                    f"question {qid} ({q['category']}) needs a reference answer; it is missing from the reference "
                    "file (mt_bench.reference_answers)."
                )
            ref = references[qid]["choices"][0]["turns"]
            kwargs = {"ref_answer_1": ref[0], "ref_answer_2": ref[1]}
        for turn in (1, 2):
            name = ("single-math-v1" if needs_ref else "single-v1") + ("-multi-turn" if turn == 2 else "")
            if name not in judge_prompts:
                raise ValueError(f"judge prompt '{name}' is missing from the judge prompt file.")
            tpl = judge_prompts[name]
            if turn == 1:
                user = tpl["prompt_template"].format(question=q["turns"][0], answer=a[0], **kwargs)
            else:
                user = tpl["prompt_template"].format(
                    question_1=q["turns"][0], question_2=q["turns"][1], answer_1=a[0], answer_2=a[1], **kwargs
                )
            tasks.append(JudgeTask(qid, q["category"], turn, name, tpl["system_prompt"], user))
    return tasks


class ChatClient:
    """Minimal client of an OpenAI-compatible ``POST {base_url}/chat/completions`` (urllib, no dependency).

    Retries transient failures ``max_retries`` times, waiting ``backoff_s * 2**attempt`` seconds (at most 60, or
    the server's ``Retry-After``) between attempts.
    """

    RETRY_STATUS = (408, 409, 429)

    def __init__(
        self,
        base_url: Optional[str] = None,
        model: str = "gpt-4",
        api_key: Optional[str] = None,
        max_retries: int = 8,
        backoff_s: float = 2.0,
        timeout_s: float = 120.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            raise JudgeError(
                "No judge endpoint: set mt_bench.judge.base_url (e.g. http://localhost:8000/v1) or the "
                "OPENAI_BASE_URL environment variable, or mt_bench.judge.enabled=false to only generate answers."
            )
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self._api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self._sleep = sleep

    def complete(self, system: str, user: str, temperature: float = 0.0, max_tokens: int = 2048) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
                "temperature": temperature,
                "max_tokens": max_tokens,
                "n": 1,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        last = ""
        for attempt in range(self.max_retries + 1):
            retry_after: Optional[float] = None
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    data = json.loads(resp.read().decode("utf-8"))
                content = data["choices"][0]["message"]["content"]
                if not isinstance(content, str):
                    raise ValueError("message content is not a string")
                return content
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace") if e.fp else ""
                last = f"HTTP {e.code}: {detail}"
                if not (e.code in self.RETRY_STATUS or e.code >= 500):
                    raise JudgeError(
                        f"The judge endpoint {self.url} rejected the request ({last}). Check mt_bench.judge.base_url, "
                        "mt_bench.judge.model and the API key."
                    ) from None
                try:
                    retry_after = float(e.headers.get("Retry-After", "")) if e.headers else None
                except ValueError:
                    retry_after = None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"{type(e).__name__}: {e}"
            except (ValueError, KeyError, IndexError, TypeError) as e:  # unreadable JSON / unexpected shape
                last = f"malformed response ({type(e).__name__}: {e})"
            if attempt < self.max_retries:
                delay = min(self.backoff_s * (2**attempt), 60.0)
                if retry_after is not None:
                    delay = min(max(delay, retry_after), 60.0)
                self._sleep(delay)
        raise JudgeError(f"The judge endpoint {self.url} failed {self.max_retries + 1} times; last error: {last}")


class JudgementCache:
    """Append-only JSONL of finished judgements, keyed by :meth:`JudgeTask.key`; safe across threads and crashes."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.records: Dict[str, Dict[str, Any]] = {}
        if self.path.is_file():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a crash: that judgement is asked again
                    if isinstance(rec, dict) and "cache_key" in rec:
                        self.records[rec["cache_key"]] = rec
            with open(self.path, "rb+") as fb:  # end a cut-short last line, so the next record starts on its own
                fb.seek(0, os.SEEK_END)
                if fb.tell() > 0:
                    fb.seek(-1, os.SEEK_END)
                    if fb.read(1) != b"\n":
                        fb.write(b"\n")

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def add(self, record: Dict[str, Any]) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.records[record["cache_key"]] = record


def judge_all(
    tasks: Sequence[JudgeTask],
    client: ChatClient,
    cache: JudgementCache,
    model_id: str,
    parallel: int = 4,
    max_tokens: int = 2048,
    progress: bool = False,
) -> List[Dict[str, Any]]:
    """Judge every task not already in ``cache``; returns all judgements (FastChat's format) in task order.

    On a permanent failure the pending requests are cancelled and :class:`JudgeError` is raised; everything
    finished so far is in the cache, so running again resumes.
    """
    todo = [t for t in tasks if t.key(model_id, client.model) not in cache]

    def one(t: JudgeTask) -> None:
        judgment = client.complete(t.system_prompt, t.user_prompt, temperature=0.0, max_tokens=max_tokens)
        cache.add(
            {
                "question_id": t.question_id,
                "model": model_id,
                "judge": [client.model, t.prompt_name],
                "user_prompt": t.user_prompt,
                "judgment": judgment,
                "score": parse_rating(judgment),
                "turn": t.turn,
                "category": t.category,
                "tstamp": time.time(),
                "cache_key": t.key(model_id, client.model),
            }
        )

    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="judging", unit="judgement")
    pool = ThreadPoolExecutor(max_workers=parallel)
    try:
        futures = [pool.submit(one, t) for t in todo]
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in done:
                if f.exception() is not None:
                    for p in pending:
                        p.cancel()
                    raise f.exception()  # type: ignore[misc]
                if bar is not None:
                    bar.update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    return [cache.records[t.key(model_id, client.model)] for t in tasks]


def summarize(judgements: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Mean rating over judgements with a parsed score (FastChat drops -1), overall, per turn, per category."""
    valid = [j for j in judgements if j["score"] != -1]

    def mean(xs: List[float]) -> Optional[float]:
        return sum(xs) / len(xs) if xs else None

    by_cat: Dict[str, List[float]] = {}
    for j in valid:
        by_cat.setdefault(j.get("category", "?"), []).append(float(j["score"]))
    return {
        "mt_bench_score": mean([float(j["score"]) for j in valid]),
        "turn_1": mean([float(j["score"]) for j in valid if j["turn"] == 1]),
        "turn_2": mean([float(j["score"]) for j in valid if j["turn"] == 2]),
        "n_judgements": len(judgements),
        "n_unparsed": len(judgements) - len(valid),
        "per_category": {c: mean(v) for c, v in sorted(by_cat.items())},
    }


def load_answers(path: str) -> Dict[int, Dict[str, Any]]:
    """``question_id -> answer record`` from a FastChat answer file (the last record per question wins)."""
    out: Dict[int, Dict[str, Any]] = {}
    for i, rec in enumerate(read_jsonl(path, "MT-Bench answer")):
        try:
            turns = rec["choices"][0]["turns"]
            qid = rec["question_id"]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"{path}: record {i} is not in FastChat's answer format (question_id, choices[0].turns).") from None
        if len(turns) < 2:
            raise ValueError(f"{path}: the answer to question {qid} has {len(turns)} turn(s); MT-Bench needs 2.")
        out[qid] = rec
    return out


def turn_prompts(
    questions: Sequence[Mapping[str, Any]],
    first_answers: Optional[Sequence[str]],
    tokenizer: Any,
    fmt: str,
    system_prompt: Optional[str],
) -> List[str]:
    """Prompts for turn 1 (``first_answers=None``) or turn 2 of every question."""
    if first_answers is None:
        return [conversation_prompt(q["turns"][:1], [], tokenizer, fmt, system_prompt) for q in questions]
    return [
        conversation_prompt(q["turns"][:2], [a], tokenizer, fmt, system_prompt) for q, a in zip(questions, first_answers)
    ]


def resolve_format(fmt: str, tokenizer: Any) -> str:
    if fmt == "auto":
        return "chat_template" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if fmt == "chat_template" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("mt_bench.prompt_format=chat_template, but this tokenizer has no chat template; use alpaca.")
    return fmt


def default_files(question_file: str) -> Tuple[Optional[str], Optional[str]]:
    """Judge prompts and reference answers next to the question file, in the shared-data or FastChat layout."""
    prompts = find_sidecar(question_file, ["judge_prompts.jsonl"])
    refs = find_sidecar(question_file, ["reference_answer_gpt-4.jsonl", "reference_answer/gpt-4.jsonl"])
    return prompts, refs
