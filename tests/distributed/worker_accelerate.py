"""Run under ``accelerate launch --multi_gpu --num_processes 2`` (CPU: gloo) by test_optim_distributed.py.

Usage: worker_accelerate.py OUT_DIR. Trains with a sharded LoRAProAdamW prepared by accelerate, then saves with
``accelerator.save_state`` after ``consolidate_state_dict`` — the documented accelerate recipe.
"""

import os
import sys

import torch
from accelerate import Accelerator
from torch import nn

from dist_toy import STEPS_DEFAULT as STEPS, global_batches, local_slice, make_model, make_opt, params_of


def main() -> None:
    out = sys.argv[1]
    accelerator = Accelerator(cpu=True)  # initialises the process group (gloo on CPU)
    rank, world = accelerator.process_index, accelerator.num_processes
    model = make_model()
    opt = make_opt("full", model, shard_state=True)  # after Accelerator(): the process group exists
    model, opt = accelerator.prepare(model, opt)
    for batch in global_batches(STEPS):
        x, y = local_slice(batch, rank, world)
        opt.zero_grad()
        accelerator.backward(nn.functional.cross_entropy(model(x), y))
        opt.step()
    opt.optimizer.consolidate_state_dict()  # every rank; then save_state writes rank 0's complete state
    accelerator.save_state(os.path.join(out, "accelerate_state"))
    torch.save(params_of(model), os.path.join(out, f"accelerate_rank{rank}.pt"))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
