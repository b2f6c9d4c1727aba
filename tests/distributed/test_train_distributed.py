"""``lorapro train`` under torchrun (2 gloo processes, CPU): data parallel through the HF Trainer, only rank 0
writes logs and the adapter, sharded optimizer state is consolidated into checkpoints that resume on 1 process."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from dist_launch import torchrun  # noqa: E402

pytestmark = pytest.mark.distributed

TRAIN_SIZE, GLOBAL_BATCH, STEPS = 16, 4, 4


def write_setup(tmp_path, out, **extra):
    data = tmp_path / "train.jsonl"
    with data.open("w") as f:
        for i in range(TRAIN_SIZE):
            f.write(json.dumps({"instruction": f"What is {i} plus {i + 3}?", "output": f"{2 * i + 3}"}) + "\n")
    cfg = {
        "method": "lora-pro", "seed": 0, "output_dir": str(out),
        "model": {"name": "builtin:tiny-llama", "task": "causal-lm"},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0, "shard_state": True},
        "train": {"max_steps": STEPS, "global_batch_size": GLOBAL_BATCH, "micro_batch_size": 2, "save_steps": 2},
        "data": {"train": str(data), "template": "alpaca"},
    }
    for k, v in extra.items():
        cfg[k].update(v)
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def records(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def adapter(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def two_proc_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train2")
    out = tmp / "run2"
    torchrun(["-m", "lorapro.cli", "train", write_setup(tmp, out)], timeout=300)
    return tmp, out


def test_only_rank0_logs_and_saves_and_the_global_batch_is_split(two_proc_run):
    _, out = two_proc_run
    recs = records(out)
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))  # one line per step: rank 0 only
    assert [r["kind"] for r in recs].count("end") == 1
    # DDP: every optimizer step consumed the global batch (2 processes x 2), not 2 examples per process
    assert train[-1]["epoch"] == pytest.approx(STEPS * GLOBAL_BATCH / TRAIN_SIZE)
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    assert all(torch.isfinite(v).all() for v in adapter(out / "adapter").values())


def test_sharded_state_checkpoint_is_complete(two_proc_run):
    _, out = two_proc_run
    sd = torch.load(out / "checkpoints" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    # tiny-llama: 2 layers x (q_proj, v_proj) = 4 pairs; full mode keeps m x n moments on each pair's A
    moments = [st for st in sd["state"].values() if "exp_avg" in st and st["exp_avg"].dim() == 2]
    assert len(moments) == 4
    assert all(float(st["step"]) == 2 for st in moments)


def test_resume_on_one_process_from_a_two_process_checkpoint(two_proc_run):
    from lorapro.finetune.cli import main as train_main

    tmp, out = two_proc_run
    out1 = tmp / "resumed1"
    cfg = write_setup(tmp, out1, train={"resume_from_checkpoint": str(out / "checkpoints" / "checkpoint-2")})
    assert train_main([str(cfg), "overwrite=true"]) == 0
    got, want = adapter(out1 / "adapter"), adapter(out / "adapter")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
