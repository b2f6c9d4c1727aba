"""The functional steps (lorapro.steps) called directly, against the float64 reference (lorapro.reference).

The optimizer classes only gather tensors and state for these functions; test_optim.py and friends check the classes
end to end. Here: full mode run on shards of rows (the design FSDP2 and ZeRO build on), with the shards' partial
projections summed by a stand-in for the all-reduce, two "ranks" as two threads.
"""

import threading

import pytest
import torch

import lorapro._perf as P
from lorapro import reference as R
from lorapro import steps as S

f64 = torch.float64
HP = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01, delta=1e-6, x_solution="sylvester")


def _problem(L=2, m=13, n=9, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = [torch.randn(r, n, generator=g, dtype=f64) for _ in range(L)]
    B = [0.5 * torch.randn(m, r, generator=g, dtype=f64) for _ in range(L)]
    return A, B, [1.0, 2.5][:L]


def _grads(A, B, seed):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(a.shape, generator=g, dtype=f64) for a in A],
            [torch.randn(b.shape, generator=g, dtype=f64) for b in B])


def _reference(A, B, s, steps=3):
    A, B = [a.clone() for a in A], [b.clone() for b in B]
    states = [{} for _ in A]
    for k in range(steps):
        gA, gB = _grads(A, B, seed=10 + k)
        for i in range(len(A)):
            A[i], B[i] = R.adamw_full_step(A[i], B[i], gA[i], gB[i], s[i], states[i], lr=HP["lr"],
                                           betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                                           weight_decay=HP["weight_decay"], delta=HP["delta"])
    return A, B


class _Shard:
    """Rows [lo, hi) of a world of ranks in threads; all_reduce_ sums the ranks' tensors in place."""

    def __init__(self, lo, hi, rank, world):
        self.lo, self.hi, self.rank, self.world = lo, hi, rank, world

    def all_reduce_(self, tensors):
        w = self.world
        w["parts"][self.rank] = [t.clone() for t in tensors]
        w["barrier"].wait()
        for j, t in enumerate(tensors):
            t.copy_(sum(parts[j] for parts in w["parts"]))
        w["barrier"].wait()


def _run_rank(A, B, s, lo, hi, rank, world, out, steps=3):
    A, B = [a.clone() for a in A], [b.clone() for b in B]
    n = A[0].shape[1]
    m1 = [torch.zeros(hi - lo, n, dtype=f64) for _ in A]
    m2 = [torch.zeros(hi - lo, n, dtype=f64) for _ in A]
    counts = [torch.tensor(0.0) for _ in A]
    for k in range(steps):
        gA, gB = _grads(A, B, seed=10 + k)
        S.adamw_full_step(A, B, gA, gB, s, m1, m2, counts, rows=_Shard(lo, hi, rank, world), **HP)
    out[rank] = (A, B, m1, counts)


@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("split", [[0, 13], [0, 6, 13], [0, 1, 7, 13]])
def test_full_step_on_row_shards_matches_the_reference(monkeypatch, blocks, split):
    # every shard walks its own rows (in blocks of 2 rows with blocks=True, a ragged last one included); the
    # summed partial projections give every rank the reference's factors. Tolerance: float64 with the same
    # operations in a different order, measured ~1e-15 relative; 1e-11 leaves room without hiding a wrong
    # row offset, sign or bias correction (those are off by > 1e-3).
    monkeypatch.setattr(P, "cpu_blocks_pay_off", lambda: blocks)
    monkeypatch.setattr(P, "CPU_BLOCK_ELEMS", 2 * 9)
    A, B, s = _problem()
    want_A, want_B = _reference(A, B, s)
    world = {"parts": [None] * (len(split) - 1), "barrier": threading.Barrier(len(split) - 1)}
    out = [None] * (len(split) - 1)
    threads = [threading.Thread(target=_run_rank, args=(A, B, s, split[k], split[k + 1], k, world, out))
               for k in range(len(split) - 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rank_A, rank_B, m1, counts in out:
        assert [float(c) for c in counts] == [3.0, 3.0]  # the function increments the step counts it is given
        for got, want in zip(rank_A + rank_B, want_A + want_B):
            torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)
    assert sum(m1[0].shape[0] for _, _, m1, _ in out) == 13


def test_full_step_fused_and_op_by_op_paths_agree(monkeypatch):
    # float64 state takes the fused kernel on CPU; with the kernel declared missing the same call goes op by op
    A, B, s = _problem(seed=1)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(P, "HAS_FUSED_CPU_ADAMW", fused)
        a, b = [t.clone() for t in A], [t.clone() for t in B]
        m1 = [torch.zeros(13, 9, dtype=f64) for _ in A]
        m2 = [torch.zeros(13, 9, dtype=f64) for _ in A]
        counts = [torch.tensor(0.0) for _ in A]
        for k in range(3):
            gA, gB = _grads(a, b, seed=20 + k)
            S.adamw_full_step(a, b, gA, gB, s, m1, m2, counts, **HP)
        results.append((a + b, m1 + m2))
    for x, y in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-15)
