"""What a user gets when something is wrong: the key they probably meant, a clear data message and nothing
half-written; and --help documenting every key."""

import dataclasses
import typing

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
    assert "Unknown config key 'train.global_batch'. Did you mean 'global_batch_size'?" in capsys.readouterr().err


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
