r"""The optimizers' steps as functions: one per mode, on one bucket of same-shape LoRA pairs.

:class:`lorapro.LoRAProAdamW` and :class:`lorapro.LoRAProSGD` validate, gather each bucket's parameters, gradients
and state (creating the state on the first step) and call one of these; they are what the tests compare with the
float64 reference (:mod:`lorapro.reference`). As in ``torch.optim.adamw``'s functional form, each function
increments the step counts it is given, updates the state tensors in place and updates the factors in place.

Shared arguments: ``A``, ``B``: the L pairs' factors (r × n, m × r; all of one shape, dtype and device);
``grad_A``, ``grad_B``: their gradients; ``scalings``: the L LoRA scales; ``delta``, ``x_solution``,
``compute_dtype``: see :class:`lorapro.LoRAProAdamW`; ``workspace``: where large temporaries go
(:data:`lorapro.functional.Workspace`). The math is in :mod:`lorapro.functional` and :mod:`lorapro.factored`;
the CPU heuristics (row blocks, fused kernel) in :mod:`lorapro._perf`. Paper: arXiv 2407.18242.
"""

from __future__ import annotations

from typing import List, Optional, Protocol, Sequence, Tuple

import torch

from . import _perf
from . import factored as FF
from . import functional as F

__all__ = ["adamw_full_step", "adamw_efficient_step", "adamw_factored_step", "sgd_step", "adamw_step",
           "adamw_update", "bias_corrections", "apply_update"]

Tensor = torch.Tensor


class Rows(Protocol):
    """A shard of rows [lo, hi) of full mode's m × n moments (e.g. :class:`lorapro.fsdp.RowShard`), and how to sum
    the partial projections of the shards (in place)."""

    lo: int
    hi: int

    def all_reduce_(self, tensors: Sequence[Tensor]) -> None: ...


def bias_corrections(beta1: float, beta2: float, step: float) -> Tuple[float, float]:
    """Adam's bias corrections ``(1 − β1ᵗ, 1 − β2ᵗ)`` for step count t (the one place they are computed, except
    inside torch's fused kernel, which computes the same from the same step count)."""
    t = float(step)
    return 1.0 - beta1**t, 1.0 - beta2**t


def _increment(steps: Sequence[Tensor]) -> None:
    for t in steps:
        t += 1


def _prepare(A: List[Tensor], B: List[Tensor], grad_A: List[Tensor], grad_B: List[Tensor],
             scalings: Sequence[float], delta: float, compute_dtype: Optional[torch.dtype],
             workspace: F.Workspace) -> Tuple[Tensor, Tensor, Tensor, F.GramInverses, Tensor, Tensor]:
    """Packed factors and gradients (``AG = [A; g_A]``, ``BG = [B, g_B]``, work dtype), the scales in the dtype
    of the r × r algebra, the Gram inverses and the cross terms (g_A·Aᵀ, Bᵀ·g_B)."""
    AG, BG = F.pack(A, B, grad_A, grad_B, workspace=workspace)
    s = torch.tensor(list(scalings), dtype=compute_dtype or torch.float64, device=AG.device)
    grams, gA_At, Bt_gB = F.packed_gram_inverses(AG, BG, delta, compute_dtype)
    return AG, BG, s, grams, gA_At, Bt_gB


