"""A tiny LoRA model (torch only, imports fast) and the training loop shared by the distributed tests and the worker.

The model follows PEFT's LoRA layer convention (``lora_A`` / ``lora_B`` ModuleDicts and a ``scaling`` dict), so
``lora_pairs`` finds it without PEFT: layers of two shapes (32×16 and 16×16 adapted weights, r = 4) whose full-mode
state splits evenly over two ranks, and a small trainable head that gets plain AdamW.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

GLOBAL_BATCH = 16
STEPS_DEFAULT = 4  # steps of every 2-process scenario
DIMS = [(16, 32), (32, 16), (16, 16), (16, 16)]  # (in, out) of the four LoRA layers


class LoRALinear(nn.Module):
    def __init__(self, n_in: int, n_out: int, r: int = 4, alpha: float = 8.0) -> None:
        super().__init__()
        self.base_layer = nn.Linear(n_in, n_out)
        self.base_layer.requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(n_in, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, n_out, bias=False)})
        self.scaling = {"default": alpha / r}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.scaling["default"] * self.lora_B["default"](self.lora_A["default"](x))


class ToyLoRA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([LoRALinear(i, o) for i, o in DIMS])
        self.head = nn.Linear(DIMS[-1][1], 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def make_model(seed: int = 0) -> ToyLoRA:
    torch.manual_seed(seed)
    model = ToyLoRA()
    with torch.no_grad():  # non-zero B so every term of the LoRA-Pro math is exercised from step 1
        for layer in model.layers:
            layer.lora_B["default"].weight.normal_(0, 0.3)
    return model


def global_batches(n: int, seed: int = 1) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(GLOBAL_BATCH, DIMS[0][0], generator=g), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g))
            for _ in range(n)]


def local_slice(batch, rank: int, world_size: int):
    x, y = batch
    k = GLOBAL_BATCH // world_size
    return x[rank * k:(rank + 1) * k], y[rank * k:(rank + 1) * k]


def train(model: nn.Module, opt: torch.optim.Optimizer, batches, start: int, stop: int,
          rank: int = 0, world_size: int = 1) -> None:
    """Steps ``start .. stop-1`` of the fixed batch sequence; each rank takes its slice of every global batch."""
    for step in range(start, stop):
        x, y = local_slice(batches[step], rank, world_size)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()  # DDP averages the gradients over ranks
        opt.step()


def make_opt(kind: str, model: nn.Module, shard_state: bool = False) -> torch.optim.Optimizer:
    from lorapro import LoRAProAdamW, LoRAProSGD

    if kind == "sgd":
        return LoRAProSGD(model, lr=0.05, momentum=0.9, weight_decay=0.01, shard_state=shard_state)
    return LoRAProAdamW(model, lr=1e-2, mode=kind, weight_decay=0.01, shard_state=shard_state)


def params_of(model: nn.Module) -> dict:
    inner: Optional[nn.Module] = getattr(model, "module", None)
    model = inner if isinstance(inner, nn.Module) else model
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
