"""mode="factored": the factored math == the dense float64 reference, no m × n tensor in the step, checkpoints, dtypes.

Tolerances of the float64 comparisons: about 100x the error measured on our CPU, rounded to a power of ten (they sat
1e3-1e5x above it before). The optimizer's A and B against the reference measured ~1e-13 relative (the
eigendecompositions and the SVD of the rank-2r EMA), hence 1e-10 there.
"""

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from lorapro import LoRAProAdamW, lora_pairs
from lorapro import factored as FF
from lorapro import functional as F
from lorapro import reference as R
from toy_lora import backward, batches, peft_toy

peft = pytest.importorskip("peft")

f64 = torch.float64


def _factors(m, n, r, seed=0, zero_B=False, s=1.5):
    """A random LoRA problem and its equivalent-gradient factors (batch of one)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n, generator=g, dtype=f64)
    B = torch.zeros(m, r, dtype=f64) if zero_B else torch.randn(m, r, generator=g, dtype=f64)
    G = torch.randn(m, n, generator=g, dtype=f64)
    gA, gB = s * B.T @ G, s * G @ A.T
    grams = F.gram_inverses(A[None], B[None], 1e-8, f64)
    left, right = F.equivalent_gradient_factors(grams, gA[None], gB[None], torch.tensor([s], dtype=f64))
    hA0, hB0 = R.adjusted_gradients(A, B, gA, gB, s, 1e-8, "zero")
    return A, B, gA, gB, left, right, R.equivalent_gradient(A, B, hA0, hB0, s)


# -- the pieces against dense formulas -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(9, 7, 2), (5, 12, 3), (16, 16, 4)])
def test_square_sums_and_rms_match_dense(shape):
    m, n, r = shape
    *_, left, right, g_tilde = _factors(m, n, r, seed=sum(shape))
    row, col = FF.square_sums(left, right)
    torch.testing.assert_close(row[0], (g_tilde**2).sum(1), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(col[0], (g_tilde**2).sum(0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(FF.factored_rms(left, right)[0], g_tilde.pow(2).mean().sqrt(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("eps", [1e-8, 0.3])
def test_preconditioned_direction_and_projection_match_dense(eps):
    m, n, r, s = 11, 8, 2, 1.5
    A, B, _, _, left, right, g_tilde = _factors(m, n, r, seed=4, s=s)
    # a second moment with some history: v̂ = 0.3 g̃² + 0.7 (another g̃)²
    *_, left2, right2, g2 = _factors(m, n, r, seed=5, s=s)
    v_hat = 0.3 * g_tilde**2 + 0.7 * g2**2
    row = 0.3 * FF.square_sums(left, right)[0] + 0.7 * FF.square_sums(left2, right2)[0]
    col = 0.3 * FF.square_sums(left, right)[1] + 0.7 * FF.square_sums(left2, right2)[1]
    a, b = FF.preconditioner(row, col, eps)
    d_left, d_right = FF.scale_factors(left, right, a, b)
    V_hat = R.factored_second_moment(v_hat, eps)
    D = g_tilde / V_hat.sqrt()
    torch.testing.assert_close(d_left[0] @ d_right[0], D, rtol=1e-11, atol=1e-13)
    # V̂ is a rank-1 fit with the row / column sums of v̂ + ε² (what makes it Adafactor's estimate)
    torch.testing.assert_close(V_hat.sum(1), (v_hat + eps**2).sum(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(V_hat.sum(0), (v_hat + eps**2).sum(0), rtol=1e-12, atol=0)
    assert torch.linalg.matrix_rank(V_hat) == 1
    torch.testing.assert_close(FF.factored_rms(d_left, d_right)[0], D.pow(2).mean().sqrt(), rtol=1e-12, atol=0)
    uA, uB = FF.project(d_left, d_right, A[None], B[None], torch.tensor([s], dtype=f64))
    torch.testing.assert_close(uA[0], s * B.T @ D, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(uB[0], s * D @ A.T, rtol=1e-12, atol=1e-14)


def test_lowrank_ema_is_the_truncated_svd():
    m, n, r, k = 13, 10, 2, 4
    g = torch.Generator().manual_seed(0)
    M = torch.zeros(m, n, dtype=f64)
    P, Q = torch.zeros(1, m, k, dtype=f64), torch.zeros(1, k, n, dtype=f64)
    for step in range(4):
        # step 0 starts from zeros; step 1 feeds a rank-deficient g̃ (B = 0, as at PEFT initialisation)
        *_, left, right, g_tilde = _factors(m, n, r, seed=step, zero_B=(step == 1))
        M = R.truncate_rank(0.9 * M + 0.1 * g_tilde, k)
        P, Q = FF.lowrank_ema(torch.cat([P, left], -1), torch.cat([Q, right], -2), 0.9, k)
        torch.testing.assert_close(P[0] @ Q[0], M, rtol=1e-11, atol=1e-13, msg=f"step {step}")
        assert torch.isfinite(P).all() and torch.isfinite(Q).all()
        torch.testing.assert_close(P[0].T @ P[0], Q[0] @ Q[0].T, rtol=1e-9, atol=1e-12)  # balanced factors
    assert torch.linalg.matrix_rank(0.9 * M + 0.1 * g_tilde) > k  # the truncation really truncated


# -- the optimizer against the reference ---------------------------------------------------------------------------


class Net(nn.Module):
    """Two layers share a shape (10 x 10), so they go through one batched bucket."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(6, 10)
        self.mid1 = nn.Linear(10, 10)
        self.mid2 = nn.Linear(10, 10)
        self.down = nn.Linear(10, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.up(x))
        h = torch.tanh(self.mid2(torch.tanh(self.mid1(h))))
        return self.head(torch.tanh(self.down(h)))


