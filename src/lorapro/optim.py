r"""LoRA-Pro optimizers: :class:`LoRAProAdamW` and :class:`LoRAProSGD`.

Both are ordinary :class:`torch.optim.Optimizer` subclasses (param groups, LR schedulers, ``zero_grad``,
``step(closure)``, ``state_dict`` with tensors and numbers only); a step whose gradients hold an inf or NaN is
skipped as a whole, with a ``RuntimeWarning``. Give them a model — every PEFT LoRA layer's (A, B, s) becomes a
LoRA-Pro pair, every other trainable parameter (biases, heads, ``modules_to_save``) gets plain AdamW / SGD — or
param groups (see :func:`build_param_groups` for the explicit form).

This module validates and gathers: param groups, each bucket's parameters, gradients and state (created here, in
one place), sharding. The steps themselves are functions, one per mode, in :mod:`lorapro.steps`; the math in
:mod:`lorapro.functional` (batched fast path) and :mod:`lorapro.reference` (float64 spec); the CPU performance
heuristics in :mod:`lorapro._perf`. Paper: Wang et al., "LoRA-Pro: Are Low-Rank Adapters Properly
Optimized?", ICLR 2025, arXiv 2407.18242.
"""

from __future__ import annotations

import math
import os
import warnings
import weakref
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.optim import Optimizer

from . import _perf
from . import steps as S
from . import distributed as _dist
from . import fsdp as _fsdp
from . import functional as F
from .pairing import LoRAPair, check_one_adapter_per_layer, check_pair, check_trainable_halves, lora_pairs

__all__ = ["LoRAProAdamW", "LoRAProSGD", "build_param_groups", "MODES"]

MODES = ("full", "efficient", "factored")

ParamsT = Union[nn.Module, Iterable[torch.Tensor], Iterable[Dict[str, Any]]]


# ----------------------------------------------------------------------------------------------------------------
# Param groups: which tensors are LoRA pairs


def _as_pair(item: Any, where: str) -> LoRAPair:
    if isinstance(item, LoRAPair):
        return item
    if isinstance(item, dict):
        return LoRAPair(name=str(item.get("name", where)), A=item["A"], B=item["B"], scaling=float(item["scaling"]))
    if isinstance(item, (tuple, list)) and len(item) == 3:
        A, B, s = item
        return LoRAPair(name=where, A=A, B=B, scaling=float(s))
    raise TypeError(
        f"{where}: a LoRA pair must be a LoRAPair, a dict with keys A, B, scaling, or a tuple (A, B, scaling); "
        f"got {type(item).__name__}."
    )


def _lora_group(pairs: Sequence[LoRAPair], options: Dict[str, Any]) -> Dict[str, Any]:
    params: List[torch.Tensor] = []
    for p in pairs:
        params += [p.A, p.B]
    return {
        **options,
        "params": params,
        "lora": True,
        "scalings": [float(p.scaling) for p in pairs],
        "pair_names": [p.name for p in pairs],
    }


