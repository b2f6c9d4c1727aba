"""Crash-safe runs: a full disk mid-save, Ctrl-C, damaged checkpoints, overwrite=true and resuming with another
config — each driven through the real CLI on builtin:tiny-llama, each ending in a run that equals the uninterrupted
one or in a clear message (rc 2; Ctrl-C rc 130)."""

import errno
import json
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import lorapro.finetune.runner as runner
from lorapro.cli import main as lorapro_main
from train_args import tiny_train_argv


def _argv(data, out, *extra):
    return tiny_train_argv(data, out, "train.save_steps=2", "train.save_total_limit=null", *extra)


def _losses(out):
    recs = [json.loads(x) for x in (Path(out) / "train_log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if r["kind"] == "train"]


def _same_adapter(a_dir, b_dir):
    a = load_file(Path(a_dir) / "adapter" / "adapter_model.safetensors")
    b = load_file(Path(b_dir) / "adapter" / "adapter_model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _resume_command(err):
    """The command printed on the line after 'continue with:'."""
    lines = err.splitlines()
    return lines[[i for i, line in enumerate(lines) if line.endswith("continue with:")][-1] + 1].strip()


def _resume_argv(command):
    """The printed resume command as argv for lorapro.cli.main (without the program name)."""
    words = shlex.split(command)
    assert words[:2] == ["lorapro", "train"], command
    return words[1:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, add_data):
    """The uninterrupted run every crash test must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert lorapro_main(_argv(add_data, out)) == 0
    return out


def test_disk_full_mid_save_leaves_no_half_checkpoint_and_resume_equals_uninterrupted(
    tmp_path, add_data, reference, monkeypatch, capsys
):
    out = tmp_path / "run"
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt") and "checkpoint-4" in str(f):
            Path(f).write_bytes(b"PK\x03\x04" + bytes(100))  # the first bytes made it to disk, then the disk was full
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    assert lorapro_main(_argv(add_data, out)) == 1
    err = capsys.readouterr().err
    assert "the disk is full" in err and str(out / "checkpoints" / "checkpoint-2") in err
    # no half-written checkpoint-4 under its final name, and the partial files were removed (space freed)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]

    monkeypatch.setattr(torch, "save", real_save)  # space freed
    command = _resume_command(err)
    assert command == f"lorapro train {out / 'config.yaml'} train.resume_from_checkpoint=latest"
    assert lorapro_main(_resume_argv(command)) == 0
    assert _losses(out) == _losses(reference)
    assert _same_adapter(out, reference)
    # every checkpoint carries its run's config
    assert (out / "checkpoints" / "checkpoint-6" / "lorapro_config.yaml").is_file()


class _Interrupt(TrainerCallback):
    """Presses Ctrl-C at the end of optimizer step ``at``."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt


def test_ctrl_c_says_where_the_checkpoint_is_and_how_to_resume(tmp_path, add_data, reference, monkeypatch, capsys):
    out = tmp_path / "run"
    real = runner.run_training
    monkeypatch.setattr(runner, "run_training", lambda cfg, **kw: real(cfg, extra_callbacks=[_Interrupt(3)], **kw))
    assert lorapro_main(_argv(add_data, out)) == 130
    err = capsys.readouterr().err
    assert "interrupted (Ctrl-C)" in err
    assert f"the last complete checkpoint is {out / 'checkpoints' / 'checkpoint-2'}" in err
    command = _resume_command(err)

    monkeypatch.setattr(runner, "run_training", real)
    assert lorapro_main(_resume_argv(command)) == 0
    assert _losses(out) == _losses(reference)
    assert _same_adapter(out, reference)


def test_ctrl_c_before_any_checkpoint_says_there_is_none(tmp_path, add_data, monkeypatch, capsys):
    real = runner.run_training
    monkeypatch.setattr(runner, "run_training", lambda cfg, **kw: real(cfg, extra_callbacks=[_Interrupt(1)], **kw))
    assert lorapro_main(_argv(add_data, tmp_path / "run", "train.save_steps=0")) == 130
    err = capsys.readouterr().err
    assert "no complete checkpoint was written" in err and "set train.save_steps" in err


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_latest_skips_a_truncated_checkpoint_with_a_warning(tmp_path, add_data, reference, capsys):
    out = _copy_run(reference, tmp_path / "run")
    opt = out / "checkpoints" / "checkpoint-6" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])
    assert lorapro_main(_argv(add_data, out, "train.resume_from_checkpoint=latest")) == 0
    text = capsys.readouterr()
    assert f"warning: skipping checkpoint-6: {opt} is damaged" in text.out + text.err
    assert _losses(out) == _losses(reference)  # resumed from checkpoint-4, same result
    assert _same_adapter(out, reference)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("optimizer.pt", "optimizer.pt is damaged: it is truncated"),
        ("trainer_state.json", "trainer_state.json is damaged: it is not valid JSON"),
        ("adapter_model.safetensors", "adapter_model.safetensors is damaged"),
    ],
)
def test_named_damaged_checkpoint_is_a_clear_error(tmp_path, add_data, reference, capsys, damage, message):
    out = _copy_run(reference, tmp_path / "run")
    ckpt = out / "checkpoints" / "checkpoint-4"
    f = ckpt / damage
    f.write_bytes(f.read_bytes()[: f.stat().st_size - 7])
    assert lorapro_main(_argv(add_data, out, f"train.resume_from_checkpoint={ckpt}")) == 2
    err = capsys.readouterr().err
    assert f"cannot resume from '{ckpt}'" in err and message in err


