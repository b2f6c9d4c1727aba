"""GSM8K: prompt, gold parsing and answer extraction on tricky strings, scoring."""

import json
from decimal import Decimal
from pathlib import Path

import pytest

from lorapro.evaluation import gsm8k

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "gsm8k" / "test.jsonl"


def test_prompt_is_the_paper_alpaca_prompt():
    p = gsm8k.build_prompt("What is 2+2?")
    assert p == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\n"
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is: 18", "18"),
        ("She sells 16 - 3 - 4 = 9 eggs.\n#### 9", "9"),  # "####" wins over later numbers
        ("#### 9\nSome trailing chatter with 123", "9"),
        ("So the total is $1,234.50.", "1234.5"),  # currency, thousands separator, decimals, final period
        ("The answer is -5.", "-5"),
        ("The temperature drops to −7 degrees", "-7"),  # unicode minus
        ("Answer: $ 1,000,000", "1000000"),
        ("The final answer is **42**", "42"),
        ("\\boxed{3.5}", "3.5"),
        ("It costs .5 dollars", "0.5"),
        ("16-3-4=9", "9"),  # hyphens between numbers are operators: last number 9, not -4
        ("The answer is 18. Then I count 3 more and 7", "18"),  # an explicit answer beats the last number
        ("results 12,345 and 6", "6"),  # last-number fallback
        ("Answer: 18.00", "18"),  # compared as decimals
        ("We get 50% of the 120 apples, i.e. 60 apples", "60"),
        ("The answer is 1,500.", "1500"),
        ("The values are 1,5 and 7,2", "2"),  # "1,5" is not a thousands group: numbers 1, 5, 7, 2
        ("x = 3.14159", "3.14159"),
        ("The answer is 2 * 1.5 = 3.\n", "2"),  # the first number of the answer sentence (MetaMath's rule)
        ("The answer is: 4.5 dollars. Later text 9", "4.5"),  # the sentence ends at ". ", not inside 4.5
        ("Answer: 12\nAnswer: unknown", "12"),  # the last phrase that holds a number
    ],
)
def test_extract_answer_tricky_strings(text, expected):
    assert gsm8k.extract_answer(text) == Decimal(expected)


# The rule order of extract_answer, one case each; every output here was scored wrong before the rule existed.


def test_rule0_output_is_cut_at_the_stop_sequences_before_extraction():
    ran_on = "The answer is: 5\nQuestion: Tom has 3 apples and buys 4. How many?\nAnswer: The answer is: 7"
    assert gsm8k.extract_answer(ran_on) == Decimal(5)
    alpaca = "The answer is 5.\n### Instruction:\nWhat is 3+4?\n\n### Response:\nThe answer is 7."
    assert gsm8k.extract_answer(alpaca) == Decimal(5)
    assert gsm8k.extract_answer(ran_on, stops=[]) == Decimal(7)  # no stops: nothing is cut
    # score_records cuts at the stops it is given (those generation used)
    res = gsm8k.score_records([{"output": "#### 3\nQ2: #### 4", "answer": "#### 4"}], stops=["\nQ2:"])
    assert res["examples"][0]["extracted"] == "3" and res["correct"] == 0


def test_rule1_the_first_hash_answer_wins():
    assert gsm8k.extract_answer("so 5 eggs.\n#### 5\nNext: 7 eggs\n#### 7") == Decimal(5)
    assert gsm8k.extract_answer("so 5 eggs.\r\n#### 5\r\nthen 7") == Decimal(5)  # Windows line ends


def test_rule1_a_markdown_heading_is_not_a_hash_answer():
    out = "#### 1. Add the costs\n4 + 5 = 9\n#### 2. Conclude\nThe answer is: 9"
    assert gsm8k.extract_answer(out) == Decimal(9)
    assert gsm8k.extract_answer("#### 1. Add the costs\n4 + 5 = 9\n#### 9\n") == Decimal(9)


def test_rule2_first_number_of_the_answer_sentence():
    assert gsm8k.extract_answer("The answer is 12 apples, since 4 * 3 = 12 and 2 are left. 40") == Decimal(12)
    assert gsm8k.extract_answer("Total 40.\nThe answer is: 3 boxes of 8 = 24.") == Decimal(3)


def test_rule2_answer_must_be_a_whole_word_with_is_or_a_colon():
    assert gsm8k.extract_answer("She answered 3 calls. Then she made 4 sales") == Decimal(4)
    assert gsm8k.extract_answer("To answer this, we need 3 boxes. In total 12") == Decimal(12)
    assert gsm8k.extract_answer("Final answer: 6. Check: 2 * 3") == Decimal(6)


def test_rule3_boxed_then_rule4_last_number():
    assert gsm8k.extract_answer("We get \\boxed{14} from 7 * 2") == Decimal(14)
    assert gsm8k.extract_answer("7 * 2 = 14, plus 1 is 15") == Decimal(15)


@pytest.mark.parametrize("text", ["", "no numbers here", "####", "The answer is: unknown"])
def test_extract_answer_none(text):
    assert gsm8k.extract_answer(text) is None


def test_extract_gold():
    assert gsm8k.extract_gold("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\n#### 18") == Decimal(18)
    assert gsm8k.extract_gold("...\n#### 1,000") == Decimal(1000)
    assert gsm8k.extract_gold("...\n#### -3") == Decimal(-3)
    with pytest.raises(ValueError, match="####"):
        gsm8k.extract_gold("no marker 5")


def test_is_correct_compares_numbers():
    assert gsm8k.is_correct(gsm8k.extract_answer("The answer is: $18.00"), gsm8k.extract_gold("#### 18"))
    assert not gsm8k.is_correct(gsm8k.extract_answer("The answer is: 17"), gsm8k.extract_gold("#### 18"))
    assert not gsm8k.is_correct(None, Decimal(0))


def test_score_records_counts_and_fields():
    recs = [
        {"output": "so 2+2=4. The answer is: 4", "answer": "2+2=4\n#### 4"},
        {"output": "I think it is 5", "answer": "#### 4"},
        {"output": "no idea", "answer": "#### 4"},
        {"output": "#### -2.5", "answer": -2.5},  # a bare number as gold is accepted too
    ]
    res = gsm8k.score_records(recs)
    assert res["n"] == 4 and res["correct"] == 2 and res["accuracy"] == 0.5
    assert [e["extracted"] for e in res["examples"]] == ["4", "5", None, "-2.5"]
    assert [e["correct"] for e in res["examples"]] == [True, False, False, True]
    with pytest.raises(ValueError, match="record 1"):
        gsm8k.score_records([recs[0], {"output": "x"}])


@pytest.mark.skipif(not DATA.is_file(), reason="needs ../shared/data")
def test_every_gold_answer_of_the_test_set_parses_and_scores_itself():
    records = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    assert len(records) == 1319
    # The gold solution itself, used as the model output, must be scored correct (its "#### N" line).
    res = gsm8k.score_records([{"output": r["answer"], "answer": r["answer"]} for r in records])
    assert res["accuracy"] == 1.0
    # The reasoning without the final line must not accidentally be scored by the "####" rule.
    stripped = [{"output": r["answer"].rsplit("####", 1)[0], "answer": r["answer"]} for r in records]
    assert all("####" not in s["output"] for s in stripped)
    assert gsm8k.load_gsm8k(str(DATA), limit=5) == records[:5]