def build_param_groups(params: ParamsT, model: Optional[nn.Module] = None, *, require_lora: bool = True
                       ) -> List[Dict[str, Any]]:
    """Turn what the user passed into param groups in which LoRA pairs are explicit.

    Accepted forms:

    - a model (``nn.Module``): its LoRA pairs (via :func:`lorapro.lora_pairs`) form one LoRA group, its other
      trainable parameters one plain group;
    - tensors or param groups plus ``model=``: the LoRA factors among them are paired by looking them up in
      ``lora_pairs(model)`` (so ``transformers.Trainer``'s own weight-decay grouping keeps working); both halves of
      a pair must be in the same group;
    - param groups with a ``"lora_pairs"`` key (the explicit form, for hand-written LoRA modules):
      ``[{"lora_pairs": [(A, B, scaling), ...], "lr": 1e-4}, {"params": head.parameters()}]``, where each
      pair is a :class:`LoRAPair`, a tuple ``(A, B, scaling)`` or a dict with keys ``A``, ``B``, ``scaling``.

    A LoRA group stores ``params = [A0, B0, A1, B1, ...]`` with ``scalings`` and ``pair_names``; it is built from
    named pairs, never from the order of a flat list the user passed. ``require_lora=False`` accepts groups
    without LoRA pairs (for :meth:`~torch.optim.Optimizer.add_param_group`).

    Refused: a pair with exactly one trainable half, and several trainable adapters on one layer.
    """
    if model is not None:
        model = _dist.unwrap_model(model)  # DDP / DeepSpeed engine -> the model; FSDP1 is refused
    if isinstance(params, nn.Module):
        params = _dist.unwrap_model(params)
        if model is not None and model is not params:
            raise ValueError("Pass the model either as the first argument or as model=, not two different models.")
        model = params
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("The model has no trainable parameters. Did you forget peft.get_peft_model(...)?")
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors or dicts, not a single tensor (wrap it in a list).")
    raw = list(params)
    if not raw:
        raise ValueError("The optimizer got an empty parameter list.")
    groups_in: List[Dict[str, Any]] = [dict(g) for g in raw] if isinstance(raw[0], dict) else [{"params": raw}]

    by_factor: Dict[int, Tuple[LoRAPair, str]] = {}
    if model is not None:
        for pair in lora_pairs(model):
            by_factor[id(pair.A)] = (pair, "A")
            by_factor[id(pair.B)] = (pair, "B")

    out: List[Dict[str, Any]] = []
    all_pairs: List[LoRAPair] = []
    for gi, group in enumerate(groups_in):
        explicit = group.pop("lora_pairs", None)
        plain_in = group.pop("params", [])
        plain_in = [plain_in] if isinstance(plain_in, torch.Tensor) else list(plain_in)
        options = {k: v for k, v in group.items() if k not in ("lora", "scalings", "pair_names")}
        pairs: List[LoRAPair] = []
        if explicit is not None:
            pairs = [_as_pair(item, f"param group {gi}, pair {j}") for j, item in enumerate(explicit)]
            for pair in pairs:
                check_trainable_halves(pair.A, pair.B, pair.name)
        plain: List[torch.Tensor] = []
        seen: Dict[int, LoRAPair] = {}
        for p in plain_in:
            hit = by_factor.get(id(p))
            if hit is None:
                plain.append(p)
            else:
                seen.setdefault(id(hit[0].A), hit[0])
        ids_here = {id(p) for p in plain_in}
        for pair in seen.values():
            if id(pair.A) not in ids_here or id(pair.B) not in ids_here:
                raise ValueError(
                    f"{pair.name}: its A and B are in different param groups (or one is missing). LoRA-Pro updates "
                    "A and B together, so put both in the same group."
                )
            pairs.append(pair)
        if pairs:
            out.append(_lora_group(pairs, options))
            all_pairs += pairs
        if plain:
            out.append({**options, "params": plain, "lora": False})
    check_one_adapter_per_layer(all_pairs)
    if not all_pairs and require_lora:
        hint = (
            "pass a PEFT model (peft.get_peft_model) or param groups with 'lora_pairs'"
            if model is None
            else "the model has no trainable LoRA layers (lora_A / lora_B); check target_modules"
        )
        raise ValueError(f"No LoRA layers found: {hint}. For plain training use torch.optim.AdamW.")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Shared machinery


def _check_range(name: str, value: float, low: float, high: Optional[float] = None, low_open: bool = False) -> None:
    ok = (value > low if low_open else value >= low) and (high is None or value < high)
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        if high is not None:
            bound += f" and < {high}"
        raise ValueError(f"Invalid {name}: {value} (must be {bound}).")


_work_dtype = F.work_dtype  # the dtype of the m × n work and default optimizer state: at least float32


