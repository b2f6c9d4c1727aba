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

- The Gram matrices are inverted as pseudo-inverses with a cut-off *relative* to their largest eigenvalue:
  eigenvalues ``λ ≤ δ·λ_max`` (δ = 1e-6 by default) count as zero, as in ``torch.linalg.pinv(..., rtol=δ)``.
  ``P_B = B(BᵀB)⁺Bᵀ`` then stays an orthogonal projector (onto the kept directions of range(B)), the PEFT
  initialisation ``B = 0`` is exact (``(BᵀB)⁺ = 0``, so ĝ_A = 0 and g̃ = G·P_A), and the result does not depend
  on the scale of B or A. A fixed ridge ``BᵀB + δI`` (the authors') does neither: when BᵀB or AAᵀ is (near)
  singular — r > min(m, n), or B after a first batch whose G has rank < r — it divides the float32 rounding of
  the gradient's null-space part (about 1e-7·‖G‖) by δ, and float32 and float64 runs from the same start then
  differed by 2–11 % after one step; and right after B = 0 (BᵀB ≈ lr², comparable to δ) it distorts the projection
  itself. With the relative cut-off the amplification of rounding is bounded by 1/√δ (≈ 1e3).
- Precision. All r × r algebra runs in float64 (or ``compute_dtype`` when given). The products with
  factor-sized operands that are not Gram matrices (Bᵀg_B, g_A·Aᵀ and the products that build ĝ) run in the
  *work dtype* of the factors (float32 for float32 / bf16 parameters): they lose cond(B)·ε₃₂ of the result's size,
  the precision the result is stored in anyway. The Gram matrices BᵀB, AAᵀ are inverted, which loses accuracy like
  cond(B)²·ε₃₂ if they are formed in float32 (normal equations). So by default (:func:`gram_inverses_for` with
  ``compute_dtype=None``) they are formed in float32 — in the same product as the cross terms — and re-formed in
  float64 for the layers whose Gram condition number exceeds :data:`GRAM_FP32_MAX_COND` (on accelerators always
  in float64). ``compute_dtype=torch.float64`` forms every Gram matrix in float64, ``torch.float32`` none.
- Factor-sized operands are *packed*: ``AG = [A; g_A]`` (2r × n) and ``BG = [B, g_B]`` (m × 2r), so
  ``ĝ_A = [X, K_B]·AG`` and ``ĝ_B = BG·[−(M·K_A + X); K_A]`` are one matrix product each, and one product per
  side gives both the Gram matrix and the cross term (``AG·Aᵀ``, ``Bᵀ·BG``); the Gram matrix is formed again in
  float64 only where the precision policy (:func:`gram_inverses_for`) asks for it.
  These r-thin products, not the r × r algebra, are what the step costs.
- ``I − P_B`` is applied as ``Y − B·((BᵀB)⁻¹·(BᵀY))``; no m × m matrix is ever formed.
- The Sylvester equation is solved through the symmetric eigendecompositions of the two Gram matrices
  (``eigh``; one per Gram, reused for the inverses), not a complex ``eig``.
- All tensors carry a leading batch dimension L: the layers of one shape are processed in single batched calls.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "X_SOLUTIONS",
    "on_accelerator_path",
    "accelerator_path",
    "GramInverses",
    "Workspace",
    "fresh",
    "work_dtype",
    "tall_mm",
    "solve_x",
    "pack",
    "cross_terms",
    "gram_inverses",
    "gram_inverses_for",
    "packed_gram_inverses",
    "equivalent_gradient_maps",
    "refine_ill_conditioned",
    "GRAM_FP32_MAX_COND",
    "adjusted_gradients",
    "adjusted_gradients_packed",
    "equivalent_gradient_factors",
    "equivalent_gradient_factors_packed",
]

X_SOLUTIONS = ("sylvester", "zero", "symmetric")

Tensor = torch.Tensor
Tensors = Union[Tensor, Sequence[Tensor]]


# ``workspace(name, shape, dtype, device) -> Tensor``: where a function may put a large temporary so that the caller
# can reuse it across steps (the optimizers keep a few MiB of such buffers: freeing and re-allocating them every step
# can make glibc return the memory to the OS and fault it in again, which cost up to half of a step on our CPU).
Workspace = Callable[[str, Tuple[int, ...], torch.dtype, torch.device], Tensor]


