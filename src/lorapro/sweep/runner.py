"""Plan and run a sweep: every run is an ordinary ``lorapro train`` process in its own folder.

The sweep keeps no state of its own: what is finished is what has a ``metrics.json`` (written last and atomically
by ``lorapro train``), what failed has a ``failed.json``. So a killed sweep continues where it stopped by running
the same command again — finished runs are never re-run, a run that was cut off is started again from scratch —
and every number in the report can be traced to one run's files.

Folder layout::

    DIR/sweep.yaml                                  the sweep config as resolved (base inlined)
    DIR/runs/TASK/METHOD/lr3.00e-04_seed0/          one `lorapro train` output_dir (config.yaml, metrics.json, ...)
    DIR/runs/TASK/METHOD/lr3.00e-04_seed0.log       its stdout + stderr (.posteval.log: the extra evaluation)
    DIR/report.md, DIR/summary.json, DIR/plots/     `lorapro sweep report DIR`
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

from lorapro.config import ConfigError, from_dict, to_dict

from .config import SweepConfig

__all__ = ["RunKey", "Sweep", "PairPlan", "plan_pair", "run_sweep", "FAILED_FILE"]

FAILED_FILE = "failed.json"
# Keys of a run's config that the sweep sets itself, so they may differ between a run on disk and its re-plan.
_RUN_KEYS = ("output_dir", "overwrite")


@dataclass(frozen=True)
class RunKey:
    task: str
    method: str
    lr: float
    seed: int

    @property
    def rel(self) -> Path:
        return Path("runs") / self.task / self.method / f"lr{self.lr:.2e}_seed{self.seed}"


def _round_lr(lr: float) -> float:
    """Learning rates are kept to 3 significant digits so an extended grid names the same folders every time."""
    return float(f"{lr:.3g}")


def _set_dotted(d: Dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = d.get(p)
        if not isinstance(nxt, dict):
            nxt = d[p] = {}
        d = nxt
    d[parts[-1]] = copy.deepcopy(value)


def _score(metrics: Optional[Mapping[str, Any]], split: str, metric: str, lower: bool) -> float:
    """The run's ``split`` metric as a number to *minimise* (failed or non-finite runs: +inf)."""
    if metrics is None:
        return math.inf
    v = (metrics.get(split) or {}).get(metric)
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return math.inf
    return float(v) if lower else -float(v)


@dataclass
class PairPlan:
    """Where one (task, method) stands: its grid (with extensions), the chosen lr, the runs it still needs."""

    grid: List[float]
    needed: List[RunKey] = field(default_factory=list)
    stage: str = "search"  # "search" | "seeds" | "done" | "failed" (every lr of the grid failed)
    best_lr: Optional[float] = None  # after stage 1 (search seed only)
    final_lrs: List[float] = field(default_factory=list)
    chosen_lr: Optional[float] = None  # after stage 2 (mean over seeds)
    at_edge: bool = False  # the chosen lr is at an edge of the (extended) grid
    extensions: int = 0


def plan_pair(cfg: SweepConfig, task: str, method: str, results: Mapping[RunKey, Optional[Dict[str, Any]]]) -> PairPlan:
    """The next runs of one (task, method), from the finished ones. Deterministic: re-planning after a crash gives
    the same plan. ``results`` maps finished runs to their metrics (``None`` for a failed run)."""
    lower = cfg.lower_is_better(cfg.select)
    s0 = cfg.seeds[0]
    grid = [_round_lr(x) for x in cfg.grid(method)]
    plan = PairPlan(grid=grid)

    def key(lr: float, seed: int) -> RunKey:
        return RunKey(task, method, lr, seed)

    def score(lr: float, seed: int) -> float:
        return _score(results.get(key(lr, seed)), "eval", cfg.select, lower)

    # Stage 1: the grid with the search seed, extended past an edge that holds the best lr.
    while True:
        missing = [key(lr, s0) for lr in grid if key(lr, s0) not in results]
        if missing:
            plan.grid, plan.needed = list(grid), missing
            return plan
        scores = [score(lr, s0) for lr in grid]
        i = min(range(len(grid)), key=lambda j: (scores[j], j))
        edge = i == 0 or i == len(grid) - 1
        if not math.isfinite(scores[i]):  # every run of the grid failed or diverged: nothing to choose from
            plan.grid, plan.stage = list(grid), "failed"
            return plan
        if edge and plan.extensions < cfg.extend:
            if i == 0:
                grid.insert(0, _round_lr(grid[0] * grid[0] / grid[1]))
            else:
                grid.append(_round_lr(grid[-1] * grid[-1] / grid[-2]))
            plan.extensions += 1
            continue
        break
    plan.grid = list(grid)
    plan.best_lr = grid[i]
    finals = [grid[i]]
    if cfg.final == "best_and_neighbour":
        nbrs = [j for j in (i - 1, i + 1) if 0 <= j < len(grid)]
        if nbrs:
            finals.append(grid[min(nbrs, key=lambda j: (scores[j], j))])
    plan.final_lrs = finals

    # Stage 2: every seed at the final lr(s).
    plan.stage = "seeds"
    plan.needed = [key(lr, s) for lr in finals for s in cfg.seeds if key(lr, s) not in results]
    if plan.needed:
        return plan

    def mean_score(lr: float) -> float:
        vals = [score(lr, s) for s in cfg.seeds]
        return sum(vals) / len(vals)

    plan.chosen_lr = min(finals, key=lambda lr: (mean_score(lr), grid.index(lr)))
    j = grid.index(plan.chosen_lr)
    plan.at_edge = j == 0 or j == len(grid) - 1
    plan.stage = "done"
    return plan


