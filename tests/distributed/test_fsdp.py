"""2-process (gloo, CPU) FSDP2 tests: ``fully_shard`` models stepped by LoRA-Pro in every mode reproduce the
one-process run; full-mode state halves per rank; DCP checkpoints resume exactly, also resharded 2 -> 1 -> 2.

The toy (fsdp_toy.py) has uneven shards (rows 8 + 7, 2 + 1), so FSDP2's padded shards are in every scenario.
"""

import copy
import functools
import json

import pytest
import torch

from dist_launch import HERE, torchrun
from dist_toy import global_batches, make_opt, train
from fsdp_toy import full_params, make_padded_model

from lorapro.distributed import optimizer_state_bytes
from lorapro.fsdp import load_checkpoint, row_range, save_checkpoint

KINDS = ("full", "efficient", "factored", "sgd")
STEPS, SAVE_AT = 4, 2  # as in worker_fsdp.py
# float32 throughout. FSDP2 reduce-scatters the two ranks' gradients (summed in another order than one process's
# batch mean) and full mode sums u_A = s·Bᵀ·D over the ranks' row blocks: last-bit differences (measured ≤ 1e-7 on
# these parameters of size ~0.3) that Adam's division by √v can amplify over the 4 steps. The same tolerance as the
# DDP tests; a real error (a row block applied twice, a missing all-reduce, a wrong shard) is 1e-3 or more.
TOL = dict(rtol=2e-5, atol=2e-6)


@functools.lru_cache(maxsize=None)
def _single_process(kind, steps):
    model = make_padded_model()
    opt = make_opt(kind, model)
    train(model, opt, global_batches(STEPS), 0, steps)
    return full_params(model), optimizer_state_bytes(opt), copy.deepcopy(opt.state_dict())


def single_process(kind, steps=STEPS):
    params, nbytes, _ = _single_process(kind, steps)
    return copy.deepcopy(params), nbytes


def assert_params_close(got, want):
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], **TOL, msg=lambda m: f"{n}: {m}")


def resume_on_one_process(out, kind):
    """2 -> 1: load the 2-process DCP checkpoint into a plain (unsharded) model, take one step, save for 1 -> 2."""
    model = make_padded_model(seed=1)  # other weights: the checkpoint must overwrite them
    opt = make_opt(kind, model)
    load_checkpoint(str(out / f"dcp_two_{kind}"), model, opt)
    train(model, opt, global_batches(STEPS), SAVE_AT, SAVE_AT + 1)
    save_checkpoint(str(out / f"dcp_one_{kind}"), model, opt)
    return full_params(model)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    for kind in KINDS:  # a plain (consolidated) checkpoint of one unsharded process at step SAVE_AT
        params, _, sd = _single_process(kind, SAVE_AT)
        torch.save({"model": params, "optim": sd}, out / f"one_process_{kind}.pt")
    torchrun([HERE / "worker_fsdp.py", out, "train"])
    one = {kind: resume_on_one_process(out, kind) for kind in KINDS}
    torchrun([HERE / "worker_fsdp.py", out, "reshard"])
    meta = [json.loads((out / f"meta_rank{r}.json").read_text()) for r in range(2)]
    return out, meta, one


@pytest.mark.distributed
@pytest.mark.parametrize("kind", KINDS)
def test_fsdp2_matches_one_process(fsdp_runs, kind):
    out, meta, _ = fsdp_runs
    want = single_process(kind)[0]
    init = full_params(make_padded_model())
    assert max((want[n] - init[n]).abs().max().item() for n in init) > 1e-3  # the run really moved the factors
    assert_params_close(torch.load(out / f"fsdp_{kind}.pt", weights_only=True), want)
    # every state tensor with a dimension is a DTensor (sharded with the parameters); only step counters are not
    for m in meta:
        assert all(s.endswith(":DTensor") or s.startswith("step:") for s in m[f"state_kinds_{kind}"]), m


