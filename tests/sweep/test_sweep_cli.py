"""`lorapro sweep --quick` end to end through the real command: Ctrl-C and resume, finished runs never re-run,
the report's numbers equal the runs' own metrics.json, a changed config is refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lorapro.config import ConfigError
from lorapro.sweep.cli import quick_config
from lorapro.sweep.runner import RunKey, Sweep, load_base



def sweep_cmd(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return [sys.executable, "-m", "lorapro.cli", "sweep", *args], env


def run(*args):
    cmd, env = sweep_cmd(*args)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def children_of(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.fixture(scope="module")
def quick_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep") / "quick"
    # 1. Ctrl-C while the first run trains: exit 130, the run's process group is gone, nothing marked finished
    cmd, env = sweep_cmd("--quick", "--dir", str(d), "--jobs", "1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "sweep: start train quick lora lr=1.00e-03 seed=0" in line, line
    time.sleep(1.0)
    kids = children_of(proc.pid)
    assert kids, "the run should be a child process"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Run the same command again to continue" in err
    for k in kids:
        assert not Path(f"/proc/{k}").exists() or "zombie" in Path(f"/proc/{k}/status").read_text()
    assert not list(d.glob("runs/*/*/*/metrics.json"))
    # kill (SIGTERM), e.g. a batch system's time limit, stops the runs the same way
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "sweep: start train" in proc.stdout.readline()
    time.sleep(1.0)
    kids = children_of(proc.pid)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    for k in kids:
        assert not Path(f"/proc/{k}").exists() or "zombie" in Path(f"/proc/{k}/status").read_text()
    # 2. the same command again finishes the sweep
    r = run("--quick", "--dir", str(d), "--jobs", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("sweep: done  train") == 4
    return d, r.stdout


def test_report_numbers_are_the_runs_numbers(quick_dir):
    d, _ = quick_dir
    summary = json.loads((d / "summary.json").read_text())
    report = (d / "report.md").read_text()
    for method in ("lora", "lora-pro"):
        runs = {}
        for f in d.glob(f"runs/quick/{method}/*/metrics.json"):
            m = json.loads(f.read_text())
            runs[m["lr"]] = m
        assert sorted(runs) == [1e-3, 1e-2]
        chosen = min(runs, key=lambda lr: runs[lr]["eval"]["loss"])  # select: eval loss
        e = summary["tasks"]["quick"][method]
        assert e["stage"] == "done" and e["chosen_lr"] == chosen
        assert e["test"]["loss"]["mean"] == runs[chosen]["test"]["loss"]
        assert e["test"]["loss"]["n"] == 1 and e["test"]["loss"]["sd"] == 0.0
        assert e["optimizer_state_mib"] == runs[chosen]["optimizer_state_mib"]
        assert f"| {method} | {chosen:.2e} | {runs[chosen]['test']['loss']:.4f} ± 0.0000 (n=1)" in report
        assert "only 2 points" in report  # a grid of fewer than 4 lrs is flagged
    # LoRA-Pro's full-mode state holds m x n moments: larger than LoRA's factor-sized AdamW state
    t = summary["tasks"]["quick"]
    assert t["lora-pro"]["optimizer_state_mib"] > t["lora"]["optimizer_state_mib"]
    lr_pro = t["lora-pro"]["chosen_lr"]
    want_diff = t["lora-pro"]["test"]["loss"]["mean"] - t["lora"]["test"]["loss"]["mean"]
    assert t["lora-pro"]["diff_vs_first"]["mean"] == pytest.approx(want_diff)
    for png in ("quick_lr.png", "quick_curves.png"):
        assert (d / "plots" / png).stat().st_size > 1000
    assert lr_pro in (1e-3, 1e-2)


def test_rerun_runs_nothing_and_an_incomplete_run_is_redone(quick_dir):
    d, _ = quick_dir
    files = sorted(d.glob("runs/*/*/*/metrics.json"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    r = run("--quick", "--dir", str(d))
    assert r.returncode == 0 and "sweep: start" not in r.stdout
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    victim = d / "runs/quick/lora/lr1.00e-02_seed0/metrics.json"
    victim.unlink()  # as if the run had been killed before it finished
    r = run("--quick", "--dir", str(d))
    assert r.returncode == 0
    assert r.stdout.count("sweep: start") == 1 and "lora lr=1.00e-02 seed=0" in r.stdout
    assert victim.is_file()


def test_report_command_and_a_changed_config_is_refused(quick_dir, tmp_path):
    d, _ = quick_dir
    (d / "report.md").unlink()
    r = run("report", str(d), "--export", str(tmp_path / "exported"))
    assert r.returncode == 0 and (d / "report.md").is_file()
    exported = sorted(p.relative_to(tmp_path / "exported").as_posix() for p in (tmp_path / "exported").rglob("*")
                      if p.is_file())
    assert "report.md" in exported and "summary.json" in exported and "plots/quick_lr.png" in exported
    assert "runs/quick/lora/lr1.00e-03_seed0/metrics.json" in exported
    assert not any("adapter" in p or p.endswith(".safetensors") for p in exported)  # no weights
    r = run("report", str(tmp_path))
    assert r.returncode == 2 and "not a sweep folder" in r.stderr
    cfg = quick_config()
    base = load_base(cfg)
    base["train"]["max_steps"] = 7
    sweep = Sweep(cfg, d, base)
    with pytest.raises(ConfigError, match="train.max_steps"):
        sweep.result(RunKey("quick", "lora", 1e-3, 0))


def test_a_failing_run_is_recorded_and_not_retried(tmp_path):
    bad = tmp_path / "bad.yaml"
    sweep_file = tmp_path / "s.yaml"
    bad.write_text(yaml.safe_dump({"model": {"name": "builtin:tiny-llama"},
                                   "data": {"train": str(tmp_path / "missing.jsonl"), "eval_size": 4,
                                            "train_size": 4, "test": str(tmp_path / "missing.jsonl")}}))
    sweep_file.write_text(yaml.safe_dump({"base": "bad.yaml", "methods": ["lora"], "lrs": {"default": [1e-3, 1e-2]},
                                          "seeds": [0], "extend": 0}))
    r = run(str(sweep_file), "--dir", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("FAILED") == 2
    failed = json.loads((tmp_path / "out/runs/bad/lora/lr1.00e-03_seed0/failed.json").read_text())
    assert failed["rc"] == 2 and any("missing.jsonl" in line for line in failed["log_tail"])
    assert "| lora | failed |" in (tmp_path / "out/report.md").read_text()
    r = run(str(sweep_file), "--dir", str(tmp_path / "out"))
    assert "sweep: start" not in r.stdout
    r = run(str(sweep_file), "--dir", str(tmp_path / "out"), "--retry-failed")
    assert r.stdout.count("sweep: start") == 2


def test_config_errors_exit_2_before_anything_runs(tmp_path):
    s = tmp_path / "s.yaml"
    s.write_text(yaml.safe_dump({"base": {"data": {"train": "x.jsonl"}}, "methods": ["lora"],
                                 "lrs": {"default": [1e-3, 1e-2]}}))
    r = run(str(s), "--dir", str(tmp_path / "o"))
    assert r.returncode == 2 and "eval set" in r.stderr and not (tmp_path / "o").exists()
    s.write_text(yaml.safe_dump({"base": {"data": {"train": "x.jsonl", "eval_size": 4, "train_size": 4}},
                                 "methods": ["lora"], "lrs": {"default": [1e-3, 1e-2]}}))
    r = run(str(s), "--dir", str(tmp_path / "o"))
    assert r.returncode == 2 and "data.test" in r.stderr
    r = run(str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_methods_and_tasks_select_what_runs_now(tmp_path):
    d = tmp_path / "sel"
    r = run("--quick", "--dir", str(d), "--methods", "lora-pro", "--dry-run")
    assert r.returncode == 0 and r.stdout.startswith("quick lora-pro:") and "quick lora:" not in r.stdout
    r = run("--quick", "--dir", str(d), "--methods", "lora-pro,nope")
    assert r.returncode == 2 and "unknown method(s) nope" in r.stderr and "lora, lora-pro" in r.stderr
    r = run("--quick", "--dir", str(d), "--tasks", "gsm8k")
    assert r.returncode == 2 and "unknown task(s) gsm8k" in r.stderr
    r = run("--quick", "--dir", str(d), "--methods", "lora-pro", "--tasks", "quick")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("sweep: done  train quick lora-pro") == 2 and "train quick lora " not in r.stdout
    assert sorted(p.parent.name for p in d.glob("runs/quick/*/*/metrics.json")) == ["lr1.00e-02_seed0",
                                                                                     "lr1.00e-03_seed0"]
    assert not (d / "runs/quick/lora").exists()
    summary = json.loads((d / "summary.json").read_text())  # the report covers the whole sweep: lora not run yet
    assert summary["tasks"]["quick"]["lora-pro"]["stage"] == "done"
    assert summary["tasks"]["quick"]["lora"]["stage"] != "done"


def test_a_second_sweep_on_the_same_folder_is_refused(tmp_path):
    import fcntl

    d = tmp_path / "locked"
    d.mkdir()
    with open(d / ".sweep.lock", "a+") as f:  # as a running sweep holds it
        f.write("pid 4242\n")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = run("--quick", "--dir", str(d))
        assert r.returncode == 2 and "another `lorapro sweep` is running" in r.stderr and "pid 4242" in r.stderr
        assert not (d / "runs").exists() and not (d / "sweep.yaml").exists()
    r = run("--quick", "--dir", str(d), "--methods", "lora")  # the lock is gone with its holder
    assert r.returncode == 0, r.stderr
    assert (d / ".sweep.lock").read_text().startswith("pid ")
