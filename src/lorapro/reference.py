r"""A plainly written float64 reference of LoRA-Pro — the specification the fast path is tested against.

One layer at a time, explicit inverses, explicit m × m projector and a Kronecker-product Sylvester solve: slow
and memory-hungry on purpose, so every line can be checked against the paper (arXiv 2407.18242, Sec. 2).

Notation: ``W = W0 + s·B·A``, B (m × r), A (r × n), ``g_A = s·Bᵀ·G``, ``g_B = s·G·Aᵀ``. The Gram matrices BᵀB and
AAᵀ are inverted as pseudo-inverses with a relative cut-off δ (``torch.linalg.pinv(..., hermitian=True, rtol=δ)``:
eigenvalues ``≤ δ·λ_max`` count as zero), and every formula uses the Gram matrices *truncated* the same way, so
``B = 0`` gives ``(BᵀB)⁺ = 0`` exactly (see :mod:`lorapro.functional` for why not a fixed ridge).

The optimizer steps below mirror :mod:`lorapro.optim` exactly (hyperparameters, bias correction, decoupled weight
decay), on plain float64 tensors and a dict state.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

Tensor = torch.Tensor


DELTA = 1e-6  # the default relative cut-off of the optimizers


def pseudo_inverses(A: Tensor, B: Tensor, delta: float) -> Tuple[Tensor, Tensor]:
    """(BᵀB)⁺ and (AAᵀ)⁺, eigenvalues ``≤ delta·λ_max`` cut."""
    return (torch.linalg.pinv(B.T @ B, hermitian=True, rtol=delta),
            torch.linalg.pinv(A @ A.T, hermitian=True, rtol=delta))


def truncated_grams(A: Tensor, B: Tensor, delta: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The Gram matrices with their cut eigenvalues removed, ``BᵀB·(BᵀB)⁺·BᵀB`` and ``AAᵀ·(AAᵀ)⁺·AAᵀ``, and the
    projectors onto their kept eigenvectors, ``(BᵀB)⁺·BᵀB`` and ``(AAᵀ)⁺·AAᵀ``."""
    BtB, AAt = B.T @ B, A @ A.T
    BtB_inv, AAt_inv = pseudo_inverses(A, B, delta)
    return BtB @ BtB_inv @ BtB, AAt @ AAt_inv @ AAt, BtB_inv @ BtB, AAt_inv @ AAt


def solve_sylvester(P: Tensor, Q: Tensor, C: Tensor, null_P: Tensor, null_Q: Tensor) -> Tensor:
    """The minimum-norm solution of P·X + X·Q = C, by vectorisation: (I ⊗ P + Qᵀ ⊗ I) vec(X) = vec(C) (column-major
    vec), for PSD P, Q whose null spaces are projected on by ``null_P``, ``null_Q``. The system is singular on
    {X = null_P·Y·null_Q}, where C must vanish; adding the projector onto that subspace (kron(null_Qᵀ, null_P))
    makes it regular and sets X's component there to 0."""
    r = P.shape[0]
    eye = torch.eye(r, dtype=P.dtype)
    K = torch.kron(eye, P) + torch.kron(Q.T.contiguous(), eye) + torch.kron(null_Q.T.contiguous(), null_P)
    vec_c = C.T.reshape(-1)  # column-major
    vec_x = torch.linalg.solve(K, vec_c)
    return vec_x.reshape(r, r).T


def x_matrix(A: Tensor, B: Tensor, g_A: Tensor, g_B: Tensor, s: float, delta: float, x_solution: str) -> Tensor:
    """The r × r matrix X of the chosen solution."""
    r = A.shape[0]
    BtB_inv, AAt_inv = pseudo_inverses(A, B, delta)
    if x_solution == "zero":
        return torch.zeros(r, r, dtype=A.dtype)
    if x_solution == "sylvester":
        # (BᵀB) X + X (AAᵀ) = −(1/s²)(BᵀB)⁺ g_A Aᵀ, with the truncated Gram matrices
        eye = torch.eye(r, dtype=A.dtype)
        BtB_k, AAt_k, proj_B, proj_A = truncated_grams(A, B, delta)
        C = -(1.0 / s**2) * BtB_inv @ g_A @ A.T
        return solve_sylvester(BtB_k, AAt_k, C, eye - proj_B, eye - proj_A)
    if x_solution == "symmetric":
        # minimise ‖B ĝ_A − ĝ_B A‖ over X. With the X = 0 parts: B ĝ_A − ĝ_B A = E + 2 B X A, E = B ĝ_A⁰ − ĝ_B⁰ A.
        # Normal equations: 2 (BᵀB) X (AAᵀ) = −Bᵀ E Aᵀ.
        gA0, gB0 = adjusted_gradients(A, B, g_A, g_B, s, delta, "zero")
        E = B @ gA0 - gB0 @ A
        return -0.5 * BtB_inv @ (B.T @ E @ A.T) @ AAt_inv
    raise ValueError(x_solution)


