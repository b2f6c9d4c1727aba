r"""Time one optimizer step on Llama-2-7B-shaped LoRA layers, and measure its memory.

Run::

    python benchmarks/optimizer_step.py              # default: 2 × (4096 × 4096) + 2 × (11008 × 4096), r = 8
    python benchmarks/optimizer_step.py --quick      # 1 + 1 layers, fewer rounds (about a minute on 2 CPU cores)
    python benchmarks/optimizer_step.py --device cuda --json results.json

Every method steps the same layer shapes (a LoRA pair is A (r × n), B (m × r), fp32; the full-weight baseline
steps m × n weights with m × n gradients). The methods are timed in interleaved rounds, in a rotating order, so
that other processes sharing the machine slow all methods alike; the median over rounds is reported. Within a
round a fast method (a step under ``TARGET_ROUND_S``) takes several consecutive steps and the round keeps the
fastest, as ``timeit`` does: a millisecond step is otherwise timed mostly by the scheduler of a shared CPU. Ratios
are computed from values measured in the same run; absolute times are only meaningful on the machine that
produced them.

Memory per method:

- *optimizer state*: bytes of the tensors the optimizer keeps between steps (0-dim step counters excluded);
- *other step memory*: everything else the method needs at the peak of a (warm) step beyond its parameters,
  gradients and optimizer state — temporaries, plus any buffer an optimizer keeps outside its state. Measured as
  the peak during one step minus the memory in use before the case was set up, minus parameter, gradient and
  state bytes: on CUDA with ``torch.cuda.max_memory_allocated()``; on CPU with the process's peak resident set
  size (``VmHWM``, reset through ``/proc/self/clear_refs``), which counts pages actually touched and can be off by
  a few MiB (small allocations served from memory the allocator already held).

Cases live in :data:`CASES` (key → :class:`Case`); add a method with one :func:`register` call. Ratios and
their targets live in :data:`RATIOS`.

The "authors' formulation" case is a plain transcription, written for this benchmark, of the LoRA-Pro full step
as the authors' reference code computes it (github.com/mrflogs/LoRA-Pro, ``peta/optim.py``): per-layer Python
loop, explicit m × m projector ``I − B(BᵀB)⁻¹Bᵀ`` formed twice per step, ``pinv`` of the ridged Gram matrices,
Sylvester equation solved with complex ``torch.linalg.eig``, full-size moments. Unlike the authors' code it keeps
the moments in fp32 and applies the standard Adam bias correction, so its update equals
``LoRAProAdamW(mode="full")``'s (checked by ``tests/test_benchmark_smoke.py``) and the comparison isolates the
formulation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from lorapro import LoRAProAdamW, LoRAProSGD

TARGET_ROUND_S = 0.2  # a fast case repeats its step within a round up to about this long (at most MAX_INNER)
MAX_INNER = 50
LR = 1e-5
BETAS = (0.9, 0.999)
EPS = 1e-8
DELTA = 1e-8


# ----------------------------------------------------------------------------------------------------------------
# Configuration and the case registry


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark: ``layers`` is a sequence of (m, n, count); every LoRA layer has rank ``rank``."""

    layers: Tuple[Tuple[int, int, int], ...] = ((4096, 4096, 2), (11008, 4096, 2))
    rank: int = 8
    scaling: float = 2.0  # α / r = 16 / 8, the authors' setting
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    seed: int = 0

    def shapes(self) -> List[Tuple[int, int]]:
        """(m, n) of every layer, in order."""
        return [(m, n) for m, n, count in self.layers for _ in range(count)]


