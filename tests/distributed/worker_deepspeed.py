"""Run under ``torchrun --nproc_per_node=2`` by test_deepspeed.py and test_deepspeed_zero.py: LoRA-Pro as
DeepSpeed's client optimizer.

Usage: worker_deepspeed.py OUT_DIR SUITE, SUITE "zero0" (stage 0: LoRAProAdamW), "zero12" (stages 1 and 2:
DeepSpeedLoRAProAdamW) or "zero3". Writes <scenario>_rank<r>.pt (the full fp32 trainable parameters) and
meta_rank<r>.json (optimizer classes, state sizes, errors).

Resharded resume, three launches on one OUT_DIR: "reshard_save" (2 processes: train to step 2, save),
"reshard_one" (1 process: load the 2-process checkpoints, save again at step 3, finish; and train to step 2 and
save), "reshard_two" (2 processes: load the 1-process checkpoints and finish). Writes <scenario>_<how>_rank<r>.pt.
"""

import json
import os
import sys

import deepspeed
import deepspeed.ops
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param
from torch import nn

from dist_toy import GLOBAL_BATCH, STEPS_DEFAULT as STEPS, global_batches, local_slice, make_model, make_opt

from lorapro.distributed import optimizer_state_bytes
from lorapro.integrations.deepspeed import (DeepSpeedLoRAProAdamW, DeepSpeedLoRAProSGD, initialize, load_checkpoint,
                                           save_checkpoint)

SAVE_AT = 2
CLIP = 0.05  # small enough that every step of the toy run is clipped


def zero_opt(kind, model):
    """The ZeRO optimizer with the hyperparameters of the 1-process reference ``make_opt(kind, ...)``."""
    ref = make_opt(kind, model)
    if kind == "sgd":
        keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
        cls = DeepSpeedLoRAProSGD
    else:
        keys = ("lr", "betas", "eps", "weight_decay", "mode")
        cls = DeepSpeedLoRAProAdamW
    return cls(model, **{k: ref.defaults[k] for k in keys})


def config(stage, gas=1, **extra):
    world = dist.get_world_size()
    cfg = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world // gas,
           "gradient_accumulation_steps": gas, "zero_optimization": {"stage": stage}}
    for key, value in extra.items():
        if key in ("offload_optimizer", "sub_group_size", "stage3_param_persistence_threshold"):
            cfg["zero_optimization"][key] = value
        else:
            cfg[key] = value
    return cfg


def run(engine, start, stop, gas=1):
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = global_batches(STEPS)
    dtype = next(engine.module.parameters()).dtype
    for step in range(start, stop):
        x, y = local_slice(batches[step], rank, world)
        k = len(x) // gas
        for micro in range(gas):  # engine.step() after every micro-batch; DeepSpeed steps at the boundary
            xs, ys = x[micro * k:(micro + 1) * k], y[micro * k:(micro + 1) * k]
            engine.backward(nn.functional.cross_entropy(engine(xs.to(dtype)).float(), ys))
            engine.step()


def full_params(engine):
    out = {}
    for n, p in engine.module.named_parameters():
        if p.requires_grad:
            full = safe_get_full_fp32_param(p)  # a collective at ZeRO >= 1; None at stage 0
            out[n] = (full if full is not None else p.detach()).float().clone()
    return out


# name -> (ZeRO stage, optimizer kind, extra config): the scenarios resumed on another number of processes
RESHARD = {"z1_full": (1, "full", {}), "z2_full": (2, "full", {}), "z2_efficient": (2, "efficient", {}),
           "z2_factored": (2, "factored", {}), "z2_sgd": (2, "sgd", {}),
           "z2_offload": (2, "full", {"offload_optimizer": {"device": "cpu"}}),
           "z2_bf16": (2, "full", {"bf16": {"enabled": True}}),
           "z3_full": (3, "full", {"stage3_param_persistence_threshold": 0}),  # every weight partitioned
           "z3_efficient": (3, "efficient", {})}  # default persistence: small weights gathered on every rank


def reshard(out, suite, rank, meta):
    """Save on one number of processes, load on another (lorapro.integrations.deepspeed.load_checkpoint)."""
    def engine_for(name, seed=0):
        stage, kind, extra = RESHARD[name]
        model = make_model(seed=seed)
        return initialize(model=model, optimizer=zero_opt(kind, model), config=config(stage, **extra))[0]

    def save(engine, name, how, tag):
        save_checkpoint(engine, os.path.join(out, f"ckpt_{name}_{how}"), tag=tag)

    def load(name, how, tag):
        engine = engine_for(name, seed=123)  # different weights: the checkpoint must restore them
        path, _ = load_checkpoint(engine, os.path.join(out, f"ckpt_{name}_{how}"), tag=tag)
        assert path is not None, name
        meta[f"global_steps_{name}_{how}"] = engine.global_steps
        return engine

    def dump(engine, name):
        torch.save(full_params(engine), os.path.join(out, f"{name}_rank{rank}.pt"))

    for name in RESHARD:
        if suite == "reshard_save":  # 2 processes
            engine = engine_for(name)
            run(engine, 0, SAVE_AT)
            save(engine, name, "w2", "step2")
            dump(engine, f"{name}_saved_w2")  # the fp32 masters at the save (bf16: not the bf16 weights)
        elif suite == "reshard_one":  # 1 process
            engine = load(name, "w2", "step2")
            dump(engine, f"{name}_loaded_w1")
            run(engine, SAVE_AT, SAVE_AT + 1)
            save(engine, name, "w1", "step3")  # the 2 -> 1 -> 2 round trip continues from here
            run(engine, SAVE_AT + 1, STEPS)
            dump(engine, f"{name}_2to1")
            engine = engine_for(name)
            run(engine, 0, SAVE_AT)
            save(engine, name, "from1", "step2")
        else:  # 2 processes
            for how, tag, start, result in (("w1", "step3", SAVE_AT + 1, "2to1to2"),
                                            ("from1", "step2", SAVE_AT, "1to2")):
                engine = load(name, how, tag)
                run(engine, start, STEPS)
                dump(engine, f"{name}_{result}")


