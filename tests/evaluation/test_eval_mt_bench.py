"""MT-Bench: FastChat prompt selection and formatting, score parsing, and the judge client against a local server
(retry after an HTTP 500, resume after an interrupted run without asking finished judgements again)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lorapro.evaluation import mt_bench as mt

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "mt_bench"
needs_data = pytest.mark.skipif(not (DATA / "question.jsonl").is_file(), reason="needs ../shared/data")


class FakeJudge:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 with scripted failures.

    The rating it returns is a pure function of the judged prompt, so the expected scores are known.
    ``fail_first`` requests get HTTP 500; after ``die_after`` successful answers every request gets HTTP 500.
    """

    def __init__(self, fail_first=0, die_after=None, status_for_all=None):
        self.fail_first = fail_first
        self.die_after = die_after
        self.status_for_all = status_for_all
        self.requests = []  # every request body received
        self.answered = []  # user prompts answered with 200
        self.auth = []
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.requests.append(body)
                    judge.auth.append(self.headers.get("Authorization"))
                    n = len(judge.requests)
                    fail = (
                        self.path != "/v1/chat/completions"
                        or judge.status_for_all is not None
                        or n <= judge.fail_first
                        or (judge.die_after is not None and len(judge.answered) >= judge.die_after)
                    )
                    if not fail:
                        judge.answered.append(body["messages"][1]["content"])
                if fail:
                    code = judge.status_for_all or (404 if self.path != "/v1/chat/completions" else 500)
                    self.send_response(code)
                    self.end_headers()
                    self.wfile.write(b'{"error": "scripted failure"}')
                    return
                rating = judge.rating(body["messages"][1]["content"])
                payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": f"Fine. Rating: [[{rating}]]"}}]}
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @staticmethod
    def rating(user_prompt: str) -> int:
        return len(user_prompt) % 10 + 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _questions():
    return [
        {"question_id": 1, "category": "writing", "turns": ["Write a haiku.", "Now in French."]},
        {"question_id": 2, "category": "math", "turns": ["What is 2+2?", "And 3+3?"]},
        {"question_id": 3, "category": "coding", "turns": ["Reverse a list in Python.", "In one line?"]},
    ]


def _answers(questions, model_id="m"):
    return {q["question_id"]: mt.answer_record(q["question_id"], model_id, [f"A1 to {q['question_id']}", f"A2 to {q['question_id']}"]) for q in questions}


def _refs():
    return {
        2: {"question_id": 2, "choices": [{"index": 0, "turns": ["4", "6"]}]},
        3: {"question_id": 3, "choices": [{"index": 0, "turns": ["x[::-1]", "x[::-1]"]}]},
    }


@pytest.fixture(scope="module")
def judge_prompts():
    if (DATA / "judge_prompts.jsonl").is_file():
        return mt.load_judge_prompts(str(DATA / "judge_prompts.jsonl"))
    pytest.skip("needs ../shared/data")


# --------------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text, score",
    [
        ("Rating: [[7]]", 7),
        ("The answer is good. [[8.5]]", 8.5),
        ("Rating: [6]", 6),  # FastChat's backup pattern
        ("[[10]] but later [3]", 10),  # double brackets win
        ("First [[4]] then [[9]]", 4),  # the first match
        ("I would give it a 7/10", -1),
        ("", -1),
    ],
)
def test_parse_rating_like_fastchat(text, score):
    assert mt.parse_rating(text) == score


def test_answer_record_has_fastchat_fields():
    rec = mt.answer_record(81, "my-model", [" first ", "second\n"])
    assert set(rec) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
    assert rec["choices"] == [{"index": 0, "turns": ["first", "second"]}]
    assert isinstance(rec["answer_id"], str) and len(rec["answer_id"]) == 22 and isinstance(rec["tstamp"], float)


def test_conversation_prompt_alpaca_turns():
    p1 = mt.conversation_prompt(["Q1"], [])
    p2 = mt.conversation_prompt(["Q1", "Q2"], ["A1"])
    assert p1 == mt.ALPACA_HEADER + "\n\n### Instruction:\nQ1\n\n### Response:\n"
    assert p2 == p1 + "A1\n\n### Instruction:\nQ2\n\n### Response:\n"


# -------------------------------------------------------------------------------------------- judge prompts


def test_judge_tasks_follow_fastchat(judge_prompts):
    qs = _questions()
    tasks = mt.make_judge_tasks(qs, _answers(qs), judge_prompts, _refs())
    assert [(t.question_id, t.turn, t.prompt_name) for t in tasks] == [
        (1, 1, "single-v1"),
        (1, 2, "single-v1-multi-turn"),
        (2, 1, "single-math-v1"),
        (2, 2, "single-math-v1-multi-turn"),
        (3, 1, "single-math-v1"),
        (3, 2, "single-math-v1-multi-turn"),
    ]
    t = tasks[0]
    assert t.system_prompt == "You are a helpful assistant."
    assert t.user_prompt.endswith(
        "[Question]\nWrite a haiku.\n\n[The Start of Assistant's Answer]\nA1 to 1\n[The End of Assistant's Answer]"
    )
    math2 = tasks[3].user_prompt
    assert "### User:\nWhat is 2+2?\n\n### Reference answer:\n4\n\n### User:\nAnd 3+3?\n\n### Reference answer:\n6" in math2
    assert "### Assistant A:\nA2 to 2" in math2
    with pytest.raises(ValueError, match="reference answer"):
        mt.make_judge_tasks(qs, _answers(qs), judge_prompts, {})


