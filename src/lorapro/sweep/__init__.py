"""``lorapro sweep``: fair method comparisons — each method at its own tuned learning rate, several seeds,
the lr chosen on a validation split carved from the training data and the result reported on a held-out test set.

See :mod:`lorapro.sweep.config` for the sweep file and the two-stage procedure, :mod:`lorapro.sweep.runner` for
how runs are launched and resumed, :mod:`lorapro.sweep.report` for the report.
"""

from .config import SweepConfig
from .report import summarize, write_report
from .runner import RunKey, Sweep, load_base, plan_pair, run_sweep

__all__ = ["SweepConfig", "Sweep", "RunKey", "load_base", "plan_pair", "run_sweep", "summarize", "write_report"]
