r"""The LoRA-Pro math, batched over layers of the same shape — the fast path.

Notation (PEFT): a LoRA layer computes ``W = W0 + s·B·A`` with ``B`` (m × r), ``A`` (r × n). Autograd gives
``g_A = s·Bᵀ·G`` and ``g_B = s·G·Aᵀ`` for the full-weight gradient ``G = ∂L/∂W``, which is never formed.

LoRA-Pro (Wang et al., arXiv 2407.18242, Theorems 2.1–2.2) replaces the factor gradients by

    ĝ_A = (1/s²) (BᵀB)⁻¹ g_A + X·A
    ĝ_B = (1/s²) [I − B(BᵀB)⁻¹Bᵀ] g_B (AAᵀ)⁻¹ − B·X

so that the *equivalent gradient* ``g̃ = s(B·ĝ_A + ĝ_B·A) = P_B·G + (I − P_B)·G·P_A`` is the least-squares
projection of ``G`` onto ``{B·Y + Z·A}``. ``g̃`` does not depend on the r × r matrix ``X``:

- ``"sylvester"`` (default): the X that keeps (ĝ_A, ĝ_B) closest to (g_A, g_B), the solution of
  ``(BᵀB)·X + X·(AAᵀ) = −(1/s²)(BᵀB)⁻¹ g_A Aᵀ``;
- ``"zero"``: ``X = 0``;
- ``"symmetric"``: the minimiser of ``‖B·ĝ_A − ĝ_B·A‖`` (both factors contribute equally to g̃), which is
  ``X = −½ (BᵀB)⁻¹ Bᵀ E Aᵀ (AAᵀ)⁻¹`` with ``E = B·ĝ_A⁰ − ĝ_B⁰·A`` the X = 0 imbalance; in exact arithmetic
  ``X = −(1/2s²)(BᵀB)⁻¹ g_A Aᵀ (AAᵀ)⁻¹``.

Implementation choices (all tested against :mod:`lorapro.reference`):

- Every Gram matrix is ridged, ``BᵀB + δI`` and ``AAᵀ + δI`` (δ = 1e-8 by default, as the authors), so the
  PEFT initialisation ``B = 0`` is well defined (then ĝ_A = 0 and g̃ = G·P_A).
- The factor-sized algebra (r × r, r × n, m × r) runs in ``compute_dtype`` (float64 by default — it costs
  O((m + n)·r²), nothing next to the m × n work, and keeps tiny Gram eigenvalues meaningful).
- ``I − P_B`` is applied as ``Y − B·((BᵀB)⁻¹·(BᵀY))``; no m × m matrix is ever formed.
- The Sylvester equation is solved through the symmetric eigendecompositions of the two Gram matrices
  (``eigh``; one per Gram, reused for the inverses), not a complex ``eig``.
- All tensors carry a leading batch dimension L: the layers of one shape are processed in single batched calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

__all__ = [
    "X_SOLUTIONS",
    "GramInverses",
    "gram_inverses",
    "adjusted_gradients",
    "equivalent_gradient_factors",
]

X_SOLUTIONS = ("sylvester", "zero", "symmetric")


@dataclass
class GramInverses:
    """Ridged Gram matrices of a batch of pairs and what is derived from them (all in the compute dtype).

    ``BtB = BᵀB`` (L × r × r, not ridged); the ridged ``BᵀB + δI = U_B diag(lam_B) U_Bᵀ``; likewise for
    ``AAt = AAᵀ``. ``BtB_inv``, ``AAt_inv`` are the ridged inverses built from those eigendecompositions.
    """

    A: torch.Tensor  # (L, r, n), compute dtype
    B: torch.Tensor  # (L, m, r), compute dtype
    BtB: torch.Tensor
    AAt: torch.Tensor
    U_B: torch.Tensor
    lam_B: torch.Tensor  # (L, r)
    U_A: torch.Tensor
    lam_A: torch.Tensor
    BtB_inv: torch.Tensor
    AAt_inv: torch.Tensor


def _ridged_eigh(gram: torch.Tensor, delta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    # The Gram matrix is PSD; round-off can make tiny eigenvalues slightly negative, so clamp before the ridge.
    lam, U = torch.linalg.eigh(gram)
    return lam.clamp_min(0.0) + delta, U


def gram_inverses(A: torch.Tensor, B: torch.Tensor, delta: float, compute_dtype: torch.dtype) -> GramInverses:
    """Eigendecompose the ridged Gram matrices of a batch of pairs: A (L, r, n), B (L, m, r)."""
    A = A.to(compute_dtype)
    B = B.to(compute_dtype)
    BtB = B.transpose(-1, -2) @ B
    AAt = A @ A.transpose(-1, -2)
    lam_B, U_B = _ridged_eigh(BtB, delta)
    lam_A, U_A = _ridged_eigh(AAt, delta)
    BtB_inv = (U_B / lam_B.unsqueeze(-2)) @ U_B.transpose(-1, -2)
    AAt_inv = (U_A / lam_A.unsqueeze(-2)) @ U_A.transpose(-1, -2)
    return GramInverses(
        A=A, B=B, BtB=BtB, AAt=AAt, U_B=U_B, lam_B=lam_B, U_A=U_A, lam_A=lam_A,
        BtB_inv=BtB_inv, AAt_inv=AAt_inv,
    )


def _rr_terms(
    grams: GramInverses, g_B: torch.Tensor, inv_s2: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The r × r pieces every solution is built from (one pass over B and g_B).

    ``K_B = (1/s²)(BᵀB)⁻¹``, ``K_A = (1/s²)(AAᵀ)⁻¹``, ``M = (BᵀB)⁻¹(Bᵀg_B)`` (so ``P_B·g_B = B·M``) and
    ``Bᵀg_B``; then the
    X = 0 solution is ``ĝ_A⁰ = K_B·g_A`` and ``ĝ_B⁰ = g_B·K_A − B·(M·K_A)``.
    """
    Bt_gB = grams.B.transpose(-1, -2) @ g_B
    K_B = inv_s2 * grams.BtB_inv
    K_A = inv_s2 * grams.AAt_inv
    M = grams.BtB_inv @ Bt_gB
    return K_B, K_A, M, Bt_gB


