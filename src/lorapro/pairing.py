"""Find the LoRA factor pairs (A, B, s) of a model — the one place where pairing happens.

A LoRA layer computes ``W = W0 + s · B · A`` with ``B = lora_B.weight`` (m × r), ``A = lora_A.weight`` (r × n)
and ``s`` the layer's *own* scale, read from the layer (``module.scaling[adapter]`` in PEFT: ``alpha / r``, or
``alpha / sqrt(r)`` with rsLoRA, per-layer with ``rank_pattern`` / ``alpha_pattern``). Nothing here recomputes
``alpha / r`` from a global setting, and nothing pairs tensors by their position in a list: each pair comes from
one module, and its shapes are checked.

This module depends on torch only. PEFT layers are recognised by their attributes (``lora_A``, ``lora_B``,
``scaling``), so PEFT does not have to be importable.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

__all__ = ["LoRAPair", "lora_pairs"]


@dataclass(frozen=True)
class LoRAPair:
    """One LoRA adapter on one layer: ``W = W0 + scaling · B @ A``.

    Attributes:
        name: ``"<module path>.<adapter name>"`` (for messages and diagnostics).
        A: the down-projection, shape (r, n) — ``lora_A[adapter].weight`` in PEFT.
        B: the up-projection, shape (m, r) — ``lora_B[adapter].weight`` in PEFT.
        scaling: the layer's scale ``s`` (a Python float).
        module: the layer that owns the pair (``None`` for hand-built pairs).
    """

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    module: Optional[nn.Module] = None

    def __post_init__(self) -> None:
        check_pair(self.A, self.B, self.scaling, self.name)

    @property
    def shape(self) -> tuple:
        """(m, n, r) of the adapted weight."""
        return (self.B.shape[0], self.A.shape[1], self.A.shape[0])


def check_pair(A: torch.Tensor, B: torch.Tensor, scaling: float, name: str = "LoRA pair") -> None:
    """Raise a clear error unless A (r × n) and B (m × r) form a LoRA pair with a finite, non-zero scale."""
    if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor):
        raise TypeError(f"{name}: A and B must be tensors (got {type(A).__name__}, {type(B).__name__}).")
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(
            f"{name}: LoRA-Pro needs 2-D factors A (r x n) and B (m x r); got A{tuple(A.shape)}, B{tuple(B.shape)}. "
            "Convolution / embedding LoRA layers are not supported."
        )
    if A.shape[0] != B.shape[1]:
        raise ValueError(
            f"{name}: shape mismatch, A is {tuple(A.shape)} (r x n) but B is {tuple(B.shape)} (m x r); "
            "A.shape[0] must equal B.shape[1]. Did you swap A and B?"
        )
    if not isinstance(scaling, (int, float)) or not (scaling == scaling) or scaling == 0 or abs(scaling) == float("inf"):
        raise ValueError(f"{name}: the LoRA scale must be a finite non-zero number, got {scaling!r}.")
    if A.is_sparse or B.is_sparse:
        raise TypeError(f"{name}: sparse LoRA factors are not supported.")


def check_trainable_halves(A: torch.Tensor, B: torch.Tensor, name: str = "LoRA pair") -> None:
    """Refuse a pair with one frozen half: it would be stepped as if that half's gradient were zero."""
    if A.requires_grad != B.requires_grad:
        frozen = "A" if not A.requires_grad else "B"
        raise ValueError(
            f"{name}: {frozen} is frozen (requires_grad=False) but its partner is trainable. LoRA-Pro adjusts A "
            "and B together (it needs both gradients); make both trainable (requires_grad_(True)) or freeze both."
        )


