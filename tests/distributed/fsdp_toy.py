"""The FSDP2 tests' toy: dist_toy's LoRA layers with shapes that FSDP2 splits unevenly over two ranks.

B (m × r) with m = 15 splits into 8 + 7 rows, A (r × n) with r = 3 into 2 + 1, the 3 × 16 head into 2 + 1: the
padded shards of ``fully_shard`` are exercised in every step, gather and checkpoint. Two layers share a shape, so
a bucket batches two pairs.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_toy import LoRALinear, ToyLoRA

PADDED_DIMS = [(16, 15), (15, 16), (16, 16), (16, 16)]  # (in, out)
RANK = 3


class PaddedToy(ToyLoRA):
    """ToyLoRA's forward over the layers above."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.layers = nn.ModuleList([LoRALinear(i, o, r=RANK, alpha=6.0) for i, o in PADDED_DIMS])
        self.head = nn.Linear(PADDED_DIMS[-1][1], 3, bias=False)


def make_padded_model(seed: int = 0, train_biases: bool = False) -> PaddedToy:
    """Seeded, with B ~ N(0, 0.3²) (as dist_toy.make_model) so every term of the LoRA-Pro math is exercised;
    ``train_biases``: the base layers' biases trainable too (plain AdamW next to the head)."""
    torch.manual_seed(seed)
    model = PaddedToy()
    with torch.no_grad():
        for layer in model.layers:
            layer.lora_B["default"].weight.normal_(0, 0.3)
            layer.base_layer.bias.requires_grad_(train_biases)
    return model


def fully_shard_model(model: nn.Module, mesh) -> nn.Module:
    """FSDP2 as users apply it: each block, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_params(model: nn.Module) -> dict:
    """Trainable parameters as whole tensors (a collective for DTensors)."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            out[n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return out
