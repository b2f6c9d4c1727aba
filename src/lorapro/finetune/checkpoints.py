"""Checkpoints that survive a full disk, Ctrl-C and a changed config.

* :class:`CheckpointTrainer` writes every checkpoint into ``checkpoints/.incomplete/checkpoint-N`` and renames it
  to ``checkpoints/checkpoint-N`` only once every file is written and flushed, so a crash mid-save (disk full,
  Ctrl-C, a killed job) never leaves a half-written ``checkpoint-N`` for ``resume_from_checkpoint=latest`` to pick.
* :func:`checkpoint_problem` finds what is broken in a checkpoint without loading it (a truncated ``optimizer.pt``,
  a corrupt ``trainer_state.json``, a missing optimizer state); :func:`latest_checkpoint` skips such checkpoints
  with a warning, and an explicitly named one is refused with a message.
* Each checkpoint carries the resolved config of its run (``lorapro_config.yaml``); :func:`config_differences`
  compares it with the config of the run that wants to resume it, so an old run is never silently continued with
  another learning rate or step count.
* :func:`move_aside` is what ``overwrite=true`` does to the previous run's outputs: they are renamed to a
  timestamped sibling directory, never deleted.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import struct
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from transformers import Trainer

__all__ = [
    "CONFIG_NAME",
    "STAGING_DIR",
    "CheckpointTrainer",
    "checkpoint_problem",
    "latest_checkpoint",
    "config_differences",
    "move_aside",
    "resume_command",
]

CONFIG_NAME = "lorapro_config.yaml"  # the run's resolved config, inside every checkpoint
STAGING_DIR = ".incomplete"  # checkpoints being written; never matched by checkpoint-N lookups
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _fsync_tree(root: Path) -> None:
    """Flush every file (and the directories) under ``root`` to disk, so that the rename that follows publishes
    complete files even if the machine loses power right after it."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        try:
            fd = os.open(dirpath, os.O_RDONLY)
        except OSError:  # directories cannot be opened on some platforms; the files are what matters
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


class CheckpointTrainer(Trainer):
    """``transformers.Trainer`` whose checkpoints appear atomically (written aside, renamed when complete).

    The Trainer offers no public hook for *where* a checkpoint is written: callbacks (``on_save``) run after the
    files are on disk, so they can mark a checkpoint complete but cannot stop a half-written ``checkpoint-N`` from
    existing under its final name. So this subclass overrides two private methods of the Trainer,
    ``_save_checkpoint`` (to stage, then publish) and ``_get_output_dir`` (to point the stock implementation at the
    staging directory), and reuses everything else: what a checkpoint contains and how it is resumed stay the
    Trainer's. A third, ``_prepare_for_training``, lets a DeepSpeed ZeRO checkpoint resume on another number of
    processes. ``tests/finetune/test_checkpoints.py`` fails if a transformers release changes these methods.

    ``checkpoint_files`` maps file names to text written into every checkpoint (the run's config).
    """

    def __init__(self, *args: Any, checkpoint_files: Optional[Mapping[str, str]] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.checkpoint_files = dict(checkpoint_files or {})
        self._staging: Optional[str] = None

    def _prepare_for_training(self, max_steps: Any, train_dataloader: Any, resume_from_checkpoint: Any) -> Any:
        """The Trainer's, except that a DeepSpeed ZeRO checkpoint written by another number of processes is loaded
        with :func:`lorapro.integrations.deepspeed.load_checkpoint` (which re-slices LoRA-Pro's state) instead of
        ``engine.load_checkpoint``, which refuses another world size. A private method of the Trainer, like the
        two below: it is where the Trainer loads a DeepSpeed checkpoint (``deepspeed_load_checkpoint``), with no
        hook; ``tests/finetune/test_checkpoints.py`` fails if a release changes it."""
        resharded = False
        if self.is_deepspeed_enabled and resume_from_checkpoint is not None:
            from lorapro.integrations.deepspeed import checkpoint_world_size

            saved = checkpoint_world_size(resume_from_checkpoint)
            resharded = saved is not None and saved != self.args.world_size
        if not resharded:
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        from transformers import trainer as hf_trainer  # _is_peft_model: defined there (4.x) or imported (5.x)

        from lorapro.integrations.deepspeed import load_checkpoint

        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        load_path, _ = load_checkpoint(self.model_wrapped, resume_from_checkpoint,
                                       load_module_strict=not hf_trainer._is_peft_model(self.model))
        if load_path is None:
            raise ValueError(f"[deepspeed] failed to resume from checkpoint {resume_from_checkpoint}")
        self._load_optimizer_and_scheduler(resume_from_checkpoint)  # what the Trainer does after its own load
        if hasattr(self, "_load_scaler"):
            self._load_scaler(resume_from_checkpoint)
        return model, train_dataloader

    def _get_output_dir(self, trial: Any) -> str:
        return self._staging if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any, *args: Any, **kwargs: Any) -> None:  # 4.x also passes metrics
        run_dir = Path(super()._get_output_dir(trial))
        staging = run_dir / STAGING_DIR
        name = f"checkpoint-{self.state.global_step}"
        main = self.args.should_save
        if main and staging.exists():
            shutil.rmtree(staging)  # whatever is there is an earlier save that never completed
        self.accelerator.wait_for_everyone()
        self._staging = str(staging)
        try:
            super()._save_checkpoint(model, trial, *args, **kwargs)
            if main:
                for fname, text in self.checkpoint_files.items():
                    (staging / name / fname).write_text(text)
                _fsync_tree(staging / name)
        except BaseException:
            if main:  # free the space the partial checkpoint took; the earlier checkpoints are untouched
                shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()  # every process has written its files (RNG state, shards)
        if main:
            final = run_dir / name
            if final.exists():  # the same step saved again (a resumed run): replace the old copy
                old = staging / (name + ".replaced")
                os.replace(final, old)
                os.replace(staging / name, final)
                shutil.rmtree(old)
            else:
                os.replace(staging / name, final)
            staging.rmdir()
            if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint).parent == staging:
                self.state.best_model_checkpoint = str(final)
            _rotate(run_dir, self.args.save_total_limit)
        self.accelerator.wait_for_everyone()


