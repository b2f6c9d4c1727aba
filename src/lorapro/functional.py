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


def _x_zero_terms(
    grams: GramInverses, g_A: torch.Tensor, g_B: torch.Tensor, inv_s2: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ĝ_A⁰ = (1/s²)(BᵀB)⁻¹ g_A and ĝ_B⁰ = (1/s²)[g_B − B(BᵀB)⁻¹(Bᵀg_B)](AAᵀ)⁻¹ (the X = 0 solution)."""
    B = grams.B
    hA0 = inv_s2 * (grams.BtB_inv @ g_A)
    proj = g_B - B @ (grams.BtB_inv @ (B.transpose(-1, -2) @ g_B))
    hB0 = inv_s2 * (proj @ grams.AAt_inv)
    return hA0, hB0


def _solve_x(grams: GramInverses, hA0: torch.Tensor, hB0: torch.Tensor, x_solution: str) -> torch.Tensor:
    A, B = grams.A, grams.B
    if x_solution == "sylvester":
        # (BᵀB)X + X(AAᵀ) = C with C = −(1/s²)(BᵀB)⁻¹ g_A Aᵀ = −ĝ_A⁰ Aᵀ. In the eigenbases of the two Gram
        # matrices the equation is diagonal: (λ_i + μ_j) X̃_ij = C̃_ij.
        C = -(hA0 @ A.transpose(-1, -2))
        C_t = grams.U_B.transpose(-1, -2) @ C @ grams.U_A
        X_t = C_t / (grams.lam_B.unsqueeze(-1) + grams.lam_A.unsqueeze(-2))
        return grams.U_B @ X_t @ grams.U_A.transpose(-1, -2)
    if x_solution == "symmetric":
        # argmin_X ‖E + 2·B X A‖ with E = B ĝ_A⁰ − ĝ_B⁰ A  ⇒  X = −½ (BᵀB)⁻¹ (Bᵀ E Aᵀ) (AAᵀ)⁻¹,
        # where Bᵀ E Aᵀ = (BᵀB)(ĝ_A⁰ Aᵀ) − (Bᵀ ĝ_B⁰)(AAᵀ) needs no m × n product.
        BtEAt = grams.BtB @ (hA0 @ A.transpose(-1, -2)) - (B.transpose(-1, -2) @ hB0) @ grams.AAt
        return -0.5 * (grams.BtB_inv @ BtEAt @ grams.AAt_inv)
    if x_solution == "zero":
        return torch.zeros(A.shape[0], A.shape[1], A.shape[1], dtype=A.dtype, device=A.device)
    raise ValueError(f"Invalid x_solution {x_solution!r}: choose one of {X_SOLUTIONS}.")


def adjusted_gradients(
    grams: GramInverses,
    g_A: torch.Tensor,
    g_B: torch.Tensor,
    scaling: torch.Tensor,
    x_solution: str = "sylvester",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Pro's adjusted factor gradients (ĝ_A, ĝ_B) for a batch of pairs.

    Args:
        grams: :func:`gram_inverses` of the current factors.
        g_A: (L, r, n) gradients of A (or any u_A = s·Bᵀ·D, to project a direction D instead of G).
        g_B: (L, m, r) gradients of B (or u_B = s·D·Aᵀ).
        scaling: (L,) the LoRA scale of each pair.
        x_solution: ``"sylvester"``, ``"zero"`` or ``"symmetric"``.

    Returns:
        (ĝ_A, ĝ_B) in the compute dtype.
    """
    dt = grams.A.dtype
    inv_s2 = (1.0 / scaling.to(dt) ** 2).view(-1, 1, 1)
    hA0, hB0 = _x_zero_terms(grams, g_A.to(dt), g_B.to(dt), inv_s2)
    if x_solution == "zero":
        return hA0, hB0
    X = _solve_x(grams, hA0, hB0, x_solution)
    return hA0 + X @ grams.A, hB0 - grams.B @ X


def equivalent_gradient_factors(
    grams: GramInverses, g_A: torch.Tensor, g_B: torch.Tensor, scaling: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Factors (L_f, R_f) with ``g̃ = L_f @ R_f`` = P_B G + (I − P_B) G P_A, a rank-2r product.

    ``L_f = [s·B, s·ĝ_B⁰]`` (m × 2r) and ``R_f = [ĝ_A⁰; A]`` (2r × n), X-independent.
    """
    dt = grams.A.dtype
    s = scaling.to(dt).view(-1, 1, 1)
    hA0, hB0 = _x_zero_terms(grams, g_A.to(dt), g_B.to(dt), 1.0 / s**2)
    left = torch.cat([s * grams.B, s * hB0], dim=-1)
    right = torch.cat([hA0, grams.A], dim=-2)
    return left, right
