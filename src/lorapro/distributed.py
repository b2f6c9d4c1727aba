r"""Multi-process LoRA-Pro on ``torch.distributed``: sharded optimizer state and wrapper checks (torch only).

Data parallel (DDP, ``torchrun``, ``accelerate launch``)
    Nothing special is needed: DDP averages the gradients during ``backward()``, so every rank calls
    ``optimizer.step()`` on the same averaged gradients and the LoRA-Pro step, a deterministic function of
    (A, B, g_A, g_B, state), keeps the replicas identical. N processes with per-rank batch b reproduce one process
    with batch N·b (the loss being a mean over equally sized local batches).

Sharded state (``LoRAProAdamW(model, ..., shard_state=True)``, ZeRO-1 for LoRA-Pro)
    Full-mode LoRA-Pro keeps two m × n moments per adapted weight (about 52 GB in fp32 for Llama-2-7B with r = 8
    on all projections). With ``shard_state=True`` the LoRA pairs are partitioned across the W ranks of the
    default process group by *whole (A, B) pairs* — the math of a pair needs A, B and its state together, so no pair
    is ever split. The partition is greedy largest-first on the element count of each pair's state
    (m·n for ``mode="full"``, (m + n)·r otherwise): pairs sorted by (−cost, group index, pair index) go one by one
    to the least-loaded rank (lowest rank on ties). It depends only on the param groups' structure and shapes, so
    every rank computes the same partition without communication (a checksum of the layout is all-reduced once
    at construction to catch ranks built from different models).

    One step: every rank steps the non-LoRA parameters (replicated plain AdamW / SGD) and *only the pairs it
    owns* (their state exists only there); then each owner broadcasts its updated factors — one flat buffer per
    owner rank and (dtype, device) — and the others copy them in. Per-rank LoRA-Pro state falls to about 1/W.

Checkpoints (world-size independent)
    ``optimizer.consolidate_state_dict(to=0)`` is a collective (every rank must call it): it gathers every pair's
    state to rank ``to``. ``optimizer.state_dict()`` on that rank then returns a state dict in *exactly* the format
    of the unsharded optimizer, so it loads into an unsharded optimizer on one process or a sharded one on any
    number of processes; on a sharded optimizer ``load_state_dict`` keeps only the pairs this rank owns.
    ``state_dict()`` without a fresh consolidation (one taken after the last step or load) raises, rather than
    silently returning a partial state — the protocol of :class:`torch.distributed.optim.ZeroRedundancyOptimizer`.
    After a consolidation the *other* ranks' ``state_dict()`` returns an empty placeholder marked with
    ``PLACEHOLDER_KEY`` (accelerate's ``save_state`` and DeepSpeed's ``save_checkpoint`` call ``state_dict()`` on
    every rank and write rank 0's); ``load_state_dict`` refuses a placeholder. The Hugging Face Trainer path
    consolidates before each checkpoint by itself (:mod:`lorapro.integrations.distributed`).

    Cost: consolidation moves every pair's state into host memory on rank ``to`` (one point-to-point transfer
    per state tensor); loading reads the whole file on every rank, then keeps the owned pairs.

FSDP2 (``fully_shard``)
    Supported without ``shard_state``: the factors are DTensors sharded by rows and the step gathers what it needs
    (:mod:`lorapro.fsdp`).

What is refused
    FSDP1-wrapped models (flat parameters), DTensors that are not laid out by ``fully_shard`` on a 1-D mesh (tensor
    parallel, HSDP) and ``shard_state=True`` with FSDP2. Engines that replace the optimizer's parameters by flat buffers
    (DeepSpeed ZeRO-1/2/3, fused fp16/bf16 optimizers) are detected at the next step; under ZeRO,
    ``lorapro.integrations.deepspeed.DeepSpeedLoRAProAdamW`` reassembles the pairs from the partitions.
"""

from __future__ import annotations