class Sweep:
    """A sweep folder: its config, its runs on disk, and how to launch one run."""

    def __init__(self, cfg: SweepConfig, directory: Path, base: Dict[str, Any]):
        self.cfg, self.dir, self.base = cfg, Path(directory), base
        self._checked: set = set()

    # ------------------------------------------------------------------------------------------------ configs
    def train_dict(self, key: RunKey) -> Dict[str, Any]:
        """The complete ``lorapro train`` config of one run (base + sweep overrides + task + method/lr/seed)."""
        d = copy.deepcopy(self.base)
        for k, v in self.cfg.overrides.items():
            _set_dotted(d, k, v)
        for k, v in (self.cfg.tasks.get(key.task) or {}).items():
            _set_dotted(d, k, v)
        _set_dotted(d, "method", key.method)
        _set_dotted(d, "optim.lr", key.lr)
        _set_dotted(d, "seed", key.seed)
        _set_dotted(d, "output_dir", str(self.dir / key.rel))
        _set_dotted(d, "overwrite", True)
        return d

    def check(self) -> None:
        """Validate every task's train config before anything runs (a typo fails in seconds, not hours)."""
        from lorapro.finetune.config import TrainConfig

        for task in self.cfg.task_names():
            key = RunKey(task, self.cfg.methods[0], 1e-3, self.cfg.seeds[0])
            try:
                tc = from_dict(TrainConfig, self.train_dict(key))
            except ConfigError as e:
                raise ConfigError(f"sweep task '{task}': {e}") from None
            if not (tc.data.eval or tc.data.eval_size):
                raise ConfigError(
                    f"sweep task '{task}': the lr is chosen on the eval set, which is empty. Carve one from the "
                    "training data (data.eval_size: N, the N records after data.train_size) or set data.eval."
                )
            if not tc.data.test:
                raise ConfigError(
                    f"sweep task '{task}': set data.test (the held-out set the report is computed on); the eval set "
                    "chooses the lr and must not also be the reported number."
                )

    # ------------------------------------------------------------------------------------------------ state
    def run_dir(self, key: RunKey) -> Path:
        return self.dir / key.rel

    def log_path(self, key: RunKey) -> Path:
        d = self.run_dir(key)
        return d.with_name(d.name + ".log")

    def result(self, key: RunKey) -> Tuple[bool, Optional[Dict[str, Any]]]:
        """``(finished, metrics)``: finished runs have metrics; failed runs are finished with ``None``."""
        from lorapro.finetune.metrics import read_metrics

        d = self.run_dir(key)
        m = read_metrics(d)
        if m is not None:
            self._check_same_config(key)
            return True, m
        if (d / FAILED_FILE).is_file():
            return True, None
        return False, None

    def _check_same_config(self, key: RunKey) -> None:
        """A finished run is reused only if it was made with the config this sweep would use now."""
        import yaml

        from lorapro.finetune.config import TrainConfig

        p = self.run_dir(key) / "config.yaml"
        if key in self._checked or not p.is_file():
            return
        self._checked.add(key)
        want = to_dict(from_dict(TrainConfig, self.train_dict(key)))
        try:  # through the config class, so keys added since the run was made compare as their defaults
            have = to_dict(from_dict(TrainConfig, yaml.safe_load(p.read_text()) or {}))
        except ConfigError as e:
            raise ConfigError(f"{self.run_dir(key)}: its config.yaml no longer loads ({e}); use another sweep "
                              "folder (--dir) or delete the old runs.") from None
        diff = sorted(k for k in _flat(want).keys() | _flat(have).keys()
                      if k not in _RUN_KEYS and _flat(want).get(k) != _flat(have).get(k))
        if diff:
            raise ConfigError(
                f"{self.run_dir(key)} was trained with a different config than this sweep now asks for "
                f"(differs in: {', '.join(diff[:8])}). Use another sweep folder (--dir) for the new settings, or "
                "delete the old runs to re-run them."
            )

    def results(self, keys: Iterable[RunKey]) -> Dict[RunKey, Optional[Dict[str, Any]]]:
        out = {}
        for k in keys:
            done, m = self.result(k)
            if done:
                out[k] = m
        return out

    def all_run_keys(self) -> List[RunKey]:
        """Every run folder on disk (finished or not) that belongs to this sweep's tasks and methods."""
        keys = []
        for task in self.cfg.task_names():
            for method in self.cfg.methods:
                d = self.dir / "runs" / task / method
                if not d.is_dir():
                    continue
                for sub in sorted(d.iterdir()):
                    if not sub.is_dir() or not sub.name.startswith("lr"):
                        continue
                    try:
                        lr_s, seed_s = sub.name[2:].split("_seed")
                        keys.append(RunKey(task, method, float(lr_s), int(seed_s)))
                    except ValueError:
                        continue
        return keys

    def plans(self) -> Dict[Tuple[str, str], PairPlan]:
        res = self.results(self.all_run_keys())
        return {(t, m): plan_pair(self.cfg, t, m, res) for t in self.cfg.task_names() for m in self.cfg.methods}


