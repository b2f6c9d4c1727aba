"""The optimizers' accelerator-only branches, run on CPU tensors through ``functional.accelerator_path()``.

No GPU has run these tests' subjects; the switch makes CPU tensors take the branches that CUDA tensors take (float64
Gram matrices without a condition check, whole buckets, no row blocks, foreach AdamW instead of the fused CPU
kernel, direct tall products), so their logic is checked here against the CPU branches and the float64 reference.
tests/test_cuda.py runs the same code on a real GPU (scripts/gpu_check.sh).
"""

import pytest
import torch

from lorapro import LoRAProAdamW, LoRAProSGD
from lorapro import functional as F
from lorapro import _perf
from lorapro import optim as O

from test_fast_paths import _adjusted, _pair, _rel_err, _run, _toy_pairs

f64 = torch.float64


def test_gram_policy_on_accelerators_is_float64_from_the_factors():
    pairs = [_pair(300, 200, 4, 10.0, seed=0), _pair(300, 200, 4, 1e6, seed=1)]
    A, B, gA, gB = (torch.stack([p[i] for p in pairs]).float() for i in range(4))
    AG, BG = F.pack(A, B, gA, gB)
    cpu, _, _ = F.packed_gram_inverses(AG, BG, 1e-8, None)
    with F.accelerator_path():
        accel, _, _ = F.packed_gram_inverses(AG, BG, 1e-8, None)
    for i in range(2):  # both layers: float64 Gram matrices formed from the factors, no condition check
        assert torch.equal(accel.BtB[i], B[i].double().T @ B[i].double())
        assert torch.equal(accel.AAt[i], A[i].double() @ A[i].double().T)
    assert not torch.equal(cpu.BtB[0], accel.BtB[0])  # the CPU branch keeps float32 ones for the well-conditioned layer
    with F.accelerator_path():
        assert max(_rel_err(_adjusted(pairs, None), pairs)) < 1e-4  # the ill-conditioned layer is accurate too


def test_accelerator_path_adamw_is_foreach_and_matches_the_fused_kernel(monkeypatch):
    make = lambda groups: LoRAProAdamW(groups, lr=1e-2, mode="efficient", weight_decay=0.1)  # noqa: E731
    fused, _ = _run(_toy_pairs(torch.float32), make)

    def no_fused(*args, **kwargs):
        raise AssertionError("the fused CPU AdamW kernel ran on the accelerator path")

    monkeypatch.setattr(torch, "_fused_adamw_", no_fused)
    with F.accelerator_path():
        foreach, _ = _run(_toy_pairs(torch.float32), make)
    for a, b in zip(fused, foreach):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_accelerator_path_keeps_buckets_whole(monkeypatch):
    monkeypatch.setattr(_perf, "CPU_BUCKET_BYTES", 1)  # on CPU: one pair per chunk
    pairs = [(j, A, B, s) for j, (A, B, s) in enumerate(_toy_pairs(f64))]
    assert len(O._LoRAProBase._buckets(pairs)) == 5
    with F.accelerator_path():
        assert len(O._LoRAProBase._buckets(pairs)) == 1


def test_accelerator_path_tall_products_are_direct():
    P, W = torch.randn(2, 50, 6, dtype=f64), torch.randn(2, 6, 8, dtype=f64)
    names = []

    def workspace(name, shape, dtype, device):
        names.append(name)
        return torch.empty(shape, dtype=dtype, device=device)

    F.tall_mm(P, W, workspace=workspace)
    assert names == ["tall_t", "tall"]  # CPU, q = 8: the transposed product, then a copy
    names.clear()
    with F.accelerator_path():
        out = F.tall_mm(P, W, workspace=workspace)
    assert names == ["tall"]
    torch.testing.assert_close(out, P @ W, rtol=1e-14, atol=0)


@pytest.mark.parametrize("cls,kw", [(LoRAProAdamW, dict(mode="efficient")), (LoRAProAdamW, dict(mode="full")),
                                    (LoRAProAdamW, dict(mode="factored")), (LoRAProSGD, dict(momentum=0.9))])
def test_every_mode_on_the_accelerator_path_matches_the_cpu_path(cls, kw, monkeypatch):
    # one thread: on CPU full mode walks its moments in row blocks; the accelerator path uses whole matrices
    monkeypatch.setattr(_perf, "CPU_BLOCK_ELEMS", 16)  # blocks of one row on CPU
    monkeypatch.setattr(_perf, "cpu_blocks_pay_off", lambda: True)
    make = lambda groups: cls(groups, lr=1e-2, **kw)  # noqa: E731
    cpu, _ = _run(_toy_pairs(f64), make)
    with F.accelerator_path():
        accel, _ = _run(_toy_pairs(f64), make)
    for a, b in zip(cpu, accel):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not torch.equal(cpu[0], _toy_pairs(f64)[0][0])


def test_reference_tests_pass_on_the_accelerator_path():
    """The step-by-step reference tests (optimizer vs the float64 spec, factored mode, the math, full mode's row
    blocks) rerun with every CPU tensor on the accelerator branches (LORAPRO_ACCELERATOR_PATH=1, read at import,
    hence a fresh process). test_fast_paths.py is left out: it asserts the CPU branches' own choices."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    files = ["test_optim.py", "test_factored.py", "test_math.py", "test_full_mode_blocks.py"]
    env = dict(os.environ, LORAPRO_ACCELERATOR_PATH="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                           *(str(here / f) for f in files)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
