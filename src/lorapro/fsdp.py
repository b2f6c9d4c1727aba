r"""LoRA-Pro on FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters that are DTensors sharded on dim 0.

``fully_shard`` turns every parameter into a DTensor on a 1-D device mesh, split along dim 0 by ``torch.chunk``'s
rule (rank k holds rows ``[k·c, min((k+1)·c, d))`` with ``c = ⌈d / W⌉``; trailing ranks may hold fewer rows or
none — FSDP pads those shards internally). A LoRA pair is then split into row blocks of A (r × n) and of B
(m × r) on every rank. The optimizers take such a model (or its DTensor parameters) unchanged; this module does
the distributed part of their step. Every rank runs the same code on the same data, so there is no owner rank.

One step, per bucket of same-shape pairs (as the single-process step batches them)
    1. All-gather the bucket's A, B, g_A, g_B (one collective per dtype). LoRA factors are small (≈ 0.3 % of a
       7B model with r = 8), so this is cheap next to FSDP's own all-gathers of the frozen weights.
    2. Run the single-process step on the gathered tensors: the r × r algebra is replicated (identical on every
       rank), then each rank copies its own rows of the updated A and B back into its shard.
    3. State, by mode:

       - ``mode="full"``: the m × n moments are sharded by rows — each rank keeps the rows that match its shard
         of B, and computes only those rows of g̃ = left·right (the row block ``s(B_rows ĝ_A + ĝ_B,rows A)``), of
         the moments and of D. Projecting D back needs ``u_A = s·Bᵀ·D`` (a sum over all rows) and the rows of
         ``u_B = s·D·Aᵀ``: one all-reduce per bucket of the partial ``u_A`` (r × n per layer) and of ``u_B``
         (m × r, zero outside this rank's rows). Per-rank full-mode state is about 1/W of the single-process
         state and no rank forms more than its rows of any m × n tensor.
       - ``"efficient"``, ``"factored"`` and ``LoRAProSGD``: the state is factor-sized; each rank stores its row
         block of every state tensor (dim 0, the same chunk rule) and the step all-gathers it with the factors.
         (Efficient mode could step its elementwise AdamW on the local rows alone; the gather keeps one code
         path for every factor-sized state and costs about as much as gathering the gradients.)
       - Parameters that are not LoRA factors (a head, biases): plain AdamW / SGD on the local shards.

    So the parameters after a step equal those of one process (or DDP) to float round-off: the gradients FSDP
    reduce-scatters are the same means DDP all-reduces, only summed in another order.

State layout and checkpoints
    Every state tensor with at least one dimension is a DTensor ``Shard(0)`` on the parameter's mesh whose global
    shape is the single-process shape (the ``step`` counters are plain 0-d tensors, replicated). Every LoRA factor
    has a state entry, empty for B in full and factored mode: torch's ``set_optimizer_state_dict`` wants one for
    each trainable parameter. So
    ``torch.distributed.checkpoint`` saves the optimizer state the usual way and loads it into any world size,
    with or without FSDP (the global shapes are what it matches)::

        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        import torch.distributed.checkpoint as dcp
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        # resume (any number of processes, FSDP or not): build model + optimizer, then
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)

    ``optimizer.load_state_dict`` also accepts a consolidated single-process state dict (plain tensors): each rank
    keeps its rows of every state tensor.

With FSDP2's ``CPUOffloadPolicy`` the shards live on the CPU; over NCCL the collectives here then go through the
current GPU (untested: no GPU run has been made yet).

What is refused: DTensors on meshes of more than one dimension (HSDP, tensor parallel) or sharded on another dim,
and ``shard_state=True`` together with FSDP (the state is sharded already). Torch only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ["is_dtensor", "check_param", "row_range", "gather_rows", "shard_rows", "wrap_rows", "RowShard",
           "step_plain_group", "step_lora_bucket", "to_local_state", "save_checkpoint", "load_checkpoint"]

Tensor = torch.Tensor


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a :class:`torch.distributed.tensor.DTensor` (False where torch has none)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)


def check_param(p: Tensor, where: str = "a parameter") -> None:
    """Raise unless the DTensor ``p`` is laid out as ``fully_shard`` lays parameters out: dim 0 over a 1-D mesh."""
    from torch.distributed.tensor import Shard

    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1 or len(placements) != 1 or not (isinstance(placements[0], Shard) and placements[0].dim == 0):
        raise ValueError(
            f"{where} is a DTensor on a {mesh.ndim}-D mesh with placements {placements}. LoRA-Pro supports DTensors "
            "laid out by FSDP2's fully_shard on a 1-D mesh (Shard(0)); for HSDP or tensor parallelism use plain "
            "FSDP2 (fully_shard on a 1-D mesh) or DDP with LoRAProAdamW(..., shard_state=True)."
        )


def row_range(rows: int, rank: int, world: int) -> Tuple[int, int]:
    """Rows ``[lo, hi)`` of a dim of size ``rows`` that ``rank`` of ``world`` holds under ``torch.chunk``'s rule
    (what ``fully_shard`` and DTensor's ``Shard(0)`` use)."""
    c = -(-rows // world)
    return min(rank * c, rows), min((rank + 1) * c, rows)


def _mesh_info(t: Tensor) -> Tuple[Any, Any, int, int]:
    mesh = t.device_mesh
    return mesh, mesh.get_group(), mesh.get_local_rank(), mesh.size()


# torch >= 2.13 renames all_gather_into_tensor (deprecated there) to all_gather_single
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _comm_device(group: Any, device: torch.device) -> torch.device:
    """Where a collective's buffers must live: NCCL moves only CUDA tensors, so CPU shards (FSDP2's
    ``CPUOffloadPolicy``) go through the current GPU; other backends use the tensors' own device."""
    if device.type == "cpu" and str(dist.get_backend(group)) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def gather_rows(tensors: Sequence[Tensor]) -> List[Tensor]:
    """The full (global) tensors of DTensors sharded on dim 0 over one 1-D mesh, as plain tensors.

    One ``all_gather_into_tensor`` per dtype: each rank sends its rows, zero-padded to ``⌈d / W⌉`` rows per tensor,
    in one flat buffer.
    """
    if not tensors:
        return []
    _, group, _, world = _mesh_info(tensors[0])
    out: List[Optional[Tensor]] = [None] * len(tensors)
    by_dtype: Dict[torch.dtype, List[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        local_dev = tensors[idx[0]].to_local().device
        dev = _comm_device(group, local_dev)
        sizes = []  # per tensor: padded elements per rank, elements per row
        for i in idx:
            shape = tensors[i].shape
            per_row = shape[1:].numel()
            sizes.append((-(-shape[0] // world) * per_row, per_row))
        send = torch.zeros(sum(s for s, _ in sizes), dtype=dtype, device=dev)
        off = 0
        for i, (size, _) in zip(idx, sizes):
            loc = tensors[i].to_local().reshape(-1)
            send[off: off + loc.numel()].copy_(loc)
            off += size
        recv = torch.empty(world * send.numel(), dtype=dtype, device=dev)
        _all_gather_flat(recv, send, group=group)
        recv = recv.view(world, -1)
        off = 0
        for i, (size, per_row) in zip(idx, sizes):
            shape = tensors[i].shape
            parts = []
            for k in range(world):
                lo, hi = row_range(shape[0], k, world)
                parts.append(recv[k, off: off + (hi - lo) * per_row])
            out[i] = torch.cat(parts).view(shape).to(local_dev)
            off += size
    return out  # type: ignore[return-value]


def wrap_rows(local: Tensor, rows: int, like: Tensor) -> Tensor:
    """A DTensor ``Shard(0)`` on ``like``'s mesh with ``rows`` global rows whose local shard is ``local``."""
    from torch.distributed.tensor import DTensor, Shard

    shape = torch.Size([rows, *local.shape[1:]])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, like.device_mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)


def shard_rows(full: Tensor, like: Tensor) -> Tensor:
    """The DTensor ``Shard(0)`` on ``like``'s mesh holding this rank's rows of the (replicated) ``full``."""
    _, _, rank, world = _mesh_info(like)
    lo, hi = row_range(full.shape[0], rank, world)
    return wrap_rows(full[lo:hi].clone(), full.shape[0], like)


def to_local_state(value: Any, like: Tensor) -> Any:
    """A state value loaded into the optimizer of a DTensor parameter ``like``: a DTensor stays one, a plain
    tensor with dims (a consolidated single-process state) keeps this rank's rows, numbers and 0-d tensors stay."""
    if torch.is_tensor(value) and not is_dtensor(value) and value.dim() > 0:
        return shard_rows(value, like)
    return value


@dataclass
class RowShard:
    """This rank's rows ``[lo, hi)`` of a bucket's m × n moments (full mode) and the group to sum over."""

    lo: int
    hi: int
    group: Any

    def all_reduce_(self, tensors: Sequence[Tensor]) -> None:
        """Sum ``tensors`` over the ranks in place, in one flat all-reduce."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        flat = flat.to(_comm_device(self.group, flat.device))
        dist.all_reduce(flat, group=self.group)
        off = 0
        for t in tensors:
            t.copy_(flat[off: off + t.numel()].view_as(t))
            off += t.numel()


def _local_proxy(p: Tensor) -> Tensor:
    """A plain tensor sharing ``p``'s local shard (in-place updates reach ``p``), with the local gradient."""
    v = p.to_local().detach()
    if p.grad is not None:
        v.grad = p.grad.to_local()
    return v


def step_plain_group(opt: torch.optim.Optimizer, group: Dict[str, Any]) -> None:
    """Step a plain (non-LoRA) param group with DTensor parameters: the elementwise update on the local shards, the
    state kept as DTensors (``Shard(0)``, as the parameters). Plain tensors in the group (a module left out of
    ``fully_shard``, replicated) are stepped as they are."""
    params = group["params"]
    sharded = [(p, _local_proxy(p)) for p in params if is_dtensor(p)]
    for p, v in sharded:
        if p in opt.state:
            opt.state[v] = _local_state(opt.state[p])
    try:
        proxy = {id(p): v for p, v in sharded}
        opt._step_plain_group({**group, "params": [proxy.get(id(p), p) for p in params]})
        for p, v in sharded:
            if opt.state.get(v):
                opt.state[p] = {k: (wrap_rows(x, p.shape[0], p) if _has_dims(x) else x)
                                for k, x in opt.state[v].items()}
    finally:  # the proxies' entries go, whatever happened; the parameters' own state stays
        for _, v in sharded:
            opt.state.pop(v, None)


def _local_state(st: Dict[str, Any]) -> Dict[str, Any]:
    """A parameter's state with every DTensor replaced by its local shard (the same storage)."""
    return {k: (x.to_local() if is_dtensor(x) else x) for k, x in st.items()}


def _has_dims(x: Any) -> bool:
    return torch.is_tensor(x) and x.dim() > 0


def _grad_or_zeros(p: Tensor) -> Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def step_lora_bucket(opt: torch.optim.Optimizer, group: Dict[str, Any], bucket: list) -> None:
    """Step a bucket of LoRA pairs whose factors are DTensors (see the module docstring): gather A, B, g_A, g_B
    (and factor-sized state), run the optimizer's own single-process bucket step on the gathered tensors, keep this
    rank's rows of the new factors and state. In full mode the moments stay row-sharded (:class:`RowShard`)."""
    _, A0, B0, _ = bucket[0]
    _, pg, rank, world = _mesh_info(A0)
    factors = [t for _, a, b, _ in bucket for t in (a, b)]
    if any(t.device_mesh != A0.device_mesh for t in factors):
        raise ValueError("All LoRA factors of a param group must be sharded over the same device mesh.")
    m = B0.shape[0]
    lo, hi = row_range(m, rank, world)
    # Full mode keeps state on A only: its m × n moments, of which this rank holds rows [lo, hi) and never gathers.
    row_local = {id(a) for _, a, _, _ in bucket} if group.get("mode") == "full" else set()
    keys = [(t, k) for t in factors if id(t) not in row_local
            for k, x in opt.state.get(t, {}).items() if is_dtensor(x)]
    gathered = gather_rows([*factors, *(_grad_or_zeros(t) for t in factors), *(opt.state[t][k] for t, k in keys)])
    n = len(factors)
    proxy_of: Dict[int, Tensor] = {}
    try:
        for t, full, g in zip(factors, gathered[:n], gathered[n: 2 * n]):
            full.grad = g
            proxy_of[id(t)] = full
            opt.state[full] = _local_state(opt.state.get(t, {}))
        for (t, k), full in zip(keys, gathered[2 * n:]):
            opt.state[proxy_of[id(t)]][k] = full
        proxies = [(j, proxy_of[id(a)], proxy_of[id(b)], s) for j, a, b, s in bucket]
        if row_local:
            opt._step_lora_bucket(group, proxies, rows=RowShard(lo, hi, pg))
        else:
            opt._step_lora_bucket(group, proxies)
        for t in factors:
            full = proxy_of[id(t)]
            t_lo, t_hi = row_range(t.shape[0], rank, world)
            t.to_local().copy_(full[t_lo:t_hi])
            wrap = (lambda x: wrap_rows(x, m, t)) if id(t) in row_local else (lambda x: shard_rows(x, t))
            if opt.state.get(full):
                opt.state[t] = {k: (wrap(x) if _has_dims(x) else x) for k, x in opt.state[full].items()}
    finally:  # the proxies' entries go, whatever happened; the parameters' own state stays
        for full in proxy_of.values():
            opt.state.pop(full, None)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: torch.distributed.checkpoint (DCP), resharded on load


def save_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Save ``model`` and ``optimizer`` with :mod:`torch.distributed.checkpoint` into the directory ``path``.

    Collective under a process group (every rank calls it; each writes its shards). The state dicts are torch's
    ``get_state_dict`` ones: parameters and LoRA-Pro state keyed by parameter name, DTensors with their global
    shapes, so :func:`load_checkpoint` reshards them onto any number of processes, with FSDP2 or without.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a :func:`save_checkpoint` directory into ``model`` and ``optimizer`` (built as for training: same
    model, LoRA layers and optimizer options; any world size). Collective under a process group.

    torch's ``get_state_dict`` first builds the optimizer state by a step with zero gradients and lr = 0 (which
    leaves the parameters unchanged), so that DCP has tensors of the right shapes and shardings to load into.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
