"""``lorapro export RUN_DIR [--output DIR]``: merge a run's adapter into its base model and save a plain model.

The result loads with ``AutoModelFor*.from_pretrained(DIR)`` and needs neither PEFT nor lorapro — what serving
stacks (vLLM, TGI, llama.cpp converters) expect. The merge is PEFT's ``merge_and_unload``: each adapted weight
becomes ``W0 + s B A`` (PiSSA / LoRA-GA adapters were already converted to plain LoRA for the original base at the
end of training), and ``modules_to_save`` (e.g. a classification head) replace their base modules.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Union

from lorapro.config import ConfigError, load_config

from .config import TrainConfig

__all__ = ["export_merged", "main"]


def _run_dir(path: Path) -> Path:
    """The run directory, also when given its ``adapter/`` subdirectory."""
    if not (path / "config.yaml").is_file() and (path.parent / "config.yaml").is_file():
        return path.parent
    return path


def export_merged(run_dir: Union[str, Path], output: Optional[Union[str, Path]] = None) -> Path:
    """Merge ``RUN_DIR/adapter`` into the base model named in ``RUN_DIR/config.yaml``; save it (with the
    tokenizer) to ``output`` (default ``RUN_DIR/merged``) and return that directory.

    The model is written to ``OUTPUT.incomplete`` and renamed when complete, so a failed export leaves no
    half-written model behind. An existing non-empty ``output`` is an error (nothing is overwritten).
    """
    import torch
    from peft import PeftModel

    from lorapro.models import load_model_and_tokenizer

    run = _run_dir(Path(run_dir))
    cfg_file = run / "config.yaml"
    if not cfg_file.is_file():
        raise ConfigError(f"'{run_dir}' is not the output_dir of a `lorapro train` run (it has no config.yaml).")
    cfg = load_config(TrainConfig, cfg_file)
    adapter = run / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        if (run / "model").is_dir():
            raise ConfigError(f"{run / 'model'} is already a complete model (method={cfg.method}); nothing to merge.")
        raise ConfigError(f"{adapter} holds no adapter: the run has not finished. Resume it, or export another run.")
    out = Path(output) if output is not None else run / "merged"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--output '{out}' exists and is not empty; choose another directory or remove it.")

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.model.dtype]
    base, tok = load_model_and_tokenizer(cfg.model.name, task=cfg.model.task, num_labels=cfg.model.num_labels,
                                         dtype=dtype)
    from .runner import peft_quietly

    with peft_quietly():
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.config._name_or_path = str(out)

    tmp = out.with_name(out.name + ".incomplete")
    if tmp.exists():
        shutil.rmtree(tmp)  # an earlier export that did not finish
    try:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="lorapro export",
        description="Merge the adapter of a `lorapro train` run into its base model and save the merged model.",
    )
    ap.add_argument("run_dir", help="output_dir of a finished `lorapro train` run (holding config.yaml and adapter/)")
    ap.add_argument("--output", default=None, help="where to save the merged model (default: RUN_DIR/merged)")
    args = ap.parse_args(argv)

    from lorapro.models import ModelLoadError

    try:
        out = export_merged(args.run_dir, args.output)
    except (ConfigError, ModelLoadError, FileNotFoundError) as e:
        print(f"lorapro export: {e}", file=sys.stderr)
        return 2
    print(f"merged model saved to {out} (load with AutoModelFor*.from_pretrained('{out}'))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
