"""Run under ``torchrun --nproc_per_node=2`` by test_fsdp.py: the FSDP2 scenarios of one phase in one launch.

Usage: worker_fsdp.py OUT_DIR PHASE
  PHASE "train": for every kind, an uninterrupted run (OUT/fsdp_<kind>.pt, written by rank 0), a DCP checkpoint at
      step SAVE_AT (OUT/dcp_two_<kind>) and a resume from it on 2 processes (OUT/resumed_<kind>.pt), a resume from
      the plain torch.save checkpoint of one unsharded process (OUT/one_process_<kind>.pt -> OUT/from_plain_<kind>.pt),
      an optimizer built before fully_shard whose parameters are swapped afterwards (OUT/swapped_<kind>.pt), a
      model whose head is left out of fully_shard (OUT/partial_<kind>.pt);
      per-rank state bytes and refusals in OUT/meta_rank<r>.json.
  PHASE "reshard": resume from OUT/dcp_one_<kind> (written by one process at step SAVE_AT + 1) to the end
      (OUT/reshard_<kind>.pt).
LORAPRO_TEST_DEVICE=cuda: NCCL on one GPU per rank (tests/test_cuda.py); default gloo on CPU.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from dist_toy import global_batches, local_slice, make_opt, train
from fsdp_toy import full_params, fully_shard_model, make_padded_model

from lorapro import LoRAProAdamW
from lorapro.distributed import optimizer_state_bytes
from lorapro.fsdp import is_dtensor, load_checkpoint, save_checkpoint

KINDS = ("full", "efficient", "factored", "sgd")
STEPS, SAVE_AT = 4, 2


def main() -> None:
    out, phase = sys.argv[1], sys.argv[2]
    device = os.environ.get("LORAPRO_TEST_DEVICE", "cpu")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device, (world,))
    batches = [(x.to(device), y.to(device)) for x, y in global_batches(STEPS)]
    meta = {}

    def sharded():
        return fully_shard_model(make_padded_model().to(device), mesh)

    def save(name, model):
        params = {n: p.cpu() for n, p in full_params(model).items()}  # collective
        if rank == 0:
            torch.save(params, os.path.join(out, f"{name}.pt"))

    for kind in KINDS:
        if phase == "train":
            model = sharded()
            opt = make_opt(kind, model)
            train(model, opt, batches, 0, STEPS, rank, world)
            save(f"fsdp_{kind}", model)
            meta[f"bytes_{kind}"] = optimizer_state_bytes(opt)
            meta[f"state_kinds_{kind}"] = sorted({f"{k}:{'DTensor' if is_dtensor(v) else v.dim()}"
                                                  for st in opt.state.values() for k, v in st.items()})

            model = sharded()
            opt = make_opt(kind, model)
            train(model, opt, batches, 0, SAVE_AT, rank, world)
            save_checkpoint(os.path.join(out, f"dcp_two_{kind}"), model, opt)
            model = sharded()
            opt = make_opt(kind, model)
            load_checkpoint(os.path.join(out, f"dcp_two_{kind}"), model, opt)
            train(model, opt, batches, SAVE_AT, STEPS, rank, world)
            save(f"resumed_{kind}", model)

            # optimizer.load_state_dict of a consolidated single-process state: each rank keeps its rows
            ck = torch.load(os.path.join(out, f"one_process_{kind}.pt"), weights_only=True)
            model = sharded()
            set_model_state_dict(model, {k: v.to(device) for k, v in ck["model"].items()},
                                 options=StateDictOptions(full_state_dict=True, strict=False))
            opt = make_opt(kind, model)
            opt.load_state_dict(ck["optim"])
            train(model, opt, batches, SAVE_AT, STEPS, rank, world)
            save(f"from_plain_{kind}", model)

            # what accelerate's FSDP2 plugin does under the Trainer: the optimizer is built on the unsharded model,
            # then fully_shard replaces the parameters and the param groups' entries are swapped for the DTensors
            model = make_padded_model().to(device)
            opt = make_opt(kind, model)
            name_of = {id(p): n for n, p in model.named_parameters()}
            fully_shard_model(model, mesh)
            sharded_by_name = dict(model.named_parameters())
            for g in opt.param_groups:
                g["params"] = [sharded_by_name[name_of[id(p)]] for p in g["params"]]
            train(model, opt, batches, 0, STEPS, rank, world)
            save(f"swapped_{kind}", model)

            # only the blocks sharded, biases trainable: one plain param group holds the biases (DTensors) and the
            # head (a plain tensor, its gradient averaged by hand as DDP would)
            model = make_padded_model(train_biases=True).to(device)
            for layer in model.layers:
                fully_shard(layer, mesh=mesh)
            opt = make_opt(kind, model)
            for step in range(STEPS):
                x, y = local_slice(batches[step], rank, world)
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                dist.all_reduce(model.head.weight.grad)
                model.head.weight.grad /= world
                opt.step()
            save(f"partial_{kind}", model)
        else:
            model = sharded()
            opt = make_opt(kind, model)
            load_checkpoint(os.path.join(out, f"dcp_one_{kind}"), model, opt)
            train(model, opt, batches, SAVE_AT + 1, STEPS, rank, world)
            save(f"reshard_{kind}", model)

    if phase == "train":
        # an error inside the step (here: in the bucket step) leaves every parameter's state attached to it
        model = sharded()
        opt = make_opt("efficient", model)
        train(model, opt, batches, 0, 1, rank, world)
        before = {id(p): sorted(st) for p, st in opt.state.items()}

        def fail(*args, **kwargs):
            raise RuntimeError("injected")

        opt._step_lora_bucket = fail
        try:
            train(model, opt, batches, 1, 2, rank, world)
        except RuntimeError as e:
            meta["error"] = str(e)
        meta["state_kept"] = ({id(p): sorted(st) for p, st in opt.state.items()} == before
                              and all(is_dtensor(p) for p in opt.state))

        # a NaN in one rank's gradient shard only: every rank skips the step (no rank steps alone into the
        # step's collectives), nothing changes, and training goes on
        import warnings

        model = sharded()
        opt = make_opt("full", model)
        train(model, opt, batches, 0, 1, rank, world)
        before_params = {n: p.detach().clone() for n, p in full_params(model).items()}
        x, y = local_slice(batches[1], rank, world)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if rank == 1:
            a = next(p for n, p in model.named_parameters() if "lora_A" in n)
            a.grad.to_local().view(-1)[0] = float("nan")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        meta["nan_warning"] = " ".join(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning))
        after = full_params(model)
        meta["nan_params_unchanged"] = all(torch.equal(before_params[n], after[n]) for n in before_params)
        train(model, opt, batches, 1, 2, rank, world)  # the next step runs on both ranks (would hang otherwise)
        meta["nan_then_trained"] = True

        try:
            LoRAProAdamW(sharded(), shard_state=True)
            meta["shard_state"] = "accepted"
        except ValueError as e:
            meta["shard_state"] = str(e)
        mesh_2d = init_device_mesh(device, (1, world), mesh_dim_names=("replicate", "shard"))
        hsdp = fully_shard_model(make_padded_model().to(device), mesh_2d)  # HSDP: (Replicate, Shard(0)) placements
        try:
            LoRAProAdamW(hsdp)
            meta["hsdp"] = "accepted"
        except ValueError as e:
            meta["hsdp"] = str(e)
        with open(os.path.join(out, f"meta_rank{rank}.json"), "w") as f:
            json.dump(meta, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