import zlib
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = [
    "StateSharding",
    "partition_by_cost",
    "pair_state_numel",
    "optimizer_state_bytes",
    "unwrap_model",
    "check_params_supported",
    "check_lora_group_intact",
    "check_loadable",
]

PLACEHOLDER_KEY = "lorapro_state_consolidated_on_rank"

SUPPORTED = (
    "Supported multi-process setups: DDP (torchrun / accelerate launch / the Hugging Face Trainer), optionally with "
    "LoRAProAdamW(..., shard_state=True) to split the LoRA-Pro state across ranks, FSDP2 (fully_shard on a 1-D "
    "mesh, without shard_state) and DeepSpeed ZeRO stage 0 (see lorapro.integrations.deepspeed)."
)


# ----------------------------------------------------------------------------------------------------------------
# Partition


def pair_state_numel(mode: Optional[str], m: int, n: int, r: int) -> int:
    """Element count that balances the partition: the m × n moments for ``mode="full"``, factor size otherwise.

    (Only the relative size matters; modes with other state layouts are balanced by factor size.)
    """
    return m * n if mode == "full" else (m + n) * r


def partition_by_cost(costs: Sequence[int], world_size: int) -> List[int]:
    """Owner rank of each item: greedy largest-first onto the least-loaded rank (ties: lower index, lower rank).

    Deterministic, so every rank computes the same answer. The heaviest rank carries at most
    ``mean load + max cost`` (the classic LPT bound).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}.")
    load = [0] * world_size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-int(costs[i]), i)):
        rank = min(range(world_size), key=lambda k: (load[k], k))
        owner[i] = rank
        load[rank] += int(costs[i])
    return owner


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of all tensors in ``optimizer.state`` on this rank (LoRA-Pro moments, plain AdamW moments, steps)."""
    from .fsdp import is_dtensor

    return sum(
        (v.to_local() if is_dtensor(v) else v).numel() * v.element_size()  # a DTensor: this rank's shard
        for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)
    )


# ----------------------------------------------------------------------------------------------------------------
# Wrappers: what is unwrapped, what is refused


def _is_fsdp1(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(module, FullyShardedDataParallel)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / a DeepSpeed engine (so pairs get the same names as unwrapped).

    FSDP2 (``fully_shard``) modules are the model itself: their parameters are DTensors, see :mod:`lorapro.fsdp`.

    Raises:
        ValueError: the model (or a submodule) is wrapped by FSDP1, which LoRA-Pro does not support.
    """
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or (
        type(model).__name__ == "DeepSpeedEngine" and isinstance(getattr(model, "module", None), nn.Module)
    ):
        model = model.module
    for name, module in model.named_modules():
        if _is_fsdp1(module):
            raise ValueError(
                f"{name or 'the model'} is wrapped by FSDP1 ({type(module).__name__}), whose flat parameters hide "
                "the LoRA factors LoRA-Pro pairs. Use FSDP2 instead: torch.distributed.fsdp.fully_shard (with "
                "accelerate: fsdp_version: 2). " + SUPPORTED
            )
    return model


def check_params_supported(param_groups: Iterable[Dict[str, Any]], shard_state: bool = False) -> None:
    """Accept DTensor parameters laid out by FSDP2's ``fully_shard``; refuse other layouts (tensor parallel,
    HSDP) and ``shard_state=True`` with them, with a message naming what works."""
    from .fsdp import check_param, is_dtensor

    for gi, group in enumerate(param_groups):
        for p in group["params"]:
            if not is_dtensor(p):
                continue
            check_param(p, f"A parameter of param group {gi}")
            if shard_state:
                raise ValueError(
                    "shard_state=True with FSDP2 (DTensor parameters): FSDP2 already shards the LoRA-Pro state with "
                    "the parameters. Drop shard_state."
                )


def check_lora_group_intact(group: Dict[str, Any]) -> None:
    """Raise if an engine replaced a LoRA group's [A0, B0, A1, B1, ...] by flat buffers.

    DeepSpeed ZeRO-1/2/3 and its fused fp16 / bf16 optimizers do this (``group["params"] = [flat_partition]``),
    which destroys the (A, B) pairing LoRA-Pro needs.
    """
    params = group["params"]
    if len(params) != 2 * len(group["scalings"]) or any(p.dim() != 2 for p in params):
        raise RuntimeError(
            "The parameters of a LoRA-Pro param group were replaced (now "
            f"{len(params)} tensor(s) of shapes {[tuple(p.shape) for p in params[:4]]}, expected "
            f"{len(group['scalings'])} (A, B) pairs of 2-D factors). An engine flattened or partitioned them — "
            "DeepSpeed ZeRO stage 1/2/3 or a DeepSpeed fp16/bf16 optimizer wrapper. Under ZeRO stage 1-3 use "
            "lorapro.integrations.deepspeed.DeepSpeedLoRAProAdamW (or DeepSpeedLoRAProSGD), same arguments, as "
            "the client optimizer: it reassembles the pairs from DeepSpeed's partitions. " + SUPPORTED
        )


def check_loadable(state_dict: Dict[str, Any]) -> None:
    """Refuse the placeholder that a sharded optimizer's ``state_dict()`` returns on ranks that hold no state."""
    if PLACEHOLDER_KEY in state_dict:
        raise ValueError(
            "This optimizer state dict is a placeholder written by a rank of a sharded LoRA-Pro optimizer "
            f"(shard_state=True): the complete state was consolidated on rank {state_dict[PLACEHOLDER_KEY]}. Load "
            "the checkpoint that rank saved."
        )


