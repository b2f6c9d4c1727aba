"""Every shipped sweep file (configs/sweeps/) loads, and every task's `lorapro train` config validates."""

from pathlib import Path

import pytest

from lorapro.sweep.cli import _load
from lorapro.sweep.runner import Sweep, load_base

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))


def test_there_are_sweep_configs():
    assert {p.stem for p in SWEEPS} >= {"glue_minilm", "gsm8k_smollm2", "mrpc_minilm_5seeds"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_config_validates(path, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)  # data paths in the sweep files are relative to the repository root
    cfg = _load(str(path.relative_to(ROOT)))
    sweep = Sweep(cfg, tmp_path / "s", load_base(cfg))
    sweep.check()  # every task: a valid train config with an eval set and a test set
    assert len(cfg.seeds) >= 3 and all(len(cfg.lrs.get(m, cfg.lrs["default"])) >= 4 for m in cfg.methods)
    if cfg.eval_config:
        assert cfg.resolve(cfg.eval_config).is_file()
