"""GSM8K (Cobbe et al. 2021, arXiv 2110.14168): the paper's prompt, answer extraction and accuracy.

Prompt: the Alpaca template without input, as in the LoRA-Pro / LoRA-GA training data (MetaMathQA):
``Below is an instruction ... ### Instruction:\\n{question}\\n\\n### Response:``.

Gold answer: the number after ``####`` on the last line of the GSM8K solution.

Predicted answer (:func:`extract_answer`). The output is first cut at the stop sequences generation uses
(:data:`DEFAULT_STOP`, or the run's ``generation.stop``): a model that runs on into a new "Question: ..." is scored
on its own first answer, never on the one it invents for the next question. Then the first rule that matches wins:

1. ``#### N`` where the number ends its line (GSM8K's own convention); the **first** such line, as lm-eval's
   strict-match rule. A markdown heading such as ``#### 1. Add the costs`` is not an answer line;
2. an answer phrase -- ``The answer is N`` / ``The answer is: N`` / ``The final answer is N`` / ``Answer: N`` /
   ``Final answer: N``, with "answer" matched as a whole word and followed by "is" or a colon ("She answered
   3 calls" and "To answer this, 3 ..." are not answer phrases): the **first** number of that sentence, as
   MetaMath's and the LoRA-Pro authors' scripts do (``The answer is 2 * 1.5 = 3.`` gives 2). MetaMath splits on
   the phrase and reads the text after the last one, so with several phrases the last one that holds a number
   is used;
3. ``\\boxed{N}`` (the last one);
4. the last number in the text.

Numbers may be negative (``-3``, ``−3``), decimal (``2.50``, ``.5``), have thousands separators (``1,234,567``),
a currency sign or a unit (``$18``, ``18 dollars``, ``50%``). Both sides are compared as exact decimals, so
``18`` = ``18.00`` = ``$18`` = ``18.`` and ``1,000`` = ``1000``; a hyphen between two numbers (``16-3``) is a
minus operator, not a sign. Accuracy counts an example correct when the extracted number equals the gold number.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..jsonl import iter_jsonl
from ..prompts import ALPACA_NO_INPUT
from .generation import cut_at_stop

__all__ = [
    "PROMPT_TEMPLATE",
    "DEFAULT_STOP",
    "build_prompt",
    "parse_number",
    "extract_gold",
    "extract_answer",
    "is_correct",
    "load_gsm8k",
    "score_records",
]

# The Alpaca prompt that `lorapro train` trains on (lorapro.prompts), with the question as the instruction.
PROMPT_TEMPLATE = ALPACA_NO_INPUT.replace("{instruction}", "{question}")

# A model may start a new example after its answer: in the Alpaca format ("### Instruction") or in the
# "Question: ...\nAnswer:" format of lm-eval and of configs/cpu_smollm2_gsm8k.yaml. Generation stops there, and
# extraction cuts there too (outputs scored by `lorapro score` were not necessarily generated with these stops).
DEFAULT_STOP = ["\n### Instruction", "\n\nBelow is an instruction", "\nQuestion:"]

# One number: an optional sign (only when not glued to a word or digit, so "16-3" is 16 and 3), an optional
# currency sign, then digits with optional thousands groups and decimals, or a bare ".5".
_NUM = (
    r"(?:(?<![\w.])[-\u2212\u2013])?(?:\$\s?)?(?<![\d.])"
    r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?!\d)"
)
_NUM_RE = re.compile(_NUM)
# "#### N" only when N ends its line: "#### 1. Add the costs" is a markdown heading, not an answer.
_HASH_RE = re.compile(r"####[ \t]*(" + _NUM + r")[ \t\r]*(?=\n|$)")
# An answer phrase ("answer" as a whole word, then "is" or a colon) and the rest of its sentence.
_ANSWER_IS_RE = re.compile(
    r"\banswer\s*(?:\bis\b\s*[:\uff1a]?|[:\uff1a])([^\n]*?)(?:\.(?=\s|$)|\n|$)",
    re.IGNORECASE,
)
_BOXED_RE = re.compile(r"\\boxed\{\s*(" + _NUM + r")")


def build_prompt(question: str, template: str = PROMPT_TEMPLATE) -> str:
    return template.format(question=question)


def parse_number(text: str) -> Optional[Decimal]:
    """``"-1,234.50"`` -> ``Decimal("-1234.50")``; ``None`` if ``text`` is not one number."""
    t = text.strip().replace("\u2212", "-").replace("\u2013", "-").replace("$", "").replace(",", "").replace(" ", "")
    t = t.rstrip(".")
    if not t or t in ("-", "."):
        return None
    try:
        value = Decimal(t)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def _number_of(matches: Sequence["re.Match[str]"], group: int = 1) -> Optional[Decimal]:
    """The number of the first match (in the given order) whose ``group`` parses as one."""
    for m in matches:
        value = parse_number(m.group(group))
        if value is not None:
            return value
    return None


def extract_gold(solution: str) -> Decimal:
    """The gold number of a GSM8K solution (text after ``####``)."""
    if "####" not in solution:
        raise ValueError(f"GSM8K gold solution has no '#### N' line: {solution[-80:]!r}")
    tail = solution.rsplit("####", 1)[1].strip()
    value = parse_number(tail.split()[0]) if tail else None
    if value is None:
        raise ValueError(f"GSM8K gold answer after '####' is not a number: {tail!r}")
    return value


def extract_answer(output: str, stops: Sequence[str] = DEFAULT_STOP) -> Optional[Decimal]:
    """The model's answer (rules in order: cut at ``stops``, first ``#### N`` line, answer phrase, ``\\boxed``,
    last number; see the module doc), or ``None`` when there is no number."""
    output = cut_at_stop(output, stops)
    value = _number_of(list(_HASH_RE.finditer(output)))
    if value is not None:
        return value
    for m in reversed(list(_ANSWER_IS_RE.finditer(output))):  # the last answer phrase that holds a number
        value = _number_of(list(_NUM_RE.finditer(m.group(1))), 0)  # its sentence's first number
        if value is not None:
            return value
    value = _number_of(list(reversed(list(_BOXED_RE.finditer(output)))))
    if value is not None:
        return value
    return _number_of(list(reversed(list(_NUM_RE.finditer(output)))), 0)


def is_correct(predicted: Optional[Decimal], gold: Decimal) -> bool:
    return predicted is not None and predicted == gold


def _fmt(value: Optional[Decimal]) -> Optional[str]:
    if value is None:
        return None
    return format(value.normalize(), "f")


def load_gsm8k(path: str, limit: Optional[int] = None) -> List[Dict[str, str]]:
    """GSM8K records ``{"question", "answer"}`` from a JSONL file (the format of the official release); an empty
    file is an error."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"GSM8K file '{p}' does not exist. Set data.path to a GSM8K JSONL file with 'question' and 'answer' "
            "fields (e.g. test.jsonl of the openai/grade-school-math repository)."
        )
    records: List[Dict[str, str]] = []
    for lineno, rec in iter_jsonl(p, "GSM8K"):
        if "question" not in rec or "answer" not in rec:
            raise ValueError(f"{p}:{lineno}: expected an object with 'question' and 'answer'.")
        records.append(rec)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise ValueError(f"GSM8K file '{p}' holds no records; an empty file would score 0.0. Set data.path to a "
                         "GSM8K JSONL file.")
    return records


def score_records(records: Sequence[Mapping[str, Any]], stops: Sequence[str] = DEFAULT_STOP) -> Dict[str, Any]:
    """Score ``{"output", "answer"}`` records (``answer`` = the GSM8K gold solution or just its number); each
    output is cut at ``stops`` before extraction (pass the stop sequences generation used).

    Returns ``{"accuracy", "n", "correct", "examples": [{output, extracted, gold, correct}, ...]}``.
    """
    examples = []
    correct = 0
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping) or not isinstance(rec.get("output"), str) or "answer" not in rec:
            raise ValueError(f"record {i}: expected an object with a string 'output' and an 'answer'.")
        answer = str(rec["answer"])
        gold = extract_gold(answer) if "####" in answer else parse_number(answer)
        if gold is None:
            raise ValueError(f"record {i}: 'answer' has neither '#### N' nor a single number: {answer[-80:]!r}")
        pred = extract_answer(rec["output"], stops)
        ok = is_correct(pred, gold)
        correct += ok
        examples.append({"output": rec["output"], "extracted": _fmt(pred), "gold": _fmt(gold), "correct": ok})
    n = len(examples)
    return {"accuracy": correct / n if n else 0.0, "n": n, "correct": correct, "examples": examples}

