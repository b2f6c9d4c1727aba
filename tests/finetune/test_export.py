"""`lorapro export RUN_DIR`: the merged model computes what base + adapter computes, and loads without PEFT."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from lorapro.cli import main as lorapro_main
from lorapro.models import load_model_and_tokenizer


def _batch(tok):
    enc = tok(["Add 3 and 4.", "Add 10 and 32. Then subtract 2."], return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_export_merges_the_adapter_and_the_logits_match(tmp_path, add_data, capsys):
    run = tmp_path / "run"
    assert lorapro_main(["train", f"data.train={add_data}", f"output_dir={run}", "method=lora", "train.max_steps=3",
                         "train.global_batch_size=4", "optim.lr=2e-2", "optim.warmup_ratio=0"]) == 0
    assert lorapro_main(["export", str(run)]) == 0
    out = run / "merged"
    assert f"merged model saved to {out}" in capsys.readouterr().out
    assert not (out / "adapter_config.json").exists()  # a plain model, no adapter files

    base, tok = load_model_and_tokenizer("builtin:tiny-llama")
    batch = _batch(tok)
    with torch.no_grad():
        base_logits = base(**batch).logits
        adapted = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
        want = adapted(**batch).logits
        merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        got = merged(**batch).logits
    assert (want - base_logits).abs().max() > 1e-3  # the adapter changes the output, so the comparison means something
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_export_keeps_a_trained_classification_head(tmp_path, capsys):
    import json

    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps({"sentence": f"text {i} " * (i % 5 + 1), "label": i % 2}) + "\n"
                            for i in range(16)))
    run = tmp_path / "run"
    assert lorapro_main(["train", f"data.train={data}", f"output_dir={run}", "method=lora", "model.task=seq-cls",
                         "model.name=builtin:tiny-bert", "model.num_labels=2", "lora.target_modules=[query,value]",
                         "train.max_steps=2", "train.global_batch_size=8", "optim.lr=5e-2"]) == 0
    out = tmp_path / "exported"
    assert lorapro_main(["export", str(run / "adapter"), "--output", str(out)]) == 0  # the adapter dir also works
    base, tok = load_model_and_tokenizer("builtin:tiny-bert", task="seq-cls", num_labels=2)
    batch = _batch(tok)
    with torch.no_grad():
        want = PeftModel.from_pretrained(base, str(run / "adapter")).eval()(**batch).logits
        got = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()(**batch).logits
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("setup, message", [("empty", "has no config.yaml"), ("occupied", "exists and is not empty")])
def test_export_errors(tmp_path, add_data, capsys, setup, message):
    run = tmp_path / "run"
    run.mkdir()
    args = ["export", str(run)]
    if setup == "occupied":
        (run / "config.yaml").write_text(f"data:\n  train: {add_data}\n")
        (run / "adapter").mkdir()
        (run / "adapter" / "adapter_config.json").write_text("{}")
        (tmp_path / "taken").mkdir()
        (tmp_path / "taken" / "x").write_text("keep")
        args += ["--output", str(tmp_path / "taken")]
    assert lorapro_main(args) == 2
    assert message in capsys.readouterr().err
