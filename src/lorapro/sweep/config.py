"""The config of ``lorapro sweep``: a base ``lorapro train`` config, tasks, methods, per-method lr grids, seeds.

Example (``configs/sweeps/glue_minilm.yaml`` is the study's)::

    base: ../cpu_minilm_sst2.yaml          # a lorapro train config; relative to this file
    overrides: {train.epochs: 3}           # dotted train-config keys applied to every run
    tasks:                                 # optional: name -> overrides (default: one task, the base as is)
      sst2: {data.train: ..., data.test: ...}
    methods: [lora, lora-pro]
    lrs:                                   # each method its own log-spaced grid ("default" for the rest)
      default: [1.0e-4, 3.0e-4, 1.0e-3, 3.0e-3]
      full: [1.0e-5, 3.0e-5, 1.0e-4, 3.0e-4]
    seeds: [0, 1, 2]
    select: loss                           # eval-set metric that picks the lr (loss: lower is better)
    report: [accuracy, loss]               # test-set metrics reported (mean ± sd over seeds)

How a sweep runs (two stages, the report says so):

1. **lr search** — every lr of a method's grid with ``seeds[0]``; the lr with the best ``select`` metric on the
   *eval* set (carved from the training data: ``data.eval_size`` records after ``data.train_size``) wins. When the
   winner is at an edge of the grid, the grid is extended one step (the grid's own ratio) past that edge, up to
   ``extend`` times; a winner still at an edge is flagged in the report.
2. **seeds** — the other seeds at the chosen lr (``final: best``) or at the chosen lr and its better neighbour
   (``final: best_and_neighbour``, the final lr is then re-chosen on the eval-set mean over seeds).

The reported numbers are test-set (``data.test``) means ± sample sd over all seeds at the final lr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

from lorapro.config import ConfigError, field

__all__ = ["SweepConfig", "LOWER_IS_BETTER"]

# Metrics where lower is better; every other metric (accuracy, f1, matthews_corrcoef, ...) is higher-is-better.
LOWER_IS_BETTER = ("loss",)


@dataclass
class SweepConfig:
    base: Any = field(
        help="the lorapro train config every run starts from: a YAML path (relative to the sweep file) or a mapping"
    )
    methods: List[str] = field(help="methods to compare (lorapro train method names)")
    lrs: Dict[str, Any] = field(
        help="per-method learning-rate grids: {method: [lr, ...], default: [lr, ...]}; ascending, log-spaced; "
        "at least 4 values are recommended (fewer is flagged in the report)"
    )
    overrides: Dict[str, Any] = field(default_factory=dict, help="dotted train-config keys set in every run")
    tasks: Dict[str, Any] = field(
        default_factory=dict, help="task name -> dotted train-config overrides (empty: one task, the base config)"
    )
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2], help="seeds; the first one is used for the lr search")
    select: str = field("loss", help="eval-set metric that chooses the lr (loss: lower is better; others: higher)")
    report: List[str] = field(
        default_factory=lambda: ["loss"], help="test-set metrics to report (the first is the headline)"
    )
    extend: int = field(2, help="how many times a grid may be extended past an edge that holds the best lr")
    final: Literal["best", "best_and_neighbour"] = field(
        "best", help="stage 2: all seeds at the best lr, or at the best lr and its better neighbour"
    )
    eval_config: Optional[str] = field(
        None,
        help="a lorapro eval config run on the adapter of every stage-2 run (e.g. GSM8K greedy accuracy); its "
        "headline metric is reported next to the test metrics (relative to the sweep file)",
    )
    source: str = field("", help="(set by the loader) the sweep file's path, for relative paths")

    def validate(self) -> None:
        from lorapro.finetune.methods import METHODS

        if not self.methods:
            raise ConfigError("sweep: 'methods' is empty; list the methods to compare, e.g. [lora, lora-pro].")
        for m in self.methods:
            if m not in METHODS:
                import difflib

                close = difflib.get_close_matches(m, list(METHODS), n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"sweep: unknown method '{m}'.{hint} Methods: {', '.join(METHODS)}.")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError("sweep: a method is listed twice in 'methods'.")
        unknown = [k for k in self.lrs if k != "default" and k not in self.methods]
        if unknown:
            raise ConfigError(
                f"sweep: lrs has grids for {unknown}, which are not in methods {self.methods}; remove them or "
                "add the methods."
            )
        for m in self.methods:
            grid = self.grid(m)
            if len(grid) < 2:
                raise ConfigError(f"sweep: the lr grid of '{m}' needs at least 2 values (4 or more recommended).")
            if any(not (isinstance(x, (int, float)) and x > 0 and math.isfinite(x)) for x in grid):
                raise ConfigError(f"sweep: the lr grid of '{m}' must hold positive numbers, got {grid}.")
            if sorted(set(grid)) != list(grid):
                raise ConfigError(f"sweep: the lr grid of '{m}' must be strictly ascending, got {grid}.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("sweep: 'seeds' must list distinct seeds, e.g. [0, 1, 2].")
        if not self.report:
            raise ConfigError("sweep: 'report' must name at least one test-set metric, e.g. [loss].")
        if self.extend < 0:
            raise ConfigError("sweep: 'extend' must be >= 0.")
        for name in self.tasks:
            if not str(name).replace("-", "").replace("_", "").isalnum():
                raise ConfigError(f"sweep: task name '{name}' must be letters, digits, - or _ (it names a folder).")

    def grid(self, method: str) -> List[float]:
        """The configured lr grid of ``method`` (before any extension)."""
        g = self.lrs.get(method, self.lrs.get("default"))
        if g is None:
            raise ConfigError(f"sweep: no lr grid for '{method}'; add lrs.{method} or lrs.default.")
        if not isinstance(g, list):
            raise ConfigError(f"sweep: lrs.{method} must be a list of learning rates, got {g!r}.")
        return [float(x) for x in g]

    def lower_is_better(self, metric: str) -> bool:
        return metric in LOWER_IS_BETTER

    def resolve(self, rel: str) -> Path:
        """A path from the sweep file, relative to that file's folder (absolute paths as they are)."""
        p = Path(rel)
        return p if p.is_absolute() or not self.source else Path(self.source).parent / p

    def task_names(self) -> List[str]:
        return list(self.tasks) or [Path(self.base).stem if isinstance(self.base, str) else "task"]
