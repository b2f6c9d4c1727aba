r"""LoRA-Pro with factored Adam moments — the math of ``LoRAProAdamW(mode="factored")``, batched over layers.

Full-mode LoRA-Pro (arXiv 2407.18242, Algorithm 1) keeps Adam's two moments of the equivalent gradient ``g̃`` in the
full m × n shape: the optimizer memory of full fine-tuning. This module keeps both moments at O((m + n)·r) per
layer and never forms an m × n tensor, using that ``g̃`` is a rank-2r product (:mod:`lorapro.functional`)::

    g̃ = s(B·ĝ_A⁰ + ĝ_B⁰·A) = Lf·Rf,     Lf = [s·B, s·ĝ_B⁰] (m × 2r),   Rf = [ĝ_A⁰; A] (2r × n).

Second moment (Adafactor, Shazeer & Stern 2018, with Adam's β2 and bias correction). Only the row and column sums
of the EMA of ``g̃²`` are kept::

    row(g̃²) = diag(Lf (Rf Rfᵀ) Lfᵀ),   col(g̃²) = diag(Rfᵀ (Lfᵀ Lf) Rf)                 O((m + n)·r²)
    ρ ← β2·ρ + (1 − β2)·row(g̃²),      κ ← β2·κ + (1 − β2)·col(g̃²)
    ρ̂ = ρ/(1 − β2ᵗ) + n·ε²,   κ̂ = κ/(1 − β2ᵗ) + m·ε²,   S = Σᵢ ρ/(1 − β2ᵗ) + m·n·ε²
    V̂ = ρ̂ κ̂ᵀ / S                                                                        (never formed)

``ρ̂, κ̂, S`` are the row sums, column sums and total of ``v̂ + ε²`` (the bias-corrected EMA of ``g̃²`` plus ε² in
every entry), so V̂ is Adafactor's rank-1 estimate of ``v̂ + ε²``: ε sits *inside* the square root, as
``√(v̂ + ε²)`` instead of Adam's ``√v̂ + ε`` (the two agree when v̂ ≫ ε² and when v̂ ≪ ε²). That placement is what
keeps the preconditioner separable, so the Adam-like direction stays factored::

    g̃ ⊘ √V̂ = diag(a)·Lf·Rf·diag(b),     a = 1/√ρ̂,   b = √S/√κ̂.

First moment: a rank-k EMA of g̃ kept as a product ``P·Q`` (P m × k, Q k × n, k = 2r, the rank of g̃):
``P·Q ← trunc_k(β1·P·Q + (1 − β1)·g̃)``, where ``trunc_k`` is the best rank-k approximation (truncated SVD),
computed from the (k + 2r)-sized Gram matrices of ``[P, Lf]`` and ``[Q; Rf]`` in O((m + n)·r²).
Then ``D = diag(a)·(P·Q)/(1 − β1ᵗ)·diag(b)`` — Adam's order: momentum of the gradient, then preconditioning.

Update clipping (Adafactor): ``D ← D / max(1, RMS(D)/d)`` with ``RMS(D)² = tr((P̃ᵀP̃)(Q̃Q̃ᵀ))/(m·n)`` for
``D = P̃·Q̃``. The factored V̂ can underestimate single entries of v (a rank-1 fit), so a few entries of D can be
much larger than Adam's; clipping bounds the step where that happens and is a no-op otherwise.

Projection back (as in full mode): ``u_A = s·Bᵀ·D = s·(Bᵀ P̃)·Q̃`` and ``u_B = s·D·Aᵀ = s·P̃·(Q̃ Aᵀ)``, O((m + n)·r²),
then :func:`lorapro.functional.adjusted_gradients` turns (u_A, u_B) into the factor steps (ĥ_A, ĥ_B).

Why these choices (``benchmarks/factored_quality.py``: MiniLM-L6 + LoRA r = 8 on 2,000 SST-2 sentences, 63 steps,
GLUE-dev accuracy over 3 seeds; the full table is in the README):

- The low-rank first moment tracks full mode; the alternative we measured — momentum of the projected factor
  steps after preconditioning (Adafactor's order, the smallest state), formerly ``first_moment="factor"`` —
  does not, and was removed: at lr 1e-4 full 0.788 ± 0.009, low-rank 0.787 ± 0.009, factor 0.758 ± 0.016; at
  lr 3e-4 full 0.810 ± 0.005, low-rank 0.805 ± 0.004, factor 0.760 ± 0.017; at lr 1e-3 low-rank fails and
  succeeds on the same seeds as full (0.795 / 0.509 / 0.756 against 0.782 / 0.509 / 0.771) while factor
  collapsed to the majority class on all three. Normalising each g̃ before averaging discards the relative size
  of successive gradients that Adam's m/√v keeps, and averaging factor steps taken in moving bases (A, B change
  every step) blurs them.
- Update clipping (d = 1) changed no result here (accuracies within 0.002 of the unclipped runs). It fires in the
  first two steps only — RMS(D) reaches 2.1 at step 1, where V̂ is the rank-1 fit of a single g̃² (full-mode Adam
  has RMS(D) = 1 there) — on ~1.6 % of layer-steps. It stays on as Adafactor's guard against the rank-1 fit
  underestimating v; it costs one Gram product per side.
- ε inside the square root is forced by separability; with the default ε = 1e-8, ε² is negligible next to g̃² in
  these runs, so the placement does not show in the results.
- ``compute_dtype=torch.float32`` gave the same accuracies as float64 (within 0.002). The default precision
  (float32 products, float64 small algebra) is closer still: after 3 steps on 60 SmolLM2-135M layers its update
  differs from the float64 one by 1.8e-6 relative (median; max 2.4e-4), all-float32's by 1.3e-3 (max 2.5e-2).

Cost: the optimizer runs the default design through :func:`lowrank_step`, eight products with factor-sized
operands per layer (four per side) and r-sized algebra: about 37·(m + n)·r² multiply-adds (the Gram matrices of
the packed m × 4r and 4r × n operands and the product that makes the new EMA factor dominate), against
O((m + n)·r) elementwise work for AdamW on the factors. So the step is much slower than plain LoRA AdamW's while
its memory is the same; ``benchmarks/optimizer_step.py`` measures the ratio.

The building blocks below take a leading batch dimension (the layers of one shape) and work in the dtype they
are given; :func:`lowrank_step` composes them in the optimizer's precision (``compute_dtype``; by default float32
products and float64 small algebra). :mod:`lorapro.reference` has the dense float64 spec (``adamw_factored_step``)
that forms g̃, v and V̂ explicitly; the tests compare the optimizer with it step by step.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from . import functional as F

__all__ = [
    "square_sums",
    "preconditioner",
    "scale_factors",
    "factored_rms",
    "project",
    "lowrank_ema",
    "lowrank_maps",
    "lowrank_step",
]


Tensor = torch.Tensor


def square_sums(
    left: Tensor, right: Tensor, ltl: Optional[Tensor] = None, rrt: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Row and column sums of ``(left @ right)²`` without forming the product.

    ``row_i = (left (right rightᵀ) leftᵀ)_ii`` and ``col_j = (rightᵀ (leftᵀ left) right)_jj``.

    Args:
        left: (L, m, p); right: (L, p, n).
        ltl, rrt: ``leftᵀleft`` and ``right rightᵀ`` (L, p, p) if already computed (they are blocks of the Gram
            matrices :func:`lowrank_ema` needs).

    Returns:
        (row (L, m), col (L, n)), clamped at 0 against round-off.
    """
    if rrt is None:
        rrt = right @ right.transpose(-1, -2)
    if ltl is None:
        ltl = left.transpose(-1, -2) @ left
    row = ((left @ rrt) * left).sum(-1)
    col = ((ltl @ right) * right).sum(-2)
    return row.clamp_min_(0.0), col.clamp_min_(0.0)