@needs_data
def test_shared_data_has_everything_mt_bench_needs(judge_prompts):
    qs = mt.load_questions(str(DATA / "question.jsonl"))
    refs = mt.load_reference_answers(str(DATA / "reference_answer_gpt-4.jsonl"))
    assert len(qs) == 80 and all(len(q["turns"]) == 2 for q in qs)
    tasks = mt.make_judge_tasks(qs, _answers(qs), judge_prompts, refs)
    assert len(tasks) == 160
    assert sum(t.prompt_name.startswith("single-math") for t in tasks) == 60  # 30 questions x 2 turns
    assert mt.default_files(str(DATA / "question.jsonl")) == (
        str(DATA / "judge_prompts.jsonl"),
        str(DATA / "reference_answer_gpt-4.jsonl"),
    )


# ------------------------------------------------------------------------------------------ client vs server


def _tasks(judge_prompts):
    qs = _questions()
    return mt.make_judge_tasks(qs, _answers(qs), judge_prompts, _refs())


def test_judging_retries_a_failed_request_and_scores(tmp_path, judge_prompts):
    tasks = _tasks(judge_prompts)
    sleeps = []
    with FakeJudge(fail_first=1) as server:
        client = mt.ChatClient(server.url, "judge-x", "sk-test", max_retries=3, backoff_s=0.01, sleep=sleeps.append)
        cache = mt.JudgementCache(str(tmp_path / "j.jsonl"))
        out = mt.judge_all(tasks, client, cache, "m", parallel=1)
    assert len(server.requests) == len(tasks) + 1  # one 500, retried
    assert sleeps == [0.01]
    assert server.auth[0] == "Bearer sk-test"
    body = server.requests[0]
    assert body["model"] == "judge-x" and body["temperature"] == 0.0 and body["max_tokens"] == 2048
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    expected = [FakeJudge.rating(t.user_prompt) for t in tasks]
    assert [j["score"] for j in out] == expected
    assert [j["turn"] for j in out] == [1, 2] * 3 and out[2]["judge"] == ["judge-x", "single-math-v1"]
    s = mt.summarize(out)
    assert s["mt_bench_score"] == pytest.approx(sum(expected) / len(expected))
    assert s["turn_1"] == pytest.approx(sum(expected[0::2]) / 3)
    assert s["turn_2"] == pytest.approx(sum(expected[1::2]) / 3)
    assert s["n_unparsed"] == 0
    assert len((tmp_path / "j.jsonl").read_text().splitlines()) == len(tasks)


def test_interrupted_run_resumes_without_asking_again(tmp_path, judge_prompts):
    tasks = _tasks(judge_prompts)
    cache_file = str(tmp_path / "judgments.jsonl")
    # Run 1: the endpoint dies for good after 2 answers; the run stops with a clear error.
    with FakeJudge(die_after=2) as server:
        client = mt.ChatClient(server.url, "judge-x", None, max_retries=2, backoff_s=0.0, sleep=lambda s: None)
        with pytest.raises(mt.JudgeError, match="failed 3 times"):
            mt.judge_all(tasks, client, mt.JudgementCache(cache_file), "m", parallel=2)
        first = list(server.answered)
    assert len(first) == 2
    # A crash while writing leaves a partial line: it must be ignored, not break the resume.
    with open(cache_file, "a") as f:
        f.write('{"question_id": 3, "cache_key": "trunc')
    # Run 2: healthy endpoint; only the missing judgements are asked.
    with FakeJudge() as server:
        client = mt.ChatClient(server.url, "judge-x", None, max_retries=2, backoff_s=0.0, sleep=lambda s: None)
        out = mt.judge_all(tasks, client, mt.JudgementCache(cache_file), "m", parallel=2)
        second = list(server.answered)
    assert len(second) == len(tasks) - 2
    assert not set(first) & set(second), "a finished judgement was asked again"
    assert set(first) | set(second) == {t.user_prompt for t in tasks}
    assert [j["score"] for j in out] == [FakeJudge.rating(t.user_prompt) for t in tasks]
    # Run 3: everything cached, no request at all.
    with FakeJudge() as server:
        client = mt.ChatClient(server.url, "judge-x", None, max_retries=0)
        mt.judge_all(tasks, client, mt.JudgementCache(cache_file), "m")
        assert server.requests == []


