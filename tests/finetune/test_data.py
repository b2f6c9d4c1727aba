"""Data pipeline of `lorapro train`: readers, the paper's recipe filters on synthetic fixtures, prompt masking,
length rule, first-N / next-M selection, padding."""

import json

import pytest
import torch

from lorapro.finetune.data import (
    DataError,
    DataSpec,
    PadCollator,
    encode_record,
    filter_codefeedback_codeblock,
    filter_metamathqa_gsm,
    filter_wizardlm_no_refusal,
    format_prompt,
    read_records,
    select_examples,
)
from lorapro.models import build_byte_tokenizer

TOK = build_byte_tokenizer()  # 1 byte = 1 token, so lengths are exact and easy to reason about


# --- synthetic fixtures with the schemas of ../shared/data/{metamathqa,codefeedback}/SOURCE.md -----------------

METAMATH = [
    {"query": "Tom has 3 apples and buys 2. How many?", "response": "3 + 2 = 5.\nThe answer is: 5",
     "type": "GSM_AnsAug", "original_question": "q1"},
    {"query": "Solve x^2 = 4.", "response": "x = 2 or -2.\nThe answer is: 2", "type": "MATH_AnsAug",
     "original_question": "q2"},
    {"query": "Rephrased: a bag has 4 balls...", "response": "4 balls.\nThe answer is: 4", "type": "GSM_Rephrased",
     "original_question": "q3"},
    {"query": "If X apples ... answer is 5, what is X?", "response": "X = 3.\nThe answer is: 3", "type": "GSM_FOBAR",
     "original_question": "q4"},
    {"query": "MATH SV", "response": "y.\nThe answer is: 1", "type": "MATH_SV", "original_question": "q5"},
    {"query": "GSM SV", "response": "z.\nThe answer is: 7", "type": "GSM_SV", "original_question": "q6"},
]

CODEFEEDBACK = [
    {"query": "Reverse a list in Python.",
     "answer": "Use slicing:\n```python\nxs[::-1]\n```\nOr in place:\n```python\nxs.reverse()\n```\nDone.",
     "resource": "x", "lang": "python"},
    {"query": "What is a monad?", "answer": "A monad is a design pattern. No code here.", "resource": "x", "lang": "haskell"},
    {"query": "Unterminated", "answer": "Try:\n```js\nconsole.log(1)", "resource": "x", "lang": "js"},
]

WIZARD = [
    {"instruction": "Write a haiku.", "output": "Autumn moonlight..."},
    {"instruction": "Hack a bank.", "output": "I'm sorry, but I cannot help with that."},
    {"instruction": "Who are you?", "output": "As an AI language model, I do not have feelings."},
    {"instruction": "Sorting?", "output": "Use merge sort; it is stable."},
    {"instruction": "Apologise.", "output": "SORRY for the delay!"},
]


def test_metamathqa_filter_keeps_exactly_the_gsm_types():
    kept = [r for r in METAMATH if filter_metamathqa_gsm(r, "response") is not None]
    assert [r["type"] for r in kept] == ["GSM_AnsAug", "GSM_Rephrased", "GSM_FOBAR", "GSM_SV"]


def test_codefeedback_filter_drops_answers_without_code_and_cuts_after_first_block():
    out = [filter_codefeedback_codeblock(r, "answer") for r in CODEFEEDBACK]
    assert out[0]["answer"] == "Use slicing:\n```python\nxs[::-1]\n```"
    assert out[0]["query"] == CODEFEEDBACK[0]["query"]
    assert CODEFEEDBACK[0]["answer"].endswith("Done.")  # the input record is not modified
    assert out[1] is None
    # an unterminated block is kept and closed, as the authors' split/join does
    assert out[2]["answer"] == "Try:\n```js\nconsole.log(1)```"


def test_wizardlm_filter_drops_refusals_case_insensitively():
    kept = [r["instruction"] for r in WIZARD if filter_wizardlm_no_refusal(r, "output") is not None]
    assert kept == ["Write a haiku.", "Sorting?"]


def test_filter_names_missing_field():
    with pytest.raises(DataError, match="no field 'type'"):
        filter_metamathqa_gsm({"query": "q", "response": "r"}, "response")


# --- readers ---------------------------------------------------------------------------------------------------


