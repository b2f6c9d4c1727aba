"""``lorapro train`` with ``train.fsdp=true`` on CPU (gloo), for test_train_fsdp.py. Usage: worker_train_fsdp.py CONFIG

accelerate turns its FSDP plugin on for accelerator backends only (``AcceleratorState`` keeps a CPU run
``MULTI_CPU``, i.e. DDP), and ``lorapro train`` therefore refuses ``train.fsdp`` on CPU. This worker flips exactly
those two decisions, so that everything after them — the Trainer, accelerate's FSDP2 plugin (``fully_shard`` on the
decoder layers, the optimizer's parameters swapped for DTensors), LoRA-Pro's FSDP2 step, DCP checkpoints, resume,
the final adapter — runs as it would on GPUs.
"""

import sys

import accelerate.state as accelerate_state
import torch
from accelerate.utils import DistributedType

import lorapro.finetune.runner as runner
from lorapro.finetune.cli import main

_state_init = accelerate_state.AcceleratorState.__init__


def _state_init_fsdp_on_cpu(self, *args, **kwargs):
    _state_init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin


class _Accelerator:
    @staticmethod
    def is_available() -> bool:
        return True


_fsdp_arguments = runner._fsdp_arguments


def _fsdp_arguments_on_cpu(world):
    saved = getattr(torch, "accelerator", None)
    torch.accelerator = _Accelerator  # only while the arguments are built: the runner's CPU refusal
    try:
        return _fsdp_arguments(world)
    finally:
        torch.accelerator = saved


accelerate_state.AcceleratorState.__init__ = _state_init_fsdp_on_cpu
runner._fsdp_arguments = _fsdp_arguments_on_cpu

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