def main() -> None:
    out, suite = sys.argv[1], sys.argv[2]
    # On CPU, DeepSpeed compiles a shared-memory all-reduce extension on first use (minutes on 2 cores); the test
    # needs only correctness, so let gloo do the all-reduce (CPU-only switch; irrelevant on GPUs).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    meta = {}

    def train(name, kind, cfg, gas=1):
        model = make_model()
        opt = zero_opt(kind, model)
        engine, *_ = initialize(model=model, optimizer=opt, config=cfg)
        run(engine, 0, STEPS, gas)
        torch.save(full_params(engine), os.path.join(out, f"{name}_rank{rank}.pt"))
        meta[f"state_bytes_{name}"] = optimizer_state_bytes(opt)
        meta[f"wrapper_{name}"] = type(engine.optimizer).__name__
        return engine

    def checkpoint(name, stage, make=zero_opt):
        model = make_model()
        engine, *_ = initialize(model=model, optimizer=make("full", model), config=config(stage))
        run(engine, 0, SAVE_AT)
        save_checkpoint(engine, os.path.join(out, f"ckpt_{name}"), tag="step2")
        model = make_model(seed=123)  # different weights: the checkpoint must restore them
        engine, *_ = initialize(model=model, optimizer=make("full", model), config=config(stage))
        engine.load_checkpoint(os.path.join(out, f"ckpt_{name}"), tag="step2")
        run(engine, SAVE_AT, STEPS)
        torch.save(full_params(engine), os.path.join(out, f"{name}_rank{rank}.pt"))

    if suite.startswith("reshard_"):
        reshard(out, suite, rank, meta)
    elif suite == "zero0":  # LoRAProAdamW itself, optionally with its state split by pairs (shard_state)
        for precision in (None, "bf16"):
            for shard in (False, True):
                model = make_model()
                extra = {precision: {"enabled": True}} if precision else {}
                engine, *_ = initialize(model=model, optimizer=make_opt("full", model, shard_state=shard),
                                        config=config(0, **extra))
                meta[f"wrapper_{precision}_{shard}"] = type(engine.optimizer).__name__
                run(engine, 0, STEPS)
                inner = engine.optimizer.optimizer if precision else engine.optimizer
                meta[f"steps_{precision}_{shard}"] = sorted({float(st["step"]) for st in inner.state.values()
                                                             if "step" in st})
                torch.save(full_params(engine), os.path.join(out, f"ds_{precision}_{'sharded' if shard else 'plain'}"
                                                                   f"_rank{rank}.pt"))
        checkpoint("ds_resumed", 0, make=lambda kind, model: make_opt(kind, model, shard_state=True))
    elif suite == "zero12":
        for stage in (1, 2):
            for kind in ("full", "efficient"):
                train(f"z{stage}_{kind}", kind, config(stage))
        train("z2_factored", "factored", config(2))
        train("z2_sgd", "sgd", config(2))
        train("z2_offload", "full", config(2, offload_optimizer={"device": "cpu"}))
        train("z2_clip_accum", "full", config(2, gas=2, gradient_clipping=CLIP), gas=2)
        train("z2_bf16", "full", config(2, bf16={"enabled": True}))  # bf16 weights, fp32 masters in the partitions
        checkpoint("z2_resumed", 2)
        # refused: a plain LoRAProAdamW at ZeRO >= 1, through our initialize and through deepspeed.initialize
        model = make_model()
        try:
            initialize(model=model, optimizer=make_opt("full", model), config=config(2))
            meta["plain_at_stage2"] = "accepted"
        except TypeError as e:
            meta["plain_at_stage2"] = str(e)
        model = make_model()
        engine, *_ = deepspeed.initialize(model=model, optimizer=make_opt("full", model),
                                          config={**config(2), "zero_allow_untested_optimizer": True})
        try:
            run(engine, 0, 1)
            meta["direct_stage2"] = "ran"
        except RuntimeError as e:
            meta["direct_stage2"] = str(e)
    else:
        for kind in ("full", "efficient"):
            # full: no parameter persistence, so even these small factors are partitioned for the forward pass too
            train(f"z3_{kind}", kind, config(3, stage3_param_persistence_threshold=0 if kind == "full" else 100000))
        train("z3_offload", "efficient", config(3, offload_optimizer={"device": "cpu"}))
        checkpoint("z3_resumed", 3)
        model = make_model()  # a LoRA group over two sub-groups: refused at the first step
        engine, *_ = initialize(model=model, optimizer=zero_opt("full", model), config=config(3, sub_group_size=100))
        try:
            run(engine, 0, 1)
            meta["split_sub_groups"] = "ran"
        except ValueError as e:
            meta["split_sub_groups"] = str(e)

    prefix = f"meta_{suite}" if suite.startswith("reshard_") else "meta"  # the reshard launches share OUT_DIR
    with open(os.path.join(out, f"{prefix}_rank{rank}.json"), "w") as f:
        json.dump(meta, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
