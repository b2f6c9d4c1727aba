"""2-process (gloo, CPU) tests: DDP and sharded LoRA-Pro state reproduce the single-process run; checkpoints move
between world sizes. All 2-process scenarios run in one torchrun launch (worker_optim.py)."""

import copy
import functools
import json

import pytest
import torch

from dist_launch import HERE, accelerate_launch, torchrun
from dist_toy import global_batches, make_model, make_opt, params_of, train

from lorapro import LoRAProAdamW
from lorapro.distributed import PLACEHOLDER_KEY, optimizer_state_bytes, partition_by_cost

STEPS, SAVE_AT = 4, 2  # as in worker_optim.py
TOL = dict(rtol=2e-5, atol=2e-6)  # fp32: the all-reduced mean differs from the one-process mean in the last bits


@functools.lru_cache(maxsize=None)
def _single_process(kind, steps):
    model = make_model()
    opt = make_opt(kind, model)
    train(model, opt, global_batches(STEPS), 0, steps)
    return params_of(model), copy.deepcopy(opt.state_dict())


def single_process(kind, steps=STEPS):
    """(trainable parameters, optimizer state dict) of the one-process run with the global batch (copies)."""
    params, sd = _single_process(kind, steps)
    return copy.deepcopy(params), copy.deepcopy(sd)


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    params, sd = single_process("full", SAVE_AT)
    torch.save({"model": params, "optim": sd}, out / "ckpt_one.pt")
    torchrun([HERE / "worker_optim.py", out, out / "ckpt_one.pt"])
    meta = [json.loads((out / f"meta_rank{r}.json").read_text()) for r in range(2)]
    return out, meta


def load(out, name, rank):
    return torch.load(out / f"{name}_rank{rank}.pt", weights_only=True)


def assert_params_close(got, want, **tol):
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], **tol, msg=lambda m: f"{n}: {m}")


def assert_moved(model_params, kind):
    """Guard against a vacuous comparison: the run really changed the LoRA factors."""
    init = params_of(make_model())
    assert max((model_params[n] - init[n]).abs().max().item() for n in init) > 1e-3, kind


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["full", "efficient"])
def test_ddp_two_processes_match_one_process_with_the_global_batch(two_procs, kind):
    out, _ = two_procs
    want = single_process(kind)[0]
    assert_moved(want, kind)
    r0, r1 = load(out, f"ddp_{kind}", 0), load(out, f"ddp_{kind}", 1)
    assert_params_close(r0, want, **TOL)
    assert_params_close(r1, r0, rtol=0, atol=0)  # replicas stay bit-identical


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["full", "efficient", "factored", "sgd"])
def test_sharded_state_matches_one_process(two_procs, kind):
    out, meta = two_procs
    want = single_process(kind)[0]
    r0, r1 = load(out, f"sharded_{kind}", 0), load(out, f"sharded_{kind}", 1)
    assert_params_close(r0, want, **TOL)
    assert_params_close(r1, r0, rtol=0, atol=0)  # the broadcast keeps replicas identical
    assert sorted(meta[0][f"owners_{kind}"]) == [0, 0, 1, 1]  # whole pairs, two per rank
    assert meta[0][f"owners_{kind}"] == meta[1][f"owners_{kind}"]


@pytest.mark.distributed
def test_sharded_state_bytes_about_halve(two_procs):
    _, meta = two_procs
    for m in meta:
        assert m["bytes_sharded_full"] <= 0.6 * m["bytes_unsharded_full"], m
        assert m["bytes_after_load"] <= 0.6 * m["bytes_unsharded_full"], m  # load keeps only the owned pairs
    # the two ranks together hold exactly one copy of the LoRA-Pro state (+ the replicated head state)
    head = 2 * 3 * 16 * 4 + 4  # exp_avg + exp_avg_sq of the 3 x 16 head in fp32, plus its step counter
    assert meta[0]["bytes_sharded_full"] + meta[1]["bytes_sharded_full"] == meta[0]["bytes_unsharded_full"] + head


@pytest.mark.distributed
def test_state_dict_refuses_until_consolidated(two_procs):
    out, meta = two_procs
    assert "consolidate_state_dict" in meta[0]["unconsolidated_state_dict"]
    assert "consolidate_state_dict" in meta[1]["unconsolidated_state_dict"]
    # after consolidating to rank 0, rank 1's state_dict() is an empty, marked placeholder that no optimizer loads
    placeholder = torch.load(out / "placeholder_rank1.pt", weights_only=True)
    assert placeholder["state"] == {} and placeholder[PLACEHOLDER_KEY] == 0
    with pytest.raises(ValueError, match="placeholder"):
        make_opt("full", make_model()).load_state_dict(placeholder)


