"""benchmarks/optimizer_step.py on tiny shapes: every case runs, state sizes are exact, the transcription of the
authors' formulation makes the same update as LoRAProAdamW(mode="full"), the CLI writes its table and JSON.

No wall-clock assertions: speed is measured by the benchmark itself, as ratios within one run.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "optimizer_step.py"


@pytest.fixture(scope="module")
def ob():
    spec = importlib.util.spec_from_file_location("optimizer_step_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


LAYERS = ((24, 16, 2), (20, 12, 1))  # (m, n, count)
RANK = 3


def _cfg(ob):
    return ob.BenchConfig(layers=LAYERS, rank=RANK)


def test_every_case_runs_with_exact_state_sizes(ob):
    cfg = _cfg(ob)
    results = ob.run(cfg, list(ob.CASES), rounds=2)
    assert set(results) == set(ob.CASES)
    for r in results.values():
        assert len(r.times) >= 1 and all(math.isfinite(t) and t > 0 for t in r.times)
        assert r.other_bytes is None or r.other_bytes >= 0

    fp32 = 4
    full = sum(count * 2 * m * n * fp32 for m, n, count in LAYERS)  # exp_avg + exp_avg_sq, m × n each
    factors = sum(count * 2 * (RANK * n + m * RANK) * fp32 for m, n, count in LAYERS)  # two moments per factor
    assert results["lorapro_full"].state_bytes == full
    assert results["adamw_full_weight"].state_bytes == full
    assert results["adamw_full_weight_fused"].state_bytes == full
    assert results["memcpy_roofline"].state_bytes == full  # the two moments it reads and writes
    assert results["authors_full"].state_bytes == full
    assert results["lorapro_efficient"].state_bytes == factors
    assert results["adamw_factors"].state_bytes == factors
    assert results["lorapro_efficient_fp32"].state_bytes == factors  # compute dtype does not change the state
    assert results["lorapro_efficient_fp64"].state_bytes == factors
    assert results["adamw_factors_fused"].state_bytes == factors
    assert results["lorapro_sgd"].state_bytes == 0  # no momentum: no state


def test_lora_cases_start_from_identical_factors(ob):
    cfg = _cfg(ob)
    a, b = ob.make_lora_layers(cfg), ob.make_lora_layers(cfg)
    assert len(a) == sum(c for _, _, c in LAYERS)
    for (A1, B1), (A2, B2) in zip(a, b):
        assert torch.equal(A1, A2) and torch.equal(B1, B2) and torch.equal(A1.grad, A2.grad)
        assert B1.abs().sum() > 0  # a trained, non-zero B: every term of the math is exercised


def test_authors_transcription_matches_lorapro_full(ob):
    # Same factors, same gradients: three steps of the transcription (m × m projector, complex eig, per-layer
    # loop) and of LoRAProAdamW(mode="full") give the same factors, so the benchmark compares like with like.
    cfg = _cfg(ob)
    ours, theirs = ob.CASES["lorapro_full"].setup(cfg), ob.CASES["authors_full"].setup(cfg)
    before = [p.detach().clone() for p in ours.params]
    for _ in range(3):
        ours.step()
        theirs.step()
    for p0, p, q in zip(before, ours.params, theirs.params):
        assert not torch.equal(p, p0)  # the step moved the factors
        torch.testing.assert_close(q, p, rtol=2e-4, atol=1e-7)


def test_authors_sylvester_solver(ob):
    g = torch.Generator().manual_seed(0)
    M = torch.randn(5, 5, generator=g, dtype=torch.float64)
    N = torch.randn(5, 5, generator=g, dtype=torch.float64)
    P, Q = M @ M.T + torch.eye(5, dtype=torch.float64), N @ N.T  # SPD + PSD: a unique solution
    C = torch.randn(5, 5, generator=g, dtype=torch.float64)
    X = ob.authors_solve_sylvester(P, Q, C)
    torch.testing.assert_close(P @ X + X @ Q, C, rtol=1e-9, atol=1e-10)


def test_fused_full_weight_case_matches_foreach(ob):
    # the fused and the foreach full-weight baselines make the same AdamW step from the same weights
    cfg = _cfg(ob)
    fused, foreach = ob.CASES["adamw_full_weight_fused"].setup(cfg), ob.CASES["adamw_full_weight"].setup(cfg)
    for _ in range(2):
        fused.step()
        foreach.step()
    for p, q in zip(fused.params, foreach.params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)


def test_memcpy_roofline_moves_both_moments_of_every_layer(ob, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "_foreach_mul_", lambda ts, x: seen.append([tuple(t.shape) for t in ts]))
    ob.CASES["memcpy_roofline"].setup(_cfg(ob)).step()
    assert seen == [[(m, n) for m, n, c in LAYERS for _ in range(c) for _ in range(2)]]


def test_registry_rejects_duplicates_and_unknown_cases(ob):
    with pytest.raises(ValueError, match="registered twice"):
        ob.register("lorapro_full", "again")(lambda cfg: None)
    with pytest.raises(ValueError, match="Unknown benchmark case"):
        ob.run(_cfg(ob), ["no_such_case"], rounds=1)


def test_cli_prints_table_and_writes_json(ob, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = ob.main(["--layers", "24x16:2,20x12:1", "--rank", "3", "--rounds", "2", "--json", str(out),
                  "--cases", "lorapro_full,lorapro_efficient,adamw_factors,adamw_full_weight"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| LoRA-Pro full" in text and "| LoRA-Pro efficient" in text
    assert "LoRA-Pro full / AdamW full-weight" in text and "LoRA-Pro efficient / AdamW on factors" in text
    assert "LoRA-Pro full / fused AdamW full-weight" not in text  # only ratios whose both cases ran
    assert "authors' formulation / LoRA-Pro full" not in text  # only ratios whose both cases ran
    data = json.loads(out.read_text())
    assert set(data["cases"]) == {"lorapro_full", "lorapro_efficient", "adamw_factors", "adamw_full_weight"}
    assert data["config"]["layers"] == [[24, 16, 2], [20, 12, 1]]
    for row in data["ratios"]:
        num, den = data["cases"][row["numerator"]], data["cases"][row["denominator"]]
        assert row["ratio"] == pytest.approx(num["median_s"] / den["median_s"])


def test_cli_rejects_bad_layers(ob):
    with pytest.raises(SystemExit):
        ob.main(["--layers", "4096by4096"])