def check_one_adapter_per_layer(pairs: Sequence[LoRAPair]) -> None:
    """Refuse two trainable adapters on one layer: each pair's step projects the layer's gradient G onto its own
    subspace, and the steps add up (two identical adapters would move the layer exactly twice as far)."""
    by_module: Dict[int, List[LoRAPair]] = defaultdict(list)
    for pair in pairs:
        if pair.module is not None:
            by_module[id(pair.module)].append(pair)
    for same in by_module.values():
        if len(same) > 1:
            names = ", ".join(p.name for p in same)
            raise ValueError(
                f"Several trainable LoRA adapters on one layer ({names}). LoRA-Pro projects the layer's full-weight "
                "gradient onto each adapter's own subspace, so their steps would add up and the layer would move "
                "too far. Train one adapter per layer at a time: freeze the others (requires_grad_(False), or "
                "PEFT's model.set_adapter(name))."
            )


def _is_lora_layer(module: nn.Module) -> bool:
    return (
        isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
        and isinstance(getattr(module, "lora_B", None), nn.ModuleDict)
        and isinstance(getattr(module, "scaling", None), dict)
    )


def _unsupported_reason(module: nn.Module, adapter: str) -> Optional[str]:
    """Why the LoRA-Pro math (for ``W0 + s·B·A`` with linear A, B) does not apply to this adapter, if it doesn't."""
    a, b = module.lora_A[adapter], module.lora_B[adapter]
    if not isinstance(a, nn.Linear) or not isinstance(b, nn.Linear):
        return (
            f"its factors are {type(a).__name__}/{type(b).__name__}, not Linear (convolution LoRA); "
            "LoRA-Pro's closed form is derived for W0 + s*B*A with matrix factors"
        )
    magnitude = getattr(module, "lora_magnitude_vector", None)
    if magnitude is not None and adapter in getattr(magnitude, "keys", lambda: [])():
        return "it is a DoRA adapter (weight-normalised, so W is not W0 + s*B*A); use plain LoRA or train DoRA with AdamW"
    return None


def lora_pairs(model: nn.Module, *, trainable_only: bool = True) -> List[LoRAPair]:
    """All LoRA (A, B, s) pairs of ``model``, in module order.

    Works with PEFT ``LoraLayer`` modules (any adapter name, several adapters — the optimizers train one per layer
    at a time, see :func:`check_one_adapter_per_layer` — ``rank_pattern`` /
    ``alpha_pattern``, rsLoRA) and with any hand-written module that follows the same convention
    (``lora_A`` / ``lora_B`` ``ModuleDict`` of ``nn.Linear`` and a ``scaling`` dict).

    Args:
        model: a PEFT model or any ``nn.Module`` containing LoRA layers.
        trainable_only: skip adapters whose A and B are both frozen (inactive adapters).

    Raises:
        ValueError: an adapter has exactly one trainable half, or is of a kind LoRA-Pro does not support
            (convolution LoRA, DoRA) while trainable.
    """
    pairs: List[LoRAPair] = []
    for module_name, module in model.named_modules():
        if not _is_lora_layer(module):
            continue
        emb = getattr(module, "lora_embedding_A", None)
        if emb is not None and any(t.requires_grad for t in emb.values()):
            raise ValueError(
                f"{module_name}: LoRA-Pro cannot optimise embedding LoRA adapters (lora_embedding_A/B); "
                "leave embedding layers out of target_modules, or freeze them and train them separately."
            )
        for adapter in module.lora_A.keys():
            if adapter not in module.lora_B:
                continue
            a_mod, b_mod = module.lora_A[adapter], module.lora_B[adapter]
            A, B = getattr(a_mod, "weight", None), getattr(b_mod, "weight", None)
            if A is None or B is None:
                continue
            name = f"{module_name}.{adapter}" if module_name else adapter
            if trainable_only:
                if not A.requires_grad and not B.requires_grad:
                    continue
                check_trainable_halves(A, B, name)
            reason = _unsupported_reason(module, adapter)
            if reason is not None:
                raise ValueError(f"{name}: LoRA-Pro cannot optimise this adapter: {reason}.")
            if adapter not in module.scaling:
                raise ValueError(f"{name}: the layer has no scaling entry for adapter '{adapter}'.")
            scaling = float(module.scaling[adapter])
            pairs.append(LoRAPair(name=name, A=A, B=B, scaling=scaling, module=module))
    return pairs

