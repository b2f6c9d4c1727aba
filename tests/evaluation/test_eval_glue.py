"""GLUE: metrics against hand-computed values, label-word parsing, loaders of the four dev sets."""

import math
from pathlib import Path

import pytest

from lorapro.evaluation import glue

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "glue"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data")

# predictions vs labels: TP = 2 (idx 0, 4), TN = 2 (idx 2, 5), FP = 1 (idx 1), FN = 1 (idx 3)
PRED = [1, 1, 0, 0, 1, 0]
GOLD = [1, 0, 0, 1, 1, 0]


def test_binary_metrics_hand_computed():
    assert glue.accuracy(PRED, GOLD) == pytest.approx(4 / 6)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 - 1) / sqrt(3*3*3*3) = 1/3
    assert glue.matthews_corrcoef(PRED, GOLD) == pytest.approx(1 / 3)
    # F1 = 2TP / (2TP + FP + FN) = 4 / 6
    assert glue.f1_binary(PRED, GOLD) == pytest.approx(2 / 3)


def test_mcc_edge_cases_and_invalid_predictions():
    assert glue.matthews_corrcoef([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert glue.matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert glue.matthews_corrcoef([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0  # constant prediction: 0 by convention
    # an unparsable answer (-1) is its own wrong class: s=4, c=2, p={1:2, -1:1, 0:1}, t={1:1, 0:3}
    # MCC = (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)) = (8 - 5) / sqrt(10 * 6)
    assert glue.matthews_corrcoef([1, -1, 0, 1], [1, 0, 0, 0]) == pytest.approx(3 / math.sqrt(60))
    # F1 with an invalid prediction on a positive example: TP=1, FP=0, FN=1 -> 2/3
    assert glue.f1_binary([1, -1, 0], [1, 1, 0]) == pytest.approx(2 / 3)
    assert glue.f1_binary([0, 0], [0, 0]) == 0.0
    with pytest.raises(ValueError):
        glue.accuracy([1], [1, 0])


def test_metrics_agree_with_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics")
    import random

    rng = random.Random(0)
    for _ in range(20):
        y = [rng.randint(0, 1) for _ in range(30)]
        p = [rng.choice([0, 1, 1, -1]) for _ in range(30)]
        assert glue.matthews_corrcoef(p, y) == pytest.approx(sk.matthews_corrcoef(y, p), abs=1e-12)
        assert glue.f1_binary(p, y) == pytest.approx(sk.f1_score(y, p, labels=[1], average="micro", zero_division=0.0), abs=1e-12)
        assert glue.accuracy(p, y) == pytest.approx(sk.accuracy_score(y, p), abs=1e-12)


def test_glue_metrics_per_task():
    assert set(glue.glue_metrics("sst2", PRED, GOLD)) == {"accuracy", "invalid_rate"}
    cola = glue.glue_metrics("cola", PRED, GOLD)
    assert list(cola)[0] == "matthews_corrcoef" and cola["matthews_corrcoef"] == pytest.approx(1 / 3)
    mrpc = glue.glue_metrics("mrpc", [1, -1], [1, 1])
    assert mrpc["f1"] == pytest.approx(2 / 3) and mrpc["accuracy"] == 0.5 and mrpc["invalid_rate"] == 0.5


@pytest.mark.parametrize(
    "text, label",
    [
        ("positive", 1),
        (" Positive.", 1),
        ("negative</s>", 0),  # the word followed by a non-word character
        ("negative", 0),
        ("negative, clearly", 0),
        ("positively", -1),  # a longer word is not the label word
        ("neutral", -1),
        ("", -1),
    ],
)
def test_label_from_text_sst2(text, label):
    assert glue.label_from_text(text, glue.TASKS["sst2"].label_words) == label


def test_label_from_text_prefers_longest_word():
    words = glue.TASKS["qnli"].label_words
    assert glue.label_from_text("not_entailment", words) == 1
    assert glue.label_from_text("entailment", words) == 0
    assert glue.label_from_text("entailment_x", words) == -1


def test_text_input_format():
    assert glue.text_input("sst2", {"text_a": "great movie"}) == "classify the sentiment of the text: great movie\nresult: "
    assert (
        glue.text_input("mrpc", {"text_a": "a", "text_b": "b"})
        == "classify the semantic similarity of the text: a\nb\nresult: "
    )


@needs_data
@pytest.mark.parametrize(
    "task, rel, n, n_pos",
    [
        ("sst2", "sst2/dev.tsv", 872, 444),
        ("cola", "cola/in_domain_dev.tsv", 527, None),
        ("mrpc", "mrpc/dev.tsv", 408, 279),
        ("qnli", "qnli/dev.tsv", 5463, None),
    ],
)
def test_loaders_read_the_dev_sets(task, rel, n, n_pos):
    ex = glue.load_glue(task, str(DATA / rel))
    assert len(ex) == n
    assert {e["label"] for e in ex} == {0, 1}
    assert all(e["text_a"] for e in ex)
    if glue.TASKS[task].pair:
        assert all(e["text_b"] for e in ex)
    if n_pos is not None:
        assert sum(e["label"] for e in ex) == n_pos
    assert glue.load_glue(task, str(DATA / rel), limit=3) == ex[:3]


def test_loader_reports_bad_rows(tmp_path):
    f = tmp_path / "dev.tsv"
    f.write_text("sentence\tlabel\ngood\t1\nbad row without label\n")
    with pytest.raises(ValueError, match=":3"):
        glue.load_glue("sst2", str(f))