def _flat(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def load_base(cfg: SweepConfig) -> Dict[str, Any]:
    """The base train config as a dict (a YAML file relative to the sweep file, or an inline mapping)."""
    import yaml

    if isinstance(cfg.base, Mapping):
        return copy.deepcopy(dict(cfg.base))
    p = cfg.resolve(cfg.base)
    if not p.is_file():
        raise ConfigError(f"sweep: base config '{p}' does not exist (paths are relative to the sweep file).")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"sweep: base config '{p}' must hold a mapping of lorapro train keys.")
    return data


# ---------------------------------------------------------------------------------------------------------- running
@dataclass
class _Running:
    key: RunKey
    proc: subprocess.Popen
    log: Any
    started: float
    kind: str = "train"


def _env(threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin while other runs compute
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _spawn(key: RunKey, argv: List[str], log_path: Path, threads: int) -> _Running:
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorapro.cli", *argv],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env(threads),
        start_new_session=True,  # Ctrl-C goes to the sweep, which stops its runs itself
    )
    return _Running(key, proc, log, time.time())


def _launch(sweep: Sweep, key: RunKey, threads: int) -> _Running:
    import shutil

    import yaml

    d = sweep.run_dir(key)
    if d.exists():  # a run that was cut off: start it again from scratch (its folder holds nothing finished)
        shutil.rmtree(d)
    d.parent.mkdir(parents=True, exist_ok=True)
    launch = sweep.dir / ".launch" / (key.rel.as_posix().replace("/", "__") + ".yaml")
    launch.parent.mkdir(parents=True, exist_ok=True)
    launch.write_text(yaml.safe_dump(sweep.train_dict(key), sort_keys=False))
    return _spawn(key, ["train", str(launch)], sweep.log_path(key), threads)


def _launch_posteval(sweep: Sweep, key: RunKey, threads: int) -> _Running:
    """``lorapro eval`` (the sweep's ``eval_config``) on a finished run's adapter, into ``RUN/posteval``."""
    import shutil

    out = sweep.run_dir(key) / "posteval"
    if out.exists():
        shutil.rmtree(out)
    d = sweep.run_dir(key)
    adapter = d / "adapter" if (d / "adapter").is_dir() else d / "model"
    argv = ["eval", str(sweep.cfg.resolve(sweep.cfg.eval_config)), f"output_dir={out}"]
    argv.append(f"model.adapter={adapter}" if adapter.name == "adapter" else f"model.name={adapter}")
    log = d.with_name(d.name + ".posteval.log")
    return _spawn(key, argv, log, threads)


def postevals_needed(sweep: Sweep, plans: Mapping[Tuple[str, str], PairPlan]) -> List[RunKey]:
    """Stage-2 runs (every seed at each final lr) that still lack the sweep's extra evaluation."""
    if not sweep.cfg.eval_config:
        return []
    keys = []
    for (task, method), p in plans.items():
        if p.stage != "done":
            continue
        for lr in p.final_lrs:
            for s in sweep.cfg.seeds:
                k = RunKey(task, method, lr, s)
                d = sweep.run_dir(k)
                if (d / "metrics.json").is_file() and not (d / "posteval" / "summary.json").is_file() \
                        and not (d / "posteval.failed").exists():
                    keys.append(k)
    return keys


