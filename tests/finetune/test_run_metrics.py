"""metrics.json of a finished run: the test set is scored with the GLUE metrics, the numbers match an independent
evaluation of the saved adapter, the optimizer state size is exact, and alignment is logged per layer type."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from lorapro.cli import main as lorapro_main
from lorapro.evaluation.glue import accuracy, f1_binary, matthews_corrcoef
from lorapro.finetune.metrics import layer_type, optimizer_state_bytes, read_metrics
from lorapro.models import load_model_and_tokenizer

SST2 = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "glue" / "sst2"


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "cls"
    rc = lorapro_main([
        "train", "method=lora-pro", f"output_dir={out}", "model.name=builtin:tiny-bert", "model.task=seq-cls",
        "model.num_labels=2", f"data.train={SST2 / 'alps_train.tsv'}", "data.train_size=48", "data.eval_size=16",
        f"data.test={SST2 / 'dev.tsv'}", "data.test_size=40", "train.max_steps=4", "train.global_batch_size=8",
        "train.micro_batch_size=8", "optim.lr=1e-2", "optim.warmup_ratio=0", "lora.target_modules=[all-linear]",
        "train.alignment_steps=2",
    ])
    assert rc == 0
    return out


def test_metrics_json_matches_an_independent_evaluation_of_the_saved_adapter(cls_run):
    m = read_metrics(cls_run)
    assert m["format"] == 1 and m["method"] == "lora-pro" and m["steps"] == 4 and m["lr"] == 1e-2
    assert set(m["test"]) >= {"loss", "accuracy", "f1", "matthews_corrcoef"}
    assert set(m["eval"]) >= {"loss", "accuracy"}
    # re-score the test set with the saved adapter and the GLUE metric functions
    base, tok = load_model_and_tokenizer("builtin:tiny-bert", task="seq-cls", num_labels=2)
    model = PeftModel.from_pretrained(base, cls_run / "adapter").eval()
    lines = (SST2 / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:41]
    preds, labels, losses = [], [], []
    with torch.no_grad():
        for line in lines:
            text, label = line.rsplit("\t", 1)
            enc = tok(text, truncation=True, max_length=128, return_tensors="pt")
            out = model(**enc, labels=torch.tensor([int(label)]))
            preds.append(int(out.logits.argmax(-1)))
            labels.append(int(label))
            losses.append(float(out.loss))
    assert m["test"]["accuracy"] == pytest.approx(accuracy(preds, labels), abs=1e-9)
    assert m["test"]["f1"] == pytest.approx(f1_binary(preds, labels), abs=1e-9)
    assert m["test"]["matthews_corrcoef"] == pytest.approx(matthews_corrcoef(preds, labels), abs=1e-9)
    assert m["test"]["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)


def test_alignment_records_per_layer_type(cls_run):
    recs = [json.loads(x) for x in (cls_run / "train_log.jsonl").read_text().splitlines()]
    al = [r for r in recs if r["kind"] == "alignment"]
    assert [r["step"] for r in al] == [0, 2, 4]
    for r in al:
        # LoRA-Pro's equivalent gradient is the least-squares projection of G: never less aligned than LoRA's
        assert r["lorapro_cos_global"] >= r["lora_cos_global"] - 1e-6
        assert all(v["layers"] >= 1 for v in r["by_type"].values())
        assert not any(".default" in t or "layer." in t for t in r["by_type"])
    assert any(r["kind"] == "test" for r in recs)


def test_optimizer_state_bytes_counts_each_tensor_once():
    p = torch.nn.Parameter(torch.zeros(10, 3))
    q = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = torch.optim.AdamW([p, q])
    (p.sum() + q.sum()).backward()
    opt.step()
    # exp_avg + exp_avg_sq per parameter, plus the float32 step counters (1 element each)
    assert optimizer_state_bytes(opt) == 2 * 30 * 4 + 2 * 4 * 8 + 2 * 4


@pytest.mark.parametrize("name, want", [
    ("base_model.model.bert.encoder.layer.3.attention.self.query", "attention.self.query"),
    ("base_model.model.model.layers.11.mlp.down_proj", "mlp.down_proj"),
    ("transformer.h.0.attn.c_attn", "attn.c_attn"),
    ("classifier.dense", "classifier.dense"),
])
def test_layer_type(name, want):
    assert layer_type(name) == want