def _tall_mm_sub(P: torch.Tensor, K: torch.Tensor, Q: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``P·K − Q·W`` for tall factor-sized P, Q (L × m × r) and r × r matrices K, W; a contiguous result.

    On CPU the BLAS is about twice as fast on the wide transposed form ``(Kᵀ·Pᵀ − Wᵀ·Qᵀ)ᵀ`` as on the tall one
    (measured with MKL, r = 8, m = 11008), which pays for the final transposing copy; elsewhere the direct form.
    """
    if P.device.type != "cpu":
        return torch.baddbmm(P @ K, Q, W, alpha=-1.0)
    out = K.transpose(-1, -2) @ P.transpose(-1, -2)
    out.baddbmm_(W.transpose(-1, -2), Q.transpose(-1, -2), alpha=-1.0)
    return out.transpose(-1, -2).contiguous()


def _solve_x(
    grams: GramInverses, g_A: torch.Tensor, K_B: torch.Tensor, K_A: torch.Tensor, M: torch.Tensor,
    Bt_gB: torch.Tensor, x_solution: str,
) -> torch.Tensor:
    """The r × r matrix X, from r × r quantities only (``ĝ_A⁰ Aᵀ = K_B (g_A Aᵀ)``; no factor-sized temporary)."""
    A = grams.A
    if x_solution == "sylvester":
        # (BᵀB)X + X(AAᵀ) = C with C = −(1/s²)(BᵀB)⁻¹ g_A Aᵀ = −ĝ_A⁰ Aᵀ. In the eigenbases of the two Gram
        # matrices the equation is diagonal: (λ_i + μ_j) X̃_ij = C̃_ij.
        C = -(K_B @ (g_A @ A.transpose(-1, -2)))
        C_t = grams.U_B.transpose(-1, -2) @ C @ grams.U_A
        X_t = C_t / (grams.lam_B.unsqueeze(-1) + grams.lam_A.unsqueeze(-2))
        return grams.U_B @ X_t @ grams.U_A.transpose(-1, -2)
    if x_solution == "symmetric":
        # argmin_X ‖E + 2·B X A‖ with E = B ĝ_A⁰ − ĝ_B⁰ A  ⇒  X = −½ (BᵀB)⁻¹ (Bᵀ E Aᵀ) (AAᵀ)⁻¹,
        # where Bᵀ E Aᵀ = (BᵀB)(ĝ_A⁰ Aᵀ) − (Bᵀ ĝ_B⁰)(AAᵀ) and Bᵀ ĝ_B⁰ = (Bᵀg_B − (BᵀB)M) K_A need no m × n product.
        Bt_hB0 = (Bt_gB - grams.BtB @ M) @ K_A
        BtEAt = grams.BtB @ (K_B @ (g_A @ A.transpose(-1, -2))) - Bt_hB0 @ grams.AAt
        return -0.5 * (grams.BtB_inv @ BtEAt @ grams.AAt_inv)
    raise ValueError(f"Invalid x_solution {x_solution!r}: choose one of {X_SOLUTIONS}.")


def adjusted_gradients(
    grams: GramInverses,
    g_A: torch.Tensor,
    g_B: torch.Tensor,
    scaling: torch.Tensor,
    x_solution: str = "sylvester",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Pro's adjusted factor gradients (ĝ_A, ĝ_B) for a batch of pairs.

    Computed as ``ĝ_A = K_B·g_A + X·A`` and ``ĝ_B = g_B·K_A − B·(M·K_A + X)`` (see :func:`_rr_terms`): all the
    r × r algebra first, then two fused matmul-adds per factor, so each factor-sized tensor is read or written a
    handful of times.

    Args:
        grams: :func:`gram_inverses` of the current factors.
        g_A: (L, r, n) gradients of A (or any u_A = s·Bᵀ·D, to project a direction D instead of G).
        g_B: (L, m, r) gradients of B (or u_B = s·D·Aᵀ).
        scaling: (L,) the LoRA scale of each pair.
        x_solution: ``"sylvester"``, ``"zero"`` or ``"symmetric"``.

    Returns:
        (ĝ_A, ĝ_B) in the compute dtype.
    """
    if x_solution not in X_SOLUTIONS:
        raise ValueError(f"Invalid x_solution {x_solution!r}: choose one of {X_SOLUTIONS}.")
    dt = grams.A.dtype
    g_A, g_B = g_A.to(dt), g_B.to(dt)
    inv_s2 = (1.0 / scaling.to(dt) ** 2).view(-1, 1, 1)
    K_B, K_A, M, Bt_gB = _rr_terms(grams, g_B, inv_s2)
    hA = K_B @ g_A
    MK = M @ K_A
    if x_solution != "zero":
        X = _solve_x(grams, g_A, K_B, K_A, M, Bt_gB, x_solution)
        hA.baddbmm_(X, grams.A)
        MK = MK + X
    return hA, _tall_mm_sub(g_B, K_A, grams.B, MK)


def equivalent_gradient_factors(
    grams: GramInverses, g_A: torch.Tensor, g_B: torch.Tensor, scaling: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Factors (L_f, R_f) with ``g̃ = L_f @ R_f`` = P_B G + (I − P_B) G P_A, a rank-2r product.

    ``L_f = [s·B, s·ĝ_B⁰]`` (m × 2r) and ``R_f = [ĝ_A⁰; A]`` (2r × n), X-independent.
    """
    dt = grams.A.dtype
    g_A, g_B = g_A.to(dt), g_B.to(dt)
    s = scaling.to(dt).view(-1, 1, 1)
    K_B, K_A, M, _ = _rr_terms(grams, g_B, 1.0 / s**2)
    sK_A = s * K_A  # s·ĝ_B⁰ = g_B·(s·K_A) − B·(M·s·K_A)
    left = torch.cat([s * grams.B, _tall_mm_sub(g_B, sK_A, grams.B, M @ sK_A)], dim=-1)
    right = torch.cat([K_B @ g_A, grams.A], dim=-2)
    return left, right