# ----------------------------------------------------------------------------------------------------------------
# Sharded state


def _require_process_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "shard_state=True splits the optimizer state across the processes of a torch.distributed process "
            "group, but none is initialised. Call torch.distributed.init_process_group(...) first (torchrun and "
            "accelerate launch set up the environment for it), or drop shard_state for single-process training."
        )


def _collective_device() -> torch.device:
    """Device for small control tensors: CUDA for NCCL, CPU otherwise."""
    backend = str(dist.get_backend())
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class StateSharding:
    """Which rank owns which LoRA pair of an optimizer, and the collectives that keep replicas identical.

    Built by ``_LoRAProBase`` when ``shard_state=True``; see the module docstring for the protocol.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        _require_process_group()
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self._version = 0  # bumped by every step / load: a consolidated state dict is valid for one version
        # True while no rank holds LoRA-Pro state (no step yet, or only state without pairs loaded): then every
        # rank's local state is the complete one
        self._no_pair_state = True
        # (version, consolidated state or None on the other ranks, rank it was gathered to)
        self._consolidated: Optional[Tuple[int, Optional[Dict[int, Dict[str, Any]]], int]] = None
        self._signature: Tuple[int, ...] = ()
        self.refresh(optimizer)

    # -- plan ----------------------------------------------------------------------------------------------------

    @staticmethod
    def _signature_of(optimizer: torch.optim.Optimizer) -> Tuple[int, ...]:
        # identities, not just counts: DeepSpeed's bf16/fp16 wrappers swap the factors for fp32 master copies
        return tuple(id(p) for g in optimizer.param_groups if g.get("lora") for p in g["params"])

    def refresh(self, optimizer: torch.optim.Optimizer) -> None:
        """(Re)compute the partition from the param groups; collective (checks all ranks agree)."""
        if any(optimizer.state.get(p) for g in optimizer.param_groups if g.get("lora") for p in g["params"]):
            raise RuntimeError(
                "The param groups of a sharded LoRA-Pro optimizer changed after it took a step; the partition of its "
                "state cannot be recomputed then. Add all param groups before the first step."
            )
        items: List[Tuple[torch.Tensor, torch.Tensor]] = []
        costs: List[int] = []
        layout: List[int] = []
        for gi, g in enumerate(optimizer.param_groups):
            if not g.get("lora"):
                continue
            check_lora_group_intact(g)
            params = g["params"]
            for j in range(len(g["scalings"])):
                A, B = params[2 * j], params[2 * j + 1]
                m, n, r = B.shape[0], A.shape[1], A.shape[0]
                items.append((A, B))
                costs.append(pair_state_numel(g.get("mode"), m, n, r))
                layout += [gi, j, m, n, r]
        owners = partition_by_cost(costs, self.world_size)
        self._check_ranks_agree(layout)
        self.owner_of: Dict[int, int] = {}
        # broadcast plan: for each owner and (dtype, device), the factors it sends, in a fixed order
        plan: Dict[Tuple[int, str, str], List[torch.Tensor]] = {}
        for (A, B), o in zip(items, owners):
            for t in (A, B):
                self.owner_of[id(t)] = o
                plan.setdefault((o, str(t.dtype), str(t.device)), []).append(t)
        self._plan = sorted(plan.items(), key=lambda kv: kv[0])
        self.pair_owners = owners
        self.pair_costs = costs
        self._signature = self._signature_of(optimizer)

    def _check_ranks_agree(self, layout: List[int]) -> None:
        checksum = zlib.crc32(repr(layout).encode())
        t = torch.tensor([checksum, -checksum], dtype=torch.int64, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if int(t[0]) != checksum or -int(t[1]) != checksum:
            raise RuntimeError(
                "shard_state=True: the ranks built optimizers over different LoRA layouts (different models, "
                "target modules or ranks r). Every process must build the same model and optimizer."
            )

    def ensure_current(self, optimizer: torch.optim.Optimizer) -> None:
        if self._signature_of(optimizer) != self._signature:
            self.refresh(optimizer)

    # -- step ----------------------------------------------------------------------------------------------------

    def owns(self, t: torch.Tensor) -> bool:
        """True unless ``t`` is a LoRA factor owned by another rank (non-LoRA parameters are replicated)."""
        return self.owner_of.get(id(t), self.rank) == self.rank

    def owned(self, pairs: List[Tuple[int, torch.Tensor, torch.Tensor, float]]) -> List[Tuple[int, torch.Tensor, torch.Tensor, float]]:
        """The (index, A, B, s) entries of ``pairs`` this rank steps."""
        return [item for item in pairs if self.owns(item[1])]

    @torch.no_grad()
    def synchronize(self) -> None:
        """Every owner broadcasts its (updated) factors; the other ranks copy them in. Collective."""
        self._version += 1
        self._consolidated = None
        self._no_pair_state = False
        if self.world_size == 1:
            return
        pending = []
        for (owner, _, _), tensors in self._plan:
            if owner == self.rank:
                flat = _flatten_dense_tensors([t.detach() for t in tensors])
            else:
                flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
            pending.append((dist.broadcast(flat, src=owner, async_op=True), owner, flat, tensors))
        for work, owner, flat, tensors in pending:
            work.wait()
            if owner != self.rank:
                for t, v in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
                    t.copy_(v)

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def keeps_state(self, p: torch.Tensor) -> bool:
        """Whether ``load_state_dict`` keeps the saved state of ``p`` on this rank."""
        return self.owns(p)

    def loaded(self, with_pair_state: bool) -> None:
        """Called by ``load_state_dict``: a consolidation taken before is stale now, and unless the loaded state
        held no pair's state, each rank holds only part of it until the next consolidation."""
        self._version += 1
        self._consolidated = None
        self._no_pair_state = not with_pair_state

    def _index_owners(self, optimizer: torch.optim.Optimizer) -> Dict[int, int]:
        """State-dict index -> owner rank for every LoRA factor (same numbering as Optimizer.state_dict)."""
        seen: Dict[int, int] = {}
        out: Dict[int, int] = {}
        i = 0
        for g in optimizer.param_groups:
            for p in g["params"]:
                if id(p) not in seen:
                    seen[id(p)] = i
                    if id(p) in self.owner_of:
                        out[i] = self.owner_of[id(p)]
                i += 1
        return out

    def consolidate(self, optimizer: torch.optim.Optimizer, to: int = 0) -> None:
        """Gather every pair's state to rank ``to`` (into host memory there). Collective: every rank must call it.

        A small metadata gather (keys, shapes, dtypes, non-tensor values) is followed by one point-to-point
        transfer per state tensor, so rank ``to`` never holds more than one incoming tensor on the device.
        """
        if not 0 <= to < self.world_size:
            raise ValueError(f"consolidate_state_dict(to={to}): to must be a rank in [0, {self.world_size}).")
        local = torch.optim.Optimizer.state_dict(optimizer)["state"]
        owners = self._index_owners(optimizer)
        mine = {i: st for i, st in local.items() if owners.get(i) == self.rank}
        layout = {
            i: [(k, ("tensor", tuple(v.shape), str(v.dtype).replace("torch.", "")) if torch.is_tensor(v) else ("value", v))
                for k, v in sorted(st.items())]
            for i, st in sorted(mine.items())
        }
        layouts: Optional[List[Any]] = [None] * self.world_size if self.rank == to else None
        dist.gather_object(layout, layouts, dst=to)
        device = _collective_device()
        if self.rank != to:
            for i, st in sorted(mine.items()):
                for k, v in sorted(st.items()):
                    if torch.is_tensor(v):
                        dist.send(v.detach().to(device).contiguous(), dst=to)
            self._consolidated = (self._version, None, to)
            return
        state: Dict[int, Dict[str, Any]] = {i: st for i, st in local.items() if i not in owners}  # replicated
        state.update(mine)
        for src, part in enumerate(layouts or []):
            if src == to:
                continue
            for i, entries in part.items():
                st = state[i] = {}
                for k, (kind, *spec) in entries:
                    if kind == "value":
                        st[k] = spec[0]
                        continue
                    shape, dtype = spec
                    buf = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
                    dist.recv(buf, src=src)
                    st[k] = buf.cpu()
        self._consolidated = (self._version, dict(sorted(state.items())), to)

    def state_dict(self, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
        """The consolidated, world-size-independent state dict (after :meth:`consolidate` on this rank)."""
        if self.world_size == 1 or self._no_pair_state:
            # one process, or no rank holds any pair's state (no step yet, nothing loaded but empty state): the local
            # state is complete (accelerate's prepare() round-trips state_dict -> load_state_dict at this point)
            return torch.optim.Optimizer.state_dict(optimizer)
        if self._consolidated is None or self._consolidated[0] != self._version:
            raise RuntimeError(
                f"{type(optimizer).__name__}(shard_state=True).state_dict(): the LoRA-Pro state is split across "
                f"{self.world_size} processes. Call optimizer.consolidate_state_dict(to=0) on every rank first (a "
                "collective, once per checkpoint, after the last step), then state_dict() on rank 0 and save it "
                "there. With the Hugging Face Trainer, lorapro.integrations.distributed.ConsolidateStateCallback does "
                "this for you."
            )
        sd = torch.optim.Optimizer.state_dict(optimizer)
        _, state, to = self._consolidated
        if state is None:
            # Frameworks (accelerate's save_state, DeepSpeed's save_checkpoint) call state_dict() on every rank and
            # write only rank 0's. Give the other ranks a marked placeholder that load_state_dict refuses.
            sd["state"] = {}
            sd[PLACEHOLDER_KEY] = to
        else:
            sd["state"] = state
        return sd


def finish_process_group() -> None:
    """Wait for every rank, then destroy the default process group (a no-op without one).

    Called by ``lorapro train`` / ``lorapro eval`` when they finish under torchrun: a process that exits while its
    gloo group is alive, or tears it down while another rank is still communicating, can abort with "terminate
    called without an active exception" (SIGABRT) — seen here on 2-process CPU runs.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()

