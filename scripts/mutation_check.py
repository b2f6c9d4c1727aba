"""Apply one-line mutations to the optimizer core and check that the tests catch each one.

A test suite that passes with a dropped square root or a wrong learning rate cannot be trusted to catch the next
such bug. For every mutant below this script copies ``src/`` to a temporary directory, changes the one line there
(the working tree is never touched), runs the mutant's targeted tests against the copy and expects them to FAIL.

    python scripts/mutation_check.py            # all 27 mutants: about 5 min on 2 cores shared with two busy processes
    python scripts/mutation_check.py -k sqrt    # the mutants whose name contains "sqrt"
    python scripts/mutation_check.py --list

Exit status 0 when every mutant is killed; 1 when one survives (a test is missing) or when a mutant's line no
longer exists (update the list below together with the code). ``tests/test_mutation_list.py`` checks in the normal
test run that every line listed here still exists exactly once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent

CORE = ["tests/test_optim.py", "tests/test_math.py", "tests/test_fast_paths.py", "tests/test_factored.py",
        "tests/test_full_mode_blocks.py", "tests/test_singular_grams.py", "tests/test_reference_dtypes.py",
        "tests/test_optim_hardening.py", "tests/test_steps.py"]
DISTRIBUTED = ["tests/distributed/test_optim_distributed.py"]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    first: Sequence[str] = ()  # the test files that should catch it, run first (-x stops at the first failure)
    tests: Sequence[str] = tuple(CORE)

    def test_files(self) -> List[str]:
        return [*self.first, *(t for t in self.tests if t not in self.first)]


MUTANTS: List[Mutant] = [
    # the three that passed every test before issue 11 (the lr one now lives where the class reads the group)
    Mutant("full: no sqrt of v with bf16 state", "src/lorapro/steps.py",
           "buf.copy_(exp_avg_sq).sqrt_()", "buf.copy_(exp_avg_sq)",
           first=("tests/test_reference_dtypes.py",)),
    Mutant("apply: 3x step for A with bf16 factors", "src/lorapro/steps.py",
           "new_A = torch.addcmul(A_cur * decay if decay != 1.0 else A_cur, step_size, dA, value=-1.0)",
           "new_A = torch.addcmul(A_cur * decay if decay != 1.0 else A_cur, step_size, dA, value=-3.0)",
           first=("tests/test_reference_dtypes.py",)),
    Mutant("step options: defaults instead of the group's", "src/lorapro/optim.py",
           "out = {k: group[k] for k in keys}", "out = {k: self.defaults[k] for k in keys}",
           first=("tests/test_reference_dtypes.py",)),
    # more of the same kind
    Mutant("full (op by op): lr dropped", "src/lorapro/steps.py",
           "step_size[i] = lr * bc2**0.5 / bc1", "step_size[i] = bc2**0.5 / bc1",
           first=("tests/test_reference_dtypes.py",)),
    Mutant("adamw_update: no sqrt of v (foreach path)", "src/lorapro/steps.py",
           "denom = torch._foreach_sqrt(exp_avg_sqs)", "denom = [t.clone() for t in exp_avg_sqs]",
           first=("tests/test_optim.py",)),
    Mutant("efficient: 2x lr", "src/lorapro/steps.py",
           "[t for t in steps for _ in range(2)], lr=lr,", "[t for t in steps for _ in range(2)], lr=2 * lr,",
           first=("tests/test_optim.py",)),
    Mutant("factored: lr dropped", "src/lorapro/steps.py",
           "    step_size = torch.full((len(A),), lr, dtype=torch.float64)\n    apply_update(A, B, A_cur",
           "    step_size = torch.full((len(A),), 1.0, dtype=torch.float64)\n    apply_update(A, B, A_cur",
           first=("tests/test_factored.py",)),
    Mutant("full (op by op): bias correction one step off", "src/lorapro/steps.py",
           "bc1, bc2 = bias_corrections(beta1, beta2, steps[i])", "bc1, bc2 = bias_corrections(beta1, beta2, steps[i] + 1)",
           first=("tests/test_reference_dtypes.py",)),
    Mutant("full (fused blocks): sign of D flipped", "src/lorapro/steps.py",
           "            sign[i] = -1.0\n", "            sign[i] = 1.0\n",
           first=("tests/test_optim.py",)),
    Mutant("full (fused blocks): D block not zeroed", "src/lorapro/steps.py",
           "                d.zero_()\n", "",
           first=("tests/test_full_mode_blocks.py",)),
    Mutant("full (fused blocks): 2x lr", "src/lorapro/steps.py",
           "            step_size[i] = lr\n", "            step_size[i] = 2 * lr\n",
           first=("tests/test_optim.py",)),
    Mutant("full (fused blocks): ε added to √v̂ twice", "src/lorapro/steps.py",
           "                                    eps=eps, amsgrad=False", "                                    eps=2 * eps, amsgrad=False",
           first=("tests/test_optim.py",)),
    Mutant("full (fused blocks): bias correction one step off", "src/lorapro/steps.py",
           "[], [steps[i]], lr=1.0", "[], [steps[i] + 1], lr=1.0",
           first=("tests/test_optim.py",)),
    Mutant("full (row shards): g̃ rows read at the shard's local offset", "src/lorapro/steps.py",
           "torch.matmul(left[i, r0:r1], right[i], out=g)  # g̃", "torch.matmul(left[i, r0 - lo:r1 - lo], right[i], out=g)  # g̃",
           first=("tests/test_steps.py",)),
    Mutant("factored: no bias correction of v", "src/lorapro/steps.py",
           "bc2 = torch.tensor([b[1] for b in bc], dtype=torch.float64)", "bc2 = torch.ones(len(bc), dtype=torch.float64)",
           first=("tests/test_factored.py",)),
    Mutant("apply: no weight decay", "src/lorapro/steps.py",
           "decay = 1.0 - lr * weight_decay", "decay = 1.0",
           first=("tests/test_optim.py",)),
    Mutant("sgd: dampening ignored", "src/lorapro/steps.py",
           "alpha=1.0 - dampening)", "alpha=1.0)",
           first=("tests/test_reference_dtypes.py",)),
    Mutant("plain AdamW: step count not incremented", "src/lorapro/steps.py",
           "    _increment(steps)\n    adamw_update(params", "    adamw_update(params",
           first=("tests/test_optim.py",)),
    Mutant("step: non-finite gradients not skipped", "src/lorapro/optim.py",
           "        if bad is not None:\n            warnings.warn(", "        if False:\n            warnings.warn(",
           first=("tests/test_optim_hardening.py",)),
    Mutant("step: closure evaluated without autograd", "src/lorapro/optim.py",
           "            with torch.enable_grad():\n                loss = closure()",
           "            with torch.no_grad():\n                loss = closure()",
           first=("tests/test_optim_hardening.py",)),
    Mutant("step: a pair with one gradient stepped", "src/lorapro/optim.py",
           "if (A.grad is None) != (B.grad is None):", "if False:",
           first=("tests/test_optim_hardening.py",)),
    Mutant("load: changed LoRA scales accepted", "src/lorapro/optim.py",
           "            if changed:\n", "            if False:\n",
           first=("tests/test_optim_hardening.py",)),
    Mutant("math: plain inverse instead of the relative cut-off", "src/lorapro/functional.py",
           "keep = lam > rtol * lam[..., -1:]", "keep = lam > 0",
           first=("tests/test_singular_grams.py",)),
    Mutant("math: transposed Sylvester solution", "src/lorapro/functional.py",
           "return grams.U_B @ X_t @ grams.U_A.transpose(-1, -2)",
           "return grams.U_B @ X_t.transpose(-1, -2) @ grams.U_A.transpose(-1, -2)",
           first=("tests/test_math.py",)),
    Mutant("math: X enters ĝ_B with the wrong sign", "src/lorapro/functional.py",
           "        MK = MK + X\n", "        MK = MK - X\n",
           first=("tests/test_math.py",)),
    Mutant("math: 1/s instead of 1/s² in g̃'s map", "src/lorapro/functional.py",
           "S[:, :r, r:] = grams.BtB_inv / s**2", "S[:, :r, r:] = grams.BtB_inv / s",
           first=("tests/test_factored.py",)),
    Mutant("shard_state: load keeps a stale consolidation valid", "src/lorapro/distributed.py",
           "self._no_pair_state = not with_pair_state", "self._no_pair_state = True",
           first=tuple(DISTRIBUTED)),
]


def check_list(mutants: Sequence[Mutant] = MUTANTS, root: Path = ROOT) -> List[str]:
    """Problems with the list itself: a line that no longer occurs exactly once, or a mutant that changes nothing."""
    problems = []
    for m in mutants:
        text = (root / m.path).read_text(encoding="utf-8")
        count = text.count(m.old)
        if count != 1:
            problems.append(f"{m.name}: the line occurs {count} times in {m.path} (expected once): {m.old!r}")
        if m.old == m.new:
            problems.append(f"{m.name}: the mutation changes nothing")
    return problems


def run_tests(src: Path, tests: Sequence[str], timeout: float) -> Tuple[int, List[str]]:
    """Run pytest on ``tests`` with the package imported from ``src``: (exit status, non-empty output lines)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, ["timed out"]
    return proc.returncode, [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()] or [""]