# The step has branches for accelerators (float64 Gram matrices with no host synchronisation, no CPU chunking or
# row blocks, foreach instead of the fused CPU AdamW kernel, direct tall products). ``accelerator_path()`` (or
# LORAPRO_ACCELERATOR_PATH=1 in the environment) makes CPU tensors take them too, so that their logic is tested on
# machines without a GPU; it changes which branch runs, never what a branch computes.
_FORCE_ACCELERATOR_PATH = os.environ.get("LORAPRO_ACCELERATOR_PATH", "").strip() == "1"


def on_accelerator_path(device: torch.device) -> bool:
    """Whether tensors on ``device`` take the accelerator branches: any device but the CPU, and the CPU as well
    inside :func:`accelerator_path`."""
    return device.type != "cpu" or _FORCE_ACCELERATOR_PATH


@contextmanager
def accelerator_path(enabled: bool = True) -> Iterator[None]:
    """Within this block CPU tensors take the optimizers' accelerator branches (for tests; not thread-safe)."""
    global _FORCE_ACCELERATOR_PATH
    before, _FORCE_ACCELERATOR_PATH = _FORCE_ACCELERATOR_PATH, enabled
    try:
        yield
    finally:
        _FORCE_ACCELERATOR_PATH = before


def fresh(name: str, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The default :data:`Workspace`: a new tensor every time."""
    return torch.empty(shape, dtype=dtype, device=device)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype factor-sized work runs in for factors of ``dtype``: at least float32."""
    return torch.promote_types(dtype, torch.float32)


@dataclass
class GramInverses:
    """Gram matrices of a batch of pairs and their pseudo-inverses.

    ``A`` (L × r × n) and ``B`` (L × m × r) are the factors in the work dtype (often views into packed buffers).
    ``BtB = BᵀB`` (L × r × r, as formed); ``BᵀB = U_B diag(λ) U_Bᵀ`` and ``lam_B`` is λ with the eigenvalues at or
    below the cut-off (``δ·λ_max``) set to exactly 0 — the spectrum of the truncated Gram matrix; likewise for
    ``AAt = AAᵀ``. ``BtB_inv``, ``AAt_inv`` are the pseudo-inverses ``U diag(1/λ kept, 0 cut) Uᵀ``. Every r × r
    tensor is in the compute dtype.
    """

    A: Tensor
    B: Tensor
    BtB: Tensor
    AAt: Tensor
    U_B: Tensor
    lam_B: Tensor  # (L, r)
    U_A: Tensor
    lam_A: Tensor
    BtB_inv: Tensor
    AAt_inv: Tensor


def pack(A: Tensors, B: Tensors, g_A: Tensors, g_B: Tensors, dtype: Optional[torch.dtype] = None,
         workspace: Workspace = fresh) -> Tuple[Tensor, Tensor]:
    """``AG = [A; g_A]`` (L, 2r, n) and ``BG = [B, g_B]`` (L, m, 2r) in ``dtype`` (default: the work dtype).

    Each argument is a stacked (L, ...) tensor or a sequence of L two-dimensional tensors (e.g. the parameters and
    gradients of L pairs); everything is copied in one foreach call, into ``workspace`` buffers "AG" and "BG"
    (default: new tensors).
    """
    As, Bs, gAs, gBs = (list(t.unbind(0)) if torch.is_tensor(t) else list(t) for t in (A, B, g_A, g_B))
    L, (r, n), m = len(As), As[0].shape, Bs[0].shape[0]
    dtype = dtype or work_dtype(As[0].dtype)
    AG = workspace("AG", (L, 2 * r, n), dtype, As[0].device)
    BG = workspace("BG", (L, m, 2 * r), dtype, As[0].device)
    dst = [AG[i, :r] for i in range(L)] + [AG[i, r:] for i in range(L)]
    dst += [BG[i, :, :r] for i in range(L)] + [BG[i, :, r:] for i in range(L)]
    torch._foreach_copy_(dst, As + gAs + Bs + gBs)
    return AG, BG


def _gram_rows(X: Tensor, cdt: torch.dtype) -> Tensor:
    """``X·Xᵀ`` for wide X (L, r, n), in ``cdt`` (the factors are converted first: products of float32 numbers are
    exact in float64, so only the float64 summation rounds)."""
    Xc = X.to(cdt)
    return Xc @ Xc.transpose(-1, -2)


def cross_terms(AG: Tensor, BG: Tensor, compute_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """``g_A·Aᵀ`` and ``Bᵀ·g_B`` (L, r, r) from packed operands, computed in their dtype, returned in ``compute_dtype``."""
    r = AG.shape[-2] // 2
    gA_At = AG[:, r:] @ AG[:, :r].transpose(-1, -2)
    Bt_gB = BG[..., :r].transpose(-1, -2) @ BG[..., r:]
    return gA_At.to(compute_dtype), Bt_gB.to(compute_dtype)


def _truncated_eigh(gram: Tensor, rtol: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Eigendecomposition of a PSD Gram matrix with a relative cut-off: (kept eigenvalues, their inverses, U),
    where the eigenvalues ``λ ≤ rtol·λ_max`` and their inverses are exactly 0 (so an all-zero Gram matrix has a
    zero pseudo-inverse)."""
    lam, U = torch.linalg.eigh(gram)
    lam = lam.clamp_min(0.0)  # PSD: round-off can make tiny eigenvalues slightly negative
    keep = lam > rtol * lam[..., -1:]  # eigh sorts ascending
    lam = torch.where(keep, lam, torch.zeros_like(lam))
    inv = torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))
    return lam, inv, U


def gram_inverses(
    A: Tensor, B: Tensor, delta: float, compute_dtype: torch.dtype, *,
    AAt: Optional[Tensor] = None, BtB: Optional[Tensor] = None,
) -> GramInverses:
    """Eigendecompose the Gram matrices of a batch of pairs, A (L, r, n), B (L, m, r), and form their
    pseudo-inverses with the relative cut-off ``delta`` (eigenvalues ``≤ delta·λ_max`` count as zero).

    ``AAt``, ``BtB``: the Gram matrices if already computed (e.g. by :func:`packed_gram_inverses`), in the compute dtype.
    """
    wdt = work_dtype(A.dtype)
    A, B = A.to(wdt), B.to(wdt)
    if AAt is None:
        AAt = _gram_rows(A, compute_dtype)
    if BtB is None:
        BtB = _gram_rows(B.transpose(-1, -2), compute_dtype)
    lam_B, inv_B, U_B = _truncated_eigh(BtB, delta)
    lam_A, inv_A, U_A = _truncated_eigh(AAt, delta)
    BtB_inv = (U_B * inv_B.unsqueeze(-2)) @ U_B.transpose(-1, -2)
    AAt_inv = (U_A * inv_A.unsqueeze(-2)) @ U_A.transpose(-1, -2)
    return GramInverses(
        A=A, B=B, BtB=BtB, AAt=AAt, U_B=U_B, lam_B=lam_B, U_A=U_A, lam_A=lam_A,
        BtB_inv=BtB_inv, AAt_inv=AAt_inv,
    )


# With compute_dtype=None (the optimizers' default) on CPU, the Gram matrices of float32 factors are formed in
# float32 and re-formed in float64 for the layers where the condition number of either Gram matrix exceeds this
# (a singular one, with eigenvalues cut, counts as infinitely ill-conditioned: which eigenvalues fall under the cut
# must not be decided by float32 rounding). A float32 Gram matrix has an error of about ε₃₂·λ_max, so the error it causes in (ĝ_A, ĝ_B) grows like
# ε₃₂·cond: measured on SmolLM2-135M LoRA layers after 12 LoRA-Pro steps, ≤ 3e-5 relative for cond < 1e3
# (float64 Gram matrices: ≤ 3.4e-6, the float32 rounding of the result itself); 1.1e-4 above 1e3.
GRAM_FP32_MAX_COND = 1e3


def _cond(lam: Tensor) -> Tensor:
    """Condition number of Gram matrices from their ascending kept eigenvalues (L, r) -> (L,): inf where an
    eigenvalue was cut, 1 where all were (B = 0, which needs no refinement: its pseudo-inverse is exactly 0)."""
    lam_max = lam[..., -1]
    return torch.where(lam_max > 0, lam_max / lam[..., 0], torch.ones_like(lam_max))


def gram_inverses_for(
    A: Tensor, B: Tensor, delta: float, compute_dtype: Optional[torch.dtype], AAt: Tensor, BtB: Tensor,
    max_cond_fp32: float = GRAM_FP32_MAX_COND,
) -> GramInverses:
    """:func:`gram_inverses` under the optimizers' precision policy, given the Gram matrices ``AAt``, ``BtB`` as
    formed in the factors' dtype (e.g. in one product with the cross terms).

    ``compute_dtype`` float64 or float32: Gram matrices and r × r algebra in that dtype (formed again from the
    factors when that is not their dtype). ``None`` (automatic): r × r algebra in float64; the given Gram matrices
    are used, except where that is not accurate enough — on accelerators (float64 Gram matrices there, which cost
    little and need no host synchronisation) and, on CPU, for the layers whose Gram condition number
    exceeds ``max_cond_fp32`` (:data:`GRAM_FP32_MAX_COND`; :func:`refine_ill_conditioned`). With float64 factors
    everything is float64.
    """
    if compute_dtype is not None:
        if compute_dtype == A.dtype:
            return gram_inverses(A, B, delta, compute_dtype, AAt=AAt, BtB=BtB)
        return gram_inverses(A, B, delta, compute_dtype)
    f64 = torch.float64
    if A.dtype == f64:
        return gram_inverses(A, B, delta, f64, AAt=AAt, BtB=BtB)
    if on_accelerator_path(A.device):
        return gram_inverses(A, B, delta, f64)
    grams = gram_inverses(A, B, delta, f64, AAt=AAt.to(f64), BtB=BtB.to(f64))
    return refine_ill_conditioned(grams, delta, max_cond_fp32)


def packed_gram_inverses(
    AG: Tensor, BG: Tensor, delta: float, compute_dtype: Optional[torch.dtype] = None,
    max_cond_fp32: float = GRAM_FP32_MAX_COND,
) -> Tuple[GramInverses, Tensor, Tensor]:
    """:class:`GramInverses` (precision policy of :func:`gram_inverses_for`) and the cross terms
    ``(g_A·Aᵀ, Bᵀ·g_B)`` of packed operands, in the dtype of the r × r algebra.

    One product per side gives the Gram matrix and the cross term: ``AG·Aᵀ = [AAᵀ; g_A·Aᵀ]`` and
    ``Bᵀ·BG = [BᵀB, Bᵀg_B]``, in the packed dtype (see the module notes on precision).
    """
    r = AG.shape[-2] // 2
    A, B = AG[:, :r], BG[..., :r]
    GA = AG @ A.transpose(-1, -2)
    GB = B.transpose(-1, -2) @ BG
    grams = gram_inverses_for(A, B, delta, compute_dtype, GA[:, :r], GB[..., :r], max_cond_fp32)
    rr = grams.BtB.dtype
    return grams, GA[:, r:].to(rr), GB[..., r:].to(rr)


def refine_ill_conditioned(grams: GramInverses, delta: float, max_cond: float = GRAM_FP32_MAX_COND) -> GramInverses:
    """Re-form in float64 the Gram matrices of the layers whose condition number (either side) exceeds
    ``max_cond``, from the factors ``grams.A``, ``grams.B``; ``grams`` itself when no layer does."""
    bad = torch.maximum(_cond(grams.lam_A), _cond(grams.lam_B)) > max_cond
    if not bool(bad.any()):
        return grams
    f64 = torch.float64
    idx = bad.nonzero().squeeze(-1)
    AAt, BtB = grams.AAt.to(f64).clone(), grams.BtB.to(f64).clone()
    AAt[idx] = _gram_rows(grams.A[idx], f64)
    BtB[idx] = _gram_rows(grams.B[idx].transpose(-1, -2), f64)
    return gram_inverses(grams.A, grams.B, delta, f64, AAt=AAt, BtB=BtB)


def tall_mm(P: Tensor, W: Tensor, contiguous: bool = True, workspace: Workspace = fresh, name: str = "tall"
            ) -> Tensor:
    """``P·W`` for a tall factor-sized P (L × m × p) and a small W (L × p × q); a contiguous result unless
    ``contiguous=False`` (then possibly a transposed view, for consumers that read it once elementwise).

    On CPU the BLAS is 2-3× slower on a tall product with q = 8 columns than on the wide transposed form
    ``(Wᵀ·Pᵀ)ᵀ`` (measured with m = 11008, p = 16 or 24: 274 / 375 µs against 144 / 186 µs for two layers,
    including the final transposing copy); from q = 16 on the direct form is faster. The result (and the
    transposed intermediate) are ``workspace`` buffers named after ``name``.
    """
    L, m, q = P.shape[0], P.shape[-2], W.shape[-1]
    if on_accelerator_path(P.device) or q >= 16:
        return torch.matmul(P, W, out=workspace(name, (L, m, q), P.dtype, P.device))
    out_t = torch.matmul(W.transpose(-1, -2), P.transpose(-1, -2), out=workspace(name + "_t", (L, q, m), P.dtype, P.device))
    if not contiguous:
        return out_t.transpose(-1, -2)
    return workspace(name, (L, m, q), P.dtype, P.device).copy_(out_t.transpose(-1, -2))


def solve_x(grams: GramInverses, gA_At: Tensor, K_B: Tensor, K_A: Tensor, M: Tensor, Bt_gB: Tensor,
             x_solution: str) -> Tensor:
    """The r × r matrix X, from r × r quantities only (``ĝ_A⁰ Aᵀ = K_B (g_A Aᵀ)``)."""
    if x_solution == "sylvester":
        # (BᵀB)X + X(AAᵀ) = C with C = −(1/s²)(BᵀB)⁻¹ g_A Aᵀ = −ĝ_A⁰ Aᵀ. In the eigenbases of the two Gram
        # matrices the equation is diagonal: (λ_i + μ_j) X̃_ij = C̃_ij.
        C = -(K_B @ gA_At)
        C_t = grams.U_B.transpose(-1, -2) @ C @ grams.U_A
        # Where both eigenvalues were cut the equation reads 0 = C̃_ij = 0 (C's rows in B's cut directions vanish):
        # X̃_ij = 0 there, the minimum-norm solution.
        den = grams.lam_B.unsqueeze(-1) + grams.lam_A.unsqueeze(-2)
        X_t = torch.where(den > 0, C_t / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
        return grams.U_B @ X_t @ grams.U_A.transpose(-1, -2)
    if x_solution == "symmetric":
        # argmin_X ‖E + 2·B X A‖ with E = B ĝ_A⁰ − ĝ_B⁰ A  ⇒  X = −½ (BᵀB)⁻¹ (Bᵀ E Aᵀ) (AAᵀ)⁻¹,
        # where Bᵀ E Aᵀ = (BᵀB)(ĝ_A⁰ Aᵀ) − (Bᵀ ĝ_B⁰)(AAᵀ) and Bᵀ ĝ_B⁰ = (Bᵀg_B − (BᵀB)M) K_A need no m × n product.
        Bt_hB0 = (Bt_gB - grams.BtB @ M) @ K_A
        BtEAt = grams.BtB @ (K_B @ gA_At) - Bt_hB0 @ grams.AAt
        return -0.5 * (grams.BtB_inv @ BtEAt @ grams.AAt_inv)
    raise ValueError(f"Invalid x_solution {x_solution!r}: choose one of {X_SOLUTIONS}.")


def adjusted_gradients_packed(
    grams: GramInverses, AG: Tensor, BG: Tensor, scaling: Tensor, x_solution: str,
    gA_At: Tensor, Bt_gB: Tensor, workspace: Workspace = fresh,
) -> Tuple[Tensor, Tensor]:
    """:func:`adjusted_gradients` from packed operands ``AG = [A; g_A]``, ``BG = [B, g_B]`` (see :func:`pack`)
    and their cross terms (:func:`packed_gram_inverses` or :func:`cross_terms`).

    All the r × r algebra runs first, in the compute dtype: ``K_B = (1/s²)(BᵀB)⁻¹``, ``K_A = (1/s²)(AAᵀ)⁻¹``,
    ``M = (BᵀB)⁻¹(Bᵀg_B)`` (so ``P_B·g_B = B·M``) and X. Then one product per factor, in the packed dtype::

        ĝ_A = K_B·g_A + X·A = [X, K_B]·AG,      ĝ_B = g_B·K_A − B·(M·K_A + X) = BG·[−(M·K_A + X); K_A]

    Returns:
        (ĝ_A (L, r, n), ĝ_B (L, m, r)) in the packed dtype, contiguous (``workspace`` buffers "hA", "hB").
    """
    if x_solution not in X_SOLUTIONS:
        raise ValueError(f"Invalid x_solution {x_solution!r}: choose one of {X_SOLUTIONS}.")
    cdt, wdt = grams.BtB.dtype, AG.dtype
    r = AG.shape[-2] // 2
    inv_s2 = (1.0 / scaling.to(cdt) ** 2).view(-1, 1, 1)
    K_B = inv_s2 * grams.BtB_inv
    K_A = inv_s2 * grams.AAt_inv
    M = grams.BtB_inv @ Bt_gB
    MK = M @ K_A
    hA = workspace("hA", (AG.shape[0], r, AG.shape[-1]), wdt, AG.device)
    if x_solution == "zero":
        torch.matmul(K_B.to(wdt), AG[:, r:], out=hA)
    else:
        X = solve_x(grams, gA_At, K_B, K_A, M, Bt_gB, x_solution)
        MK = MK + X
        torch.matmul(torch.cat([X, K_B], dim=-1).to(wdt), AG, out=hA)
    hB = tall_mm(BG, torch.cat([-MK, K_A], dim=-2).to(wdt), workspace=workspace, name="hB")
    return hA, hB


def adjusted_gradients(
    grams: GramInverses,
    g_A: Tensor,
    g_B: Tensor,
    scaling: Tensor,
    x_solution: str = "sylvester",
) -> Tuple[Tensor, Tensor]:
    """LoRA-Pro's adjusted factor gradients (ĝ_A, ĝ_B) for a batch of pairs.

    Args:
        grams: :func:`gram_inverses` of the current factors.
        g_A: (L, r, n) gradients of A (or any u_A = s·Bᵀ·D, to project a direction D instead of G).
        g_B: (L, m, r) gradients of B (or u_B = s·D·Aᵀ).
        scaling: (L,) the LoRA scale of each pair.
        x_solution: ``"sylvester"``, ``"zero"`` or ``"symmetric"``.

    Returns:
        (ĝ_A, ĝ_B) in the work dtype of the factors (see :func:`adjusted_gradients_packed`).
    """
    if x_solution not in X_SOLUTIONS:
        raise ValueError(f"Invalid x_solution {x_solution!r}: choose one of {X_SOLUTIONS}.")
    AG, BG = pack(grams.A, grams.B, g_A, g_B, dtype=grams.A.dtype)
    gA_At, Bt_gB = cross_terms(AG, BG, grams.BtB.dtype)
    return adjusted_gradients_packed(grams, AG, BG, scaling, x_solution, gA_At, Bt_gB)


def equivalent_gradient_maps(grams: GramInverses, scaling: Tensor, Bt_gB: Tensor) -> Tuple[Tensor, Tensor]:
    """r-sized maps (T, S), both (L, 2r, 2r) in the dtype of the r × r algebra, with which the factors of g̃ are
    products of the packed operands: ``[s·B, s·ĝ_B⁰] = [B, g_B]·T`` and ``[ĝ_A⁰; A] = S·[A; g_A]``, where
    ``T = [[s·I, −M·s·K_A], [0, s·K_A]]``, ``S = [[0, K_B], [I, 0]]`` and ``M = (BᵀB)⁻¹·(Bᵀg_B)`` (X = 0)."""
    cdt = grams.BtB.dtype
    L, r = grams.BtB.shape[0], grams.BtB.shape[-1]
    s = scaling.to(cdt).view(-1, 1, 1)
    eye = torch.eye(r, dtype=cdt, device=grams.BtB.device)
    sK_A = grams.AAt_inv / s
    T = torch.zeros(L, 2 * r, 2 * r, dtype=cdt, device=eye.device)
    T[:, :r, :r] = s * eye
    T[:, :r, r:] = -(grams.BtB_inv @ Bt_gB @ sK_A)
    T[:, r:, r:] = sK_A
    S = torch.zeros_like(T)
    S[:, :r, r:] = grams.BtB_inv / s**2
    S[:, r:, :r] = eye
    return T, S


def equivalent_gradient_factors_packed(
    grams: GramInverses, AG: Tensor, BG: Tensor, scaling: Tensor, Bt_gB: Tensor
) -> Tuple[Tensor, Tensor]:
    """:func:`equivalent_gradient_factors` from packed operands (see :func:`adjusted_gradients_packed`):
    ``left = BG·T``, ``right = S·AG`` with the maps of :func:`equivalent_gradient_maps`."""
    T, S = equivalent_gradient_maps(grams, scaling, Bt_gB)
    return tall_mm(BG, T.to(BG.dtype)), S.to(AG.dtype) @ AG


def equivalent_gradient_factors(
    grams: GramInverses, g_A: Tensor, g_B: Tensor, scaling: Tensor
) -> Tuple[Tensor, Tensor]:
    """Factors (L_f, R_f) with ``g̃ = L_f @ R_f`` = P_B G + (I − P_B) G P_A, a rank-2r product.

    ``L_f = [s·B, s·ĝ_B⁰]`` (m × 2r) and ``R_f = [ĝ_A⁰; A]`` (2r × n), X-independent, in the work dtype.
    """
    AG, BG = pack(grams.A, grams.B, g_A, g_B, dtype=grams.A.dtype)
    _, Bt_gB = cross_terms(AG, BG, grams.BtB.dtype)
    return equivalent_gradient_factors_packed(grams, AG, BG, scaling, Bt_gB)