def apply_update(A: List[Tensor], B: List[Tensor], A_cur: Tensor, B_cur: Tensor, dA: Tensor, dB: Tensor,
                 step_size: Tensor, lr: float, weight_decay: float) -> None:
    """θ ← θ·(1 − lr·wd) − step_size·d for both factors of every pair.

    ``A_cur``, ``B_cur`` (L, ...) are the pairs' current factors in the work dtype; ``dA``, ``dB`` are temporaries
    of the step (scaled in place here); ``step_size`` (L,) float64 on the host. Parameters of the work dtype are
    updated in place; narrower ones (bf16) are computed in the work dtype and rounded once.
    """
    params = [p for pair in zip(A, B) for p in pair]
    decay = 1.0 - lr * weight_decay
    if all(p.dtype == dA.dtype == dB.dtype and p.device == dA.device for p in params):
        steps = [float(x) for x in step_size.tolist() for _ in range(2)]
        ds = [t for pair in zip(dA.unbind(0), dB.unbind(0)) for t in pair]
        torch._foreach_mul_(ds, steps)
        if decay != 1.0:
            torch._foreach_mul_(params, decay)
        torch._foreach_sub_(params, ds)
        return
    step_size = step_size.to(device=A_cur.device, dtype=A_cur.dtype).view(-1, 1, 1)  # built on the host
    new_A = torch.addcmul(A_cur * decay if decay != 1.0 else A_cur, step_size, dA, value=-1.0)
    new_B = torch.addcmul(B_cur * decay if decay != 1.0 else B_cur, step_size, dB, value=-1.0)
    torch._foreach_copy_(params, [t for pair in zip(new_A.unbind(0), new_B.unbind(0)) for t in pair])


# ----------------------------------------------------------------------------------------------------------------
# Plain AdamW (non-LoRA parameters, and efficient mode on the adjusted gradients)


def adamw_update(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                 steps: List[Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float) -> None:
    """One AdamW update of every tensor with the given gradients (``steps``: step counts, already incremented).
    All parameters share one dtype and device, as do all moments.

    ``m ← β1·m + (1 − β1)·g``, ``v ← β2·v + (1 − β2)·g²``, ``θ ← θ·(1 − lr·λ) − lr·(m/(1 − β1ᵗ))/(√(v/(1 − β2ᵗ)) + ε)``.
    Uses torch's fused AdamW kernel where it applies (:func:`lorapro._perf.fused_adamw_ok`), else foreach ops in
    the work dtype: parameters narrower than float32 (bf16, fp16) are updated in float32 and rounded once.
    """
    if _perf.fused_adamw_ok([*params, *grads, *exp_avgs, *exp_avg_sqs]):
        torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                            weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
        return
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    # (m / (1 − β1ᵗ)) / (√v / √(1 − β2ᵗ) + ε) = (√(1 − β2ᵗ) / (1 − β1ᵗ)) · m / (√v + ε·√(1 − β2ᵗ))
    step_sizes, denom_eps = [], []
    for t in steps:
        bc1, bc2 = bias_corrections(beta1, beta2, t)
        step_sizes.append(-lr * bc2**0.5 / bc1)
        denom_eps.append(eps * bc2**0.5)
    wdt = F.work_dtype(params[0].dtype)
    exp_avgs = [t.to(wdt) for t in exp_avgs]  # no copy where the state already has the work dtype
    exp_avg_sqs = [t.to(wdt) for t in exp_avg_sqs]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, denom_eps)
    targets = params if all(p.dtype == wdt for p in params) else [p.to(wdt) for p in params]
    if weight_decay != 0.0:
        torch._foreach_mul_(targets, 1.0 - lr * weight_decay)
    torch._foreach_addcdiv_(targets, exp_avgs, denom, step_sizes)
    if targets is not params:
        torch._foreach_copy_(params, targets)