class _LoRAProBase(Optimizer):
    """Param-group handling, gradient collection, batching by shape and checkpoint loading."""

    def __init__(
        self,
        params: ParamsT,
        defaults: Dict[str, Any],
        *,
        model: Optional[nn.Module],
        compute_dtype: Optional[torch.dtype],
        state_dtype: Optional[torch.dtype],
        shard_state: bool = False,
    ) -> None:
        if compute_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(
                f"Invalid compute_dtype {compute_dtype}: use None (default: automatic), torch.float64 or torch.float32."
            )
        if state_dtype is not None and not state_dtype.is_floating_point:
            raise ValueError(f"Invalid state_dtype {state_dtype}: use a floating-point dtype such as torch.bfloat16.")
        self.compute_dtype = compute_dtype
        self.state_dtype = state_dtype
        # the model whose LoRA layers pair the factors of groups added later (add_param_group); weak, so the
        # optimizer does not keep a model alive, and not state (not saved)
        known = params if isinstance(params, nn.Module) else model
        self._model_ref = weakref.ref(_dist.unwrap_model(known)) if known is not None else None
        super().__init__(build_param_groups(params, model), defaults)
        _dist.check_params_supported(self.param_groups, shard_state)
        # shard_state=True: each rank keeps the state of the LoRA pairs it owns (lorapro.distributed)
        self._sharding = _dist.StateSharding(self) if shard_state else None
        self._scratch: Dict[Tuple[Any, ...], torch.Tensor] = {}  # see _workspace

    def _workspace(self, name: str, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A buffer kept between steps for a large temporary of the step (:data:`lorapro.functional.Workspace`):
        one per name, shape, dtype and device — a few MiB per distinct bucket shape, as buckets are chunked on CPU.
        Not optimizer state: not saved, not loaded. Freeing and re-allocating such temporaries every step made
        glibc return the memory to the OS and fault it in again, which cost up to half of a step on our CPU, and
        how much depended on what else the process had allocated."""
        key = (name, tuple(shape), dtype, torch.device(device))
        buf = self._scratch.get(key)
        if buf is None:
            buf = self._scratch[key] = torch.empty(shape, dtype=dtype, device=device)
        return buf

    # -- Optimizer API -------------------------------------------------------------------------------------------

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a param group after construction (e.g. by a framework), split like the constructor splits: LoRA
        factors among ``params`` are paired through the model the optimizer was built with (its current
        ``lora_pairs``), or name them with the ``{"lora_pairs": [(A, B, scaling), ...]}`` form."""
        if "lora" not in param_group:
            model = self._model_ref() if getattr(self, "_model_ref", None) is not None else None
            groups = build_param_groups([param_group], model, require_lora=False)
            if model is not None:
                # a new adapter on a layer whose adapter this optimizer already trains would be double-counted
                trained = {id(p) for g in [*self.param_groups, *groups] for p in g["params"]}
                check_one_adapter_per_layer([pair for pair in lora_pairs(model) if id(pair.A) in trained])
            for g in groups:
                super().add_param_group(g)
            return
        if param_group["lora"]:
            params = list(param_group["params"])
            if len(params) != 2 * len(param_group["scalings"]):
                raise ValueError("A LoRA param group must hold [A0, B0, A1, B1, ...] and one scaling per pair.")
            for j in range(len(param_group["scalings"])):
                check_pair(params[2 * j], params[2 * j + 1], param_group["scalings"][j], param_group["pair_names"][j])
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """One optimizer step on the current gradients; returns the closure's loss (None without a closure).

        ``closure``: torch's optimizer contract — a callable that recomputes the loss, calls ``backward()`` and
        returns the loss. It is evaluated once, under ``torch.enable_grad()``, before the step (PyTorch
        Lightning's automatic optimization always passes one). Without it, call ``loss.backward()`` first.

        Non-finite gradients: if any gradient holds an inf or NaN, the whole step is skipped with a
        ``RuntimeWarning`` naming the parameter — no parameter, moment or step count changes — as
        ``torch.amp.GradScaler`` skips such steps (which it does before this method is called).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_pair_grads()
        bad = self._nonfinite_grad()
        if bad is not None:
            warnings.warn(
                f"{type(self).__name__}.step(): the gradient of {bad} has inf or NaN entries; the step was skipped "
                "(parameters and optimizer state unchanged). Lower the learning rate, clip gradients, or use "
                "torch.amp.GradScaler with fp16.",
                RuntimeWarning,
                stacklevel=2,
            )
            return loss
        if self._sharding is not None:
            self._sharding.ensure_current(self)
        for group in self.param_groups:
            if group["lora"]:
                _dist.check_lora_group_intact(group)  # e.g. DeepSpeed ZeRO replaced the factors by flat buffers
                pairs = self._pairs_with_grad(group)
                if self._sharding is not None:
                    pairs = self._sharding.owned(pairs)
                for bucket in self._buckets(pairs):
                    if _fsdp.is_dtensor(bucket[0][1]):  # FSDP2: factors sharded by rows (lorapro.fsdp)
                        _fsdp.step_lora_bucket(self, group, bucket)
                    else:
                        self._step_lora_bucket(group, bucket)
                    for _, a, b, _ in bucket:
                        # a state entry for every factor, empty where a mode keeps none (B in full / factored mode):
                        # torch.distributed.checkpoint's set_optimizer_state_dict requires one per trainable parameter
                        self.state.setdefault(a, {})
                        self.state.setdefault(b, {})
            elif any(_fsdp.is_dtensor(p) for p in group["params"]):
                _fsdp.step_plain_group(self, group)
            else:
                self._step_plain_group(group)
        if self._sharding is not None:
            self._sharding.synchronize()  # owners broadcast their updated factors
        return loss

    def _check_pair_grads(self) -> None:
        """Refuse a pair with exactly one gradient (a half frozen or detached after construction), before any
        state changes: stepping it as if the missing gradient were zero would silently move both factors."""
        for group in self.param_groups:
            if not group.get("lora"):
                continue
            _dist.check_lora_group_intact(group)  # e.g. DeepSpeed ZeRO replaced the factors by flat buffers
            params = group["params"]
            for j, name in enumerate(group["pair_names"]):
                A, B = params[2 * j], params[2 * j + 1]
                if (A.grad is None) != (B.grad is None):
                    missing = "A" if A.grad is None else "B"
                    raise RuntimeError(
                        f"{name}: {missing} has no gradient but its partner has one (requires_grad="
                        f"{(A if missing == 'A' else B).requires_grad}). LoRA-Pro needs the gradients of both A and "
                        "B; train both halves of a pair or freeze both (then the pair is skipped)."
                    )

    def _nonfinite_grad(self) -> Optional[str]:
        """The name of a parameter whose gradient has an inf or NaN entry, or None. One read of the gradients
        (their max-norms) and one host synchronisation per device.

        Under FSDP2 each rank holds a shard of the gradients, so a bad entry may be visible on one rank only: the
        verdict is all-reduced over each DTensor mesh, so that every rank skips the same steps (a rank stepping
        alone would also leave the others waiting in the step's collectives)."""
        grads: List[torch.Tensor] = []
        names: List[Tuple[int, int]] = []
        meshes: Dict[int, Any] = {}
        for gi, group in enumerate(self.param_groups):
            for k, p in enumerate(group["params"]):
                g = p.grad
                if g is None or g.is_sparse:  # sparse gradients are refused by the step
                    continue
                if _fsdp.is_dtensor(g):
                    meshes.setdefault(id(g.device_mesh), g.device_mesh)
                    g = g.to_local()
                grads.append(g)
                names.append((gi, k))
        by_device: Dict[torch.device, List[int]] = defaultdict(list)
        for i, g in enumerate(grads):
            by_device[g.device].append(i)
        bad: Optional[str] = None
        for idx in by_device.values():
            norms = torch._foreach_norm([grads[i] for i in idx], math.inf)
            finite = torch.stack([n.float() for n in norms]).isfinite()
            if not bool(finite.all()):
                gi, k = names[idx[int((~finite).nonzero()[0])]]
                group = self.param_groups[gi]
                if group.get("lora"):
                    bad = f"{group['pair_names'][k // 2]}.{'AB'[k % 2]}"
                else:
                    bad = f"param group {gi}, parameter {k} (shape {tuple(group['params'][k].shape)})"
                break
        for mesh in meshes.values():
            pg = mesh.get_group()
            flag = torch.tensor([0.0 if bad is None else 1.0], device=_fsdp._comm_device(pg, grads[0].device))
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=pg)
            if bad is None and float(flag) > 0:
                bad = "a gradient shard held by another rank (FSDP2)"
        return bad

    def state_dict(self) -> Dict[str, Any]:
        """The optimizer state; with ``shard_state=True`` the consolidated one (call
        :meth:`consolidate_state_dict` on every rank first, then this on the rank it gathered to)."""
        if self._sharding is not None:
            return self._sharding.state_dict(self)
        return super().state_dict()

    def consolidate_state_dict(self, to: int = 0) -> None:
        """``shard_state=True``: gather every LoRA pair's state to rank ``to`` so that ``state_dict()`` there is
        complete and world-size independent. A collective — every rank must call it. A no-op when not sharded."""
        if self._sharding is not None:
            self._sharding.consolidate(self, to)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Like :meth:`torch.optim.Optimizer.load_state_dict`, but keeps each state tensor's dtype.

        (torch casts state to the parameter's dtype; here the full-mode moments are m × n fp32 tensors that belong
        to an r × n bf16 factor, and casting them would break resume == uninterrupted.)
        """
        _dist.check_loadable(state_dict)  # not the placeholder of a rank of a sharded optimizer
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"This checkpoint has {len(saved_groups)} param groups, the optimizer {len(self.param_groups)}: "
                "it was saved for a different model or LoRA configuration."
            )
        for i, (old, new) in enumerate(zip(saved_groups, self.param_groups)):
            for key in ("lora", "mode"):
                if old.get(key) != new.get(key):
                    raise ValueError(
                        f"Param group {i}: checkpoint has {key}={old.get(key)!r}, optimizer has {new.get(key)!r}. "
                        f"Create the optimizer with the same {key} the checkpoint was saved with."
                    )
            if old.get("first_moment", "lowrank") != "lowrank":
                raise ValueError(
                    f"Param group {i}: this checkpoint was saved with mode='factored', first_moment="
                    f"{old['first_moment']!r}, a variant that has been removed (measured worse than the default "
                    "low-rank first moment; see the README). Resume it with the lorapro version that wrote it, or start "
                    "a fresh optimizer."
                )
            if len(old["params"]) != len(new["params"]):
                raise ValueError(f"Param group {i}: checkpoint has {len(old['params'])} tensors, model {len(new['params'])}.")
            changed = [f"{name}: checkpoint {a!r}, model {b!r}"
                       for name, a, b in zip(new.get("pair_names", []), old.get("scalings", []), new.get("scalings", []))
                       if not math.isclose(float(a), float(b), rel_tol=1e-12)]
            if changed:
                raise ValueError(
                    f"Param group {i}: the LoRA scales (lora_alpha / r) changed since the checkpoint was saved ("
                    + "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
                    + "). Resume with the LoRA configuration the checkpoint was trained with; to train on with new "
                    "scales on purpose, start a fresh optimizer instead of loading this state."
                )
        saved_state = state_dict["state"]
        pair_names = [g.get("pair_names") for g in self.param_groups]
        super().load_state_dict({"state": {}, "param_groups": saved_groups})
        for g, names in zip(self.param_groups, pair_names):  # the model's names, not the checkpoint's
            if names is not None:
                g["pair_names"] = names
            g.pop("first_moment", None)  # written by versions with first_moment="factor"; always "lowrank" here
        if self._sharding is not None:
            self._sharding.ensure_current(self)  # owners of groups added since the last step
        id_to_param = {
            pid: p
            for old, new in zip(saved_groups, self.param_groups)
            for pid, p in zip(old["params"], new["params"])
        }
        for pid, st in saved_state.items():
            p = id_to_param[pid]
            if self._sharding is not None and not self._sharding.keeps_state(p):
                continue  # another rank owns this pair's state
            self.state[p] = {
                k: (v.detach().to(device=p.device if k != "step" else v.device).clone() if torch.is_tensor(v) else v)
                for k, v in st.items()
            }
            if _fsdp.is_dtensor(p):  # a consolidated state loaded under FSDP2: keep this rank's rows
                self.state[p] = {k: _fsdp.to_local_state(v, p) for k, v in self.state[p].items()}
        if self._sharding is not None:  # each rank now holds only its own pairs' part of the loaded state
            self._sharding.loaded(any(id(id_to_param[pid]) in self._sharding.owner_of for pid in saved_state))

    # -- helpers for subclasses ----------------------------------------------------------------------------------

    def _pairs_with_grad(self, group: Dict[str, Any]) -> List[Tuple[int, torch.Tensor, torch.Tensor, float]]:
        """(index, A, B, s) for each pair with gradients (:meth:`_check_pair_grads` refused pairs with one)."""
        params = group["params"]
        out = []
        for j, s in enumerate(group["scalings"]):
            A, B = params[2 * j], params[2 * j + 1]
            if A.grad is None and B.grad is None:
                continue
            for t in (A, B):
                if t.grad is not None and t.grad.is_sparse:
                    raise TypeError(f"{group['pair_names'][j]}: LoRA-Pro does not support sparse gradients.")
            out.append((j, A, B, float(s)))
        return out

    @staticmethod
    def _buckets(pairs: List[Tuple[int, torch.Tensor, torch.Tensor, float]]) -> List[List[Tuple[int, torch.Tensor, torch.Tensor, float]]]:
        """Group pairs that share (m, n, r, dtype, device) so their algebra runs in single batched calls."""
        buckets: Dict[Any, list] = defaultdict(list)
        for item in pairs:
            _, A, B, _ = item
            buckets[(B.shape[0], A.shape[1], A.shape[0], A.dtype, A.device, _fsdp.is_dtensor(A))].append(item)
        out = []
        for bucket in buckets.values():
            _, A, B, _ = bucket[0]
            if F.on_accelerator_path(A.device):
                out.append(bucket)
                continue
            packed_bytes = 2 * (A.numel() + B.numel()) * _work_dtype(A.dtype).itemsize
            per_chunk = max(1, _perf.CPU_BUCKET_BYTES // packed_bytes)
            out += [bucket[i: i + per_chunk] for i in range(0, len(bucket), per_chunk)]
        return out

    @staticmethod
    def _factors_and_grads(bucket: list) -> Tuple[List[torch.Tensor], ...]:
        """The A's, B's and their gradients (a missing one as zeros) of a bucket's pairs."""
        A = [a for _, a, _, _ in bucket]
        B = [b for _, _, b, _ in bucket]
        gA = [a.grad if a.grad is not None else torch.zeros_like(a) for a in A]
        gB = [b.grad if b.grad is not None else torch.zeros_like(b) for b in B]
        return A, B, gA, gB

    def _state_dtype_for(self, p: torch.Tensor) -> torch.dtype:
        """The dtype of ``p``'s new optimizer state: ``state_dtype``, else the work dtype (at least float32)."""
        return self.state_dtype or _work_dtype(p.dtype)

    def _init_state(self, p: torch.Tensor, shapes: Dict[str, Tuple[int, ...]], step: bool = True) -> Dict[str, Any]:
        """``p``'s state, with what is missing created — the one place optimizer state is created: a zero tensor
        per entry of ``shapes`` (dtype :meth:`_state_dtype_for`, on ``p``'s device) and, with ``step``, the
        0-dim float32 step count (host), incremented by the functional steps (:mod:`lorapro.steps`)."""
        st = self.state[p]
        if step and "step" not in st:
            st["step"] = torch.tensor(0.0)
        for key, shape in shapes.items():
            if key not in st:
                st[key] = torch.zeros(shape, dtype=self._state_dtype_for(p), device=p.device)
        return st

    def _options(self, group: Dict[str, Any], *keys: str, lora: bool = True) -> Dict[str, Any]:
        """Keyword arguments of a functional step (:mod:`lorapro.steps`): the group's hyperparameters ``keys``
        (``betas`` as ``beta1``, ``beta2``) and, for a LoRA step, the optimizer's precision and workspace."""
        out = {k: group[k] for k in keys}
        if "betas" in out:
            out["beta1"], out["beta2"] = out.pop("betas")
        return dict(out, compute_dtype=self.compute_dtype, workspace=self._workspace) if lora else out

    def _step_lora_bucket(self, group: Dict[str, Any], bucket: list) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _step_plain_group(self, group: Dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------------


class LoRAProAdamW(_LoRAProBase):
    r"""LoRA-Pro with AdamW (arXiv 2407.18242, Algorithm 1).

    For every LoRA pair (A, B, s), with ``g̃ = P_B G + (I − P_B) G P_A`` the equivalent gradient
    (:mod:`lorapro.functional`):

    ``mode="full"`` — the paper's algorithm. Moments of g̃ in the full m × n shape::

        m ← β1·m + (1 − β1)·g̃,     v ← β2·v + (1 − β2)·g̃²
        D = (m / (1 − β1ᵗ)) / (√(v / (1 − β2ᵗ)) + ε)
        (ĥ_A, ĥ_B) = adjusted_gradients(u_A = s·Bᵀ·D, u_B = s·D·Aᵀ)      # D projected back like a gradient
        A ← A·(1 − lr·λ) − lr·ĥ_A,   B ← B·(1 − lr·λ) − lr·ĥ_B

      Optimizer memory is that of full fine-tuning of the adapted weights (2·m·n per layer, ``state_dtype``).

    ``mode="efficient"`` — the authors' earlier memory-light variant: ordinary AdamW on (ĝ_A, ĝ_B), moments of
      factor size (plain LoRA's memory).

    ``mode="factored"`` — Adam on g̃ at LoRA's memory (:mod:`lorapro.factored`): an Adafactor second moment (EMAs
      of the row and column sums of g̃², computed from g̃'s rank-2r factors), a rank-2r EMA of g̃ kept as two
      factors, ε inside the square root (√(v̂ + ε²)) and Adafactor's update clipping::

        V̂ = ρ̂ κ̂ᵀ / Σρ̂                               (row / column sums of v̂ + ε², never formed as m × n)
        P·Q ← trunc_2r(β1·P·Q + (1 − β1)·g̃),     D = (P·Q / (1 − β1ᵗ)) ⊘ √V̂,     D ← D / max(1, RMS(D)/d)
        (ĥ_A, ĥ_B) = adjusted_gradients(s·Bᵀ·D, s·D·Aᵀ),   then the update as in full mode

      State (m + n)·(2r + 1) numbers per layer; no m × n tensor is formed in the step.

    Parameters that are not LoRA factors get plain AdamW with the same hyperparameters.

    Args:
        params: a model (PEFT or any module with LoRA layers), or param groups (see :func:`build_param_groups`).
        lr: learning rate.
        betas: (β1, β2).
        eps: ε added to √v̂.
        weight_decay: decoupled weight decay λ (applied to A and B, as AdamW applies it to parameters).
        mode: ``"full"``, ``"efficient"`` or ``"factored"``.
        x_solution: ``"sylvester"`` (default), ``"zero"`` or ``"symmetric"`` — the free r × r matrix X.
        delta: relative cut-off of the pseudo-inverses of the Gram matrices BᵀB and AAᵀ: eigenvalues
            ``≤ δ·λ_max`` count as zero (``torch.linalg.pinv``'s ``rtol``), so B = 0 (PEFT's initialisation) gives
            ĝ_A = 0 and g̃ = G·P_A exactly, and a singular Gram matrix (r > min(m, n), a rank-deficient first
            batch) does not amplify float32 rounding (see :mod:`lorapro.functional`).
        model: with ``params`` given as tensors/groups, the model whose LoRA layers say which tensors pair up.
        compute_dtype: precision of the LoRA-Pro algebra. ``None`` (default, automatic): r × r algebra in float64,
            products with factor-sized operands in the factors' work dtype (float32 for float32 / bf16 factors),
            Gram matrices BᵀB, AAᵀ formed in float32 where their condition number is ≤ 1e3 and in float64 where
            it is not (on accelerators always in float64); see :mod:`lorapro.functional`. ``torch.float64``: all
            of it in float64 (the most accurate; on CPU about 1.4× slower in efficient mode). ``torch.float32``:
            all of it in float32 (fastest; float32 Gram matrices lose accuracy like cond(B)²·1e-7).
        state_dtype: dtype of the moments (default: float32, or the parameter dtype if wider);
            ``torch.bfloat16`` halves full mode's memory.
        shard_state: inside an initialised ``torch.distributed`` process group, keep each LoRA pair's state only
            on the rank that owns it (pairs balanced across ranks) and broadcast the updated factors after each
            step; see :mod:`lorapro.distributed`, including the checkpoint protocol (``consolidate_state_dict``).
        clip_threshold: factored mode only — Adafactor's update clipping threshold d (the step direction D is
            scaled down to RMS(D) ≤ d); ``None`` disables clipping.

    Caveats: full mode's state is m × n per layer (about 52 GB in fp32 for Llama-2-7B with r = 8 on all
    projections); use ``mode="factored"`` (Adam on g̃ at about plain LoRA's state) or ``mode="efficient"`` where
    that does not fit. The step needs the current A, B, so call it
    after gradients are final (after clipping / all-reduce). If any gradient holds an inf or NaN, the step is
    skipped (parameters and state unchanged) with a ``RuntimeWarning``, in every mode.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        mode: str = "full",
        x_solution: str = "sylvester",
        delta: float = 1e-6,
        model: Optional[nn.Module] = None,
        compute_dtype: Optional[torch.dtype] = None,
        state_dtype: Optional[torch.dtype] = None,
        shard_state: bool = False,
        clip_threshold: Optional[float] = 1.0,
    ) -> None:
        _check_range("learning rate", lr, 0.0)
        _check_range("epsilon value", eps, 0.0)
        _check_range("beta parameter at index 0", betas[0], 0.0, 1.0)
        _check_range("beta parameter at index 1", betas[1], 0.0, 1.0)
        _check_range("weight_decay value", weight_decay, 0.0)
        _check_range("delta (relative cut-off of the Gram eigenvalues)", delta, 0.0, 1.0, low_open=True)
        if mode not in MODES:
            raise ValueError(f"Invalid mode {mode!r}: choose one of {MODES}.")
        if x_solution not in F.X_SOLUTIONS:
            raise ValueError(f"Invalid x_solution {x_solution!r}: choose one of {F.X_SOLUTIONS}.")
        if clip_threshold is not None:
            _check_range("clip_threshold (use None to disable update clipping)", clip_threshold, 0.0, low_open=True)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, mode=mode,
                        x_solution=x_solution, delta=delta, clip_threshold=clip_threshold)
        super().__init__(params, defaults, model=model, compute_dtype=compute_dtype, state_dtype=state_dtype,
                         shard_state=shard_state)

    # -- LoRA pairs ----------------------------------------------------------------------------------------------

    def _step_lora_bucket(self, group: Dict[str, Any], bucket: list, rows: Optional[_fsdp.RowShard] = None) -> None:
        """One bucket of same-shape pairs: gather factors, gradients and state, then the mode's functional step
        (:mod:`lorapro.steps`). ``rows``: full mode under FSDP2 only, this rank's rows of the moments
        (:func:`lorapro.fsdp.step_lora_bucket`)."""
        A, B, gA, gB = self._factors_and_grads(bucket)
        scalings = [sc for _, _, _, sc in bucket]
        mode = group["mode"]
        opts = self._options(group, "lr", "betas", "eps", "weight_decay", "delta", "x_solution")
        m, r, n = B[0].shape[0], A[0].shape[0], A[0].shape[1]
        if mode == "full":
            lo, hi = (0, m) if rows is None else (rows.lo, rows.hi)
            sts = [self._init_state(a, {"exp_avg": (hi - lo, n), "exp_avg_sq": (hi - lo, n)}) for a in A]
            S.adamw_full_step(A, B, gA, gB, scalings, [st["exp_avg"] for st in sts],
                              [st["exp_avg_sq"] for st in sts], [st["step"] for st in sts], rows=rows, **opts)
        elif mode == "efficient":
            sts = []
            for a, b in zip(A, B):
                sts += [self._init_state(a, {"exp_avg": a.shape, "exp_avg_sq": a.shape}),
                        self._init_state(b, {"exp_avg": b.shape, "exp_avg_sq": b.shape}, step=False)]
            S.adamw_efficient_step(A, B, gA, gB, scalings, [st["exp_avg"] for st in sts],
                                   [st["exp_avg_sq"] for st in sts], [st["step"] for st in sts[::2]], **opts)
        else:  # factored
            k = 2 * r  # rank of the first-moment EMA = rank of g̃
            sts = [self._init_state(a, {"exp_avg_sq_row": (m,), "exp_avg_sq_col": (n,), "exp_avg_left": (m, k),
                                        "exp_avg_right": (k, n)}) for a in A]
            S.adamw_factored_step(A, B, gA, gB, scalings, *([st[key] for st in sts] for key in (
                "exp_avg_left", "exp_avg_right", "exp_avg_sq_row", "exp_avg_sq_col", "step")),
                clip_threshold=group["clip_threshold"], **opts)

    # -- other trainable parameters: plain AdamW -----------------------------------------------------------------

    def _step_plain_group(self, group: Dict[str, Any]) -> None:
        by_kind: Dict[Any, List[List[torch.Tensor]]] = defaultdict(lambda: [[], [], [], [], []])
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise TypeError("LoRAProAdamW does not support sparse gradients; use torch.optim.SparseAdam for them.")
            st = self._init_state(p, {"exp_avg": p.shape, "exp_avg_sq": p.shape})
            lists = by_kind[(p.dtype, st["exp_avg"].dtype, p.device)]  # adamw_step takes one dtype at a time
            for lst, t in zip(lists, (p, p.grad.to(st["exp_avg"].dtype), st["exp_avg"], st["exp_avg_sq"], st["step"])):
                lst.append(t)
        opts = self._options(group, "lr", "betas", "eps", "weight_decay", lora=False)
        for params, grads, exp_avgs, exp_avg_sqs, steps in by_kind.values():
            S.adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, **opts)


class LoRAProSGD(_LoRAProBase):
    r"""LoRA-Pro with SGD: ``A ← A·(1 − lr·λ) − lr·d_A``, ``B ← B·(1 − lr·λ) − lr·d_B``.

    ``d`` is the adjusted gradient ĝ (:func:`lorapro.functional.adjusted_gradients`) or, with ``momentum > 0``,
    its momentum buffer with :class:`torch.optim.SGD` semantics (``buf ← μ·buf + (1 − dampening)·ĝ``, Nesterov
    optional). Weight decay λ is decoupled. Non-LoRA parameters get the same SGD on their raw gradients.

    Args: as :class:`LoRAProAdamW` where shared, plus ``momentum``, ``dampening``, ``nesterov``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        x_solution: str = "sylvester",
        delta: float = 1e-6,
        model: Optional[nn.Module] = None,
        compute_dtype: Optional[torch.dtype] = None,
        state_dtype: Optional[torch.dtype] = None,
        shard_state: bool = False,
    ) -> None:
        _check_range("learning rate", lr, 0.0)
        _check_range("momentum value", momentum, 0.0)
        _check_range("weight_decay value", weight_decay, 0.0)
        _check_range("delta (relative cut-off of the Gram eigenvalues)", delta, 0.0, 1.0, low_open=True)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening.")
        if x_solution not in F.X_SOLUTIONS:
            raise ValueError(f"Invalid x_solution {x_solution!r}: choose one of {F.X_SOLUTIONS}.")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, x_solution=x_solution, delta=delta, mode="sgd")
        super().__init__(params, defaults, model=model, compute_dtype=compute_dtype, state_dtype=state_dtype,
                         shard_state=shard_state)

    def _momentum(self, group: Dict[str, Any], p: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """d, or its momentum (:func:`lorapro.steps.sgd_momentum`) kept in ``p``'s state."""
        st = self.state[p]
        d, buf = S.sgd_momentum(d, st.get("momentum_buffer"), momentum=group["momentum"],
                                dampening=group["dampening"], nesterov=group["nesterov"],
                                state_dtype=self._state_dtype_for(p))
        if buf is not None:
            st["momentum_buffer"] = buf
        return d

    def _step_lora_bucket(self, group: Dict[str, Any], bucket: list) -> None:
        A, B, gA, gB = self._factors_and_grads(bucket)
        params = [p for pair in zip(A, B) for p in pair]
        bufs = S.sgd_step(A, B, gA, gB, [sc for _, _, _, sc in bucket],
                          [self.state[p].get("momentum_buffer") for p in params],
                          state_dtype=self._state_dtype_for(A[0]),
                          **self._options(group, "lr", "momentum", "dampening", "nesterov", "weight_decay", "delta",
                                          "x_solution"))
        for p, buf in zip(params, bufs):
            if buf is not None:
                self.state[p]["momentum_buffer"] = buf

    def _step_plain_group(self, group: Dict[str, Any]) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise TypeError("LoRAProSGD does not support sparse gradients.")
            wdt = _work_dtype(p.dtype)
            d = self._momentum(group, p, p.grad.to(wdt))
            p.copy_(p.to(wdt) * (1.0 - lr * wd) - lr * d)
