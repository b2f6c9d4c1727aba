"""LoRA-Pro under DeepSpeed ZeRO stage 1, 2 and 3 (2 gloo processes on CPU) equals the 1-process optimizer.

Tolerance: DeepSpeed averages the two ranks' gradients (each the mean over its half of the global batch) where the
1-process run takes the mean over the whole batch, so the gradients differ by float32 rounding (~1e-7 relative);
four LoRA-Pro steps amplify that through the Gram inverses and Adam's division by √v (small early on). Measured
differences are ≤ 1e-7 absolute on parameters that moved by 0.03-0.14; the bound below (rtol 2e-5, atol 2e-6, as for
DDP and ZeRO-0) is 20× that and still 1000× below the smallest step — a wrong lr, weight decay, missing pair or
unclipped step shows up as a difference of order 1e-3 or more.

Skipped when DeepSpeed is not installed (``pip install deepspeed`` with ``DS_BUILD_OPS=0`` is enough on CPU)."""

import json

import pytest
import torch

pytest.importorskip("deepspeed")

from dist_launch import HERE, torchrun  # noqa: E402
from dist_toy import STEPS_DEFAULT as STEPS, global_batches, make_model, make_opt, params_of  # noqa: E402

from lorapro.distributed import optimizer_state_bytes  # noqa: E402

TOL = dict(rtol=2e-5, atol=2e-6)
from worker_deepspeed import CLIP  # noqa: E402

pytestmark = pytest.mark.distributed


