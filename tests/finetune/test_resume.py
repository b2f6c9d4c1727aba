"""resume_from_checkpoint reproduces the uninterrupted run: same losses after the checkpoint, same final adapter, and
the checkpoint holds LoRA-Pro's optimizer state (loadable with weights_only=True)."""

import json
import shutil

import torch
from safetensors.torch import load_file

from lorapro.cli import main as lorapro_main
from train_args import tiny_train_argv


def _argv(data, out, *extra):
    return tiny_train_argv(data, out, "train.save_steps=3", "optim.warmup_ratio=0.2", *extra)


def _train_losses(out):
    recs = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if r["kind"] == "train"]


def test_resume_reproduces_uninterrupted_run(tmp_path, add_data):
    full = tmp_path / "full"
    assert lorapro_main(_argv(add_data, full)) == 0

    # What an interrupted run leaves behind: its first checkpoint and its log up to there (plus a stale later line).
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "checkpoint-3", cut / "checkpoints" / "checkpoint-3")
    lines = (full / "train_log.jsonl").read_text().splitlines()
    (cut / "train_log.jsonl").write_text("\n".join(lines[:4]) + "\n")  # steps 1-3 and a step-4 line, cut off

    ckpt = cut / "checkpoints" / "checkpoint-3"
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    moments = [s for s in state["state"].values() if "exp_avg" in s]
    assert moments and all(s["exp_avg"].dim() == 2 for s in moments)
    # full mode keeps m x n moments of the equivalent gradient (tiny-llama q_proj: 64 x 64)
    assert any(tuple(s["exp_avg"].shape) == (64, 64) for s in moments)

    assert lorapro_main(_argv(add_data, cut, "train.resume_from_checkpoint=latest")) == 0

    full_losses, cut_losses = _train_losses(full), _train_losses(cut)
    assert [s for s, _ in cut_losses] == [1, 2, 3, 4, 5, 6]  # the stale step-4 line was replaced
    assert cut_losses == full_losses  # exactly, not approximately
    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(cut / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_latest_without_checkpoint_is_a_clear_error(tmp_path, add_data, capsys):
    rc = lorapro_main(_argv(add_data, tmp_path / "empty", "train.resume_from_checkpoint=latest"))
    assert rc == 2
    assert "holds no checkpoint-N directory" in capsys.readouterr().err
