"""lorapro.config: strict typed configs with helpful errors."""

from dataclasses import dataclass
from typing import List, Literal, Optional

import pytest

from lorapro.config import ConfigError, field, help_text, load_config, to_dict


@dataclass
class Optim:
    lr: float = field(1e-4, help="learning rate")
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999], help="Adam betas")


@dataclass
class Cfg:
    method: Literal["lora", "lora-pro"] = field("lora", help="training method")
    steps: int = field(10, help="number of steps")
    out: Optional[str] = field(None, help="output dir")
    bf16: bool = field(False, help="bfloat16")
    optim: Optim = field(default_factory=Optim, help="optimizer settings")


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("method: lora-pro\noptim:\n  lr: 2e-5\n")
    cfg = load_config(Cfg, p, ["steps=20", "optim.betas=[0.8, 0.9]", "bf16=true", "out=null"])
    assert cfg.method == "lora-pro" and cfg.steps == 20 and cfg.bf16 is True and cfg.out is None
    assert cfg.optim.lr == 2e-5 and cfg.optim.betas == [0.8, 0.9]
    assert to_dict(cfg)["optim"] == {"lr": 2e-5, "betas": [0.8, 0.9]}


def test_unknown_key_names_the_closest(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'optim.lr'"):
        load_config(Cfg, None, ["optim.lrr=1"])
    p = tmp_path / "c.yaml"
    p.write_text("stepz: 3\n")
    with pytest.raises(ConfigError, match="Unknown config key 'stepz'. Did you mean 'steps'"):
        load_config(Cfg, p)


def test_type_errors_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="steps: expected an integer"):
        load_config(Cfg, None, ["steps=1.5"])
    with pytest.raises(ConfigError, match="not one of"):
        load_config(Cfg, None, ["method=dora-pro"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Cfg, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Cfg, None, ["steps"])


def test_help_lists_every_key():
    text = help_text(Cfg)
    for key in ("method", "steps", "out", "bf16", "optim.lr", "optim.betas"):
        assert key in text
    assert "learning rate" in text
