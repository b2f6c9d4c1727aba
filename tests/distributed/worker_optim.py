"""Run under ``torchrun --nproc_per_node=2`` by test_optim_distributed.py: every 2-process scenario in one launch.

Usage: worker_optim.py OUT_DIR CKPT_FROM_ONE_PROCESS
Writes OUT_DIR/<scenario>_rank<r>.pt (trainable parameters after the run) and OUT_DIR/meta_rank<r>.json.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_toy import global_batches, make_model, make_opt, params_of, train

from lorapro.distributed import optimizer_state_bytes

STEPS, SAVE_AT = 4, 2


def main() -> None:
    out, ckpt_from_one = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = global_batches(STEPS)
    meta = {"world_size": world}

    def save(name, model):
        torch.save(params_of(model), os.path.join(out, f"{name}_rank{rank}.pt"))

    def state_dict_or_error(opt):
        try:
            sd = opt.state_dict()
        except RuntimeError as e:
            return str(e)
        return f"returned {len(sd['state'])} state entries, steps {sorted(float(st['step']) for st in sd['state'].values())}"

    def save_consolidated(name, model, opt):
        opt.consolidate_state_dict(to=0)
        if rank == 0:
            torch.save({"model": params_of(model), "optim": opt.state_dict()}, os.path.join(out, f"{name}.pt"))
        dist.barrier()

    def resumed_model(ck):
        model = make_model()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in ck["model"]:
                    p.copy_(ck["model"][n])
        return DDP(model)

    # DDP, unsharded optimizer: gradients are averaged before the LoRA-Pro step
    for kind in ("full", "efficient"):
        model = DDP(make_model())
        opt = make_opt(kind, model)
        train(model, opt, batches, 0, STEPS, rank, world)
        save(f"ddp_{kind}", model)
        meta[f"bytes_unsharded_{kind}"] = optimizer_state_bytes(opt)

    # DDP + sharded state
    for kind in ("full", "efficient", "factored", "sgd"):
        model = DDP(make_model())
        opt = make_opt(kind, model, shard_state=True)
        train(model, opt, batches, 0, STEPS, rank, world)
        save(f"sharded_{kind}", model)
        meta[f"bytes_sharded_{kind}"] = optimizer_state_bytes(opt)
        meta[f"owners_{kind}"] = opt._sharding.pair_owners

    # checkpoint protocol: state_dict() refuses until consolidated; save on 2 processes
    model = DDP(make_model())
    opt = make_opt("full", model, shard_state=True)
    train(model, opt, batches, 0, SAVE_AT, rank, world)
    try:
        opt.state_dict()
        meta["unconsolidated_state_dict"] = "returned"
    except RuntimeError as e:
        meta["unconsolidated_state_dict"] = str(e)
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save({"model": params_of(model), "optim": opt.state_dict()}, os.path.join(out, "ckpt_two.pt"))
    else:  # what accelerate / DeepSpeed do: call state_dict() on every rank, keep rank 0's
        torch.save(opt.state_dict(), os.path.join(out, "placeholder_rank1.pt"))
    dist.barrier()

    # resume on 2 processes from a checkpoint written by 1 unsharded process
    ck = torch.load(ckpt_from_one, weights_only=True)
    model = resumed_model(ck)
    opt = make_opt("full", model, shard_state=True)
    opt.load_state_dict(ck["optim"])
    meta["bytes_after_load"] = optimizer_state_bytes(opt)
    train(model, opt, batches, SAVE_AT, STEPS, rank, world)
    save("resumed_from_one", model)

    # load -> state_dict(): each rank holds only its pairs, so it must refuse until consolidated, then give back
    # exactly the checkpoint; a consolidation taken before the load must not survive it
    model = resumed_model(ck)
    opt = make_opt("full", model, shard_state=True)
    opt.load_state_dict(ck["optim"])
    meta["state_dict_after_load"] = state_dict_or_error(opt)
    save_consolidated("ckpt_reloaded", model, opt)
    model = DDP(make_model())
    opt = make_opt("full", model, shard_state=True)
    train(model, opt, batches, 0, SAVE_AT - 1, rank, world)
    opt.consolidate_state_dict(to=0)  # of step 1; the checkpoint loaded next is of step 2
    opt.load_state_dict(ck["optim"])
    meta["state_dict_after_stale_consolidation"] = state_dict_or_error(opt)
    # load -> step -> save
    model = resumed_model(ck)
    opt = make_opt("full", model, shard_state=True)
    opt.load_state_dict(ck["optim"])
    train(model, opt, batches, SAVE_AT, SAVE_AT + 1, rank, world)
    save_consolidated("ckpt_load_step_save", model, opt)

    with open(os.path.join(out, f"meta_rank{rank}.json"), "w") as f:
        json.dump(meta, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