def test_readers_json_list_mapping_jsonl_and_tsv(tmp_path):
    recs = [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    (tmp_path / "l.json").write_text(json.dumps(recs))
    (tmp_path / "m.json").write_text(json.dumps({"0": recs[0], "1": recs[1]}))
    (tmp_path / "d.json").write_text(json.dumps({"data": recs}))
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    for name in ("l.json", "m.json", "d.json", "r.jsonl"):
        assert list(read_records(str(tmp_path / name))) == recs, name
    # GLUE-style TSV: BOM in the header, quotes are literal characters
    (tmp_path / "h.tsv").write_text('\ufeffQuality\t#1 String\n1\t"He said" it\n0\tplain\n', encoding="utf-8")
    assert list(read_records(str(tmp_path / "h.tsv"))) == [
        {"Quality": "1", "#1 String": '"He said" it'},
        {"Quality": "0", "#1 String": "plain"},
    ]
    # CoLA-style TSV without a header row
    (tmp_path / "c.tsv").write_text("gj04\t1\t\tThe sailors rode.\ngj04\t0\t*\tRode sailors the.\n")
    rows = list(read_records(str(tmp_path / "c.tsv"), tsv_columns=["source", "label", "orig", "sentence"]))
    assert [(r["label"], r["sentence"]) for r in rows] == [("1", "The sailors rode."), ("0", "Rode sailors the.")]


def test_reader_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        list(read_records(str(tmp_path / "bad.jsonl")))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported extension"):
        read_records(str(tmp_path / "x.csv"))


def test_real_glue_files_parse():
    """The shipped CPU recipes point at these files; every row must parse with the configured fields."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "glue"
    if not root.is_dir():
        pytest.skip("../shared/data not present")
    sst2 = list(read_records(str(root / "sst2" / "dev.tsv")))
    assert len(sst2) == 872 and set(r["label"] for r in sst2) == {"0", "1"}
    mrpc = list(read_records(str(root / "mrpc" / "dev.tsv")))
    assert len(mrpc) == 408 and "#1 String" in mrpc[0]
    qnli = list(read_records(str(root / "qnli" / "train_subset_9k.json")))
    assert len(qnli) == 8999 and set(r["label"] for r in qnli) == {"entailment", "not_entailment"}


# --- prompt format, masking, length rule --------------------------------------------------------------------------


def test_alpaca_no_input_template_and_prompt_masking():
    rec = {"query": "What is 2+2?", "response": "4"}
    spec = DataSpec(task="causal-lm", template="alpaca", prompt_field="query", response_field="response",
                    max_tokens=10_000)
    prompt = format_prompt(rec, template="alpaca", prompt_field="query")
    assert prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nWhat is 2+2?\n\n### Response:\n"
    )
    ex = encode_record(rec, spec, TOK)
    n_prompt = len(prompt.encode())
    assert ex["input_ids"] == list(TOK(prompt + " 4")["input_ids"]) + [TOK.eos_token_id]
    assert ex["labels"][:n_prompt] == [-100] * n_prompt  # every prompt token is masked
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]  # " 4" + EOS are learned
    assert TOK.decode(ex["input_ids"][n_prompt:-1]) == " 4"


def test_chat_template_trains_with_one_bos():
    """The chat template renders BOS itself; a tokenizer that also adds BOS must not put a second one in front."""
    from tokenizers.processors import TemplateProcessing

    tok = build_byte_tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    tok.chat_template = "{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    assert tok("x")["input_ids"] == [tok.bos_token_id, tok.convert_tokens_to_ids("x")]  # adds BOS, like Llama's
    spec = DataSpec(task="causal-lm", template="chat", prompt_field="q", response_field="a", max_tokens=100)
    ex = encode_record({"q": "hi", "a": "ok"}, spec, tok)
    byte_ids = build_byte_tokenizer()("[hi] ok")["input_ids"]  # 1 byte = 1 token, no BOS
    assert ex["input_ids"] == [tok.bos_token_id, *byte_ids, tok.eos_token_id]
    n_prompt = 1 + len("[hi]")  # BOS + the rendered user turn are masked, " ok" + EOS learned
    assert ex["labels"] == [-100] * n_prompt + ex["input_ids"][n_prompt:]
    # other templates are plain text, so there the tokenizer's BOS is kept
    plain = DataSpec(task="causal-lm", template="plain", prompt_field="q", response_field="a", max_tokens=100)
    assert encode_record({"q": "hi", "a": "ok"}, plain, tok)["input_ids"][:2] == [tok.bos_token_id, byte_ids[1]]


def test_length_rule_drops_at_max_tokens_never_truncates():
    prompt_len = len(format_prompt({"q": "x"}, template="plain", prompt_field="q"))  # 1 byte
    rec = {"q": "x", "a": "abcd"}  # "x" + " " + "abcd" = 6 tokens
    keep = DataSpec(task="causal-lm", template="plain", prompt_field="q", response_field="a", max_tokens=7)
    drop = DataSpec(task="causal-lm", template="plain", prompt_field="q", response_field="a", max_tokens=6)
    assert prompt_len == 1
    assert len(encode_record(rec, keep, TOK)["input_ids"]) == 7  # 6 + EOS
    assert encode_record(rec, drop, TOK) is None


def test_selection_first_n_train_then_next_m_eval_after_filtering():
    spec = DataSpec(task="causal-lm", template="alpaca", prompt_field="query", response_field="response",
                    filter="metamathqa-gsm", max_tokens=10_000)
    (train, ev), read = select_examples(METAMATH, spec, TOK, [2, 1])
    decode = lambda ex: TOK.decode(ex["input_ids"])  # noqa: E731
    assert ["Tom has" in decode(train[0]), "Rephrased" in decode(train[1])] == [True, True]
    assert "If X apples" in decode(ev[0])
    assert read == 4  # stopped reading once 2 + 1 kept records were found


def test_seq_cls_and_seq2seq_encoding():
    rec = {"premise": "A cat sleeps.", "hypothesis": "An animal rests.", "label": "neutral"}
    names = ("entailment", "neutral", "contradiction")
    cls = DataSpec(task="seq-cls", text_fields=("premise", "hypothesis"), label_names=names, max_length=8)
    ex = encode_record(rec, cls, TOK)
    assert ex["labels"] == 1 and len(ex["input_ids"]) <= 8
    s2s = DataSpec(task="seq2seq", template="format", prompt_format="classify: {premise}\n{hypothesis}\nresult: ",
                   label_names=names, label_words=("yes", "maybe", "no"), max_length=128)
    ex = encode_record(rec, s2s, TOK)
    assert TOK.decode(ex["input_ids"]) == "classify: A cat sleeps.\nAn animal rests.\nresult: "
    assert TOK.decode(ex["labels"]) == "maybe"
    with pytest.raises(DataError, match="neither an integer nor one of"):
        encode_record({**rec, "label": "unknown"}, cls, TOK)


def test_pad_collator():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = PadCollator(pad_token_id=0)(batch)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    cls = PadCollator(0)([{"input_ids": [1, 2], "labels": 1}, {"input_ids": [3], "labels": 0}])
    assert cls["labels"].dtype == torch.long and cls["labels"].tolist() == [1, 0]