def adjusted_gradients(
    A: Tensor, B: Tensor, g_A: Tensor, g_B: Tensor, s: float, delta: float, x_solution: str
) -> Tuple[Tensor, Tensor]:
    """ĝ_A = (1/s²)(BᵀB)⁺ g_A + X A,  ĝ_B = (1/s²)[I − B(BᵀB)⁺Bᵀ] g_B (AAᵀ)⁺ − B X."""
    m = B.shape[0]
    BtB_inv, AAt_inv = pseudo_inverses(A, B, delta)
    P_B = B @ BtB_inv @ B.T  # m × m, formed explicitly here (never in the fast path)
    gA_hat = (1.0 / s**2) * BtB_inv @ g_A
    gB_hat = (1.0 / s**2) * (torch.eye(m, dtype=A.dtype) - P_B) @ g_B @ AAt_inv
    if x_solution != "zero":
        X = x_matrix(A, B, g_A, g_B, s, delta, x_solution)
        gA_hat = gA_hat + X @ A
        gB_hat = gB_hat - B @ X
    return gA_hat, gB_hat


def equivalent_gradient(A: Tensor, B: Tensor, gA_hat: Tensor, gB_hat: Tensor, s: float) -> Tensor:
    """g̃ = s (B ĝ_A + ĝ_B A): the full-weight change per unit learning rate that the factor step makes."""
    return s * (B @ gA_hat + gB_hat @ A)


def lora_equivalent_gradient(A: Tensor, B: Tensor, g_A: Tensor, g_B: Tensor, s: float) -> Tensor:
    """Plain LoRA's equivalent gradient s (B g_A + g_B A) = s² (B Bᵀ G + G Aᵀ A)."""
    return s * (B @ g_A + g_B @ A)


# ----------------------------------------------------------------------------------------------------------------
# Optimizer steps (one pair; state is a plain dict). They mirror lorapro.optim.


def sgd_step(
    A: Tensor, B: Tensor, g_A: Tensor, g_B: Tensor, s: float, state: Dict[str, Tensor], *, lr: float,
    momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
    delta: float = DELTA, x_solution: str = "sylvester",
) -> Tuple[Tensor, Tensor]:
    """LoRA-Pro SGD: d = ĝ (or its momentum, torch.optim.SGD semantics); θ ← θ(1 − lr·wd) − lr·d."""
    hA, hB = adjusted_gradients(A, B, g_A, g_B, s, delta, x_solution)
    if momentum:
        if "buf_A" not in state:
            state["buf_A"], state["buf_B"] = hA.clone(), hB.clone()
        else:
            state["buf_A"] = momentum * state["buf_A"] + (1 - dampening) * hA
            state["buf_B"] = momentum * state["buf_B"] + (1 - dampening) * hB
        if nesterov:
            hA, hB = hA + momentum * state["buf_A"], hB + momentum * state["buf_B"]
        else:
            hA, hB = state["buf_A"], state["buf_B"]
    new_A = A * (1 - lr * weight_decay) - lr * hA
    new_B = B * (1 - lr * weight_decay) - lr * hB
    return new_A, new_B


def adamw_full_step(
    A: Tensor, B: Tensor, g_A: Tensor, g_B: Tensor, s: float, state: Dict[str, Tensor], *, lr: float,
    betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
    delta: float = DELTA, x_solution: str = "sylvester",
) -> Tuple[Tensor, Tensor]:
    """The paper's LoRA-Pro AdamW (Algorithm 1), with standard bias correction.

    m ← β1 m + (1−β1) g̃,  v ← β2 v + (1−β2) g̃²,  D = (m / (1−β1ᵗ)) / (√(v / (1−β2ᵗ)) + ε),
    then D is projected like a gradient: u_A = s Bᵀ D, u_B = s D Aᵀ → (ĥ_A, ĥ_B), and
    θ ← θ(1 − lr·wd) − lr·ĥ for θ ∈ {A, B}.
    """
    beta1, beta2 = betas
    gA_hat, gB_hat = adjusted_gradients(A, B, g_A, g_B, s, delta, "zero")  # g̃ does not depend on X
    g_tilde = equivalent_gradient(A, B, gA_hat, gB_hat, s)
    t = state.get("step", 0) + 1
    state["step"] = t
    state["exp_avg"] = beta1 * state.get("exp_avg", torch.zeros_like(g_tilde)) + (1 - beta1) * g_tilde
    state["exp_avg_sq"] = beta2 * state.get("exp_avg_sq", torch.zeros_like(g_tilde)) + (1 - beta2) * g_tilde**2
    m_hat = state["exp_avg"] / (1 - beta1**t)
    v_hat = state["exp_avg_sq"] / (1 - beta2**t)
    D = m_hat / (v_hat.sqrt() + eps)
    hA, hB = adjusted_gradients(A, B, s * B.T @ D, s * D @ A.T, s, delta, x_solution)
    new_A = A * (1 - lr * weight_decay) - lr * hA
    new_B = B * (1 - lr * weight_decay) - lr * hB
    return new_A, new_B