def test_changed_answers_are_judged_again(tmp_path, judge_prompts):
    qs = _questions()[:1]
    with FakeJudge() as server:
        client = mt.ChatClient(server.url, "j", None, max_retries=0)
        cache = str(tmp_path / "c.jsonl")
        mt.judge_all(mt.make_judge_tasks(qs, _answers(qs), judge_prompts, {}), client, mt.JudgementCache(cache), "m")
        new = {1: mt.answer_record(1, "m", ["other", "answers"])}
        mt.judge_all(mt.make_judge_tasks(qs, new, judge_prompts, {}), client, mt.JudgementCache(cache), "m")
        assert len(server.answered) == 4


def test_client_errors_are_not_retried_and_are_explained(judge_prompts):
    with FakeJudge(status_for_all=401) as server:
        client = mt.ChatClient(server.url, "j", "bad-key", max_retries=5, backoff_s=0.0, sleep=lambda s: None)
        with pytest.raises(mt.JudgeError, match="rejected the request.*HTTP 401"):
            client.complete("s", "u")
        assert len(server.requests) == 1


def test_unreachable_endpoint_backs_off_exponentially():
    sleeps = []
    client = mt.ChatClient("http://127.0.0.1:9/v1", "j", None, max_retries=3, backoff_s=0.5, timeout_s=1, sleep=sleeps.append)
    with pytest.raises(mt.JudgeError, match="failed 4 times"):
        client.complete("s", "u")
    assert sleeps == [0.5, 1.0, 2.0]


def test_endpoint_and_key_from_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://example.invalid/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    c = mt.ChatClient()
    assert c.url == "http://example.invalid/v1/chat/completions" and c._api_key == "sk-env"
    monkeypatch.delenv("OPENAI_BASE_URL")
    with pytest.raises(mt.JudgeError, match="OPENAI_BASE_URL"):
        mt.ChatClient()


# ---------------------------------------------------------------------------------------------- end to end


@needs_data
def test_eval_mt_bench_end_to_end_with_the_tiny_model(tmp_path, capsys, monkeypatch):
    from lorapro.evaluation.cli import eval_main

    out = tmp_path / "mt"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    with FakeJudge(fail_first=1) as server:
        args = [
            "task=mt_bench", "model.name=builtin:tiny-llama", f"data.path={DATA / 'question.jsonl'}", "data.limit=3",
            f"output_dir={out}", "generation.max_new_tokens=4", "generation.progress=false", "mt_bench.model_id=tiny",
            "mt_bench.judge.enabled=true", f"mt_bench.judge.base_url={server.url}", "mt_bench.judge.backoff_s=0.01",
            "mt_bench.judge.api_key=sk-secret",
        ]
        assert eval_main(args) == 0, capsys.readouterr().err
        n_requests = len(server.requests)
        assert server.auth[-1] == "Bearer sk-secret"  # the config wins over the environment
    answers = [json.loads(l) for l in (out / "answers.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [81, 82, 83]
    for a in answers:
        assert set(a) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert a["model_id"] == "tiny" and len(a["choices"][0]["turns"]) == 2
    judgements = [json.loads(l) for l in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(judgements) == 6 and n_requests == 7  # 3 questions x 2 turns, plus the retried HTTP 500
    summary = json.loads((out / "summary.json").read_text())
    scores = [j["score"] for j in judgements]
    assert summary["metrics"]["mt_bench_score"] == pytest.approx(sum(scores) / 6)
    assert summary["n"] == 3 and summary["details"]["n_judgements"] == 6
    assert "sk-secret" not in (out / "summary.json").read_text()
    # FastChat's layout as well: model_answer/<model_id>.jsonl and model_judgment/gpt-4_single.jsonl
    assert [json.loads(l) for l in (out / "model_answer" / "tiny.jsonl").read_text().splitlines()] == answers
    fastchat = [json.loads(l) for l in (out / "model_judgment" / "gpt-4_single.jsonl").read_text().splitlines()]
    key = lambda j: (j["question_id"], j["turn"], j["score"])  # noqa: E731 - the cache is in completion order
    assert [key(j) for j in fastchat] == sorted(map(key, judgements))
    assert {j["model"] for j in fastchat} == {"tiny"} and {j["judge"][0] for j in fastchat} == {"gpt-4"}
    assert summary["files"]["fastchat_judgments"] == "model_judgment/gpt-4_single.jsonl"
    # Judging the written answer file again needs no model and no request: everything is cached. The finished
    # run's results are replaced only when asked to.
    created = (out / "summary.json").read_text()
    with FakeJudge() as server:
        args2 = [
            "task=mt_bench", f"data.path={DATA / 'question.jsonl'}", "data.limit=3", f"output_dir={out}",
            f"mt_bench.answers={out / 'answers.jsonl'}", "mt_bench.judge.enabled=true", f"mt_bench.judge.base_url={server.url}",
        ]
        assert eval_main(args2) == 2
        assert "overwrite=true" in capsys.readouterr().err
        assert (out / "summary.json").read_text() == created
        assert eval_main([*args2, "overwrite=true"]) == 0, capsys.readouterr().err
        assert server.requests == []
    assert json.loads((out / "summary.json").read_text())["metrics"]["mt_bench_score"] == pytest.approx(sum(scores) / 6)
