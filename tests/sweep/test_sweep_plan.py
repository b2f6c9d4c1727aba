"""The sweep's two-stage plan (lr search with edge extension, then seeds) and its config checks — pure logic."""

import math

import pytest

from lorapro.config import ConfigError, from_dict
from lorapro.sweep.config import SweepConfig
from lorapro.sweep.runner import RunKey, plan_pair


def cfg(**kw):
    d = {"base": {}, "methods": ["lora"], "lrs": {"default": [1e-4, 1e-3, 1e-2]}, "seeds": [0, 1, 2], "extend": 2}
    d.update(kw)
    return from_dict(SweepConfig, d)


def results_from(scores, seeds=(0,), metric="loss"):
    """{RunKey: metrics} with eval ``metric`` = scores[lr] (+ seed/100 so seeds differ)."""
    out = {}
    for lr, v in scores.items():
        for s in seeds:
            out[RunKey("t", "lora", lr, s)] = None if v is None else {"eval": {metric: v + s / 100}}
    return out


def test_first_plan_is_the_grid_with_the_search_seed():
    p = plan_pair(cfg(), "t", "lora", {})
    assert p.stage == "search"
    assert p.needed == [RunKey("t", "lora", lr, 0) for lr in (1e-4, 1e-3, 1e-2)]


def test_interior_best_goes_to_seed_stage():
    res = results_from({1e-4: 0.9, 1e-3: 0.5, 1e-2: 0.7})
    p = plan_pair(cfg(), "t", "lora", res)
    assert (p.stage, p.best_lr, p.extensions) == ("seeds", 1e-3, 0)
    assert p.needed == [RunKey("t", "lora", 1e-3, 1), RunKey("t", "lora", 1e-3, 2)]


def test_best_at_upper_edge_extends_the_grid_by_its_own_ratio():
    res = results_from({1e-4: 0.9, 1e-3: 0.7, 1e-2: 0.5})
    p = plan_pair(cfg(), "t", "lora", res)
    assert p.stage == "search" and p.extensions == 1
    assert p.grid == [1e-4, 1e-3, 1e-2, 0.1]
    assert p.needed == [RunKey("t", "lora", 0.1, 0)]


def test_best_at_lower_edge_extends_downwards_and_stops_after_extend_steps():
    res = results_from({1e-4: 0.1, 1e-3: 0.7, 1e-2: 0.9, 1e-5: 0.05, 1e-6: 0.01})
    p = plan_pair(cfg(extend=2), "t", "lora", res)
    assert p.grid == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2]
    assert p.extensions == 2 and p.best_lr == 1e-6 and p.stage == "seeds"
    res.update(results_from({1e-6: 0.01}, seeds=(1, 2)))
    p = plan_pair(cfg(extend=2), "t", "lora", res)
    assert p.stage == "done" and p.chosen_lr == 1e-6 and p.at_edge  # still at the edge: flagged


def test_higher_is_better_metric_and_failed_runs_count_as_worst():
    res = results_from({1e-4: 0.80, 1e-3: None, 1e-2: 0.85}, metric="accuracy")
    res[RunKey("t", "lora", 1e-3, 0)] = None  # failed run
    p = plan_pair(cfg(select="accuracy", extend=0), "t", "lora", res)
    assert p.best_lr == 1e-2 and p.stage == "seeds"


def test_non_finite_metric_counts_as_worst():
    res = results_from({1e-4: 0.9, 1e-3: math.nan, 1e-2: 0.95})
    p = plan_pair(cfg(extend=0), "t", "lora", res)
    assert p.best_lr == 1e-4


def test_every_run_failed_means_nothing_to_choose():
    res = {RunKey("t", "lora", lr, 0): None for lr in (1e-4, 1e-3, 1e-2)}
    p = plan_pair(cfg(), "t", "lora", res)
    assert p.stage == "failed" and p.needed == [] and p.chosen_lr is None


def test_best_and_neighbour_runs_seeds_at_both_and_chooses_on_the_mean():
    c = cfg(final="best_and_neighbour", extend=0, lrs={"default": [1e-4, 1e-3, 1e-2, 1e-1]})
    res = results_from({1e-4: 0.9, 1e-3: 0.50, 1e-2: 0.52, 1e-1: 0.8})
    p = plan_pair(c, "t", "lora", res)
    assert p.final_lrs == [1e-3, 1e-2]
    assert set(p.needed) == {RunKey("t", "lora", lr, s) for lr in (1e-3, 1e-2) for s in (1, 2)}
    # seeds 1 and 2 make 1e-2 better on average than 1e-3
    for s in (1, 2):
        res[RunKey("t", "lora", 1e-3, s)] = {"eval": {"loss": 0.60}}
        res[RunKey("t", "lora", 1e-2, s)] = {"eval": {"loss": 0.40}}
    p = plan_pair(c, "t", "lora", res)
    assert p.stage == "done" and p.chosen_lr == 1e-2 and not p.at_edge


def test_plan_is_deterministic_and_lrs_are_rounded_to_three_digits():
    c = cfg(lrs={"default": [1e-4, 3.1623e-4, 1e-3]}, extend=1)
    res = results_from({1e-4: 0.9, 3.16e-4: 0.8, 1e-3: 0.7})
    p1, p2 = plan_pair(c, "t", "lora", res), plan_pair(c, "t", "lora", res)
    assert p1 == p2
    assert p1.grid == [1e-4, 3.16e-4, 1e-3, 3.16e-3]


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"methods": ["lora-pr"]}, "Did you mean 'lora-pro'"),
        ({"methods": ["lora", "lora"]}, "listed twice"),
        ({"lrs": {"default": [1e-3, 1e-4]}}, "strictly ascending"),
        ({"lrs": {"default": [1e-3]}}, "at least 2 values"),
        ({"lrs": {"default": [0.0, 1e-3]}}, "positive numbers"),
        ({"lrs": {"lora": [1e-4, 1e-3], "full": [1e-5, 1e-4]}}, "not in methods"),
        ({"lrs": {"full": [1e-5, 1e-4]}, "methods": ["full", "lora"]}, "no lr grid for 'lora'"),
        ({"seeds": []}, "distinct seeds"),
        ({"tasks": {"a/b": {}}}, "names a folder"),
    ],
)
def test_bad_sweep_configs_say_what_to_fix(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        cfg(**kw)
