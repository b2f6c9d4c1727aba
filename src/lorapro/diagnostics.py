r"""Gradient-alignment diagnostics: how close is a LoRA update direction to full fine-tuning?

For every LoRA layer ``W = W0 + s·B·A`` and one batch, :func:`measure_alignment` compares the full-weight gradient
``G = ∂L/∂W`` with the *equivalent gradient* of

- LoRA-Pro: ``g̃ = P_B·G + (I − P_B)·G·P_A`` (the best rank-constrained approximation the factors can express), and
- plain LoRA: ``g̃_LoRA = s·(B·g_A + g_B·A) = s²·(B·Bᵀ·G + G·Aᵀ·A)``,

reporting ``‖g̃ − G‖ / ‖G‖`` and ``cos(g̃, G)`` per layer and aggregated. ``G`` is accumulated from forward hooks
(inputs ``x`` of each adapted layer) and the gradients of the layer outputs ``∂L/∂y`` — ``G = Σ_tokens ∂L/∂y ⊗ x``
— without making ``W0`` trainable and without touching any ``.grad``. Dropout is disabled while measuring
(``model.eval()``), so ``g_A = s·Bᵀ·G`` and ``g_B = s·G·Aᵀ`` hold exactly.

Plain LoRA's relative error includes its scale mismatch (``s²``, factor norms); ``cos`` is scale-free and is the
number to compare across methods. The paper motivates LoRA-Pro with exactly this gap (arXiv 2407.18242, Sec. 2).

Memory: one m × n gradient at a time in float32 (plus the activations of the batch).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from . import functional as F
from .pairing import LoRAPair, lora_pairs

__all__ = ["LayerAlignment", "AlignmentReport", "full_weight_gradients", "measure_alignment", "format_alignment_table"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class LayerAlignment:
    """Alignment numbers of one LoRA layer (cos in [−1, 1]; rel_error = ‖g̃ − G‖ / ‖G‖)."""

    name: str
    shape: Tuple[int, int, int]  # (m, n, r)
    scaling: float
    grad_norm: float  # ‖G‖
    lorapro_rel_error: float
    lorapro_cos: float
    lora_rel_error: float
    lora_cos: float


@dataclass
class AlignmentReport:
    """Per-layer records and aggregates.

    ``summary`` keys: ``layers``; ``lorapro_cos_mean``, ``lora_cos_mean``, ``lorapro_rel_error_mean``,
    ``lora_rel_error_mean`` (plain means over layers); ``lorapro_cos_global``, ``lora_cos_global``,
    ``lorapro_rel_error_global``, ``lora_rel_error_global`` (treating all layers' gradients as one vector).
    """

    layers: List[LayerAlignment] = field(default_factory=list)
    summary: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"layers": [asdict(layer) for layer in self.layers], "summary": dict(self.summary)}


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ValueError("The model output has no .loss; pass loss_fn=lambda model, batch: ... returning a scalar.")
    return loss


def _modules_of(pairs: List[LoRAPair]) -> List[nn.Module]:
    mods: List[nn.Module] = []
    for p in pairs:
        if p.module is None:
            raise ValueError(f"{p.name}: diagnostics need pairs found in a model (lora_pairs(model)).")
        if all(m is not p.module for m in mods):
            mods.append(p.module)
    return mods


def _captured_grads(model: nn.Module, batch: Any, loss_fn: Optional[LossFn], pairs: List[LoRAPair]):
    """Run forward + autograd.grad; return {module: [(x, dL/dy), ...]} for every call of each LoRA module."""
    calls: Dict[int, List[Tuple[torch.Tensor, torch.Tensor]]] = {}
    outputs: List[torch.Tensor] = []
    owners: List[Tuple[int, torch.Tensor]] = []
    handles = []

    def hook(module: nn.Module, inputs: Tuple[Any, ...], output: Any) -> None:
        if not torch.is_tensor(output) or not output.requires_grad:
            return
        outputs.append(output)
        owners.append((id(module), inputs[0].detach()))

    for mod in _modules_of(pairs):
        handles.append(mod.register_forward_hook(hook))
    was_training = model.training
    model.eval()  # no dropout: g_A = s Bᵀ G exactly
    try:
        with torch.enable_grad():
            loss = (loss_fn or _default_loss)(model, batch)
            if loss.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}.")
            grads = torch.autograd.grad(loss, outputs, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for (mid, x), gy in zip(owners, grads):
        if gy is not None:
            calls.setdefault(mid, []).append((x, gy.detach()))
    return calls


def _gradient_of(calls: List[Tuple[torch.Tensor, torch.Tensor]], m: int, n: int) -> torch.Tensor:
    G = None
    for x, gy in calls:
        term = gy.reshape(-1, m).float().T @ x.reshape(-1, n).float()
        G = term if G is None else G.add_(term)
    return G


def _iter_gradients(model: nn.Module, batch: Any, loss_fn: Optional[LossFn], pairs: List[LoRAPair]) -> Iterator[Tuple[LoRAPair, torch.Tensor]]:
    calls = _captured_grads(model, batch, loss_fn, pairs)
    for p in pairs:
        m, n, _ = p.shape
        got = calls.get(id(p.module))
        G = _gradient_of(got, m, n) if got else torch.zeros(m, n, device=p.A.device)
        yield p, G


def full_weight_gradients(model: nn.Module, batch: Any, loss_fn: Optional[LossFn] = None) -> Dict[str, torch.Tensor]:
    """``{pair name: G}`` with ``G = ∂L/∂W`` (m × n, float32) for every LoRA layer, from hooks (W0 stays frozen)."""
    return {p.name: G for p, G in _iter_gradients(model, batch, loss_fn, lora_pairs(model))}


def _cos_and_rel(approx: torch.Tensor, G: torch.Tensor) -> Tuple[float, float, float, float, float]:
    """cos, rel_error and the three sums they come from (⟨a,G⟩, ‖a‖², ‖a − G‖²) for global aggregation."""
    a, g = approx.double(), G.double()
    dot, aa, gg = float((a * g).sum()), float((a * a).sum()), float((g * g).sum())
    diff = float(((a - g) ** 2).sum())
    cos = dot / math.sqrt(aa * gg) if aa > 0 and gg > 0 else 0.0
    rel = math.sqrt(diff / gg) if gg > 0 else 0.0
    return cos, rel, dot, aa, diff


def measure_alignment(model: nn.Module, batch: Any, loss_fn: Optional[LossFn] = None, *, delta: float = 1e-6) -> AlignmentReport:
    """Measure, per LoRA layer, how well LoRA-Pro's and plain LoRA's update directions match full fine-tuning.

    Args:
        model: a PEFT (or PEFT-style) LoRA model.
        batch: one batch; passed to ``loss_fn`` (default: ``model(**batch).loss``).
        loss_fn: ``loss_fn(model, batch) -> scalar loss``.
        delta: the relative cut-off of the Gram pseudo-inverses, as in the optimizer.

    Returns:
        :class:`AlignmentReport` (see :func:`format_alignment_table` to print it).
    """
    pairs = lora_pairs(model, trainable_only=False)
    if not pairs:
        raise ValueError("No LoRA layers found in the model; diagnostics compare LoRA updates with full fine-tuning.")
    report = AlignmentReport()
    tot = {"gg": 0.0, "pro": [0.0, 0.0, 0.0], "lora": [0.0, 0.0, 0.0]}
    with torch.no_grad():
        for p, G in _iter_gradients(model, batch, loss_fn, pairs):
            s = torch.tensor([p.scaling], dtype=torch.float64, device=G.device)
            A, B = p.A.detach()[None], p.B.detach()[None]
            g_A = (p.scaling * B[0].float().T @ G)[None]
            g_B = (p.scaling * G @ A[0].float().T)[None]
            grams = F.gram_inverses(A, B, delta, torch.float64)
            left, right = F.equivalent_gradient_factors(grams, g_A, g_B, s)
            g_pro = (left[0].float() @ right[0].float())
            g_lora = p.scaling * (B[0].float() @ g_A[0] + g_B[0] @ A[0].float())
            pro = _cos_and_rel(g_pro, G)
            lora = _cos_and_rel(g_lora, G)
            gg = float((G.double() ** 2).sum())
            tot["gg"] += gg
            for k, v in (("pro", pro), ("lora", lora)):
                for j in range(3):
                    tot[k][j] += v[2 + j]
            report.layers.append(
                LayerAlignment(
                    name=p.name, shape=p.shape, scaling=p.scaling, grad_norm=math.sqrt(gg),
                    lorapro_rel_error=pro[1], lorapro_cos=pro[0], lora_rel_error=lora[1], lora_cos=lora[0],
                )
            )
    n = len(report.layers)
    summ: Dict[str, float] = {"layers": float(n)}
    for key in ("lorapro_cos", "lora_cos", "lorapro_rel_error", "lora_rel_error"):
        summ[f"{key}_mean"] = sum(getattr(layer, key) for layer in report.layers) / n
    for k, prefix in (("pro", "lorapro"), ("lora", "lora")):
        dot, aa, diff = tot[k]
        summ[f"{prefix}_cos_global"] = dot / math.sqrt(aa * tot["gg"]) if aa > 0 and tot["gg"] > 0 else 0.0
        summ[f"{prefix}_rel_error_global"] = math.sqrt(diff / tot["gg"]) if tot["gg"] > 0 else 0.0
    report.summary = summ
    return report


def format_alignment_table(report: AlignmentReport, max_rows: Optional[int] = 20) -> str:
    """A Markdown table: one row per layer (the first ``max_rows``), then the aggregates."""
    head = "| layer | m×n (r) | cos LoRA-Pro | cos LoRA | ‖g̃−G‖/‖G‖ LoRA-Pro | ‖g̃−G‖/‖G‖ LoRA |"
    lines = [head, "|---|---|---:|---:|---:|---:|"]
    rows = report.layers if max_rows is None else report.layers[:max_rows]
    for L in rows:
        m, n, r = L.shape
        lines.append(
            f"| {L.name} | {m}×{n} ({r}) | {L.lorapro_cos:.4f} | {L.lora_cos:.4f} | "
            f"{L.lorapro_rel_error:.4f} | {L.lora_rel_error:.4f} |"
        )
    if max_rows is not None and len(report.layers) > max_rows:
        lines.append(f"| … {len(report.layers) - max_rows} more layers | | | | | |")
    s = report.summary
    lines.append(
        f"| **mean over {int(s['layers'])} layers** | | {s['lorapro_cos_mean']:.4f} | {s['lora_cos_mean']:.4f} | "
        f"{s['lorapro_rel_error_mean']:.4f} | {s['lora_rel_error_mean']:.4f} |"
    )
    lines.append(
        f"| **all layers as one vector** | | {s['lorapro_cos_global']:.4f} | {s['lora_cos_global']:.4f} | "
        f"{s['lorapro_rel_error_global']:.4f} | {s['lora_rel_error_global']:.4f} |"
    )
    return "\n".join(lines)