def _step_of(path: Path) -> int:
    m = _CHECKPOINT_RE.match(path.name)
    return int(m.group(1)) if m else -1


def checkpoints_in(ckdir: Path) -> List[Path]:
    """The ``checkpoint-N`` directories in ``ckdir``, oldest (smallest N) first."""
    if not ckdir.is_dir():
        return []
    return sorted((p for p in ckdir.iterdir() if p.is_dir() and _CHECKPOINT_RE.match(p.name)), key=_step_of)


def _rotate(ckdir: Path, limit: Optional[int]) -> None:
    """Keep the ``limit`` newest checkpoints (by step); the newest is always kept."""
    if not limit or limit <= 0:
        return
    for old in checkpoints_in(ckdir)[: -max(limit, 1)]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# checking a checkpoint without loading it


def _safetensors_problem(path: Path) -> Optional[str]:
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                return "its header is cut off"
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError):
        return "its header is not readable"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if 8 + n + max(ends, default=0) > size:
        return f"it is {size} bytes, shorter than its header says ({8 + n + max(ends)})"
    return None


def _file_problem(path: Path) -> Optional[str]:
    suffix = path.suffix
    if suffix == ".json":
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            return f"it is not valid JSON ({e})"
    elif suffix in (".pt", ".pth", ".bin"):
        # torch.save writes a zip archive whose directory sits at the very end: a truncated file has none
        if not zipfile.is_zipfile(path):
            return "it is truncated or not a torch.save file"
    elif suffix == ".safetensors":
        return _safetensors_problem(path)
    return None


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why ``path`` cannot be resumed from (``None`` when it looks complete).

    Cheap checks only (no tensor is loaded, so a 50 GB optimizer state costs nothing): ``trainer_state.json``
    exists and holds a step, every JSON file parses, every ``torch.save`` file still has its zip directory at its
    end and every safetensors file is as long as its header says, and the optimizer state is present (the Trainer
    would otherwise silently restart the optimizer from zero).
    """
    path = Path(path)
    state = path / "trainer_state.json"
    if not state.is_file():
        return f"{state} is missing (not a Trainer checkpoint, or it was never completed)"
    for f in sorted(path.rglob("*")):
        if f.is_file():
            problem = _file_problem(f)
            if problem:
                return f"{f} is damaged: {problem}"
    try:
        step = json.loads(state.read_text()).get("global_step")
    except AttributeError:
        step = None
    if not isinstance(step, int):
        return f"{state} holds no global_step"
    has_optimizer = any((path / n).is_file() for n in ("optimizer.pt", "optimizer.bin")) or any(
        p.is_dir() and (p.name.startswith("global_step")  # DeepSpeed keeps its own layout
                        or (p.name.startswith("optimizer_") and (p / ".metadata").is_file()))  # FSDP2: sharded DCP
        for p in path.iterdir()
    )
    if not has_optimizer:
        return (
            f"{path} holds no optimizer state (written with train.save_only_model=true?); resuming would restart "
            "the optimizer from zero"
        )
    return None


def latest_checkpoint(ckdir: Path, warn: Any = print) -> Tuple[Optional[Path], List[str]]:
    """The newest checkpoint in ``ckdir`` that :func:`checkpoint_problem` accepts, and the problems of the newer
    ones that were skipped (each also passed to ``warn``)."""
    skipped: List[str] = []
    for ck in reversed(checkpoints_in(ckdir)):
        problem = checkpoint_problem(ck)
        if problem is None:
            return ck, skipped
        msg = f"skipping {ck.name}: {problem}"
        skipped.append(msg)
        warn(msg)
    return None, skipped


# ---------------------------------------------------------------------------------------------------------------
# the config a checkpoint was written with


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], allowed: Sequence[str]) -> List[str]:
    """``"key: saved -> current"`` for every key whose value differs between two config dicts, except ``allowed``."""
    a, b = _flatten(saved), _flatten(current)
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if k not in allowed and a.get(k) != b.get(k)
    ]


def saved_config_path(checkpoint: Path) -> Optional[Path]:
    """The config a checkpoint was written with: its own copy, else (checkpoints from before it carried one) the
    ``config.yaml`` of the run directory it sits in."""
    own = checkpoint / CONFIG_NAME
    if own.is_file():
        return own
    run_cfg = checkpoint.parent.parent / "config.yaml"
    return run_cfg if run_cfg.is_file() else None


# ---------------------------------------------------------------------------------------------------------------
# overwrite=true and how to resume


def move_aside(out: Path) -> Path:
    """Rename ``out`` to ``out.replaced-YYYYmmdd-HHMMSS`` (same parent, so it is a rename, never a copy) and return
    the new name. Nothing the previous run wrote is deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = out.with_name(f"{out.name}.replaced-{stamp}")
    i = 1
    while target.exists():
        target = out.with_name(f"{out.name}.replaced-{stamp}-{i}")
        i += 1
    os.replace(out, target)
    return target


def resume_command(output_dir: Path) -> str:
    """The command that continues the run in ``output_dir`` from its newest complete checkpoint."""
    cfg = Path(output_dir) / "config.yaml"
    return f"lorapro train {shlex.quote(str(cfg))} train.resume_from_checkpoint=latest"
