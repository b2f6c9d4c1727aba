"""CPU performance heuristics of the optimizers, with the measurements behind them.

Nothing here changes what a step computes, only how it is cut up; the tests compare every path with the float64
reference (:mod:`lorapro.reference`). Measured with ``benchmarks/optimizer_step.py`` on Llama-2-7B layer sizes
(2 × 4096² + 2 × 11008 × 4096, r = 8) on a 2-core Xeon shared with two other busy processes.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from .functional import on_accelerator_path

__all__ = ["CPU_BLOCK_ELEMS", "CPU_BUCKET_BYTES", "cpu_blocks_pay_off", "fused_adamw_ok", "HAS_FUSED_CPU_ADAMW"]

# Full mode walks the m × n moments in blocks of rows of about this many elements on CPU (1 MiB in fp32): per
# block g̃, then one call of torch's fused AdamW kernel (both moments and D in one pass), then the block's share of
# Bᵀ·D and D·Aᵀ, with g̃ and D staying in cache; no m × n temporary is allocated (faulting in a fresh 180 MB buffer
# can cost as much as the arithmetic). Measured, one thread: 2^18 elements 1.5-1.9x fused full-weight AdamW,
# 2^16: 2.2x, 2^17: 2.0x, 2^19: 2.0x, 2^20: 2.7x (noisy; 2^18 was best in every run).
CPU_BLOCK_ELEMS = 1 << 18

# On CPU a bucket of same-shape pairs is processed in chunks of about this many bytes of packed factors and
# gradients, so that the step's factor-sized temporaries stay in cache and are recycled by the allocator instead
# of being faulted in afresh every step.
CPU_BUCKET_BYTES = int(os.environ.get("LORAPRO_BUCKET_BYTES", 4 << 20))


def cpu_blocks_pay_off() -> bool:
    """Whether full mode should cut its moments into row blocks on CPU: on one thread, or with passive OpenMP
    waiting. Each op of a block is one more synchronisation of the intra-op thread pool, whose idle threads
    busy-wait by default — ruinous when other processes share the cores (2 threads on 2 busy cores: 10 s per
    step with 2^18-element blocks, 3.5 s with 2^22, 2.3 s with whole matrices, against 0.6 s on one thread). So
    with several actively waiting threads a block is the whole matrix (fewest synchronisations; the step's
    temporaries are then g̃ and −D of the largest layer, 2·m·n elements)."""
    return torch.get_num_threads() == 1 or os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


HAS_FUSED_CPU_ADAMW = hasattr(torch, "_fused_adamw_") and tuple(
    int(x) for x in torch.__version__.split("+")[0].split(".")[:2]
) >= (2, 4)


def fused_adamw_ok(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these tensors: CPU (its CPU kernel exists from torch 2.4), one
    float32 / float64 dtype for all of them, contiguous. One pass over memory instead of about seven; in full mode's
    row blocks it replaces nine ops per block by one (the sqrt and two divisions per element it does are then
    most of the block's time). On accelerators the foreach path is used (the step counts here live on the host;
    the fused CUDA kernel wants them on the device)."""
    t0 = tensors[0]
    return (
        HAS_FUSED_CPU_ADAMW
        and not on_accelerator_path(t0.device)
        and t0.dtype in (torch.float32, torch.float64)
        and all(t.dtype == t0.dtype and t.device == t0.device and t.is_contiguous() for t in tensors)
    )