def adamw_efficient_step(
    A: Tensor, B: Tensor, g_A: Tensor, g_B: Tensor, s: float, state: Dict[str, Tensor], *, lr: float,
    betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
    delta: float = DELTA, x_solution: str = "sylvester",
) -> Tuple[Tensor, Tensor]:
    """The authors' memory-light variant: ordinary AdamW on (ĝ_A, ĝ_B), with factor-sized moments."""
    beta1, beta2 = betas
    hA, hB = adjusted_gradients(A, B, g_A, g_B, s, delta, x_solution)
    t = state.get("step", 0) + 1
    state["step"] = t
    out = []
    for key, theta, g in (("A", A, hA), ("B", B, hB)):
        m = beta1 * state.get(f"exp_avg_{key}", torch.zeros_like(g)) + (1 - beta1) * g
        v = beta2 * state.get(f"exp_avg_sq_{key}", torch.zeros_like(g)) + (1 - beta2) * g**2
        state[f"exp_avg_{key}"], state[f"exp_avg_sq_{key}"] = m, v
        d = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
        out.append(theta * (1 - lr * weight_decay) - lr * d)
    return out[0], out[1]


def adamw_plain_step(
    p: Tensor, g: Tensor, state: Dict[str, Tensor], *, lr: float, betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8, weight_decay: float = 0.0,
) -> Tensor:
    """torch.optim.AdamW, for the non-LoRA parameters (biases, heads, modules_to_save)."""
    beta1, beta2 = betas
    t = state.get("step", 0) + 1
    state["step"] = t
    state["exp_avg"] = beta1 * state.get("exp_avg", torch.zeros_like(g)) + (1 - beta1) * g
    state["exp_avg_sq"] = beta2 * state.get("exp_avg_sq", torch.zeros_like(g)) + (1 - beta2) * g**2
    d = (state["exp_avg"] / (1 - beta1**t)) / ((state["exp_avg_sq"] / (1 - beta2**t)).sqrt() + eps)
    return p * (1 - lr * weight_decay) - lr * d


# ----------------------------------------------------------------------------------------------------------------
# Factored mode (lorapro.factored): the dense spec. Forms g̃, the m × n EMA v of g̃² and V̂ explicitly.


def factored_second_moment(v_hat: Tensor, eps: float) -> Tensor:
    """Adafactor's rank-1 estimate of ``v̂ + ε²``: V̂ = r cᵀ / Σr with r, c the row and column sums of v̂ + ε²."""
    w = v_hat + eps**2
    r, c = w.sum(dim=1), w.sum(dim=0)
    return torch.outer(r, c) / r.sum()


def truncate_rank(M: Tensor, k: int) -> Tensor:
    """The best rank-k approximation of M (truncated SVD)."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def adamw_factored_step(
    A: Tensor, B: Tensor, g_A: Tensor, g_B: Tensor, s: float, state: Dict[str, Tensor], *, lr: float,
    betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
    delta: float = DELTA, x_solution: str = "sylvester", clip_threshold: float | None = 1.0,
) -> Tuple[Tensor, Tensor]:
    """LoRA-Pro AdamW with a factored second moment (``mode="factored"``), written densely.

    v ← β2 v + (1−β2) g̃²  (kept m × n here; the fast path keeps only its row and column sums),
    V̂ = factored_second_moment(v / (1−β2ᵗ), ε). Then, with k = 2r: M ← trunc_k(β1 M + (1−β1) g̃),
    D = (M / (1−β1ᵗ)) / √V̂, clipped; ĥ = proj(D); θ ← θ(1 − lr·wd) − lr·ĥ.

    Clipping: D ← D / max(1, RMS(D)/d) with d = ``clip_threshold`` (None: no clipping). proj(D) is LoRA-Pro's
    projection of a full-weight direction: adjusted_gradients(s Bᵀ D, s D Aᵀ).
    """
    beta1, beta2 = betas
    k = 2 * A.shape[0]
    gA_hat, gB_hat = adjusted_gradients(A, B, g_A, g_B, s, delta, "zero")
    g_tilde = equivalent_gradient(A, B, gA_hat, gB_hat, s)
    t = state.get("step", 0) + 1
    state["step"] = t
    state["exp_avg_sq"] = beta2 * state.get("exp_avg_sq", torch.zeros_like(g_tilde)) + (1 - beta2) * g_tilde**2
    V_hat = factored_second_moment(state["exp_avg_sq"] / (1 - beta2**t), eps)
    M = beta1 * state.get("exp_avg", torch.zeros_like(g_tilde)) + (1 - beta1) * g_tilde
    state["exp_avg"] = truncate_rank(M, k)
    D = (state["exp_avg"] / (1 - beta1**t)) / V_hat.sqrt()
    rms = D.pow(2).mean().sqrt()
    if clip_threshold is not None:
        D = D / max(1.0, float(rms) / clip_threshold)
    hA, hB = adjusted_gradients(A, B, s * B.T @ D, s * D @ A.T, s, delta, x_solution)
    new_A = A * (1 - lr * weight_decay) - lr * hA
    new_B = B * (1 - lr * weight_decay) - lr * hB
    return new_A, new_B
