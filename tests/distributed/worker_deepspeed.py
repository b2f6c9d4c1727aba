"""Run under ``torchrun --nproc_per_node=2`` by test_deepspeed.py: LoRA-Pro as DeepSpeed's client optimizer.

Usage: worker_deepspeed.py OUT_DIR. Writes <scenario>_rank<r>.pt (trainable parameters) and meta_rank<r>.json.
"""

import json
import os
import sys

import deepspeed
import deepspeed.ops
import torch
import torch.distributed as dist
from torch import nn

from dist_toy import GLOBAL_BATCH, STEPS_DEFAULT as STEPS, global_batches, local_slice, make_model, make_opt, params_of

from lorapro.integrations.deepspeed import initialize, save_checkpoint

SAVE_AT = 2


def config(stage=0, precision=None):
    cfg = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // dist.get_world_size(),
           "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    if precision:
        cfg[precision] = {"enabled": True}
    return cfg


def run(engine, start, stop, rank, world):
    batches = global_batches(STEPS)
    dtype = next(engine.module.parameters()).dtype
    for step in range(start, stop):
        x, y = local_slice(batches[step], rank, world)
        engine.backward(nn.functional.cross_entropy(engine(x.to(dtype)).float(), y))
        engine.step()


def main() -> None:
    out = sys.argv[1]
    # On CPU, DeepSpeed compiles a shared-memory all-reduce extension on first use (minutes on 2 cores); the test
    # needs only correctness, so let gloo do the all-reduce (CPU-only switch; irrelevant on GPUs).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    meta = {}

    def save(name, engine):
        torch.save({k: v.float() for k, v in params_of(engine.module).items()}, os.path.join(out, f"{name}_rank{rank}.pt"))

    for precision in (None, "bf16"):
        for shard in (False, True):
            model = make_model()
            engine, *_ = initialize(model=model, optimizer=make_opt("full", model, shard_state=shard),
                                    config=config(precision=precision))
            meta[f"wrapper_{precision}_{shard}"] = type(engine.optimizer).__name__
            run(engine, 0, STEPS, rank, world)
            save(f"ds_{precision}_{'sharded' if shard else 'plain'}", engine)

    # checkpoint: save at SAVE_AT with sharded state, resume in a fresh engine, finish
    model = make_model()
    engine, *_ = initialize(model=model, optimizer=make_opt("full", model, shard_state=True), config=config())
    run(engine, 0, SAVE_AT, rank, world)
    save_checkpoint(engine, os.path.join(out, "ds_ckpt"), tag="step2")
    model = make_model(seed=123)  # different weights: the checkpoint must restore them
    engine, *_ = initialize(model=model, optimizer=make_opt("full", model, shard_state=True), config=config())
    engine.load_checkpoint(os.path.join(out, "ds_ckpt"), tag="step2")
    run(engine, SAVE_AT, STEPS, rank, world)
    save("ds_resumed", engine)

    with open(os.path.join(out, f"meta_rank{rank}.json"), "w") as f:
        json.dump(meta, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