def launch(tmp_path_factory, suite):
    out = tmp_path_factory.mktemp(suite)
    torchrun([HERE / "worker_deepspeed.py", out, suite], timeout=500)
    return out, [json.loads((out / f"meta_rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def zero12(tmp_path_factory):
    return launch(tmp_path_factory, "zero12")


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    return launch(tmp_path_factory, "zero3")


def load(out, name, rank):
    return torch.load(out / f"{name}_rank{rank}.pt", weights_only=True)


def one_process(kind, clip=None):
    """The reference: one process, the whole global batch per step, optionally clipping the raw gradients."""
    model = make_model()
    opt = make_opt(kind, model)
    for step, (x, y) in enumerate(global_batches(STEPS)):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
        opt.step()
    return params_of(model), optimizer_state_bytes(opt)


def close(got, want, **tol):
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], **tol, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("name", ["z1_full", "z1_efficient", "z2_full", "z2_efficient", "z2_factored", "z2_sgd",
                                  "z2_offload"])
def test_zero12_matches_one_process(zero12, name):
    out, meta = zero12
    kind = {"offload": "full"}.get(name.split("_")[1], name.split("_")[1])
    want, _ = one_process(kind)
    for rank in (0, 1):
        close(load(out, name, rank), want, **TOL)
    assert meta[0][f"wrapper_{name}"] == "DeepSpeedZeroOptimizer"  # DeepSpeed's own ZeRO-1/2 optimizer ran


@pytest.mark.parametrize("name", ["z3_full", "z3_efficient", "z3_offload"])
def test_zero3_matches_one_process(zero3, name):
    out, meta = zero3
    want, _ = one_process("efficient" if name == "z3_offload" else name.split("_")[1])
    for rank in (0, 1):
        close(load(out, name, rank), want, **TOL)
    assert meta[0][f"wrapper_{name}"] == "DeepSpeedZeroOptimizer_Stage3"


def test_clipping_and_accumulation_match_one_process_clipped_by_the_raw_gradient_norm(zero12):
    out, _ = zero12
    want, _ = one_process("full", clip=CLIP)
    unclipped, _ = one_process("full")
    got = load(out, "z2_clip_accum", 0)
    close(got, want, **TOL)
    assert max(float((want[n] - unclipped[n]).abs().max()) for n in want) > 1e-3  # the clipping was active


@pytest.mark.parametrize("suite,name", [("zero12", "z1_full"), ("zero12", "z2_full"), ("zero3", "z3_full")])
def test_full_mode_state_per_rank_is_half(request, suite, name):
    _, meta = request.getfixturevalue(suite)
    _, single = one_process("full")
    per_rank = [m[f"state_bytes_{name}"] for m in meta]
    # the toy's pairs split 768 / 768 moment elements; the head's AdamW state is split by ZeRO's partition
    assert all(0.45 < b / single < 0.56 for b in per_rank), (per_rank, single)
    assert sum(per_rank) == pytest.approx(single, rel=0.05)


def test_bf16_stage2_steps_like_fp32(zero12):
    out, _ = zero12
    got, (want, _) = load(out, "z2_bf16", 0), one_process("full")
    init = params_of(make_model())
    for n in want:  # bf16 forward/backward and gradient reduction; the LoRA-Pro step on the fp32 masters
        d, ref = (got[n] - init[n]).flatten(), (want[n] - init[n]).flatten()
        assert torch.nn.functional.cosine_similarity(d, ref, dim=0) > 0.99, n  # measured ≥ 0.995
        assert 0.97 < d.norm() / ref.norm() < 1.03, n  # measured 0.99-1.01
    assert got.keys() == want.keys()


@pytest.mark.parametrize("suite,name", [("zero12", "z2_resumed"), ("zero3", "z3_resumed")])
def test_checkpoint_resume_equals_uninterrupted(request, suite, name):
    out, _ = request.getfixturevalue(suite)
    want, _ = one_process("full")
    for rank in (0, 1):
        close(load(out, name, rank), want, **TOL)


def test_what_cannot_work_is_refused_with_the_alternative(zero12, zero3):
    for m in zero12[1]:
        assert "DeepSpeedLoRAProAdamW" in m["plain_at_stage2"]
        assert "flattened or partitioned" in m["direct_stage2"] and "DeepSpeedLoRAProAdamW" in m["direct_stage2"]
    for m in zero3[1]:
        assert "sub_group_size" in m["split_sub_groups"]


def test_one_ranks_zero_state_dict_refuses_another_world_size_and_shard_state_is_refused():
    """A single rank's state dict holds only that rank's pairs and slices: loading it alone on another number of
    processes would drop the rest, so it is refused with the way that works (load_checkpoint reads every rank's)."""
    from lorapro.integrations.deepspeed import ZERO_STATE_KEY, DeepSpeedLoRAProAdamW

    model = make_model()
    opt = DeepSpeedLoRAProAdamW(model, lr=1e-2)
    sd = opt.state_dict()
    sd[ZERO_STATE_KEY] = {"world_size": 2, "pairs": {}, "plain": {}}  # as written by each of 2 ranks
    with pytest.raises(ValueError, match="saved by 2 data-parallel processes.*loaded by 1.*load_checkpoint"):
        opt.load_state_dict(sd)
    with pytest.raises(ValueError, match="drop shard_state"):
        DeepSpeedLoRAProAdamW(model, lr=1e-2, shard_state=True)


def test_incomplete_sets_of_rank_states_are_refused(tmp_path):
    from lorapro.integrations.deepspeed import ZERO_STATE_KEY, DeepSpeedLoRAProAdamW, checkpoint_world_size

    (tmp_path / "latest").write_text("global_step2")
    folder = tmp_path / "global_step2"
    folder.mkdir()
    assert checkpoint_world_size(tmp_path) is None  # stage 0: no ZeRO optimizer files
    for r in (0, 2):  # rank 1's file is missing
        (folder / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"ranks \[0, 2\]: some are missing"):
        checkpoint_world_size(tmp_path)
    (folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert checkpoint_world_size(tmp_path, "global_step2") == 3

    opt = DeepSpeedLoRAProAdamW(make_model(), lr=1e-2)
    sd = opt.state_dict()
    sd[ZERO_STATE_KEY] = {"world_size": 2, "pairs": {}, "plain": {}}
    with pytest.raises(ValueError, match="Got 1 ranks' state dicts.*saved by \\[2\\]"):
        opt.load_zero_shards([sd])  # the other rank's file is missing
    sd[ZERO_STATE_KEY]["world_size"] = 1
    for g in sd["param_groups"]:
        if g["lora"]:
            g["mode"] = "efficient"
    with pytest.raises(ValueError, match="checkpoint has mode='efficient', this optimizer 'full'"):
        opt.load_zero_shards([sd])  # a checkpoint of another mode


def test_universal_checkpoints_are_refused():
    from lorapro.integrations.deepspeed import check_deepspeed_config

    with pytest.raises(ValueError, match="load_universal.*LoRA-Pro's per-pair state.*load_checkpoint"):
        check_deepspeed_config({"zero_optimization": {"stage": 2}, "checkpoint": {"load_universal": True}})


# -- resharded resume: save on 2 processes, load on 1, save there, load on 2 (and 1 -> 2) ---------------------------

RESHARDED = ["z1_full", "z2_full", "z2_efficient", "z2_factored", "z2_sgd", "z2_offload", "z3_full", "z3_efficient"]


@pytest.fixture(scope="module")
def reshard(tmp_path_factory):
    out = tmp_path_factory.mktemp("reshard")
    for suite, nproc in (("reshard_save", 2), ("reshard_one", 1), ("reshard_two", 2)):
        torchrun([HERE / "worker_deepspeed.py", out, suite], nproc=nproc, timeout=500)
    meta = {}  # rank 0's, of the three launches
    for suite in ("reshard_save", "reshard_one", "reshard_two"):
        meta.update(json.loads((out / f"meta_{suite}_rank0.json").read_text()))
    return out, meta


@pytest.mark.parametrize("name", RESHARDED)
def test_resharded_resume_equals_uninterrupted(reshard, name):
    """2 -> 1, 2 -> 1 -> 2 and 1 -> 2 processes, then on to step 4, give the parameters of the uninterrupted run
    (the 1-process optimizer, which the uninterrupted 2-process ZeRO runs match: test_zero12_matches_one_process,
    test_zero3_matches_one_process). Tolerance as above (TOL). Measured: <= 6e-8 absolute. The loading model has
    other initial weights (frozen ones too), so every weight must come from the checkpoint. A pair whose state was
    dropped or given to another pair restarts Adam's moments (a step of ~lr = 1e-2 instead of the continued one)
    or momentum: off by >= 2e-3 (measured by breaking the load: 2e-3 to 7e-2)."""
    out, meta = reshard
    want, _ = one_process({"offload": "full"}.get(name.split("_")[1], name.split("_")[1]))
    for how, ranks in (("2to1", (0,)), ("2to1to2", (0, 1)), ("1to2", (0, 1))):
        for rank in ranks:
            close(load(out, f"{name}_{how}", rank), want, **TOL)
    assert meta[f"global_steps_{name}_w2"] == 2 and meta[f"global_steps_{name}_w1"] == 3


def test_resharded_resume_restores_the_fp32_masters_of_a_bf16_run(reshard):
    """In bf16 the module holds bf16 copies; the fp32 masters come back exactly from the partitions (with fp32
    weights the module's copies are exact, so only bf16 shows a load that forgot them)."""
    out, _ = reshard
    saved = load(out, "z2_bf16_saved_w2", 0)
    loaded = load(out, "z2_bf16_loaded_w1", 0)
    close(loaded, saved, rtol=0, atol=0)
    assert max(float((p - p.bfloat16().float()).abs().max()) for p in saved.values()) > 1e-4  # not bf16 values
