"""Tests that need a CUDA GPU (marker ``cuda``; skipped elsewhere). scripts/gpu_check.sh runs them.

Each compares the GPU run with the CPU run of the same code (or with torch's own optimizer on the GPU), so a
failure points at a device-specific branch: the float64 Gram policy, the foreach AdamW path, bf16 factors, whole
buckets and whole-matrix full mode, NCCL collectives of the FSDP2 step. tests/test_accelerator_path.py checks the
same branches' logic on CPU tensors.

Tolerances: float32 on the GPU differs from the CPU in summation order (cuBLAS vs. the CPU BLAS); over a few Adam
steps that stays below 1e-4 relative on these O(0.3) parameters. TF32 is off (torch's default for matmul).
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from lorapro import LoRAProAdamW, LoRAProSGD
from lorapro import functional as F
from lorapro import _perf
from lorapro import optim as O

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")]

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "distributed"))
TOL = dict(rtol=1e-4, atol=1e-5)
N_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def _pairs(device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for m, n in ((64, 48), (64, 48), (40, 24)):  # a bucket of two and one of one
        A = torch.nn.Parameter((torch.randn(4, n, generator=g) * 0.3).to(device=device, dtype=dtype))
        B = torch.nn.Parameter((torch.randn(m, 4, generator=g) * 0.3).to(device=device, dtype=dtype))
        out.append((A, B, 2.0))
    return out


def _run(device, make, dtype=torch.float32, steps=3):
    pairs = _pairs(device, dtype)
    head = torch.nn.Parameter(torch.ones(5, 7, device=device, dtype=dtype))
    opt = make([{"lora_pairs": pairs}, {"params": [head]}])
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for A, B, _ in pairs:
            A.grad = (torch.randn(A.shape, generator=g) * 1e-2).to(device=device, dtype=dtype)
            B.grad = (torch.randn(B.shape, generator=g) * 1e-2).to(device=device, dtype=dtype)
        head.grad = (torch.randn(head.shape, generator=g) * 1e-2).to(device=device, dtype=dtype)
        opt.step()
    return [t.detach().float().cpu() for A, B, _ in pairs for t in (A, B)] + [head.detach().float().cpu()], opt


MODES = [(LoRAProAdamW, dict(mode="full")), (LoRAProAdamW, dict(mode="efficient")),
         (LoRAProAdamW, dict(mode="factored")),
         (LoRAProSGD, dict(momentum=0.9))]


@pytest.mark.parametrize("cls,kw", MODES)
def test_every_mode_on_the_gpu_matches_the_cpu(cls, kw):
    make = lambda groups: cls(groups, lr=1e-2, weight_decay=0.01, **kw)  # noqa: E731
    gpu, _ = _run("cuda", make)
    cpu, _ = _run("cpu", make)
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a, b, **TOL)
    assert not torch.equal(cpu[0], _pairs("cpu")[0][0].detach())  # the parameters moved


def test_bf16_factors_on_the_gpu_track_float32():
    make = lambda groups: LoRAProAdamW(groups, lr=1e-2, mode="full")  # noqa: E731
    bf16, opt = _run("cuda", make, dtype=torch.bfloat16)
    fp32, _ = _run("cuda", make)
    st = opt.state[opt.param_groups[0]["params"][0]]
    assert st["exp_avg"].dtype == torch.float32 and st["exp_avg"].is_cuda  # moments in fp32 on the GPU
    for a, b in zip(bf16, fp32):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_adamw_on_the_gpu_is_the_foreach_path_and_equals_torch_adamw():
    p = torch.nn.Parameter(torch.randn(33, 17, device="cuda"))
    assert not _perf.fused_adamw_ok([p])  # accelerators take the foreach branch
    ref = torch.nn.Parameter(p.detach().clone())
    ours = LoRAProAdamW([{"lora_pairs": _pairs("cuda")[:1]}, {"params": [p]}], lr=1e-2, weight_decay=0.1)
    torch_adamw = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1, foreach=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(4):
        p.grad = torch.randn(p.shape, device="cuda", generator=g)
        ref.grad = p.grad.clone()
        ours.step()
        torch_adamw.step()
    torch.testing.assert_close(p, ref, rtol=1e-6, atol=1e-7)


def test_float64_gram_policy_on_the_gpu():
    pairs = _pairs("cuda")
    A = torch.stack([a.detach() for a, _, _ in pairs[:2]])
    B = torch.stack([b.detach() for _, b, _ in pairs[:2]])
    AG, BG = F.pack(A, B, torch.zeros_like(A), torch.zeros_like(B))
    grams, _, _ = F.packed_gram_inverses(AG, BG, 1e-8, None)
    assert grams.BtB.dtype == torch.float64 and grams.BtB.is_cuda
    torch.testing.assert_close(grams.BtB, B.double().transpose(-1, -2) @ B.double(), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(grams.AAt, A.double() @ A.double().transpose(-1, -2), rtol=1e-14, atol=1e-14)


@pytest.mark.distributed
def test_fsdp2_over_nccl_matches_one_cpu_process(tmp_path, monkeypatch):
    """Two GPUs: the sharded step over NCCL. One GPU: the same code with a world of one (NCCL collectives, DTensor
    state, DCP), without the sharding."""
    from dist_launch import torchrun
    from dist_toy import global_batches, make_opt, train
    from fsdp_toy import full_params, make_padded_model

    monkeypatch.setenv("LORAPRO_TEST_DEVICE", "cuda")
    nproc = min(N_GPUS, 2)
    for kind in ("full", "efficient", "factored", "sgd"):  # the worker resumes from these (see test_fsdp.py)
        model = make_padded_model()
        opt = make_opt(kind, model)
        train(model, opt, global_batches(4), 0, 2)
        torch.save({"model": full_params(model), "optim": opt.state_dict()}, tmp_path / f"one_process_{kind}.pt")
    torchrun([HERE / "distributed" / "worker_fsdp.py", tmp_path, "train"], nproc=nproc, timeout=300)
    for kind in ("full", "efficient", "factored", "sgd"):
        model = make_padded_model()
        opt = make_opt(kind, model)
        train(model, opt, global_batches(4), 0, 4)
        got = torch.load(tmp_path / f"fsdp_{kind}.pt", weights_only=True)
        want = full_params(model)
        for n in want:
            torch.testing.assert_close(got[n], want[n], **TOL, msg=lambda m: f"{kind} {n}: {m}")
        for name in ("resumed", "from_plain", "swapped"):
            got = torch.load(tmp_path / f"{name}_{kind}.pt", weights_only=True)
            for n in want:
                torch.testing.assert_close(got[n], want[n], **TOL, msg=lambda m: f"{kind} {name} {n}: {m}")
    meta = json.loads((tmp_path / "meta_rank0.json").read_text())
    assert meta["state_kept"] is True
    single = sum(2 * o * i * 4 for i, o in [(16, 15), (15, 16), (16, 16), (16, 16)])  # full-mode moments, fp32
    assert meta["bytes_full"] < (0.6 if nproc == 2 else 1.1) * single


@pytest.mark.distributed
@pytest.mark.skipif(N_GPUS < 2, reason="lorapro train with train.fsdp needs two GPUs")
def test_lorapro_train_fsdp2_matches_ddp(tmp_path):
    pytest.importorskip("transformers")
    from dist_launch import torchrun
    from test_train_distributed import records, write_setup

    losses = {}
    for name, train_kw in (("ddp", {}), ("fsdp", {"fsdp": True})):
        out = tmp_path / name
        cfg = write_setup(tmp_path, out, optim={"shard_state": False}, train=train_kw)
        torchrun(["-m", "lorapro.cli", "train", cfg], timeout=300)
        losses[name] = [r["loss"] for r in records(out) if r["kind"] == "train"]
    assert len(losses["fsdp"]) == 4
    assert losses["fsdp"] == pytest.approx(losses["ddp"], rel=1e-3)
    ckpt = tmp_path / "fsdp" / "checkpoints" / "checkpoint-2"
    assert any(ckpt.iterdir())
    print("FSDP2 checkpoint contents:", sorted(p.name for p in ckpt.iterdir()))


def test_cuda_environment_summary():
    """Not a check: records what ran (device names, capability, versions) in the gpu_check log."""
    print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": N_GPUS,
                      "names": [torch.cuda.get_device_name(i) for i in range(N_GPUS)],
                      "bf16": torch.cuda.is_bf16_supported(), "env_accel": os.environ.get("LORAPRO_ACCELERATOR_PATH")}))
