"""``python run_cli.py ARGS`` = ``python -m lorapro.cli ARGS``, without DeepSpeed's CPU shared-memory all-reduce.

On a machine without GPUs DeepSpeed compiles a shared-memory all-reduce extension the first time it initialises its
communication (minutes on 2 cores); the tests need only correctness, so they let gloo do the all-reduce. A CPU-only
switch, irrelevant on GPUs."""

import sys

import deepspeed.ops

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

from lorapro.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