@dataclass
class Prepared:
    """A case ready to run: ``step()`` performs one optimizer step; ``state_bytes()`` is the optimizer state size.

    ``params`` are the tensors the step updates (LoRA cases: [A0, B0, A1, B1, ...]), for correctness checks.
    """

    step: Callable[[], None]
    state_bytes: Callable[[], int]
    params: List[torch.Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class Case:
    """A benchmarked method. ``every`` > 1 times it only every ``every``-th round (slow reference methods)."""

    key: str
    label: str
    setup: Callable[[BenchConfig], Prepared]
    every: int = 1


CASES: Dict[str, Case] = {}


def register(key: str, label: str, every: int = 1) -> Callable[[Callable[[BenchConfig], Prepared]], Callable]:
    """Decorator: add a setup function ``BenchConfig -> Prepared`` to :data:`CASES`."""

    def deco(fn: Callable[[BenchConfig], Prepared]) -> Callable[[BenchConfig], Prepared]:
        if key in CASES:
            raise ValueError(f"Benchmark case {key!r} is registered twice.")
        CASES[key] = Case(key=key, label=label, setup=fn, every=every)
        return fn

    return deco


# (numerator, denominator, comparison, target, description): checked in the report when both cases ran; a ratio
# with target None is reported for information.
RATIOS: List[Tuple[str, str, str, Optional[float], str]] = [
    ("lorapro_full", "adamw_full_weight", "<=", 1.0, "LoRA-Pro full / AdamW full-weight"),
    ("lorapro_full", "adamw_full_weight_fused", "<=", 1.0, "LoRA-Pro full / fused AdamW full-weight"),
    ("lorapro_full", "memcpy_roofline", "<=", None, "LoRA-Pro full / memcpy roofline (read + write both moments)"),
    ("adamw_full_weight_fused", "memcpy_roofline", "<=", None, "fused AdamW full-weight / memcpy roofline"),
    ("lorapro_efficient", "adamw_factors", "<=", 3.0, "LoRA-Pro efficient / AdamW on factors"),
    ("lorapro_efficient_fp64", "adamw_factors", "<=", 3.0, "LoRA-Pro efficient (float64 Gram matrices) / AdamW on factors"),
    ("lorapro_efficient_fp32", "adamw_factors", "<=", 3.0, "LoRA-Pro efficient (float32 compute) / AdamW on factors"),
    ("lorapro_efficient", "adamw_factors_fused", "<=", None, "LoRA-Pro efficient / fused AdamW on factors"),
    ("lorapro_factored", "adamw_factors", "<=", 3.0, "LoRA-Pro factored / AdamW on factors"),
    ("lorapro_factored_fp32", "adamw_factors", "<=", 3.0, "LoRA-Pro factored (float32 compute) / AdamW on factors"),
    ("lorapro_factored", "lorapro_efficient", "<=", None, "LoRA-Pro factored / LoRA-Pro efficient"),
    ("factored_products_floor", "adamw_factors", "<=", None, "factored mode's thin products alone (floor) / AdamW on factors"),
    ("authors_full", "lorapro_full", ">=", 10.0, "authors' formulation / LoRA-Pro full"),
]


# ----------------------------------------------------------------------------------------------------------------
# Shared setup helpers


def make_lora_layers(cfg: BenchConfig) -> List[Tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """Deterministic LoRA factors with gradients: A ~ N(0, 1/n), B ~ N(0, 0.01²) (a trained, non-zero B), grads ~ N(0, 1e-6).

    Every LoRA case gets identical tensors for the same ``cfg`` (same seed), so their steps are comparable.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    out = []
    for m, n in cfg.shapes():
        r = cfg.rank
        A = torch.randn(r, n, generator=gen) / n**0.5
        B = torch.randn(m, r, generator=gen) * 0.01
        gA = torch.randn(r, n, generator=gen) * 1e-3
        gB = torch.randn(m, r, generator=gen) * 1e-3
        A = torch.nn.Parameter(A.to(device=cfg.device, dtype=cfg.dtype))
        B = torch.nn.Parameter(B.to(device=cfg.device, dtype=cfg.dtype))
        A.grad = gA.to(device=cfg.device, dtype=cfg.dtype)
        B.grad = gB.to(device=cfg.device, dtype=cfg.dtype)
        out.append((A, B))
    return out


def optimizer_state_bytes(state: Iterable[Dict[str, Any]]) -> int:
    """Bytes of all state tensors with at least one dimension (0-dim step counters are not counted)."""
    total = 0
    for st in state:
        for v in st.values():
            if torch.is_tensor(v) and v.dim() > 0:
                total += v.numel() * v.element_size()
    return total


def _torch_optimizer_case(opt: torch.optim.Optimizer, params: List[torch.Tensor]) -> Prepared:
    return Prepared(step=opt.step, state_bytes=lambda: optimizer_state_bytes(opt.state.values()), params=params)


def _lorapro_case(cfg: BenchConfig, cls: type = LoRAProAdamW, **kwargs: Any) -> Prepared:
    layers = make_lora_layers(cfg)
    groups = [{"lora_pairs": [(A, B, cfg.scaling) for A, B in layers]}]
    opt = cls(groups, lr=LR, **kwargs)
    return _torch_optimizer_case(opt, [p for pair in layers for p in pair])


# ----------------------------------------------------------------------------------------------------------------
# The cases


@register("lorapro_full", "LoRA-Pro full (`LoRAProAdamW(mode=\"full\")`)")
def _setup_lorapro_full(cfg: BenchConfig) -> Prepared:
    return _lorapro_case(cfg, mode="full", betas=BETAS, eps=EPS)


@register("lorapro_efficient", "LoRA-Pro efficient (`mode=\"efficient\"`)")
def _setup_lorapro_efficient(cfg: BenchConfig) -> Prepared:
    return _lorapro_case(cfg, mode="efficient", betas=BETAS, eps=EPS)


@register("lorapro_efficient_fp64", "LoRA-Pro efficient, `compute_dtype=torch.float64`")
def _setup_lorapro_efficient_fp64(cfg: BenchConfig) -> Prepared:
    return _lorapro_case(cfg, mode="efficient", betas=BETAS, eps=EPS, compute_dtype=torch.float64)


@register("lorapro_efficient_fp32", "LoRA-Pro efficient, `compute_dtype=torch.float32`")
def _setup_lorapro_efficient_fp32(cfg: BenchConfig) -> Prepared:
    return _lorapro_case(cfg, mode="efficient", betas=BETAS, eps=EPS, compute_dtype=torch.float32)


@register("lorapro_factored", "LoRA-Pro factored (`mode=\"factored\"`)")
def _setup_lorapro_factored(cfg: BenchConfig) -> Prepared:
    return _lorapro_case(cfg, mode="factored", betas=BETAS, eps=EPS)


@register("lorapro_factored_fp32", "LoRA-Pro factored, `compute_dtype=torch.float32`")
def _setup_lorapro_factored_fp32(cfg: BenchConfig) -> Prepared:
    return _lorapro_case(cfg, mode="factored", betas=BETAS, eps=EPS, compute_dtype=torch.float32)


@register("factored_products_floor", "factored mode's eight thin products alone (a floor: no algebra, copies or state)")
def _setup_factored_products_floor(cfg: BenchConfig) -> Prepared:
    """Only the eight products with factor-sized operands that one factored-mode step makes per chunk of layers
    (:func:`lorapro.factored.lowrank_step`), on preallocated random operands, with outputs written in place and the
    optimizer's CPU chunking. Whatever else the step does only adds to this, so ``floor / AdamW on factors`` bounds
    from below what any implementation of this design can reach on the machine."""
    from lorapro.functional import tall_mm

    r = cfg.rank
    gen = torch.Generator().manual_seed(cfg.seed)
    pairs = [(i, A, B, cfg.scaling) for i, (A, B) in enumerate(make_lora_layers(cfg))]
    chunks = LoRAProAdamW._buckets(pairs)  # the optimizer's own grouping by shape and chunking
    shapes = [(len(c), c[0][2].shape[0], c[0][1].shape[1]) for c in chunks]  # (L, m, n)
    work = []
    for L, m, n in sorted(set(shapes)):
        def rnd(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen).to(device=cfg.device, dtype=cfg.dtype)
        bufs = dict(BGP=rnd(L, m, 4 * r), AGQ=rnd(L, 4 * r, n), W4=rnd(L, 4 * r, 4 * r), W3=rnd(L, r, 3 * r),
                    W3t=rnd(L, 3 * r, r), Y=rnd(L, m, 4 * r), Z=rnd(L, 4 * r, n))
        work.append((shapes.count((L, m, n)), bufs))

    def step() -> None:
        for times, b in work:
            for _ in range(times):
                BGP, AGQ = b["BGP"], b["AGQ"]
                BGP.transpose(-1, -2) @ BGP  # Gram matrices of the packed operands
                AGQ @ AGQ.transpose(-1, -2)
                torch.matmul(BGP, b["W4"], out=b["Y"])  # new EMA factors with the row / column-sum products
                torch.matmul(b["W4"], AGQ, out=b["Z"])
                BGP[..., r:].transpose(-1, -2) @ BGP[..., 2 * r:]  # [B, d_left]ᵀ d_left, [A; d_right] d_rightᵀ
                AGQ[:, r:] @ AGQ[:, 2 * r:].transpose(-1, -2)
                b["W3"] @ AGQ[:, r:]  # the factor steps
                tall_mm(BGP[..., r:], b["W3t"], contiguous=False)

    return Prepared(step=step, state_bytes=lambda: 0)


@register("lorapro_sgd", "LoRA-Pro SGD (`LoRAProSGD`, no momentum)")
def _setup_lorapro_sgd(cfg: BenchConfig) -> Prepared:
    return _lorapro_case(cfg, cls=LoRAProSGD)


@register("adamw_factors", "`torch.optim.AdamW` on the LoRA factors (plain LoRA)")
def _setup_adamw_factors(cfg: BenchConfig) -> Prepared:
    params = [p for pair in make_lora_layers(cfg) for p in pair]
    return _torch_optimizer_case(torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS), params)


@register("adamw_factors_fused", "`torch.optim.AdamW(fused=True)` on the LoRA factors")
def _setup_adamw_factors_fused(cfg: BenchConfig) -> Prepared:
    params = [p for pair in make_lora_layers(cfg) for p in pair]
    return _torch_optimizer_case(torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, fused=True), params)


def make_full_weights(cfg: BenchConfig) -> List[torch.nn.Parameter]:
    """Deterministic m × n weights (N(0, 0.02²)) with gradients (N(0, 1e-6)), one per layer."""
    gen = torch.Generator().manual_seed(cfg.seed)
    params = []
    for m, n in cfg.shapes():
        W = torch.nn.Parameter(torch.randn(m, n, generator=gen).mul_(0.02).to(device=cfg.device, dtype=cfg.dtype))
        W.grad = torch.randn(m, n, generator=gen).mul_(1e-3).to(device=cfg.device, dtype=cfg.dtype)
        params.append(W)
    return params


@register("adamw_full_weight", "`torch.optim.AdamW` on the full m × n weights")
def _setup_adamw_full_weight(cfg: BenchConfig) -> Prepared:
    params = make_full_weights(cfg)
    return _torch_optimizer_case(torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS), params)


@register("adamw_full_weight_fused", "`torch.optim.AdamW(fused=True)` on the full m × n weights")
def _setup_adamw_full_weight_fused(cfg: BenchConfig) -> Prepared:
    """What a full fine-tuning user runs: one pass of torch's fused kernel over weights, gradients and moments."""
    params = make_full_weights(cfg)
    return _torch_optimizer_case(torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, fused=True), params)


@register("memcpy_roofline", "memory roofline: read and write both m × n moments once (in place, no arithmetic)")
def _setup_memcpy_roofline(cfg: BenchConfig) -> Prepared:
    """The memory traffic full mode cannot avoid: every step reads and writes each layer's two m × n moments
    (4·m·n floats moved per layer: 2·m·n read, 2·m·n written, in place). Timed as
    ``torch._foreach_mul_(moments, 1.0)`` over all layers' moments — a streaming read-modify-write with no
    arithmetic to speak of; an out-of-place copy would move more (its destination is read before it is written).
    No work on g̃, D or the factors: whatever full mode does beyond this is its compute."""
    moments = [torch.rand(m, n, device=cfg.device, dtype=cfg.dtype) for m, n in cfg.shapes() for _ in range(2)]

    def step() -> None:
        torch._foreach_mul_(moments, 1.0)

    # the moments stand for full mode's optimizer state (state bytes, not step memory)
    return Prepared(step=step, state_bytes=lambda: optimizer_state_bytes([dict(enumerate(moments))]))


# -- the authors' formulation, transcribed (reference only; not part of the package) -----------------------------


def authors_solve_sylvester(P: torch.Tensor, Q: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Solve ``P·X + X·Q = C`` through complex eigendecompositions, as the authors' code does.

    With ``P = U·diag(λ)·U⁻¹`` and ``Q = V·diag(μ)·V⁻¹`` (``torch.linalg.eig``, complex),
    ``Y = U⁻¹·C·V`` divided elementwise by ``λ_i + μ_j`` gives ``X = U·Y·V⁻¹``; the real part is returned.
    """
    lam, U = torch.linalg.eig(P)
    mu, V = torch.linalg.eig(Q)
    F = torch.linalg.solve(U, C.to(U.dtype) @ V)
    Y = F / (lam[:, None] + mu[None, :])
    return (U @ Y @ torch.linalg.inv(V)).real.to(C.dtype)


def authors_full_step(
    A: torch.Tensor, B: torch.Tensor, s: float, state: Dict[str, Any], *, lr: float,
    betas: Tuple[float, float], eps: float, delta: float,
) -> None:
    """One LoRA-Pro full AdamW step on one pair, written the way the authors' reference code computes it."""
    beta1, beta2 = betas
    r, m = A.shape[0], B.shape[0]
    eye_r = torch.eye(r, dtype=A.dtype, device=A.device)
    AAt, BtB = A @ A.T, B.T @ B
    AAt_inv = torch.linalg.pinv(AAt + delta * eye_r)
    BtB_inv = torch.linalg.pinv(BtB + delta * eye_r)
    # adjusted gradients and the equivalent gradient, with the m × m projector formed explicitly
    gA = (1 / s**2) * BtB_inv @ A.grad
    gB = (1 / s**2) * ((torch.eye(m, dtype=B.dtype, device=B.device) - B @ BtB_inv @ B.T) @ B.grad @ AAt_inv)
    g = s * B @ gA + s * gB @ A
    # Adam moments in the full m × n shape
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(g)
        state["exp_avg_sq"] = torch.zeros_like(g)
    state["step"] += 1
    t = state["step"]
    state["exp_avg"].lerp_(g, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (state["exp_avg_sq"].sqrt() / (1 - beta2**t) ** 0.5).add_(eps)
    D = (state["exp_avg"] / (1 - beta1**t)) / denom
    # project the Adam direction back onto the factors, again through the m × m projector and a complex-eig X
    uA, uB = s * B.T @ D, s * D @ A.T
    X = authors_solve_sylvester(BtB, AAt, -(1 / s**2) * BtB_inv @ uA @ A.T)
    hA = (1 / s**2) * BtB_inv @ uA + X @ A
    hB = (1 / s**2) * ((torch.eye(m, dtype=B.dtype, device=B.device) - B @ BtB_inv @ B.T) @ uB @ AAt_inv) - B @ X
    A.add_(hA, alpha=-lr)
    B.add_(hB, alpha=-lr)


@register("authors_full", "authors' formulation, transcribed (m × m projector, complex `eig`, per-layer loop)",
          every=3)
def _setup_authors_full(cfg: BenchConfig) -> Prepared:
    layers = make_lora_layers(cfg)
    states: List[Dict[str, Any]] = [{} for _ in layers]

    @torch.no_grad()
    def step() -> None:
        for (A, B), st in zip(layers, states):
            authors_full_step(A, B, cfg.scaling, st, lr=LR, betas=BETAS, eps=EPS, delta=DELTA)

    return Prepared(step=step, state_bytes=lambda: optimizer_state_bytes(states),
                    params=[p for pair in layers for p in pair])


# ----------------------------------------------------------------------------------------------------------------
# Measurement


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_step(prepared: Prepared, device: str) -> float:
    """Wall-clock seconds of one ``step()`` (device synchronised before and after)."""
    _sync(device)
    t0 = time.perf_counter()
    prepared.step()
    _sync(device)
    return time.perf_counter() - t0


def _read_status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
        return True
    except OSError:
        return False


def memory_in_use(device: str) -> Optional[int]:
    """Bytes in use now: allocated CUDA memory, or the process's resident set size on CPU (None if unknown)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    kb = _read_status_kb("VmRSS")
    return None if kb is None else kb * 1024


def step_peak_memory(prepared: Prepared, device: str) -> Optional[int]:
    """Peak bytes in use during one ``step()`` (see the module docstring); ``None`` where it cannot be measured."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        prepared.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    if not _reset_peak_rss():
        prepared.step()
        return None
    prepared.step()
    kb = _read_status_kb("VmHWM")
    return None if kb is None else kb * 1024


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the given tensors and of their ``.grad``."""
    total = 0
    for t in tensors:
        total += t.numel() * t.element_size()
        if t.grad is not None:
            total += t.grad.numel() * t.grad.element_size()
    return total


@dataclass
class Result:
    key: str
    label: str
    times: List[float]  # one value per round: the fastest of `inner` consecutive steps
    state_bytes: int
    other_bytes: Optional[int]  # peak step memory beyond parameters, gradients and state (None: not measurable)
    inner: int = 1
    all_times: List[float] = field(default_factory=list)  # every timed step

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def run(cfg: BenchConfig, keys: Sequence[str], rounds: int, warmup: int = 1,
        log: Callable[[str], None] = lambda s: None) -> Dict[str, Result]:
    """Set up the cases, warm them up, measure memory, then time ``rounds`` interleaved rounds."""
    unknown = [k for k in keys if k not in CASES]
    if unknown:
        raise ValueError(f"Unknown benchmark case(s) {unknown}; known: {sorted(CASES)}.")
    torch.manual_seed(cfg.seed)
    # First touch of the BLAS/LAPACK/OpenMP machinery allocates buffers and threads once per process; do it on
    # tiny shapes so that it is not counted in the first case's memory.
    tiny = BenchConfig(layers=((12, 10, 1),), rank=2, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed)
    for k in keys:
        p = CASES[k].setup(tiny)
        p.step()
        p.step()
    del p
    prepared: Dict[str, Prepared] = {}
    results: Dict[str, Result] = {}
    for k in keys:  # set up and measure one case at a time, so the memory numbers belong to that case alone
        t0 = time.perf_counter()
        before = memory_in_use(cfg.device)
        prepared[k] = p = CASES[k].setup(cfg)
        durations = []
        for _ in range(warmup):  # allocates the lazily created state, warms caches and kernels
            durations.append(timed_step(p, cfg.device))
        t1 = time.perf_counter()
        peak = step_peak_memory(p, cfg.device)  # a warm step
        durations.append(time.perf_counter() - t1)
        # steps per round from the fastest step so far (one step stalled by another process must not decide it)
        inner = max(1, min(MAX_INNER, int(TARGET_ROUND_S / min(durations))))
        state = p.state_bytes()
        other = None if peak is None or before is None else max(0, peak - before - tensor_bytes(p.params) - state)
        results[k] = Result(k, CASES[k].label, [], state, other, inner)
        log(f"  set up {k} ({time.perf_counter() - t0:.1f}s, {inner} step(s) per round)")
    for i in range(rounds):
        order = list(keys[i % len(keys):]) + list(keys[:i % len(keys)])  # rotate: no fixed position in a round
        for k in order:
            if i % CASES[k].every == 0:
                ts = [timed_step(prepared[k], cfg.device) for _ in range(results[k].inner)]
                results[k].all_times += ts
                results[k].times.append(min(ts))
        log(f"  round {i + 1}/{rounds}: " + ", ".join(f"{k} {results[k].times[-1] * 1e3:.0f}ms"
                                                     for k in keys if i % CASES[k].every == 0))
    return results


def ratio_rows(results: Dict[str, Result]) -> List[Dict[str, Any]]:
    rows = []
    for num, den, op, target, desc in RATIOS:
        if num in results and den in results:
            ratio = results[num].median / results[den].median
            met = None if target is None else (ratio <= target if op == "<=" else ratio >= target)
            rows.append(dict(numerator=num, denominator=den, description=desc, ratio=ratio,
                             target="–" if target is None else f"{op} {target:g}", met=met))
    return rows


def _mb(b: Optional[int]) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.1f}"


def markdown_table(results: Dict[str, Result], cfg: BenchConfig) -> str:
    base = results.get("adamw_full_weight")
    lines = [
        "| method | step (ms) | × AdamW full-weight | optimizer state (MiB) | other step memory (MiB) | rounds × steps |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results.values():
        rel = f"{r.median / base.median:.2f}" if base is not None else "n/a"
        lines.append(f"| {r.label} | {r.median * 1e3:,.1f} | {rel} | {_mb(r.state_bytes)} | {_mb(r.other_bytes)} "
                     f"| {len(r.times)} × {r.inner} |")
    lines.append("")
    lines.append("| ratio (same run) | measured | target | |")
    lines.append("|---|---:|---:|---|")
    for row in ratio_rows(results):
        verdict = "" if row["met"] is None else ("met" if row["met"] else "MISSED")
        lines.append(f"| {row['description']} | {row['ratio']:.2f} | {row['target']} | {verdict} |")
    return "\n".join(lines)


def _load_average() -> Optional[Tuple[float, float, float]]:
    try:
        return os.getloadavg()
    except OSError:
        return None


def environment(cfg: BenchConfig) -> Dict[str, Any]:
    env = dict(torch=torch.__version__, python=platform.python_version(), device=cfg.device,
               threads=torch.get_num_threads(), cpu_count=os.cpu_count(), machine=platform.machine(),
               load_average=_load_average())
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), None)
    except OSError:
        pass
    if cfg.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env


def describe(cfg: BenchConfig) -> str:
    layers = " + ".join(f"{c} × ({m} × {n})" for m, n, c in cfg.layers)
    return f"{layers}, r = {cfg.rank}, {str(cfg.dtype).replace('torch.', '')} parameters, device {cfg.device}"


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _parse_layers(text: str) -> Tuple[Tuple[int, int, int], ...]:
    out = []
    for item in text.split(","):
        try:
            shape, _, count = item.strip().partition(":")
            m, n = (int(v) for v in shape.lower().split("x"))
            out.append((m, n, int(count or 1)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"Invalid --layers item {item!r}: write MxN:COUNT items separated by commas, e.g. 4096x4096:2,11008x4096:2"
            ) from None
    return tuple(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 + 1 layers and fewer rounds")
    parser.add_argument("--layers", type=_parse_layers, default=None,
                        help="layer shapes as MxN:COUNT,... (default 4096x4096:2,11008x4096:2)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 12, quick 4)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda was requested but CUDA is not available; use --device cpu.")
    layers = args.layers or (((4096, 4096, 1), (11008, 4096, 1)) if args.quick else BenchConfig.layers)
    rounds = args.rounds or (4 if args.quick else 12)
    cfg = BenchConfig(layers=layers, rank=args.rank, device=args.device)
    keys = [k.strip() for k in args.cases.split(",") if k.strip()]

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    load_before = _load_average()
    log(f"Benchmarking one optimizer step: {describe(cfg)}; {rounds} rounds")
    results = run(cfg, keys, rounds, log=log)
    elapsed = time.perf_counter() - t0

    load = "" if load_before is None else f", 1-min load average {load_before[0]:.1f} on {os.cpu_count()} CPUs"
    print(f"One optimizer step, {describe(cfg)}; torch {torch.__version__}, {torch.get_num_threads()} threads{load}.")
    print("Step: median over interleaved rounds of the fastest of the round's consecutive steps" + "".join(
        f"; {CASES[k].label.split(' (')[0]} timed every {CASES[k].every} rounds" for k in keys if CASES[k].every > 1)
        + f". Whole run {elapsed:.0f}s.\n")
    print(markdown_table(results, cfg))
    if args.json:
        payload = dict(config=dict(layers=[list(x) for x in cfg.layers], rank=cfg.rank, scaling=cfg.scaling,
                                   dtype=str(cfg.dtype), device=cfg.device, rounds=rounds),
                       environment=environment(cfg), elapsed_s=elapsed,
                       cases={k: dict(label=r.label, times_s=r.times, median_s=r.median, state_bytes=r.state_bytes,
                                      other_step_bytes=r.other_bytes, steps_per_round=r.inner,
                                      all_step_times_s=r.all_times,
                                      median_of_all_steps_s=statistics.median(r.all_times))
                              for k, r in results.items()},
                       ratios=ratio_rows(results))
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
