"""Data-parallel generation under torchrun: 2 CPU processes (gloo) give the same predictions as one process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT / ".." / "shared" / "data"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.distributed,
    pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data"),
]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def test_two_ranks_match_one_process(tmp_path):
    common = ["eval", "configs/eval/tiny_gsm8k.yaml", "data.limit=5", "generation.batch_size=2"]
    one = subprocess.run(
        [sys.executable, "-m", "lorapro.cli", *common, f"output_dir={tmp_path / 'one'}"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1",
         f"--master_port={_free_port()}", "-m", "lorapro.cli", *common, f"output_dir={tmp_path / 'two'}"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # only rank 0 writes and prints
    rows = lambda d: [json.loads(l) for l in (tmp_path / d / "predictions.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = rows("one"), rows("two")
    assert len(a) == len(b) == 5
    assert [r["output"] for r in a] == [r["output"] for r in b]
    assert [r["index"] for r in b] == list(range(5))