def main(argv: Sequence[str] = ()) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="only mutants whose name contains this text")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutant")
    args = ap.parse_args(list(argv))
    mutants = [m for m in MUTANTS if args.k.lower() in m.name.lower()]
    if args.list:
        for m in mutants:
            print(f"{m.name:55s} {m.path}")
        return 0
    problems = check_list(mutants)
    if problems:
        print("The mutant list is out of date with the code:\n  " + "\n  ".join(problems))
        return 1
    with tempfile.TemporaryDirectory(prefix="lorapro-mutants-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        tests = sorted({t for m in mutants for t in m.test_files()})
        rc, out = run_tests(src, tests, args.timeout)
        if rc != 0:
            print("\n".join(out[-30:]) + "\nThe unmutated code does not pass the targeted tests; fix that first.")
            return 1
        survivors = []
        for m in mutants:
            target = src / Path(m.path).relative_to("src")
            original = target.read_text(encoding="utf-8")
            target.write_text(original.replace(m.old, m.new), encoding="utf-8")
            t0 = time.monotonic()
            try:
                rc, out = run_tests(src, m.test_files(), args.timeout)
            finally:
                target.write_text(original, encoding="utf-8")
            verdict = "killed" if rc == 1 else "SURVIVED" if rc == 0 else f"error (exit {rc})"
            print(f"{verdict:16s} {m.name:55s} {time.monotonic() - t0:5.0f} s  {out[-1]}", flush=True)
            if rc != 1:
                survivors.append(m.name)
    if survivors:
        print(f"\n{len(survivors)} of {len(mutants)} mutants were not killed by a failing test: {survivors}")
        return 1
    print(f"\nall {len(mutants)} mutants killed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