def _record_failure(sweep: Sweep, r: _Running, rc: int) -> None:
    log = Path(r.log.name)
    tail = log.read_text(errors="replace").splitlines()[-30:] if log.exists() else []
    d = sweep.run_dir(r.key)
    d.mkdir(parents=True, exist_ok=True)
    (d / FAILED_FILE).write_text(json.dumps({"rc": rc, "log": str(log), "log_tail": tail}, indent=1))


def _stop(running: List[_Running]) -> None:
    for r in running:
        try:
            os.killpg(r.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 20
    for r in running:
        try:
            r.proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(r.proc.pid, signal.SIGKILL)
            r.proc.wait()
        r.log.close()


@contextlib.contextmanager
def sweep_lock(directory: Path) -> Iterator[None]:
    """Hold ``DIR/.sweep.lock`` while a sweep runs in ``DIR``: a second ``lorapro sweep`` on the same folder (a second
    terminal, a re-submitted batch job) would start the same runs and delete each other's half-finished run folders.
    An OS lock (``flock``), so it is released when the process ends, however it ends: no stale lock files."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    f = open(directory / ".sweep.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(
            f"another `lorapro sweep` is running in {directory} ({holder}); two sweeps in one folder would start the "
            "same runs twice. Wait for it to finish or stop it (Ctrl-C, kill); to run more at once use --jobs N."
        ) from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()


def selection(sweep: Sweep, tasks: Optional[Iterable[str]] = None,
              methods: Optional[Iterable[str]] = None) -> Tuple[set, set]:
    """The (tasks, methods) a ``--tasks`` / ``--methods`` selection names (all when ``None``); unknown names raise."""
    only_t = set(tasks) if tasks is not None else set(sweep.cfg.task_names())
    only_m = set(methods) if methods is not None else set(sweep.cfg.methods)
    for name, got, known in (("task", only_t, sweep.cfg.task_names()), ("method", only_m, sweep.cfg.methods)):
        unknown = sorted(got - set(known))
        if unknown:
            raise ConfigError(f"unknown {name}(s) {', '.join(unknown)}: this sweep's {name}s are "
                              f"{', '.join(known)}.")
    return only_t, only_m


def run_sweep(sweep: Sweep, *, jobs: int = 1, threads: Optional[int] = None, retry_failed: bool = False,
              say: Any = print, poll_s: float = 1.0, tasks: Optional[Iterable[str]] = None,
              methods: Optional[Iterable[str]] = None) -> Dict[Tuple[str, str], PairPlan]:
    """Run every run the sweep still needs, ``jobs`` at a time, until every (task, method) is done.

    ``tasks`` / ``methods`` restrict this call to some of the sweep's tasks and methods (the rest keep their runs
    and are run by a later call without them). Returns the final plans of the (task, method) pairs it ran. Ctrl-C
    stops the running runs (their folders are re-run next time) and re-raises.
    """
    sweep.check()
    only_t, only_m = selection(sweep, tasks, methods)

    def selected() -> Dict[Tuple[str, str], PairPlan]:
        return {tm: p for tm, p in sweep.plans().items() if tm[0] in only_t and tm[1] in only_m}

    if retry_failed:
        for k in sweep.all_run_keys():
            f = sweep.run_dir(k) / FAILED_FILE
            if f.is_file():
                f.unlink()
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    running: List[_Running] = []
    plans = selected()
    try:
        while True:
            busy = {r.key for r in running}
            wanted = [("train", k) for p in plans.values() for k in p.needed if k not in busy]
            wanted += [("eval", k) for k in postevals_needed(sweep, plans) if k not in busy]
            if not wanted and not running:
                return plans
            while wanted and len(running) < jobs:
                kind, key = wanted.pop(0)
                say(f"sweep: start {kind} {key.task} {key.method} lr={key.lr:.2e} seed={key.seed}")
                r = (_launch if kind == "train" else _launch_posteval)(sweep, key, threads)
                r.kind = kind
                running.append(r)
            time.sleep(poll_s)
            for r in list(running):
                rc = r.proc.poll()
                if rc is None:
                    continue
                running.remove(r)
                r.log.close()
                took = time.time() - r.started
                what = f"{r.kind} {r.key.task} {r.key.method} lr={r.key.lr:.2e} seed={r.key.seed}"
                d = sweep.run_dir(r.key)
                ok = (d / "metrics.json").is_file() if r.kind == "train" else (d / "posteval" / "summary.json").is_file()
                if rc == 0 and ok:
                    say(f"sweep: done  {what} ({took:.0f} s)")
                else:
                    if r.kind == "train":
                        _record_failure(sweep, r, rc)
                    else:
                        (d / "posteval.failed").write_text(f"rc {rc}; log {r.log.name}\n")
                    say(f"sweep: FAILED {what} (rc {rc}); log: {r.log.name}")
                plans = selected()
    except BaseException:
        _stop(running)
        raise
