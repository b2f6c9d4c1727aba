"""LoRA-Pro in a plain PyTorch training loop with a PEFT model.

    python examples/plain_pytorch_loop.py                                   # tiny random model, seconds
    python examples/plain_pytorch_loop.py --model smollm2-135m-instruct     # the packaged SmolLM2, ~4 s/step on CPU
    python examples/plain_pytorch_loop.py --model meta-llama/Llama-2-7b-hf  # any hub model (needs the hub)

It prints the loss of each step. Only ``LoRAProAdamW(...)`` differs from an ordinary LoRA loop.
"""

from __future__ import annotations

import argparse
import math

import torch
from peft import LoraConfig, get_peft_model

from lorapro import LoRAProAdamW
from lorapro.models import load_model_and_tokenizer

TEXTS = [
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer: 3 + 5 = 8. #### 8",
    "Question: A book costs 12 dollars. How much do 4 books cost?\nAnswer: 4 * 12 = 48. #### 48",
    "Question: Sara ran 2 miles on Monday and 3 miles on Tuesday. How far did she run?\nAnswer: 2 + 3 = 5. #### 5",
    "Question: There are 20 birds and 7 fly away. How many are left?\nAnswer: 20 - 7 = 13. #### 13",
]


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:tiny-llama")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--mode", default="full", choices=["full", "efficient"])
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(args.model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))

    # --- the only LoRA-Pro-specific line: the optimizer takes the model and pairs every lora_A/lora_B itself ---
    optimizer = LoRAProAdamW(model, lr=args.lr, mode=args.mode, x_solution="sylvester", weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps)),
    )

    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    losses = []
    model.train()
    for step in range(args.steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # clips the raw LoRA gradients, as usual
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        print(f"step {step + 1:3d}  loss {loss.item():.4f}  lr {scheduler.get_last_lr()[0]:.2e}")
    return losses


if __name__ == "__main__":
    main()
