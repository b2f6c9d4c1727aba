"""`lorapro demo`: the shipped data slice and the whole pipeline (train both methods, held-out loss, alignment,
table, plot) on builtin:tiny-llama — the real run on SmolLM2 takes minutes and is measured for the README."""

import json
import math
from pathlib import Path

import pytest
import yaml

from lorapro import demo


def test_shipped_demo_data_is_small_licensed_and_disjoint():
    files = {p.name: p for p in demo.DATA_DIR.iterdir()}
    assert {"LICENSE_gsm8k", "SOURCE.md", demo.TRAIN_FILE.name, demo.TEST_FILE.name} <= set(files)
    assert "MIT License" in files["LICENSE_gsm8k"].read_text()
    assert "MIT" in files["SOURCE.md"].read_text() and "openai/grade-school-math" in files["SOURCE.md"].read_text()
    assert sum(p.stat().st_size for p in files.values()) < 400_000
    train = [json.loads(x) for x in demo.TRAIN_FILE.read_text().splitlines()]
    test = [json.loads(x) for x in demo.TEST_FILE.read_text().splitlines()]
    assert len(train) == 400 and len(test) == 100
    assert all(set(r) == {"question", "answer"} and "####" in r["answer"] for r in train + test)
    assert not {r["question"] for r in train} & {r["question"] for r in test}


def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = demo.main(["--model", "builtin:tiny-llama", "--max-tokens", "1024", "--steps", "4", "--heldout", "6",
                    "--lr", "5e-3", "--output-dir", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| base model |" in text and "| lora |" in text and "| lora-pro |" in text
    res = json.loads((out / "demo_results.json").read_text())
    rows = {r["run"]: r for r in res["rows"]}
    assert set(rows) == {"base model", "lora", "lora-pro"}
    for m in ("lora", "lora-pro"):
        r = rows[m]
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["heldout_loss"])
        assert -1.0 <= r["align_cos"] <= 1.0 and r["align_rel_error"] >= 0
        assert len(res["curves"][m]) == 4
        assert (out / m / "adapter" / "adapter_model.safetensors").is_file()
        # the held-out loss moved away from the base model's: the adapter was trained and is in use
        assert r["heldout_loss"] != rows["base model"]["heldout_loss"]
    # LoRA-Pro's direction is the least-squares projection of G onto what the factors can express, so at the same
    # state its cosine with G is at least LoRA's.
    summ = rows["lora-pro"]["alignment_summary"]
    assert summ["lorapro_cos_global"] >= summ["lora_cos_global"]
    assert (out / "demo_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert res["lrs"] == {"lora": 5e-3, "lora-pro": 5e-3} and "one learning rate for every method" in text
    # the held-out loss shown for a run is its metrics.json test loss, and the demo's own held-out loss function
    # (used for the base model) computes the same number from the saved adapter
    from peft import PeftModel

    from lorapro.models import load_model_and_tokenizer

    base, tok = load_model_and_tokenizer("builtin:tiny-llama")
    cfg = demo.demo_config("lora", steps=4, output_dir=out, seed=0, lr=5e-3, model="builtin:tiny-llama",
                           max_tokens=1024, heldout=6)
    held = demo.heldout_examples(cfg, tok, 6)
    model = PeftModel.from_pretrained(base, out / "lora" / "adapter")
    assert demo.heldout_loss(model, held, tok.pad_token_id) == pytest.approx(rows["lora"]["heldout_loss"], rel=1e-5)


def test_demo_uses_each_methods_tuned_lr_from_the_study(tmp_path, capsys):
    """The demo's default lrs are the chosen lrs of the committed study in the demo's setting."""
    summary = Path(__file__).resolve().parents[2] / "docs" / "results" / "gsm8k_smollm2" / "summary.json"
    chosen = json.loads(summary.read_text())["tasks"]["gsm8k"]
    for m, lr in demo.TUNED_LRS.items():
        assert lr == (chosen[m]["chosen_lr"] or chosen[m]["search_lr"]), m
    cfg = demo.demo_config("lora", steps=20, output_dir=tmp_path, seed=0, lr=1e-3, model="smollm2-135m-instruct")
    study = yaml.safe_load((summary.parent / "sweep.yaml").read_text())["base"]
    assert cfg.train.max_steps == study["train"]["max_steps"] and cfg.data.train_size == study["data"]["train_size"]
    assert cfg.data.prompt_format == study["data"]["prompt_format"] and cfg.lora.r == study["lora"]["r"]
    assert demo.main(["--methods", "lora,dora"]) == 2
    assert "no tuned lr for ['dora']" in capsys.readouterr().err


def test_demo_rejects_unknown_method(capsys):
    assert demo.main(["--methods", "lora,lora-prp"]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_demo_never_replaces_a_calling_process():
    """main() re-executes itself with OMP_WAIT_POLICY set only when it *is* the command, never under a caller."""
    assert demo._started_as_command() is False


def test_demo_makes_no_network_lookups_and_shows_no_deprecation_warnings(tmp_path, monkeypatch, capsys):
    """The demo's model (smollm2-135m-instruct) has a name that is no path but looks like a hub repository, so
    PEFT's default save asked the hub for its config.json. The tiny model stands in for it under that name."""
    import socket
    import warnings

    import lorapro.models as models

    real_load = models.load_model_and_tokenizer

    def named_like_the_demo_model(name, **kwargs):
        model, tok = real_load(name, **kwargs)
        model.config._name_or_path = model.name_or_path = "smollm2-135m-instruct"
        return model, tok

    import peft.utils.other

    lookups = []

    def no_network(*args, **kwargs):
        lookups.append(args[:2])
        raise OSError("no network in this test")

    monkeypatch.setattr(models, "load_model_and_tokenizer", named_like_the_demo_model)
    monkeypatch.setattr(peft.utils.other, "file_exists", no_network)  # PEFT's hub look-up
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # a user's machine: online unless told otherwise
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = demo.main(["--model", "builtin:tiny-llama", "--max-tokens", "1024", "--steps", "2", "--heldout", "2",
                        "--lr", "5e-3", "--output-dir", str(tmp_path / "demo")])
    assert rc == 0
    assert lookups == []
    shown = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
    assert not [w for w in shown if "Deprecat" in w or "FutureWarning" in w or "remote file" in w
                or "config file" in w], shown