# Runs of the worker that must end where the uninterrupted one-process run ends (OUT/<variant>_<kind>.pt).
VARIANTS = {
    "resumed": "DCP checkpoint at step 2 on 2 processes, resumed on 2 processes (resume == uninterrupted)",
    "from_plain": "optimizer.load_state_dict of one unsharded process's torch.save state: each rank keeps its rows",
    "swapped": "optimizer built before fully_shard, parameters swapped for the DTensors (accelerate's FSDP2 order)",
}


@pytest.mark.distributed
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fsdp2_runs_end_where_one_process_ends(fsdp_runs, variant, kind):
    out, _, _ = fsdp_runs
    assert_params_close(torch.load(out / f"{variant}_{kind}.pt", weights_only=True), single_process(kind)[0])


@pytest.mark.distributed
@pytest.mark.parametrize("kind", KINDS)
def test_fsdp2_plain_group_mixing_sharded_and_plain_tensors(fsdp_runs, kind):
    out, _, _ = fsdp_runs
    model = make_padded_model(train_biases=True)
    opt = make_opt(kind, model)
    train(model, opt, global_batches(STEPS), 0, STEPS)
    want = full_params(model)
    assert any("bias" in n for n in want)
    assert_params_close(torch.load(out / f"partial_{kind}.pt", weights_only=True), want)


@pytest.mark.distributed
@pytest.mark.parametrize("kind", KINDS)
def test_fsdp2_checkpoint_reshards_two_to_one_to_two(fsdp_runs, kind):
    out, _, one = fsdp_runs
    assert_params_close(one[kind], single_process(kind, SAVE_AT + 1)[0])  # 2 -> 1, one step on one process
    assert_params_close(torch.load(out / f"reshard_{kind}.pt", weights_only=True), single_process(kind)[0])


@pytest.mark.distributed
def test_fsdp2_full_mode_state_halves_per_rank(fsdp_runs):
    _, meta, _ = fsdp_runs
    single = single_process("full")[1]
    print("full-mode state bytes per rank:", [m["bytes_full"] for m in meta], "one process:", single)
    for m in meta:
        assert m["bytes_full"] <= 0.6 * single, (m["bytes_full"], single)
    # the two ranks hold exactly one copy of every moment (rows 8 + 7 of each 15-row one, ...) plus their own
    # replicated step counters (4 LoRA pairs + the head, 4 bytes each)
    assert meta[0]["bytes_full"] + meta[1]["bytes_full"] == single + 5 * 4
    # factor-sized modes: sharded too
    for kind in ("efficient", "factored", "sgd"):
        assert meta[0][f"bytes_{kind}"] + meta[1][f"bytes_{kind}"] <= single_process(kind)[1] + 5 * 4


@pytest.mark.distributed
def test_fsdp2_error_inside_the_step_keeps_the_state_on_the_parameters(fsdp_runs):
    _, meta, _ = fsdp_runs
    for m in meta:
        assert m["error"] == "injected" and m["state_kept"] is True


@pytest.mark.distributed
def test_fsdp2_nan_in_one_ranks_shard_skips_the_step_on_every_rank(fsdp_runs):
    _, meta, _ = fsdp_runs
    assert "skipped" in meta[0]["nan_warning"] and "another rank" in meta[0]["nan_warning"]
    assert "skipped" in meta[1]["nan_warning"] and "another rank" not in meta[1]["nan_warning"]  # names its own
    for m in meta:
        assert m["nan_params_unchanged"] is True and m["nan_then_trained"] is True


@pytest.mark.distributed
def test_fsdp2_refusals_name_the_alternative(fsdp_runs):
    _, meta, _ = fsdp_runs
    for m in meta:
        assert "Drop shard_state" in m["shard_state"]
        assert "2-D mesh" in m["hsdp"] and "fully_shard on a 1-D mesh" in m["hsdp"]


def test_row_range_is_torch_chunk():
    for rows in (0, 1, 3, 4, 15, 16):
        for world in (1, 2, 3, 4, 8):
            chunks = torch.arange(rows).chunk(world) if rows else ()
            got = [row_range(rows, k, world) for k in range(world)]
            want = [(int(c[0]), int(c[-1]) + 1) for c in chunks if c.numel()]
            assert [g for g in got if g[1] > g[0]] == want
            assert sum(hi - lo for lo, hi in got) == rows
