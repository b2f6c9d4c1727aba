"""Toy PEFT LoRA models and batches shared by the optimizer tests (tests/test_optim.py, tests/test_factored.py)."""

import torch
from torch import nn

from lorapro import lora_pairs


class MLP(nn.Module):
    """6 → 10 → 10 → 6 with tanh, and a 3-class head: the layers ``up``, ``mid``, ``down`` take LoRA."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(6, 10)
        self.mid = nn.Linear(10, 10)
        self.down = nn.Linear(10, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.down(torch.tanh(self.mid(torch.tanh(self.up(x)))))))


def peft_toy(net: nn.Module, target_modules, dtype=torch.float64, seed=0, zero_B=False, **lora_kwargs):
    """``net`` (built after seeding with ``seed``) wrapped by PEFT LoRA r = 2, α = 4 on ``target_modules`` with
    ``modules_to_save=["head"]``; B is made non-zero (N(0, 0.3²)) unless ``zero_B`` so every term of the math is
    exercised. Factors keep ``dtype`` (no autocast to fp32)."""
    import peft

    cfg = dict(r=2, lora_alpha=4, target_modules=list(target_modules), modules_to_save=["head"])
    cfg.update(lora_kwargs)
    model = peft.get_peft_model(net.to(dtype), peft.LoraConfig(**cfg), autocast_adapter_dtype=False)
    if not zero_B:
        with torch.no_grad():
            for p in lora_pairs(model):
                p.B.normal_(0, 0.3)
    return model


def batches(n, dtype=torch.float64, seed=1):
    """``n`` batches of 8 inputs of width 6 with 3-class labels."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g).to(dtype), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def backward(model, batch):
    """Cross-entropy of ``model`` on ``batch``, back-propagated; returns the loss."""
    x, y = batch
    loss = nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    return loss.item()
