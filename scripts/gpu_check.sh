#!/usr/bin/env bash
# GPU readiness check: one command, on a CUDA machine, after the README setup with a CUDA build of torch:
#   TORCH_SPEC="torch>=2.4" bash scripts/setup.sh      # the README setup; this script installs nothing
#   bash scripts/gpu_check.sh [OUT_DIR]                 # OUT_DIR: default $OUT, else ./gpu_check_out
# Runs, within 8 minutes:
#   - tests/test_cuda.py (marker `cuda`): every mode on the GPU against the CPU, bf16 factors, the foreach AdamW
#     branch against torch's AdamW, the float64 Gram policy; with >= 2 GPUs also FSDP2 over NCCL against one CPU
#     process and `lorapro train` with train.fsdp=true against DDP;
#   - tests/test_accelerator_path.py (the same branches' logic on CPU tensors, as a control);
# Time limits per step: 30 + 270 + 45 + 120 s = 7 min 45 s at most.
#   - benchmarks/optimizer_step.py --device cuda (Llama-2-7B layer shapes).
# Writes OUT_DIR/gpu_check.json (versions, devices, test counts and outcomes, benchmark results, exit codes, wall
# times) and OUT_DIR/gpu_check.log (everything printed). Exit status 0 only if every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-./gpu_check_out}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME TIMEOUT_S COMMAND...: run, log, record exit code and seconds in $OUT_DIR/steps.tsv
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name: $*" >> "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$OUT_DIR/steps.tsv"
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" >> "$LOG"
}

: > "$OUT_DIR/steps.tsv"
step environment 30 bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.device_count())'"
step tests 270 "$PY" -m pytest -q -p no:randomly -rA -m cuda tests/test_cuda.py --junitxml="$OUT_DIR/junit.xml"
step tests_accelerator_path_control 45 "$PY" -m pytest -q -p no:randomly tests/test_accelerator_path.py
step benchmark 120 "$PY" benchmarks/optimizer_step.py --device cuda --rounds 4 --json "$OUT_DIR/benchmark.json"

"$PY" - "$OUT_DIR" <<'PYEOF' >> "$LOG" 2>&1
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
summary = {"steps": {}, "tests": {}, "benchmark": None}
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, secs = line.split("\t")
    summary["steps"][name] = {"exit": int(rc), "seconds": int(secs)}
try:
    import torch
    summary["torch"], summary["cuda"] = torch.__version__, torch.version.cuda
    summary["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
except Exception as e:  # still write the JSON
    summary["torch_error"] = repr(e)
junit = out / "junit.xml"
if junit.is_file():
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag + (": " + (child.get("message") or "")[:300])
        summary["tests"][f"{case.get('classname')}::{case.get('name')}"] = outcome
bench = out / "benchmark.json"
if bench.is_file():
    summary["benchmark"] = json.loads(bench.read_text())
counts = {}
for v in summary["tests"].values():
    counts[v.split(":")[0]] = counts.get(v.split(":")[0], 0) + 1
summary["test_counts"] = counts
summary["ok"] = all(s["exit"] == 0 for s in summary["steps"].values()) and counts.get("passed", 0) > 0
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))
print("gpu_check:", "OK" if summary["ok"] else "FAILED", counts, {k: v["exit"] for k, v in summary["steps"].items()})
PYEOF
tail -n 1 "$LOG"
grep -q "gpu_check: OK" "$LOG"
