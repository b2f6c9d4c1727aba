"""The README's plain-PyTorch example runs and learns."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plain_pytorch_loop.py"


@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_plain_pytorch_loop_example_learns(mode):
    spec = importlib.util.spec_from_file_location("plain_pytorch_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    losses = module.main(["--steps", "12", "--lr", "5e-3", "--mode", mode])
    assert len(losses) == 12
    assert losses[-1] < 0.95 * losses[0]  # random-init tiny model: ~5.54 -> ~5.05 in 12 steps