def make_model(dtype=f64, seed=0, zero_B=False):
    torch.manual_seed(seed)
    return peft_toy(Net(), ["up", "mid1", "mid2", "down"], dtype=dtype, zero_B=zero_B, alpha_pattern={"mid2": 16})


CASES = [
    (dict(lr=1e-2, weight_decay=0.05), "sylvester"),
    (dict(lr=1e-2, clip_threshold=0.3, betas=(0.8, 0.9)), "symmetric"),
    (dict(lr=1e-2, clip_threshold=None, eps=1e-3), "zero"),
]


@pytest.mark.parametrize("hp,x", CASES)
def test_factored_matches_reference_step_by_step(hp, x):
    model = make_model()
    opt = LoRAProAdamW(model, mode="factored", x_solution=x, **hp)
    pairs = lora_pairs(model)
    ref = {p.name: (p.A.detach().clone(), p.B.detach().clone(), {}) for p in pairs}
    head = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    ref_head = {id(p): (p.detach().clone(), {}) for p in head}
    plain_hp = {k: v for k, v in hp.items() if k in ("lr", "betas", "weight_decay", "eps")}
    for step, batch in enumerate(batches(5)):
        opt.zero_grad()
        backward(model, batch)
        if step == 2:  # mid2 sits this step out: the two pairs of the 10 x 10 bucket then have different step counts
            skipped = next(p for p in pairs if ".mid2." in p.name)
            skipped.A.grad = skipped.B.grad = None
        for p in pairs:
            if p.A.grad is None:
                continue
            A, B, st = ref[p.name]
            newA, newB = R.adamw_factored_step(A, B, p.A.grad, p.B.grad, p.scaling, st, x_solution=x, **hp)
            ref[p.name] = (newA, newB, st)
        for p in head:
            val, st = ref_head[id(p)]
            ref_head[id(p)] = (R.adamw_plain_step(val, p.grad, st, **plain_hp), st)
        opt.step()
        for p in pairs:
            A, B, st = ref[p.name]
            msg = f"{p.name} at step {step}"
            torch.testing.assert_close(p.A.detach(), A, rtol=1e-10, atol=1e-12, msg=msg)
            torch.testing.assert_close(p.B.detach(), B, rtol=1e-10, atol=1e-12, msg=msg)
            ost = opt.state[p.A]
            assert ost["step"].item() == st["step"]
            torch.testing.assert_close(ost["exp_avg_sq_row"], st["exp_avg_sq"].sum(1), rtol=1e-12, atol=1e-17)
            torch.testing.assert_close(ost["exp_avg_sq_col"], st["exp_avg_sq"].sum(0), rtol=1e-12, atol=1e-17)
            torch.testing.assert_close(ost["exp_avg_left"] @ ost["exp_avg_right"], st["exp_avg"],
                                       rtol=1e-9, atol=1e-13, msg=msg)
        for p in head:
            torch.testing.assert_close(p.detach(), ref_head[id(p)][0], rtol=1e-12, atol=1e-14)
    assert opt.state[skipped.A]["step"].item() == 4


