"""What a user gets when something is wrong: the key they probably meant, a clear data message and nothing
half-written; and --help documenting every key."""

import dataclasses
import importlib.util
import typing

import pytest

from lorapro.cli import main as lorapro_main
from lorapro.finetune.config import TrainConfig


def _all_keys(cls, prefix=""):
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def test_help_documents_every_key(capsys):
    assert lorapro_main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    keys = _all_keys(TrainConfig)
    assert len(keys) > 40
    for key in keys:
        assert f"  {key} (" in out, key
    assert "lora-pro-efficient" in out and "usage: lorapro train" in out


def test_bad_override_key_names_the_closest(tmp_path, add_data, capsys):
    rc = lorapro_main(["train", f"data.train={add_data}", f"output_dir={tmp_path / 'o'}", "optim.lrr=1e-4"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "Unknown config key 'optim.lrr'" in err and "Did you mean 'optim.lr'?" in err
    assert not (tmp_path / "o").exists()


def test_bad_yaml_key_names_the_closest(tmp_path, add_data, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  train: {add_data}\ntrain:\n  global_batch: 8\n")
    assert lorapro_main(["train", str(cfg)]) == 2
    assert "Unknown config key 'train.global_batch'. Did you mean 'train.global_batch_size'?" in capsys.readouterr().err


def test_bad_method_names_the_closest(tmp_path, add_data, capsys):
    assert lorapro_main(["train", f"data.train={add_data}", "method=lorapro"]) == 2
    assert "Did you mean 'lora-pro'?" in capsys.readouterr().err


def test_missing_data_file_is_clear_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    missing = tmp_path / "nowhere" / "train.jsonl"
    rc = lorapro_main(["train", f"data.train={missing}", f"output_dir={out}", "train.max_steps=1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"Data file '{missing}' does not exist" in err
    assert not out.exists()  # nothing half-written


def test_wrong_field_is_clear_and_writes_nothing(tmp_path, add_data, capsys):
    out = tmp_path / "run"
    rc = lorapro_main(["train", f"data.train={add_data}", f"output_dir={out}", "data.prompt_field=question"])
    assert rc == 2
    assert "no field 'question'" in capsys.readouterr().err
    assert not out.exists()


def test_non_empty_output_dir_is_refused(tmp_path, add_data, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    rc = lorapro_main(["train", f"data.train={add_data}", f"output_dir={out}", "train.max_steps=1"])
    assert rc == 2
    assert "is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]


def test_batch_sizes_must_divide(tmp_path, add_data, capsys):
    rc = lorapro_main(["train", f"data.train={add_data}", "train.global_batch_size=10", "train.micro_batch_size=4"])
    assert rc == 2
    assert "must be a multiple of train.micro_batch_size" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("optim.learning_rate=1e-4", "Did you mean 'optim.lr'? ('learning_rate' is a Hugging Face"),
        ("learning_rate=1e-4", "Did you mean 'optim.lr'?"),
        ("num_train_epochs=3", "Did you mean 'train.epochs'?"),
        ("per_device_train_batch_size=8", "Did you mean 'train.micro_batch_size'?"),
        ("train.gradient_accumulation_steps=4", "Did you mean 'train.global_batch_size'? "),
        ("train.lr=1e-4", "Did you mean 'optim.lr'?"),  # the right name in the wrong section
        ("optim.warmup_ratioo=0.1", "Did you mean 'optim.warmup_ratio'?"),
    ],
)
def test_suggestions_keep_the_section_and_know_hugging_face_names(tmp_path, add_data, capsys, override, suggestion):
    out = tmp_path / "o"
    assert lorapro_main(["train", f"data.train={add_data}", f"output_dir={out}", override]) == 2
    err = capsys.readouterr().err
    assert f"Unknown config key '{override.split('=')[0]}'. {suggestion}" in err
    assert "shard_state" not in err
    assert not out.exists()


def _train_rc(tmp_path, add_data, *overrides):
    out = tmp_path / "run"
    rc = lorapro_main(["train", f"data.train={add_data}", f"output_dir={out}", "train.max_steps=1", *overrides])
    return rc, out


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.name=builtin:tiny-lama"], "Unknown builtin model 'builtin:tiny-lama'. Did you mean 'builtin:tiny-llama'?"),
        (["model.name=tiny-llama"], "Did you mean 'builtin:tiny-llama'?"),
        (["model.name=meta-llama/Llama-2-7b-hf"], "Could not load model 'meta-llama/Llama-2-7b-hf'"),
        (["model.name=builtin:tiny-t5"], "Model 'builtin:tiny-t5' supports task(s) ['seq2seq'], not 'causal-lm'"),
    ],
)
def test_model_errors_are_messages(tmp_path, add_data, capsys, overrides, message):
    rc, out = _train_rc(tmp_path, add_data, *overrides)
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_hub_name_offline_says_what_to_do(tmp_path, add_data, capsys):
    rc, out = _train_rc(tmp_path, add_data, "model.name=meta-llama/Llama-2-7b-hf")
    assert rc == 2
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE is set" in err and "huggingface-cli download meta-llama/Llama-2-7b-hf" in err


def test_local_model_that_does_not_fit_the_task(tmp_path, add_data, capsys):
    from lorapro.models import load_model_and_tokenizer

    t5, tok = load_model_and_tokenizer("builtin:tiny-t5", task="seq2seq")
    t5.save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    rc, out = _train_rc(tmp_path, add_data, f"model.name={tmp_path / 't5'}")
    assert rc == 2
    err = capsys.readouterr().err
    assert "cannot be loaded for task 'causal-lm'" in err and "T5Config" in err
    assert not out.exists()


def test_deepspeed_not_installed(tmp_path, add_data, capsys, monkeypatch):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 0}}')
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "deepspeed" else real(n, *a))
    rc, out = _train_rc(tmp_path, add_data, f"train.deepspeed={ds}")
    assert rc == 2
    assert "DeepSpeed is not installed: pip install 'lorapro[deepspeed]'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("tool, module", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_report_to_a_tool_that_is_not_installed(tmp_path, add_data, capsys, monkeypatch, tool, module):
    real = importlib.util.find_spec
    hidden = {"tensorboard", "tensorboardX", "wandb"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in hidden else real(n, *a))
    rc, out = _train_rc(tmp_path, add_data, f"train.report_to={tool}")
    assert rc == 2
    assert f"train.report_to={tool} but {module} is not installed" in capsys.readouterr().err
    assert not out.exists()
