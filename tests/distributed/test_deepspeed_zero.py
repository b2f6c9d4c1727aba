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


def test_a_zero_checkpoint_refuses_another_world_size_and_shard_state_is_refused():
    from lorapro.integrations.deepspeed import ZERO_STATE_KEY, DeepSpeedLoRAProAdamW

    model = make_model()
    opt = DeepSpeedLoRAProAdamW(model, lr=1e-2)
    sd = opt.state_dict()
    sd[ZERO_STATE_KEY] = {"world_size": 2, "pairs": {}}  # as written by each of 2 ranks
    with pytest.raises(ValueError, match="saved by 2 data-parallel processes.*loaded by 1.*shard_state=True"):
        opt.load_state_dict(sd)
    with pytest.raises(ValueError, match="drop shard_state"):
        DeepSpeedLoRAProAdamW(model, lr=1e-2, shard_state=True)


def test_without_zero_it_is_the_lorapro_optimizer():
    from lorapro.integrations.deepspeed import DeepSpeedLoRAProAdamW

    want, _ = one_process("full")
    model = make_model()
    opt = DeepSpeedLoRAProAdamW(model, **{k: make_opt("full", model).defaults[k] for k in ("lr", "weight_decay")})
    for x, y in global_batches(STEPS):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    close(params_of(model), want, rtol=0, atol=0)


def test_an_unknown_deepspeed_partition_layout_is_a_clear_error():
    from types import SimpleNamespace

    from lorapro.integrations.deepspeed import _local_slices

    flat = torch.zeros(8)
    with pytest.raises(RuntimeError, match="partition layout.*neither _hp_mapping nor ds_id"):
        _local_slices([torch.zeros(2, 2)], flat, 0)
    factor = torch.zeros(2, 2)
    factor._hp_mapping = SimpleNamespace(param_group_index=0)  # a release whose mapping lacks the fragment fields
    with pytest.raises(RuntimeError, match="partition layout.*AttributeError.*ZeRO stage 0"):
        _local_slices([factor], flat, 0)
