#!/usr/bin/env bash
# Mutation check of the optimizer core: see scripts/mutation_check.py (arguments are passed on, e.g. -k sqrt).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
exec "$PY" scripts/mutation_check.py "$@"
