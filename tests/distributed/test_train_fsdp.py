"""``lorapro train ... train.fsdp=true`` through the Hugging Face Trainer and accelerate's FSDP2 plugin, on 2 CPU
processes: the same losses and adapter as the DDP run, DCP checkpoints, and a resume that equals the uninterrupted
run. accelerate enables FSDP on accelerators only; worker_train_fsdp.py flips that one decision (see there)."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from dist_launch import HERE, torchrun  # noqa: E402
from test_train_distributed import adapter, records, write_setup  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train_fsdp")
    ddp, fsdp, resumed = tmp / "ddp", tmp / "fsdp", tmp / "resumed"
    common = dict(optim={"shard_state": False})
    torchrun(["-m", "lorapro.cli", "train", write_setup(tmp, ddp, **common)], timeout=300)
    torchrun([HERE / "worker_train_fsdp.py", write_setup(tmp, fsdp, train={"fsdp": True}, **common)], timeout=300)
    resume = {"fsdp": True, "resume_from_checkpoint": str(fsdp / "checkpoints" / "checkpoint-2")}
    torchrun([HERE / "worker_train_fsdp.py", write_setup(tmp, resumed, train=resume, **common)], timeout=300)
    return ddp, fsdp, resumed


def losses(out):
    return [r["loss"] for r in records(out) if r["kind"] == "train"]


def test_fsdp2_trains_like_ddp(runs):
    ddp, fsdp, _ = runs
    assert len(losses(fsdp)) == 4
    assert losses(fsdp) == pytest.approx(losses(ddp), rel=1e-5)
    got, want = adapter(fsdp / "adapter"), adapter(ddp / "adapter")
    assert got.keys() == want.keys() and len(want) == 8  # 2 layers x (q_proj, v_proj) x (A, B)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


def test_fsdp2_checkpoints_are_dcp_and_resume_equals_uninterrupted(runs):
    _, fsdp, resumed = runs
    ckpt = fsdp / "checkpoints" / "checkpoint-2"
    # one DCP shard file per rank and the metadata (torch.distributed.checkpoint's layout)
    assert sorted(p.name for p in (ckpt / "optimizer_0").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert losses(resumed) == pytest.approx(losses(fsdp)[2:], rel=1e-6)
    got, want = adapter(resumed / "adapter"), adapter(fsdp / "adapter")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=lambda m: f"{k}: {m}")