@pytest.mark.distributed
def test_save_on_two_processes_resume_on_one(two_procs):
    out, _ = two_procs
    ck = torch.load(out / "ckpt_two.pt", weights_only=True)
    ref_sd = single_process("full", SAVE_AT)[1]
    assert_state_dicts_equal(ck["optim"], ref_sd, **TOL)  # the consolidated checkpoint: unsharded format and content
    model = make_model()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in ck["model"]:
                p.copy_(ck["model"][n])
    opt = make_opt("full", model)
    opt.load_state_dict(ck["optim"])
    train(model, opt, global_batches(STEPS), SAVE_AT, STEPS)
    assert_params_close(params_of(model), single_process("full")[0], **TOL)


def assert_state_dicts_equal(got, want, **tol):
    assert got["state"].keys() == want["state"].keys()
    for i, st in want["state"].items():
        assert got["state"][i].keys() == st.keys(), i
        for k in st:
            torch.testing.assert_close(got["state"][i][k], st[k], **tol, msg=lambda m: f"state {i}, {k}: {m}")


@pytest.mark.distributed
def test_sharded_load_then_state_dict_is_refused_until_consolidated_then_complete(two_procs):
    out, meta = two_procs
    for m in meta:  # not a partial state (3 of the 5 entries) on either rank
        assert "consolidate_state_dict" in m["state_dict_after_load"], m["state_dict_after_load"]
        # a consolidation of step 1 taken before loading the step-2 checkpoint is stale
        assert "consolidate_state_dict" in m["state_dict_after_stale_consolidation"], m["state_dict_after_stale_consolidation"]
    ck = torch.load(out / "ckpt_one.pt", weights_only=True)
    reloaded = torch.load(out / "ckpt_reloaded.pt", weights_only=True)
    # 4 LoRA pairs (the pair's state on A, an empty entry for B: torch's DCP state-dict API wants one per factor)
    # + the head
    state = ck["optim"]["state"]
    assert len(state) == 9 and sum(1 for v in state.values() if v) == 5
    assert_state_dicts_equal(reloaded["optim"], ck["optim"], rtol=0, atol=0)  # loading moves, never changes


@pytest.mark.distributed
def test_sharded_load_step_save_matches_one_process(two_procs):
    out, _ = two_procs
    saved = torch.load(out / "ckpt_load_step_save.pt", weights_only=True)
    params, sd = single_process("full", SAVE_AT + 1)
    assert_params_close(saved["model"], params, **TOL)
    assert_state_dicts_equal(saved["optim"], sd, **TOL)


@pytest.mark.distributed
def test_save_on_one_process_resume_on_two(two_procs):
    out, _ = two_procs
    want = single_process("full")[0]
    for rank in (0, 1):
        assert_params_close(load(out, "resumed_from_one", rank), want, **TOL)


@pytest.mark.distributed
def test_accelerate_launch_sharded_matches_one_process_and_save_state_is_complete(tmp_path):
    pytest.importorskip("accelerate")
    accelerate_launch([HERE / "worker_accelerate.py", tmp_path])
    want, ref_sd = single_process("full")
    r0, r1 = (torch.load(tmp_path / f"accelerate_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_params_close(r0, want, **TOL)
    assert_params_close(r1, r0, rtol=0, atol=0)
    saved = torch.load(tmp_path / "accelerate_state" / "optimizer.bin", weights_only=True)
    assert saved["state"].keys() == ref_sd["state"].keys()  # every pair's state, gathered from both ranks
    for i, st in ref_sd["state"].items():
        for k in st:
            torch.testing.assert_close(saved["state"][i][k], st[k], **TOL)


# ---- no processes needed ---------------------------------------------------------------------------------------


def test_shard_state_without_process_group_is_a_clear_error():
    with pytest.raises(ValueError, match="init_process_group"):
        LoRAProAdamW(make_model(), shard_state=True)


def test_partition_is_balanced_deterministic_and_keeps_order_on_ties():
    assert partition_by_cost([512, 512, 256, 256], 2) == [0, 1, 0, 1]
    assert partition_by_cost([5, 1, 1, 1, 1, 1], 2) == [0, 1, 1, 1, 1, 1]
    costs = [4096 * 4096] * 4 * 32 + [11008 * 4096] * 3 * 32  # Llama-2-7B: q, k, v, o and gate, up, down
    for world in (2, 3, 8):
        owners = partition_by_cost(costs, world)
        load = [sum(c for c, o in zip(costs, owners) if o == k) for k in range(world)]
        assert max(load) <= sum(costs) / world + max(costs)  # the largest-first bound
        assert max(load) / min(load) < 1.05
        assert owners == partition_by_cost(costs, world)
    assert partition_by_cost([3, 2], 1) == [0, 0]


def test_optimizer_state_bytes_counts_every_tensor():
    model = make_model()
    opt = make_opt("full", model)
    train(model, opt, global_batches(1), 0, 1)
    # per layer exp_avg + exp_avg_sq of the m x n weight (fp32) + a step counter; plus AdamW on the 3 x 16 head
    lora = sum(2 * o * i * 4 + 4 for i, o in [(16, 32), (32, 16), (16, 16), (16, 16)])
    assert optimizer_state_bytes(opt) == lora + 2 * 3 * 16 * 4 + 4
