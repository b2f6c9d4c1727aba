"""Full mode walks the m × n moments in blocks of rows on CPU (lorapro._perf.CPU_BLOCK_ELEMS; on one thread or
with OMP_WAIT_POLICY=PASSIVE). The tiny models of test_optim.py fit in one block, so here the block is made small
enough to cut the matrices into many blocks (including a ragged last one) and the result is compared with the
one-block run, which test_optim.py checks against the float64 reference."""

import pytest
import torch

import lorapro._perf as P
from lorapro import LoRAProAdamW


def _pairs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for m, n, r, s in [(37, 11, 3, 2.0), (37, 11, 3, 0.5), (9, 23, 2, 1.0)]:
        A = torch.nn.Parameter(torch.randn(r, n, generator=g, dtype=torch.float64).to(dtype))
        B = torch.nn.Parameter((0.3 * torch.randn(m, r, generator=g, dtype=torch.float64)).to(dtype))
        out.append((A, B, s))
    return out


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # blocks are used on one CPU thread (or with passive OpenMP waiting)
    yield
    torch.set_num_threads(threads)


def _run(monkeypatch, block_elems, dtype, steps=4, **kw):
    monkeypatch.setattr(P, "CPU_BLOCK_ELEMS", block_elems)
    pairs = _pairs(dtype)
    opt = LoRAProAdamW([{"lora_pairs": pairs}], lr=1e-2, mode="full", weight_decay=0.01, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for A, B, _ in pairs:
            A.grad = torch.randn(A.shape, generator=g, dtype=torch.float64).to(dtype)
            B.grad = torch.randn(B.shape, generator=g, dtype=torch.float64).to(dtype)
        opt.step()
    return [t.detach().clone() for A, B, _ in pairs for t in (A, B)], opt


@pytest.mark.parametrize("block_elems", [11, 50, 200])  # 1 row, 4 rows (ragged: 37 = 9·4 + 1), 18 rows
def test_blocks_equal_one_block_float64(monkeypatch, block_elems):
    one, opt1 = _run(monkeypatch, 1 << 30, torch.float64)
    many, opt2 = _run(monkeypatch, block_elems, torch.float64)
    for a, b in zip(one, many):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
    for p1, p2 in zip(opt1.param_groups[0]["params"], opt2.param_groups[0]["params"]):
        for key in ("exp_avg", "exp_avg_sq"):
            if key in opt1.state[p1]:
                torch.testing.assert_close(opt2.state[p2][key], opt1.state[p1][key], rtol=1e-12, atol=1e-16)


def test_blocks_with_bfloat16_state(monkeypatch):
    # state narrower than the work dtype: each block of g̃ is cast to the state dtype and back
    one, _ = _run(monkeypatch, 1 << 30, torch.float32, state_dtype=torch.bfloat16)
    many, opt = _run(monkeypatch, 50, torch.float32, state_dtype=torch.bfloat16)
    for a, b in zip(one, many):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    st = opt.state[opt.param_groups[0]["params"][0]]
    assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg"].shape == (37, 11)