def preconditioner(row_hat: Tensor, col_hat: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """Vectors (a, b) with ``X ⊘ √V̂ = diag(a)·X·diag(b)`` for the factored second moment V̂.

    Args:
        row_hat: (L, m) bias-corrected EMA of the row sums of g̃² (without ε).
        col_hat: (L, n) the same for column sums.
        eps: Adam's ε; ε² is added to every entry of v̂ before factoring.

    Returns:
        a = 1/√(row_hat + n·ε²) (L, m) and b = √(Σ row_hat + m·n·ε²)/√(col_hat + m·ε²) (L, n).
    """
    m, n = row_hat.shape[-1], col_hat.shape[-1]
    e2 = eps * eps
    total = row_hat.sum(-1, keepdim=True) + m * n * e2
    a = (row_hat + n * e2).rsqrt()
    b = (total / (col_hat + m * e2)).sqrt()
    return a, b


def scale_factors(left: Tensor, right: Tensor, a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """Factors of ``diag(a)·left·right·diag(b)``: (a ⊙ rows of left, b ⊙ columns of right)."""
    return left * a.unsqueeze(-1), right * b.unsqueeze(-2)


def factored_rms(left: Tensor, right: Tensor) -> Tensor:
    """RMS of ``left @ right`` (L, m, n) from the factors: √(tr((leftᵀleft)(right rightᵀ)) / (m·n)), shape (L,)."""
    m, n = left.shape[-2], right.shape[-1]
    ltl = left.transpose(-1, -2) @ left
    rrt = right @ right.transpose(-1, -2)
    sq = (ltl * rrt).sum((-1, -2)).clamp_min(0.0)  # both symmetric: tr(XY) = Σ X ⊙ Y
    return (sq / (m * n)).sqrt()


def project(left: Tensor, right: Tensor, A: Tensor, B: Tensor, scaling: Tensor) -> Tuple[Tensor, Tensor]:
    """``u_A = s·Bᵀ·D`` (L, r, n) and ``u_B = s·D·Aᵀ`` (L, m, r) for ``D = left @ right``, in O((m + n)·r·p)."""
    s = scaling.to(left.dtype).view(-1, 1, 1)
    uA = (s * (B.transpose(-1, -2) @ left)) @ right
    uB = left @ (s * (right @ A.transpose(-1, -2)))
    return uA, uB


def lowrank_ema(
    Lc: Tensor, Rc: Tensor, beta1: float, rank: int, lc_gram: Optional[Tensor] = None,
    rc_gram: Optional[Tensor] = None, rtol: float = 1e-12,
) -> Tuple[Tensor, Tensor]:
    """Rank-``rank`` EMA in factored form: ``P'·Q' = trunc_rank(β1·P·Q + (1 − β1)·left·right)``.

    The inputs are concatenated, ``Lc = [P, left]`` (m × p) and ``Rc = [Q; right]`` (p × n), so the new EMA is
    ``Lc·W·Rc`` with the diagonal weights ``W = diag(β1·1_rank, (1 − β1)·1_(p − rank))``. From the Gram matrices
    ``LcᵀLc = U₁ diag(λ₁) U₁ᵀ`` and ``Rc Rcᵀ = U₂ diag(λ₂) U₂ᵀ``, ``Lc·W·Rc = Q₁·C·Q₂ᵀ`` with orthonormal Q₁, Q₂
    and the p × p core ``C = diag(√λ₁) U₁ᵀ W U₂ diag(√λ₂)``. With ``C ≈ U Σ Vᵀ`` (its top ``rank`` triplets)::

        P' = Lc·W·U₂·diag(√λ₂)·V·Σ^(−1/2),     Q' = Σ^(−1/2)·Uᵀ·diag(√λ₁)·U₁ᵀ·W·Rc

    so ``P'·Q' = Q₁ U Σ Vᵀ Q₂ᵀ`` (the truncated SVD, Eckart–Young) and ``P'ᵀP' = Q'Q'ᵀ = Σ`` (balanced factors).
    No division by a Gram eigenvalue occurs; singular values below ``rtol·σ_max`` are dropped (their columns set
    to 0), which keeps the first step (P = Q = 0) and a rank-deficient g̃ (B = 0 at PEFT init) exact.
    Cost O((m + n)·p²) — p = rank + 2r — all in matrix products; the SVD is p × p.

    Args:
        Lc: (L, m, p) = [P, left]; Rc: (L, p, n) = [Q; right], with P (L, m, rank), Q (L, rank, n).
        beta1: EMA coefficient.
        rank: the kept rank (the width of P).
        lc_gram, rc_gram: ``LcᵀLc`` and ``Rc Rcᵀ`` if already computed.

    Returns:
        (P', Q') of shapes (L, m, rank), (L, rank, n).
    """
    if lc_gram is None:
        lc_gram = Lc.transpose(-1, -2) @ Lc
    if rc_gram is None:
        rc_gram = Rc @ Rc.transpose(-1, -2)
    right_map, left_map = lowrank_maps(lc_gram, rc_gram, beta1, rank, rtol)
    return Lc @ right_map, left_map @ Rc


def lowrank_maps(lc_gram: Tensor, rc_gram: Tensor, beta1: float, rank: int, rtol: float = 1e-12
                 ) -> Tuple[Tensor, Tensor]:
    """The p × rank and rank × p maps of :func:`lowrank_ema` (``P' = Lc·right_map``, ``Q' = left_map·Rc``), from
    the Gram matrices ``LcᵀLc`` and ``Rc Rcᵀ`` alone (L, p, p), in their dtype."""
    p = lc_gram.shape[-1]
    w = torch.full((p,), 1.0 - beta1, dtype=lc_gram.dtype, device=lc_gram.device)
    w[:rank] = beta1
    lam1, U1 = torch.linalg.eigh(lc_gram)
    lam2, U2 = torch.linalg.eigh(rc_gram)
    sq1 = lam1.clamp_min(0.0).sqrt()
    sq2 = lam2.clamp_min(0.0).sqrt()
    wU2 = w.unsqueeze(-1) * U2  # W·U₂
    core = sq1.unsqueeze(-1) * (U1.transpose(-1, -2) @ wU2) * sq2.unsqueeze(-2)
    U, sigma, Vh = torch.linalg.svd(core)
    U, sigma, Vh = U[..., :rank], sigma[..., :rank], Vh[..., :rank, :]
    keep = sigma > rtol * sigma[..., :1]
    inv_sqrt = torch.where(keep, sigma.clamp_min(torch.finfo(sigma.dtype).tiny).rsqrt(), torch.zeros_like(sigma))
    right_map = (wU2 * sq2.unsqueeze(-2)) @ (Vh.transpose(-1, -2) * inv_sqrt.unsqueeze(-2))  # (L, p, rank)
    left_map = ((inv_sqrt.unsqueeze(-1) * U.transpose(-1, -2) * sq1.unsqueeze(-2)) @ U1.transpose(-1, -2)) * w
    return right_map, left_map


def _blocks(L: int, size: int, like: Tensor) -> Tensor:
    return torch.zeros(L, size, size, dtype=like.dtype, device=like.device)


def lowrank_step(
    A: List[Tensor], B: List[Tensor], g_A: List[Tensor], g_B: List[Tensor], P: List[Tensor], Q: List[Tensor],
    row_ema: List[Tensor], col_ema: List[Tensor], scaling: Tensor, *, beta1: float, beta2: float, bc1: Tensor,
    bc2: Tensor, eps: float, clip_threshold: Optional[float], delta: float, x_solution: str,
    compute_dtype: Optional[torch.dtype] = None, workspace: F.Workspace = F.fresh,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One ``mode="factored"`` step for L pairs of one shape, in few thin products.

    The same algebra as :func:`square_sums`, :func:`lowrank_ema`, :func:`preconditioner`, :func:`factored_rms`,
    :func:`project` and :func:`lorapro.functional.adjusted_gradients` composed, reorganised so that every
    product with a factor-sized operand is one of eight (four per side):

    - pack ``BGP = [g_B, B, P]`` (m × 4r) and ``AGQ = [g_A; A; Q]`` (4r × n); their Gram matrices (one product
      each) give BᵀB, AAᵀ, the cross terms and every Gram matrix of ``Lc = [P, Lf]``, ``Rc = [Q; Rf]``, because
      ``Lf = [g_B, B]·T`` and ``Rf = S·[g_A; A]`` for r-sized T, S (so Lf and Rf are never formed);
    - one product per side gives the new EMA factor (``P' = BGP·(Ť·right_map)``) together with what the row
      (column) sums of g̃² need (``[g_B, B]·T·(Rf Rfᵀ)·Tᵀ``);
    - the direction's factors ``d_left = diag(a)·P'/(1 − β1ᵗ)``, ``d_right = Q'·diag(b)`` overwrite the P and Q
      slots, and one product per side (``[B, d_left]ᵀ·d_left``, ``[A; d_right]·d_rightᵀ``) gives the RMS for the
      clipping and the projections ``Bᵀ·D``, ``D·Aᵀ`` as r-sized factors;
    - the factor steps are then ``ĥ_A = [X, c·K_B·(Bᵀd_left)]·[A; d_right]`` and
      ``ĥ_B = [B, d_left]·[−(M·K_A + X); c·(d_right Aᵀ)·K_A]`` (c = s × the clipping factor), one product each.

    Precision: the thin products run in ``compute_dtype`` or, when it is None, the work dtype of the factors; the
    small algebra (Gram inverses, eigh, SVD) in ``compute_dtype`` or float64, with the Gram matrices BᵀB, AAᵀ of
    ill-conditioned layers re-formed in float64 (:func:`lorapro.functional.packed_gram_inverses`).

    Args:
        A, B, g_A, g_B: the L pairs' factors and gradients; P, Q: their first-moment factors (m × 2r, 2r × n);
        row_ema, col_ema: their second-moment EMAs (m,), (n,), updated in place.
        scaling: (L,) LoRA scales; bc1, bc2: (L,) bias corrections 1 − β1ᵗ, 1 − β2ᵗ.
        workspace: where to put the large temporaries (:data:`lorapro.functional.Workspace`; default: fresh
            tensors). The optimizer keeps them between steps: freeing and re-allocating a few MiB every step made
            glibc return the memory to the OS and fault it in again, a third of the step on our CPU.

    Returns:
        (ĥ_A, ĥ_B, A, B, P', Q'): the factor steps (the learning rate's multiplicand; clipping included), the
        current factors and the new first-moment factors, all in the thin-product dtype.
    """
    L, (r, n), m = len(A), A[0].shape, B[0].shape[0]
    k, r2, r4 = 2 * r, 2 * r, 4 * r
    tdt = compute_dtype or F.work_dtype(A[0].dtype)
    rr_dtype = compute_dtype or torch.float64  # = the dtype F.gram_inverses_for gives
    dev = A[0].device
    ws = workspace
    BGP = ws("BGP", (L, m, r4), tdt, dev)
    AGQ = ws("AGQ", (L, r4, n), tdt, dev)
    dst = [BGP[i, :, :r] for i in range(L)] + [BGP[i, :, r:r2] for i in range(L)] + [BGP[i, :, r2:] for i in range(L)]
    dst += [AGQ[i, :r] for i in range(L)] + [AGQ[i, r:r2] for i in range(L)] + [AGQ[i, r2:] for i in range(L)]
    torch._foreach_copy_(dst, [*g_B, *B, *P, *g_A, *A, *Q])
    Bv, Av = BGP[..., r:r2], AGQ[:, r:r2]

    # Gram matrices of the packed operands (blocks g = 0:r, b = r:2r, p = 2r:4r) and LoRA-Pro's inverses
    GB = BGP.transpose(-1, -2) @ BGP
    GA = AGQ @ AGQ.transpose(-1, -2)
    grams = F.gram_inverses_for(Av, Bv, delta, compute_dtype, GA[:, r:r2, r:r2], GB[:, r:r2, r:r2])
    GB, GA = GB.to(rr_dtype), GA.to(rr_dtype)
    GB[:, r:r2, r:r2], GA[:, r:r2, r:r2] = grams.BtB, grams.AAt
    s = scaling.to(rr_dtype).view(-1, 1, 1)
    K_B, K_A = grams.BtB_inv / s**2, grams.AAt_inv / s**2
    # Lf = [g_B, B]·T = [s·B, s·ĝ_B⁰],  Rf = S·[g_A; A] = [K_B·g_A; A]: the maps of lorapro.functional with the
    # blocks of the packed operands in the order [g, b]
    T, S = F.equivalent_gradient_maps(grams, scaling, GB[:, r:r2, :r])
    T = torch.cat([T[:, r:], T[:, :r]], dim=1)
    S = torch.cat([S[..., r:], S[..., :r]], dim=-1)
    ltl = T.transpose(-1, -2) @ GB[:, :r2, :r2] @ T
    rrt = S @ GA[:, :r2, :r2] @ S.transpose(-1, -2)
    # Lc = [P, Lf] = BGP·Tc,  Rc = [Q; Rf] = Sc·AGQ
    Tc = _blocks(L, r4, GB)
    Tc[:, r2:, :k] = torch.eye(k, dtype=rr_dtype, device=dev)
    Tc[:, :r2, k:] = T
    Sc = _blocks(L, r4, GB)
    Sc[:, :k, r2:] = torch.eye(k, dtype=rr_dtype, device=dev)
    Sc[:, k:, :r2] = S
    lc_gram = Tc.transpose(-1, -2) @ GB @ Tc
    rc_gram = Sc @ GA @ Sc.transpose(-1, -2)
    right_map, left_map = lowrank_maps(lc_gram, rc_gram, beta1, k)

    # P' and the row sums of g̃² (rows of [g_B, B]·T·RfRfᵀ·Tᵀ dotted with rows of [g_B, B]); Q' and column sums
    W_rows = torch.zeros(L, r4, k + r2, dtype=rr_dtype, device=dev)
    W_rows[:, :, :k] = Tc @ right_map
    W_rows[:, :r2, k:] = T @ rrt @ T.transpose(-1, -2)
    Y = torch.matmul(BGP, W_rows.to(tdt), out=ws("Y", (L, m, k + r2), tdt, dev))
    row = torch.mul(Y[..., k:], BGP[..., :r2], out=ws("rows", (L, m, r2), tdt, dev)).sum(-1).clamp_min_(0.0)
    W_cols = torch.zeros(L, k + r2, r4, dtype=rr_dtype, device=dev)
    W_cols[:, :k] = left_map @ Sc
    W_cols[:, k:, :r2] = S.transpose(-1, -2) @ ltl @ S
    Z = torch.matmul(W_cols.to(tdt), AGQ, out=ws("Z", (L, k + r2, n), tdt, dev))
    col = torch.mul(Z[:, k:], AGQ[:, :r2], out=ws("cols", (L, r2, n), tdt, dev)).sum(-2).clamp_min_(0.0)
    P_new, Q_new = Y[..., :k], Z[:, :k]

    # second moment (EMAs of the row / column sums) and the preconditioner
    sdt_state = row_ema[0].dtype
    torch._foreach_mul_(row_ema, beta2)
    torch._foreach_add_(row_ema, [x.to(sdt_state) for x in row.unbind(0)], alpha=1.0 - beta2)
    torch._foreach_mul_(col_ema, beta2)
    torch._foreach_add_(col_ema, [x.to(sdt_state) for x in col.unbind(0)], alpha=1.0 - beta2)
    inv_bc2 = (1.0 / bc2).to(device=dev, dtype=tdt).unsqueeze(-1)
    a_vec, b_vec = preconditioner(torch.stack(row_ema).to(tdt) * inv_bc2, torch.stack(col_ema).to(tdt) * inv_bc2, eps)
    inv_bc1 = (1.0 / bc1).to(device=dev, dtype=tdt).view(-1, 1)

    # D = diag(a)·P'·Q'·diag(b)/(1 − β1ᵗ): its factors overwrite the P and Q slots
    torch.mul(P_new, (a_vec * inv_bc1).unsqueeze(-1), out=BGP[..., r2:])
    torch.mul(Q_new, b_vec.unsqueeze(-2), out=AGQ[:, r2:])
    HB = (BGP[..., r:].transpose(-1, -2) @ BGP[..., r2:]).to(rr_dtype)  # [Bᵀd_left; d_leftᵀd_left]
    HA = (AGQ[:, r:] @ AGQ[:, r2:].transpose(-1, -2)).to(rr_dtype)  # [A d_rightᵀ; d_right d_rightᵀ]
    Cb, Ca = HB[:, :r], HA[:, :r].transpose(-1, -2)  # Bᵀ·d_left (r × 2r), d_right·Aᵀ (2r × r)
    c = s
    if clip_threshold is not None:  # Adafactor's update clipping: RMS(D)² = tr((d_leftᵀd_left)(d_right d_rightᵀ))/(m·n)
        rms = ((HB[:, r:] * HA[:, r:]).sum((-1, -2)).clamp_min(0.0) / (m * n)).sqrt()
        c = s * (clip_threshold / rms).clamp(max=1.0).view(-1, 1, 1)

    # projection back: u_A = c·(Bᵀd_left)·d_right, u_B = c·d_left·(d_right Aᵀ); their cross terms are r × r
    cross = c * (Cb @ Ca)  # = u_A Aᵀ = Bᵀ u_B
    M_u = grams.BtB_inv @ cross
    MK = M_u @ K_A
    W_A = torch.zeros(L, r, 3 * r, dtype=rr_dtype, device=dev)
    W_A[:, :, r:] = c * (K_B @ Cb)
    if x_solution != "zero":
        X = F.solve_x(grams, cross, K_B, K_A, M_u, cross, x_solution)
        W_A[:, :, :r] = X
        MK = MK + X
    hA = torch.matmul(W_A.to(tdt), AGQ[:, r:], out=ws("hA", (L, r, n), tdt, dev))
    hB = F.tall_mm(BGP[..., r:], torch.cat([-MK, c * (Ca @ K_A)], dim=-2).to(tdt), contiguous=False, workspace=ws,
                   name="hB")
    return hA, hB, Av, Bv, P_new, Q_new