def test_clipping_bounds_the_step_direction():
    # With a tiny threshold the update is the clipped one: halving d halves the first step of every factor.
    steps = {}
    for d in (1e-3, 5e-4):
        model = make_model()
        opt = LoRAProAdamW(model, lr=1e-2, mode="factored", clip_threshold=d)
        backward(model, batches(1)[0])
        before = [(p.A.detach().clone(), p.B.detach().clone()) for p in lora_pairs(model)]
        opt.step()
        steps[d] = [(p.A.detach() - a, p.B.detach() - b) for p, (a, b) in zip(lora_pairs(model), before)]
    for (a1, b1), (a2, b2) in zip(steps[1e-3], steps[5e-4]):
        torch.testing.assert_close(a2, 0.5 * a1, rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(b2, 0.5 * b1, rtol=1e-9, atol=1e-15)
        assert b1.abs().max() > 0


def test_first_step_from_peft_init_B_zero():
    model = make_model(zero_B=True)
    opt = LoRAProAdamW(model, lr=1e-2, mode="factored", x_solution="zero")
    backward(model, batches(1)[0])
    before = [(p.A.detach().clone(), p.B.detach().clone()) for p in lora_pairs(model)]
    opt.step()
    for (A0, B0), p in zip(before, lora_pairs(model)):
        assert torch.isfinite(p.A).all() and torch.isfinite(p.B).all()
        torch.testing.assert_close(p.A.detach(), A0)  # ĝ_A = 0 when B = 0
        assert (p.B.detach() - B0).abs().max() > 1e-4


# -- memory: factor-sized state, no m × n tensor in the step -------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the shape of every tensor an op produces while active."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def _hand_pair(m=64, n=48, r=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    A = nn.Parameter(torch.randn(r, n, generator=g, dtype=dtype))
    B = nn.Parameter(torch.randn(m, r, generator=g, dtype=dtype))
    W0 = torch.randn(m, n, generator=g, dtype=dtype)
    x = torch.randn(5, n, generator=g, dtype=dtype)
    return A, B, W0, x


def test_no_m_by_n_tensor_in_the_step_and_state_is_factor_sized():
    m, n, r = 128, 96, 8  # r = 8 as in the 7B benchmark; (m + n)·4r < m·n
    A, B, W0, x = _hand_pair(m, n, r)
    opt = LoRAProAdamW([{"lora_pairs": [(A, B, 2.0)]}], lr=1e-3, mode="factored")
    full = LoRAProAdamW([{"lora_pairs": [(A, B, 2.0)]}], lr=1e-3, mode="full")
    for step in range(2):
        ((x @ (W0 + 2.0 * B @ A).T) ** 2).sum().backward()
        with LargestTensor() as rec:
            opt.step()
        biggest = max(rec.shapes, key=lambda s: torch.Size(s).numel())
        assert torch.Size(biggest).numel() <= (m + n) * 4 * r, biggest  # at most (m + n) x (k + 2r)
        assert not any(s[-2:] in ((m, n), (n, m)) for s in rec.shapes if len(s) >= 2)
        A.grad = B.grad = None
    state = [t for p in (A, B) for k, t in opt.state[p].items() if k != "step"]
    per_pair = (m + n) * (2 * r + 1)
    assert sum(t.numel() for t in state) == per_pair
    lora_adamw = 2 * (A.numel() + B.numel())  # plain LoRA AdamW: two moments per factor
    assert per_pair <= 1.1 * lora_adamw  # (2r + 1)/(2r) = 1.06 at r = 8
    # the same recorder does catch an m × n tensor (full mode forms g̃ and keeps m × n moments)
    ((x @ (W0 + 2.0 * B @ A).T) ** 2).sum().backward()
    with LargestTensor() as rec:
        full.step()
    assert any(s[-2:] == (m, n) for s in rec.shapes if len(s) >= 2)


# -- checkpoints and dtypes ----------------------------------------------------------------------------------------


def test_save_load_continue_equals_uninterrupted_bit_for_bit(tmp_path):
    data = batches(6, dtype=torch.float32)
    hp = dict(lr=1e-2, weight_decay=0.01, mode="factored")

    def run(model, opt, bs):
        for b in bs:
            opt.zero_grad()
            backward(model, b)
            opt.step()

    m1 = make_model(dtype=torch.float32)
    o1 = LoRAProAdamW(m1, **hp)
    run(m1, o1, data)

    m2 = make_model(dtype=torch.float32)
    o2 = LoRAProAdamW(m2, **hp)
    run(m2, o2, data[:3])
    torch.save({"model": m2.state_dict(), "optim": o2.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for g in ckpt["optim"]["param_groups"]:
        g["first_moment"] = "lowrank"  # what versions with the first_moment option wrote in every group
    m3 = make_model(dtype=torch.float32, seed=123)
    m3.load_state_dict(ckpt["model"])
    o3 = LoRAProAdamW(m3, **hp)
    o3.load_state_dict(ckpt["optim"])
    assert all("first_moment" not in g for g in o3.param_groups)
    run(m3, o3, data[3:])
    for (n1, p1), (n3, p3) in zip(m1.named_parameters(), m3.named_parameters()):
        assert n1 == n3
        assert torch.equal(p1, p3), n1


def test_checkpoint_of_the_removed_factor_first_moment_is_refused():
    model = make_model(dtype=torch.float32)
    opt = LoRAProAdamW(model, lr=1e-2, mode="factored")
    backward(model, batches(1, dtype=torch.float32)[0])
    opt.step()
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        g["first_moment"] = "factor"
    with pytest.raises(ValueError, match="first_moment='factor'.*removed"):
        LoRAProAdamW(model, lr=1e-2, mode="factored").load_state_dict(sd)
    with pytest.raises(TypeError):
        LoRAProAdamW(model, mode="factored", first_moment="factor")  # the option is gone


def test_bf16_parameters_stay_finite_and_keep_dtype():
    model = make_model(dtype=torch.bfloat16)
    opt = LoRAProAdamW(model, lr=1e-2, mode="factored")
    data = batches(1, dtype=torch.bfloat16)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        losses.append(backward(model, data[0]))
        opt.step()
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
        assert torch.isfinite(p.float()).all()
    st = opt.state[lora_pairs(model)[0].A]
    assert st["exp_avg_sq_row"].dtype == torch.float32
    assert losses[-1] < 0.9 * losses[0]


def test_state_dtype_bfloat16_option():
    model = make_model(dtype=torch.float32)
    opt = LoRAProAdamW(model, lr=1e-2, mode="factored", state_dtype=torch.bfloat16)
    backward(model, batches(1, dtype=torch.float32)[0])
    opt.step()
    st = opt.state[lora_pairs(model)[0].A]
    assert {t.dtype for k, t in st.items() if k != "step"} == {torch.bfloat16}
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("cdt,tol", [(None, dict(rtol=1e-4, atol=1e-5)), (torch.float32, dict(rtol=1e-3, atol=5e-5))])
def test_float32_work_close_to_float64(cdt, tol):
    # The default (float32 products, float64 small algebra) and compute_dtype=torch.float32 (all float32) follow the
    # float64 run over several steps; all-float32 less closely (its Gram-matrix route loses precision to cancellation).
    runs = []
    for c in (torch.float64, cdt):
        model = make_model(dtype=torch.float32)
        opt = LoRAProAdamW(model, lr=1e-2, mode="factored", compute_dtype=c)
        for b in batches(4, dtype=torch.float32):
            opt.zero_grad()
            backward(model, b)
            opt.step()
        runs.append([p.detach().clone() for p in lora_pairs(model) for p in (p.A, p.B)])
    init = [p.detach() for p in lora_pairs(make_model(dtype=torch.float32)) for p in (p.A, p.B)]
    for p64, p32, p0 in zip(*runs, init):
        assert (p64 - p0).abs().max() > 1e-3  # the factors moved
        torch.testing.assert_close(p32, p64, **tol)


def test_load_rejects_other_mode():
    model = make_model()
    opt = LoRAProAdamW(model, mode="factored")
    with pytest.raises(ValueError, match="mode"):
        LoRAProAdamW(model, mode="full").load_state_dict(opt.state_dict())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(clip_threshold=0.0), "clip_threshold"),
        (dict(clip_threshold=-1.0), "clip_threshold"),
    ],
)
def test_error_invalid_factored_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAProAdamW(make_model(), mode="factored", **kwargs)
