"""``train.fsdp``: the TrainingArguments that turn on accelerate's FSDP2 plugin, and the runs it refuses.

The run itself needs GPUs (accelerate enables FSDP on accelerators only): tests/distributed/test_train_fsdp.py runs
it on CPU with that check flipped, tests/test_cuda.py on two or more GPUs (scripts/gpu_check.sh).
"""

import pytest
import torch

from lorapro.finetune.config import ConfigError, TrainConfig
from lorapro.finetune.runner import _fsdp_arguments


class _Available:
    def __init__(self, yes: bool) -> None:
        self.yes = yes

    def is_available(self) -> bool:
        return self.yes


def test_fsdp_arguments_select_fsdp2_on_accelerators(monkeypatch):
    monkeypatch.setattr(torch, "accelerator", _Available(True), raising=False)
    kw = _fsdp_arguments(world=8)
    assert kw["fsdp"] in (True, "full_shard")
    assert kw["fsdp_config"]["state_dict_type"] == "SHARDED_STATE_DICT"  # DCP checkpoints
    assert kw["fsdp_config"]["fsdp_version"] == 2  # FSDP1 would hide the LoRA factors in flat parameters
    assert kw["fsdp_config"]["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    from lorapro.integrations.distributed import check_trainer_args

    class Args:
        fsdp, fsdp_config, deepspeed = kw["fsdp"], kw["fsdp_config"], None

    check_trainer_args(Args())  # the LoRA-Pro optimizer factory accepts what train.fsdp asks for


def test_fsdp_on_cpu_or_one_process_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch, "accelerator", _Available(False), raising=False)
    with pytest.raises(ConfigError, match="needs GPUs.*plain DDP on CPU"):
        _fsdp_arguments(world=2)
    monkeypatch.setattr(torch, "accelerator", _Available(True), raising=False)
    with pytest.raises(ConfigError, match="one process.*torchrun"):
        _fsdp_arguments(world=1)


def test_fsdp_key_defaults_off():
    assert TrainConfig().train.fsdp is False
