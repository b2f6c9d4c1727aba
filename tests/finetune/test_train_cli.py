"""End to end through the real `lorapro train` CLI on builtin:tiny-llama (random init, no download), every method:
the saved artefact reloads (PeftModel.from_pretrained / from_pretrained) and gives the trained model's logits, the
JSONL log and the PNG plot are written, and each method really ran its own optimizer."""

import json
import math

import pytest
import torch
from peft import PeftModel

from lorapro.cli import main as lorapro_main
from lorapro.finetune.methods import METHODS
from lorapro.models import load_model_and_tokenizer

STEPS = 3


def _train(tmp_path, data, method, *extra):
    out = tmp_path / method
    argv = [
        "train",
        f"data.train={data}",
        f"method={method}",
        f"output_dir={out}",
        f"train.max_steps={STEPS}",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",  # gradient accumulation 2
        "optim.lr=1e-2",
        "optim.warmup_ratio=0",
        "data.train_size=16",
        "lora.r=4",
        "lora.lora_ga_batches=2",
        *extra,
    ]
    return lorapro_main(argv), out


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", list(METHODS))
def test_train_every_method_saves_a_reloadable_artefact(tmp_path, add_data, capture_runs, capsys, method):
    rc, out = _train(tmp_path, add_data, method)
    assert rc == 0
    (run,) = capture_runs
    stdout = capsys.readouterr().out

    # one line says where the adapter went
    saved = out / ("model" if method == "full" else "adapter")
    assert f"saved to {saved}" in stdout
    # the JSONL log has one finite train record per step, with lr and throughput
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 and r["tokens"] > 0 for r in train)
    assert records[-1]["kind"] == "end" and records[-1]["saved"] == str(saved)
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (out / "config.yaml").is_file()

    # the optimizer the Trainer stepped is the method's
    opt = run.optimizer
    if METHODS[method].optimizer == "lorapro":
        assert type(opt).__name__ == "LoRAProAdamW"
        assert {g.get("mode") for g in opt.param_groups if g.get("lora")} == {METHODS[method].optimizer_kwargs["mode"]}
    else:
        assert type(opt).__name__ == "AdamW"
    if method == "loraplus":
        lrs = sorted({g["initial_lr"] for g in opt.param_groups if g["params"]})  # before the schedule
        assert lrs[-1] / lrs[0] == pytest.approx(16.0)  # lr(B) = 16 lr(A)

    # reload in a fresh base model: same logits as the trained model, different from the untouched base
    ids = torch.tensor([run.train_dataset[0]["input_ids"]])
    trained = _logits(run.model, ids)
    fresh, _ = load_model_and_tokenizer("builtin:tiny-llama")
    base = _logits(fresh, ids)
    if method == "full":
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(saved)
    else:
        cfg = json.loads((saved / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == "builtin:tiny-llama"
        assert (saved / "adapter_model.safetensors").is_file()
        reloaded = PeftModel.from_pretrained(fresh, saved)
    got = _logits(reloaded, ids)
    torch.testing.assert_close(got, trained, atol=2e-5, rtol=1e-4)
    assert (trained - base).abs().max() > 1e-3
    if method != "full":
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(_logits(merged, ids), trained, atol=2e-5, rtol=1e-4)


def test_methods_differ_on_the_same_data(tmp_path, add_data, capture_runs):
    """Same data, seed and schedule: LoRA and LoRA-Pro start from the same loss and then diverge."""
    for m in ("lora", "lora-pro"):
        assert _train(tmp_path, add_data, m)[0] == 0
    lora, pro = (dict(r.train_losses) for r in capture_runs)
    assert lora[1] == pro[1]  # identical first batch and initial weights
    assert lora[STEPS] != pro[STEPS]


def test_seq_cls_and_seq2seq_tasks(tmp_path, capture_runs):
    """The classification head and the T5 text-to-text path, on a tiny SST-2-like TSV file."""
    tsv = tmp_path / "sst.tsv"
    rows = ["sentence\tlabel"] + [f"{w} movie\t{i % 2}" for i, w in enumerate(["good", "bad", "great", "awful"] * 4)]
    tsv.write_text("\n".join(rows) + "\n")
    common = [f"data.train={tsv}", "train.max_steps=2", "train.global_batch_size=4", "train.micro_batch_size=4",
              "optim.lr=1e-2", "optim.warmup_ratio=0", "lora.target_modules=[all-linear]", "data.eval_size=4",
              "data.train_size=12"]
    rc = lorapro_main(["train", *common, "method=lora-pro", f"output_dir={tmp_path / 'cls'}",
                       "model.name=builtin:tiny-bert", "model.task=seq-cls", "model.num_labels=2"])
    assert rc == 0
    rc = lorapro_main(["train", *common, "method=lora-pro", f"output_dir={tmp_path / 's2s'}",
                       "model.name=builtin:tiny-t5", "model.task=seq2seq", "data.template=format",
                       "data.prompt_format=sentiment: {sentence}", "data.label_words=[negative,positive]"])
    assert rc == 0
    cls, s2s = capture_runs
    assert cls.eval_loss is not None and math.isfinite(cls.eval_loss)
    log = [json.loads(x) for x in (tmp_path / "cls" / "train_log.jsonl").read_text().splitlines()]
    assert any("eval_accuracy" in r for r in log)
    # the classifier head is trained in full and saved with the adapter (PEFT modules_to_save)
    fresh, _ = load_model_and_tokenizer("builtin:tiny-bert", task="seq-cls", num_labels=2)
    torch.nn.init.normal_(fresh.classifier.weight)  # a head that differs from the trained one
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "cls" / "adapter").eval()
    ids = torch.tensor([cls.train_dataset[0]["input_ids"]])
    cls.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, cls.model(input_ids=ids).logits)
    assert math.isfinite(s2s.train_losses[-1][1])


def test_bf16_autocast_and_bf16_base_weights(tmp_path, add_data, capture_runs):
    """train.bf16 (autocast) with the base loaded in bfloat16: LoRA factors stay fp32 (PEFT), the run is finite."""
    rc, _ = _train(tmp_path, add_data, "lora-pro", "train.bf16=true", "model.dtype=bfloat16")
    assert rc == 0
    (run,) = capture_runs
    assert all(math.isfinite(l) for _, l in run.train_losses)
    dtypes = {n.split(".")[-2]: p.dtype for n, p in run.model.named_parameters() if "lora_" in n}
    assert set(dtypes.values()) == {torch.float32}
    assert run.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16


def test_hub_dataset_names_go_through_datasets_load_dataset(tmp_path, monkeypatch):
    """A name that is not a local file is read with datasets.load_dataset(name, config, split=...)."""
    import sys
    import types

    from lorapro.finetune.data import DataError, read_records

    calls = []
    fake = types.ModuleType("datasets")

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return [{"sentence": "fine", "label": 1}]

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert list(read_records("nyu-mll/glue", split="validation", hub_config="sst2")) == [{"sentence": "fine", "label": 1}]
    assert calls == [("nyu-mll/glue", "sst2", "validation")]
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DataError, match="pip install datasets"):
        read_records("meta-math/MetaMathQA")
