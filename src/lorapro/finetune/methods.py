"""Every fine-tuning method ``lorapro train`` runs, in one table.

A method is (how the adapter is built) x (which optimizer steps it). Data, schedule, seed, batch and logging are
shared, so a comparison between rows differs in the method only. To add a method, add one row to ``METHODS``,
e.g. ``Method("name", "what it is", lora_kwargs={...}, optimizer="lorapro", optimizer_kwargs={"mode": ...})``.

Layer scales are never computed here: PEFT stores them per layer (``module.scaling[adapter]``, alpha/r or
alpha/sqrt(r) with rsLoRA) and the LoRA-Pro optimizer reads them from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping

__all__ = ["Method", "METHODS", "get_method"]


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    peft: bool = True  # False: full fine-tuning, no adapter
    lora_kwargs: Mapping[str, Any] = field(default_factory=dict)  # extra peft.LoraConfig arguments
    optimizer: str = "adamw"  # "adamw" | "lorapro" | "loraplus"
    optimizer_kwargs: Mapping[str, Any] = field(default_factory=dict)  # extra LoRAProAdamW arguments (mode=...)
    init: str = "default"  # "default" | "pissa" | "lora-ga": adapters initialised from the base weights / gradients


METHODS: Dict[str, Method] = {
    m.name: m
    for m in [
        Method("full", "full fine-tuning, AdamW on every weight", peft=False),
        Method("lora", "LoRA (Hu et al. 2021), AdamW on A and B"),
        Method("rslora", "rank-stabilised LoRA: scale alpha/sqrt(r), AdamW", lora_kwargs={"use_rslora": True}),
        Method("dora", "DoRA: weight-decomposed LoRA, AdamW", lora_kwargs={"use_dora": True}),
        Method("pissa", "PiSSA: adapters from the principal singular vectors of W0, AdamW", init="pissa"),
        Method("lora-ga", "LoRA-GA: adapters from the SVD of an estimated full gradient, AdamW", init="lora-ga"),
        Method("loraplus", "LoRA+: AdamW with lr(B) = loraplus_lr_ratio x lr(A)", optimizer="loraplus"),
        Method(
            "lora-pro",
            "LoRA-Pro (the paper's algorithm): AdamW moments of the equivalent gradient, full m x n state",
            optimizer="lorapro",
            optimizer_kwargs={"mode": "full"},
        ),
        Method(
            "rslora-pro",
            "LoRA-Pro (full mode) on an rsLoRA adapter",
            lora_kwargs={"use_rslora": True},
            optimizer="lorapro",
            optimizer_kwargs={"mode": "full"},
        ),
        Method(
            "lora-pro-efficient",
            "LoRA-Pro, memory-light: AdamW moments of the adjusted factor gradients (LoRA-sized state)",
            optimizer="lorapro",
            optimizer_kwargs={"mode": "efficient"},
        ),
        Method(
            "lora-pro-factored",
            "LoRA-Pro, factored moments: Adafactor-style second moment of the equivalent gradient (near-LoRA memory)",
            optimizer="lorapro",
            optimizer_kwargs={"mode": "factored"},
        ),
    ]
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"Unknown method '{name}'.{hint} Methods: {', '.join(METHODS)}.") from None


def methods_table() -> str:
    """A Markdown table of the methods (for --help and the README)."""
    lines = ["| method | what it is |", "|---|---|"]
    lines += [f"| `{m.name}` | {m.description} |" for m in METHODS.values()]
    return "\n".join(lines)