def adamw_step(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
               steps: List[Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float) -> None:
    """Plain AdamW on tensors that are not LoRA factors: increments ``steps``, then :func:`adamw_update`."""
    _increment(steps)
    adamw_update(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                 weight_decay=weight_decay)


# ----------------------------------------------------------------------------------------------------------------
# LoRA-Pro AdamW, one function per mode


def adamw_full_step(
    A: List[Tensor], B: List[Tensor], grad_A: List[Tensor], grad_B: List[Tensor], scalings: Sequence[float],
    exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor], steps: List[Tensor], *, lr: float, beta1: float,
    beta2: float, eps: float, weight_decay: float, delta: float, x_solution: str,
    compute_dtype: Optional[torch.dtype] = None, rows: Optional[Rows] = None, workspace: F.Workspace = F.fresh,
) -> None:
    r"""``mode="full"`` (arXiv 2407.18242, Algorithm 1): Adam moments of g̃ in the m × n shape.

    ``m ← β1·m + (1 − β1)·g̃``, ``v ← β2·v + (1 − β2)·g̃²``, ``D = (m/(1 − β1ᵗ)) / (√(v/(1 − β2ᵗ)) + ε)``, then
    ``(ĥ_A, ĥ_B) = adjusted_gradients(s·Bᵀ·D, s·D·Aᵀ)`` and ``θ ← θ·(1 − lr·λ) − lr·ĥ``.

    ``exp_avgs``, ``exp_avg_sqs``: the pairs' moments, (m × n) or, with ``rows``, rows [lo, hi) of them (a shard:
    only those rows of g̃ and D are formed, and the partial sums u_A = s·Bᵀ·D and the rows of u_B = s·D·Aᵀ are
    summed over the shards with ``rows.all_reduce_``). ``steps``: one count per pair.

    Each layer's moments are walked once, in blocks of rows on CPU (:data:`lorapro._perf.CPU_BLOCK_ELEMS`): per
    block g̃ = left·right, the moments and D, then the block's share of Bᵀ·D and D·Aᵀ. Where torch's fused AdamW
    kernel takes the moments (float32 / float64 state of the work dtype, CPU) it updates both moments and writes
    −D in one pass (a zeroed block as its "parameter", lr 1, no weight decay: θ = 0 − D, bias-corrected by the
    kernel); else op by op (bf16 state, accelerators).
    """
    _increment(steps)
    AG, BG, s, grams, _, Bt_gB = _prepare(A, B, grad_A, grad_B, scalings, delta, compute_dtype, workspace)
    left, right = F.equivalent_gradient_factors_packed(grams, AG, BG, s, Bt_gB)  # g̃ = left @ right
    wdt = F.work_dtype(A[0].dtype)
    A_w, B_w = grams.A, grams.B
    L, m, n, dev = len(A), B[0].shape[0], A[0].shape[1], A[0].device
    lo, hi = (0, m) if rows is None else (rows.lo, rows.hi)
    blocks = not F.on_accelerator_path(dev) and _perf.cpu_blocks_pay_off()
    block = max(1, min(hi - lo, _perf.CPU_BLOCK_ELEMS // n)) if blocks else hi - lo
    g_buf = torch.empty(block, n, dtype=wdt, device=dev)  # g̃ (and D, op by op) of one block
    d_buf: Optional[Tensor] = None  # −D of one block (fused kernel)
    uA = torch.zeros_like(A_w)
    # u_B transposed, (L, r, m): a block's D·Aᵀ is computed as A·Dᵀ, about 2x faster on CPU for r ≪ n
    uBt = A_w.new_empty(L, A_w.shape[1], m) if rows is None else A_w.new_zeros(L, A_w.shape[1], m)
    step_size = torch.empty(L, dtype=torch.float64)
    sign = torch.ones(L, dtype=wdt, device=dev)
    for i in range(L):
        exp_avg_all, exp_avg_sq_all = exp_avgs[i], exp_avg_sqs[i]
        Bt = B_w[i].T.contiguous()  # (r, m): a block's Bᵀ is then a row-major slice
        if _perf.fused_adamw_ok([exp_avg_all, exp_avg_sq_all]) and exp_avg_all.dtype == wdt:
            if d_buf is None:
                d_buf = torch.empty(block, n, dtype=wdt, device=dev)
            for r0 in range(lo, hi, block):
                r1 = min(hi, r0 + block)
                g, d = g_buf[: r1 - r0], d_buf[: r1 - r0]
                torch.matmul(left[i, r0:r1], right[i], out=g)  # g̃
                d.zero_()
                torch._fused_adamw_([d], [g], [exp_avg_all[r0 - lo:r1 - lo]], [exp_avg_sq_all[r0 - lo:r1 - lo]],
                                    [], [steps[i]], lr=1.0, beta1=beta1, beta2=beta2, weight_decay=0.0,
                                    eps=eps, amsgrad=False, maximize=False)  # d = −D, bias-corrected
                uA[i].addmm_(Bt[:, r0:r1], d)
                torch.mm(A_w[i], d.T, out=uBt[i, :, r0:r1])
            sign[i] = -1.0
            step_size[i] = lr
            continue
        bc1, bc2 = bias_corrections(beta1, beta2, steps[i])
        for r0 in range(lo, hi, block):  # one block of rows of g̃, m, v and D at a time
            r1 = min(hi, r0 + block)
            buf = g_buf[: r1 - r0]
            exp_avg, exp_avg_sq = exp_avg_all[r0 - lo:r1 - lo], exp_avg_sq_all[r0 - lo:r1 - lo]
            torch.matmul(left[i, r0:r1], right[i], out=buf)  # g̃
            g = buf if exp_avg.dtype == wdt else buf.to(exp_avg.dtype)
            exp_avg.lerp_(g, 1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            # D·(1 − β1ᵗ)/√(1 − β2ᵗ) = m / (√v + ε·√(1 − β2ᵗ)), written into the block buffer
            torch.sqrt(exp_avg_sq, out=buf) if exp_avg_sq.dtype == wdt else buf.copy_(exp_avg_sq).sqrt_()
            buf.add_(eps * bc2**0.5)
            torch.div(exp_avg, buf, out=buf)
            uA[i].addmm_(Bt[:, r0:r1], buf)
            torch.mm(A_w[i], buf.T, out=uBt[i, :, r0:r1])
        step_size[i] = lr * bc2**0.5 / bc1
    if rows is not None:
        rows.all_reduce_([uA, uBt])
    sc = (s.to(wdt) * sign).view(-1, 1, 1)
    hA, hB = F.adjusted_gradients(grams, uA.mul_(sc), uBt.mul_(sc).transpose(-1, -2), s, x_solution)
    apply_update(A, B, grams.A, grams.B, hA, hB, step_size, lr, weight_decay)


def adamw_efficient_step(
    A: List[Tensor], B: List[Tensor], grad_A: List[Tensor], grad_B: List[Tensor], scalings: Sequence[float],
    exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor], steps: List[Tensor], *, lr: float, beta1: float,
    beta2: float, eps: float, weight_decay: float, delta: float, x_solution: str,
    compute_dtype: Optional[torch.dtype] = None, workspace: F.Workspace = F.fresh,
) -> None:
    """``mode="efficient"``: AdamW on the adjusted gradients (ĝ_A, ĝ_B), moments of factor size.

    ``exp_avgs``, ``exp_avg_sqs``: 2L tensors, ``[A0's, B0's, A1's, B1's, ...]``; ``steps``: one count per pair
    (A and B of a pair share it)."""
    _increment(steps)
    AG, BG, s, grams, gA_At, Bt_gB = _prepare(A, B, grad_A, grad_B, scalings, delta, compute_dtype, workspace)
    hA, hB = F.adjusted_gradients_packed(grams, AG, BG, s, x_solution, gA_At, Bt_gB, workspace=workspace)
    params = [p for pair in zip(A, B) for p in pair]
    hs = [h for pair in zip(hA.unbind(0), hB.unbind(0)) for h in pair]
    grads = [h.to(e.dtype) for h, e in zip(hs, exp_avgs)]  # no copy where the state has the work dtype
    adamw_update(params, grads, exp_avgs, exp_avg_sqs, [t for t in steps for _ in range(2)], lr=lr, beta1=beta1,
                 beta2=beta2, eps=eps, weight_decay=weight_decay)


def adamw_factored_step(
    A: List[Tensor], B: List[Tensor], grad_A: List[Tensor], grad_B: List[Tensor], scalings: Sequence[float],
    exp_avg_lefts: List[Tensor], exp_avg_rights: List[Tensor], exp_avg_sq_rows: List[Tensor],
    exp_avg_sq_cols: List[Tensor], steps: List[Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, delta: float, x_solution: str, clip_threshold: Optional[float],
    compute_dtype: Optional[torch.dtype] = None, workspace: F.Workspace = F.fresh,
) -> None:
    """``mode="factored"``: Adam on g̃ at LoRA's memory (:func:`lorapro.factored.lowrank_step`: a rank-2r EMA of
    g̃ as two factors, ``exp_avg_left`` (m × 2r) and ``exp_avg_right`` (2r × n), and Adafactor's row / column
    EMAs of g̃², ``exp_avg_sq_row`` (m) and ``exp_avg_sq_col`` (n)), then the update as in full mode."""
    _increment(steps)
    bc = [bias_corrections(beta1, beta2, t) for t in steps]
    bc1 = torch.tensor([b[0] for b in bc], dtype=torch.float64)
    bc2 = torch.tensor([b[1] for b in bc], dtype=torch.float64)
    s = torch.tensor(list(scalings), dtype=compute_dtype or torch.float64, device=A[0].device)
    hA, hB, A_cur, B_cur, P, Q = FF.lowrank_step(
        A, B, grad_A, grad_B, exp_avg_lefts, exp_avg_rights, exp_avg_sq_rows, exp_avg_sq_cols, s,
        beta1=beta1, beta2=beta2, bc1=bc1, bc2=bc2, eps=eps, clip_threshold=clip_threshold, delta=delta,
        x_solution=x_solution, compute_dtype=compute_dtype, workspace=workspace,
    )
    torch._foreach_copy_([*exp_avg_lefts, *exp_avg_rights], [*P.unbind(0), *Q.unbind(0)])
    step_size = torch.full((len(A),), lr, dtype=torch.float64)
    apply_update(A, B, A_cur, B_cur, hA, hB, step_size, lr, weight_decay)


# ----------------------------------------------------------------------------------------------------------------
# LoRA-Pro SGD


def sgd_momentum(d: Tensor, buf: Optional[Tensor], *, momentum: float, dampening: float, nesterov: bool,
                 state_dtype: torch.dtype) -> Tuple[Tensor, Optional[Tensor]]:
    """torch.optim.SGD's momentum on a direction d: ``buf ← μ·buf + (1 − dampening)·d`` (``buf = d`` on the first
    step), then ``d + μ·buf`` (Nesterov) or ``buf``. Returns (the direction, the buffer — new on the first step,
    else ``buf`` updated in place; None without momentum)."""
    if momentum == 0:
        return d, None
    if buf is None:
        buf = d.to(state_dtype).clone()
    else:
        buf.mul_(momentum).add_(d.to(buf.dtype), alpha=1.0 - dampening)
    b = buf.to(d.dtype)
    return (d + momentum * b if nesterov else b), buf


def sgd_step(
    A: List[Tensor], B: List[Tensor], grad_A: List[Tensor], grad_B: List[Tensor], scalings: Sequence[float],
    momentum_buffers: List[Optional[Tensor]], *, lr: float, momentum: float, dampening: float, nesterov: bool,
    weight_decay: float, delta: float, x_solution: str, state_dtype: torch.dtype,
    compute_dtype: Optional[torch.dtype] = None, workspace: F.Workspace = F.fresh,
) -> List[Optional[Tensor]]:
    """LoRA-Pro SGD: ``θ ← θ·(1 − lr·λ) − lr·d`` with d the adjusted gradient ĝ or its momentum.

    ``momentum_buffers``: 2L entries ``[A0's, B0's, ...]``, None where there is none yet; returns them, new ones
    (``state_dtype``) created on the first step with momentum."""
    AG, BG, s, grams, gA_At, Bt_gB = _prepare(A, B, grad_A, grad_B, scalings, delta, compute_dtype, workspace)
    hA, hB = F.adjusted_gradients_packed(grams, AG, BG, s, x_solution, gA_At, Bt_gB, workspace=workspace)
    out: List[Optional[Tensor]] = []
    dA, dB = [], []
    for i in range(len(A)):
        for h, buf, ds in ((hA[i], momentum_buffers[2 * i], dA), (hB[i], momentum_buffers[2 * i + 1], dB)):
            d, buf = sgd_momentum(h, buf, momentum=momentum, dampening=dampening, nesterov=nesterov,
                                  state_dtype=state_dtype)
            ds.append(d)
            out.append(buf)
    step_size = torch.full((len(A),), lr, dtype=torch.float64)
    apply_update(A, B, grams.A, grams.B, torch.stack(dA), torch.stack(dB), step_size, lr, weight_decay)
    return out