def test_overwrite_moves_the_previous_run_aside(tmp_path, add_data, reference, capsys):
    out = _copy_run(reference, tmp_path / "run")
    (out / "notes.txt").write_text("mine")
    # a new run with other settings: none of the old run's checkpoints may be resumed by it later
    assert lorapro_main(_argv(add_data, out, "overwrite=true", "train.max_steps=2", "train.save_steps=0",
                              "optim.lr=1e-3")) == 0
    assert not list(out.glob("checkpoints/checkpoint-*")) and not (out / "notes.txt").exists()
    (backup,) = tmp_path.glob("run.replaced-*")
    assert (backup / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (backup / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4",
                                                                          "checkpoint-6"]
    assert f"moved the previous contents of {out} to {backup}" in capsys.readouterr().out
    assert lorapro_main(_argv(add_data, out, "train.resume_from_checkpoint=latest")) == 2
    assert "holds no checkpoint-N directory" in capsys.readouterr().err


def test_resume_refuses_a_checkpoint_from_another_config(tmp_path, add_data, reference, capsys):
    out = _copy_run(reference, tmp_path / "run")
    before = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    rc = lorapro_main(_argv(add_data, out, "train.resume_from_checkpoint=latest", "optim.lr=1e-3",
                            "train.max_steps=8", "train.logging_steps=2"))
    assert rc == 2
    err = capsys.readouterr().err
    assert "optim.lr: 0.005 -> 0.001" in err and "train.max_steps: 6 -> 8" in err
    assert "train.logging_steps" not in err.split("Keys that may change")[0]  # a resumable key is no difference
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_save_only_model_checkpoints_are_small_and_not_resumed_silently(tmp_path, add_data, reference, capsys):
    out = tmp_path / "run"
    assert lorapro_main(_argv(add_data, out, "train.save_only_model=true", "train.max_steps=2")) == 0
    ckpt = out / "checkpoints" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "optimizer.pt").exists()
    full = reference / "checkpoints" / "checkpoint-2"
    size = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())  # noqa: E731
    assert size(ckpt) < size(full) / 3  # full mode: m x n moments per LoRA pair dominate
    rc = lorapro_main(_argv(add_data, out, "train.save_only_model=true", "train.max_steps=2",
                            f"train.resume_from_checkpoint={ckpt}"))
    assert rc == 2
    assert "holds no optimizer state" in capsys.readouterr().err


def test_fsdp2_sharded_optimizer_state_counts_as_optimizer_state(tmp_path):
    """accelerate's FSDP2 checkpoints keep the optimizer as a DCP directory (optimizer_0/.metadata + shards), not
    optimizer.pt: such a checkpoint is resumable; a directory without DCP metadata is not optimizer state."""
    import json

    from lorapro.finetune.checkpoints import checkpoint_problem

    ck = tmp_path / "checkpoint-2"
    (ck / "optimizer_0").mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (ck / "optimizer_0" / "__0_0.distcp").write_bytes(b"x")
    assert "no optimizer state" in checkpoint_problem(ck)
    (ck / "optimizer_0" / ".metadata").write_bytes(b"x")
    assert checkpoint_problem(ck) is None


def test_the_trainer_still_loads_deepspeed_checkpoints_where_checkpoint_trainer_intercepts():
    """CheckpointTrainer._prepare_for_training re-routes a resharded DeepSpeed load; it relies on the Trainer's
    method of that name taking these arguments and being where ``deepspeed_load_checkpoint`` is called."""
    import inspect

    from transformers import Trainer

    method = Trainer._prepare_for_training
    assert list(inspect.signature(method).parameters) == ["self", "max_steps", "train_dataloader",
                                                          "resume_from_checkpoint"]
    source = inspect.getsource(method)
    assert "deepspeed_load_checkpoint(" in source and "self._load_optimizer_and_scheduler(resume_from_checkpoint)" \
        in source
    import transformers.trainer as hf_trainer

    assert callable(hf_trainer._is_peft_model)
