"""Run untrusted Python programs (model-written code) so that they cannot harm the machine that scores them.

Each program gets, by construction:

* **its own process** (a fresh ``python -I`` interpreter, never a fork of the evaluator), in its own session, with
  stdin at /dev/null and stdout/stderr written to files the program cannot open by name;
* **a wall-clock timeout** (``timeout_s``) after which the **whole process tree is killed**. When util-linux
  ``unshare`` can create namespaces, the program runs as PID 1 of a new PID namespace, so killing it makes the
  kernel kill every process it started, including ones that called ``setsid()`` or double-forked. Otherwise the
  process group is killed (a program that leaves its process group escapes that kill and is bounded only by its
  CPU-time limit);
* **resource limits**: ``RLIMIT_CPU`` (CPU seconds), ``RLIMIT_AS`` (memory), ``RLIMIT_FSIZE`` (largest file it may
  write), ``RLIMIT_NPROC`` (processes and threads; stops fork bombs) and no core files;
* **no root**: when the evaluator runs as root (CI, containers) the child drops to an unprivileged uid/gid
  (65534, "nobody", by default) before running the program. This matters: the kernel does not enforce
  ``RLIMIT_NPROC`` for root, and root could delete or read any file;
* **no network**: a new network namespace (no interfaces up, so even 127.0.0.1 is unreachable), from
  ``unshare --net`` or ``os.unshare`` (Python >= 3.12, root). Where neither is possible, a socket guard refuses to
  create Python sockets; that is best effort only (C extensions or ``ctypes`` can bypass it);
* **a throw-away working directory** (mode 0700, owned by the sandbox user), deleted afterwards.

Which of these were in effect is reported by :func:`isolation` and written into every HumanEval result.

Limits (not provided): there is no filesystem isolation beyond Unix permissions — the unprivileged user can still
read world-readable files (``/etc/passwd``, the Python installation) and write world-writable places (``/tmp``,
bounded by ``RLIMIT_FSIZE``); programs running at the same time share the sandbox uid, so with several workers
one hostile program can see or disturb another's directory and ``RLIMIT_NPROC`` counts their processes
together; without root (and without user namespaces) the program runs as the evaluating user. For adversarial
code at scale, run the evaluation inside a container or VM as well.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["SandboxLimits", "ExecResult", "Isolation", "isolation", "run_program", "run_programs"]

_CHILD = str(Path(__file__).with_name("_sandbox_child.py"))
_NOBODY = 65534


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Limits applied to every program. Defaults suit HumanEval (tests take well under a second)."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    max_processes: int = 16
    cpu_s: Optional[int] = None  # default: ceil(timeout_s) + 1
    uid: int = _NOBODY
    gid: int = _NOBODY

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}.")
        for name in ("memory_mb", "file_size_mb", "max_processes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.cpu_s is not None and self.cpu_s < 1:
            raise ValueError(f"cpu_s must be >= 1 (or None), got {self.cpu_s}.")

    @property
    def effective_cpu_s(self) -> int:
        return int(self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) + 1)


@dataclasses.dataclass(frozen=True)
class Isolation:
    """What the sandbox can enforce on this machine (probed once per process)."""

    prefix: tuple  # command prefix, e.g. ("unshare", "--net", "--pid", "--fork", "--kill-child", "--")
    network: str  # "network namespace" | "socket guard (best effort)"
    processes: str  # "pid namespace" | "process group"
    user: str  # "uid 65534" | "current user (...)"
    drop_to: Optional[tuple]  # (uid, gid) the child switches to, or None
    try_unshare_in_child: bool

    def describe(self, limits: SandboxLimits) -> Dict[str, object]:
        return {
            "network": self.network,
            "process_tree_kill": self.processes,
            "user": self.user,
            "timeout_s": limits.timeout_s,
            "cpu_s": limits.effective_cpu_s,
            "memory_mb": limits.memory_mb,
            "file_size_mb": limits.file_size_mb,
            "max_processes": limits.max_processes,
        }


@dataclasses.dataclass
class ExecResult:
    """Outcome of one program. ``status`` is ``"passed"``, ``"failed"`` or ``"timed out"``."""

    passed: bool
    status: str
    detail: str
    returncode: Optional[int]
    duration_s: float


def _probe(cmd: Sequence[str]) -> bool:
    try:
        r = subprocess.run(
            list(cmd) + [sys.executable, "-I", "-c", "pass"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=20,
        )
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@functools.lru_cache(maxsize=None)
def _isolation(uid: int, gid: int) -> Isolation:
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    unshare = shutil.which("unshare")
    ns_flags = ("--net", "--pid", "--fork", "--kill-child")
    if unshare and is_root and _probe((unshare, *ns_flags, "--")):
        return Isolation(
            prefix=(unshare, *ns_flags, "--"),
            network="network namespace",
            processes="pid namespace",
            user=f"uid {uid} / gid {gid}",
            drop_to=(uid, gid),
            try_unshare_in_child=False,
        )
    if unshare and not is_root and _probe((unshare, "--user", "--map-root-user", *ns_flags, "--")):
        return Isolation(
            prefix=(unshare, "--user", "--map-root-user", *ns_flags, "--"),
            network="network namespace",
            processes="pid namespace",
            user=f"current user (uid {os.getuid()}; not root, so no switch to uid {uid})",
            drop_to=None,
            try_unshare_in_child=False,
        )
    can_unshare_in_child = is_root and sys.version_info >= (3, 12)
    return Isolation(
        prefix=(),
        network="network namespace (os.unshare)" if can_unshare_in_child else "socket guard (best effort)",
        processes="process group",
        user=f"uid {uid} / gid {gid}" if is_root else f"current user (uid {os.getuid()})",
        drop_to=(uid, gid) if is_root else None,
        try_unshare_in_child=can_unshare_in_child,
    )


def isolation(limits: Optional[SandboxLimits] = None) -> Isolation:
    """The isolation this machine provides (probed once; ``unshare`` is tried with a trivial command)."""
    limits = limits or SandboxLimits()
    return _isolation(limits.uid, limits.gid)


def _last_line(path: str, limit: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln for ln in tail.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def _children(pid: int) -> List[int]:
    """Direct children of ``pid`` (Linux /proc); empty where /proc is unavailable."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        pass
    kids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # the command name (field 2) may contain spaces; the ppid comes right after its ")"
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return kids


def _kill_tree(proc: "subprocess.Popen[bytes]", pid_namespace: bool) -> None:
    """SIGKILL everything the program started, and reap ``proc``.

    With a PID namespace, killing its init (``unshare``'s only child) makes the kernel kill every process in the
    namespace before ``unshare`` sees its child exit, so nothing is left behind, not even a zombie. The process
    group is killed as well (the only mechanism without namespaces).
    """
    if pid_namespace and proc.poll() is None:
        for child in _children(proc.pid):
            try:
                os.kill(child, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_program(source: str, limits: Optional[SandboxLimits] = None) -> ExecResult:
    """Run the Python program ``source`` in the sandbox; it passes when it runs to the end without raising."""
    limits = limits or SandboxLimits()
    iso = isolation(limits)
    root = tempfile.mkdtemp(prefix="lorapro-sandbox-")  # 0700, ours; holds the program's output files
    start = time.monotonic()
    read_fd = write_fd = -1
    try:
        workdir = os.path.join(root, "work")
        os.mkdir(workdir, 0o700)
        program = os.path.join(workdir, "program.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        if iso.drop_to is not None:
            uid, gid = iso.drop_to
            os.chmod(root, 0o711)  # the sandbox user may pass through to work/, not list or read our files
            os.chown(workdir, uid, gid)
            os.chown(program, uid, gid)
        token = secrets.token_hex(16)
        spec = {
            "workdir": workdir,
            "program": "program.py",
            "netns": bool(iso.prefix),
            "try_unshare": iso.try_unshare_in_child,
            "cpu_s": limits.effective_cpu_s,
            "memory_bytes": limits.memory_mb * 2**20,
            "file_size_bytes": limits.file_size_mb * 2**20,
            "max_processes": limits.max_processes,
            "drop_to": list(iso.drop_to) if iso.drop_to else None,
        }
        read_fd, write_fd = os.pipe()
        spec["result_fd"] = write_fd
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1",
            "PYTHONHASHSEED": "0",
        }
        cmd = [*iso.prefix, sys.executable, "-I", "-B", _CHILD, json.dumps(spec)]
        with open(os.path.join(root, "stdout"), "wb") as out, open(os.path.join(root, "stderr"), "wb") as err:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                pass_fds=(write_fd,),
                start_new_session=True,  # own process group, so the whole group can be killed
                cwd=workdir,
                env=env,
                close_fds=True,
            )
        os.close(write_fd)
        write_fd = -1
        try:
            assert proc.stdin is not None
            proc.stdin.write((token + "\n").encode())
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        timed_out = False
        try:
            proc.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        # Always: on timeout this stops the tree; after a normal exit it removes stragglers that stayed in the
        # process group (with a PID namespace the kernel has already killed them when the program's init exited).
        _kill_tree(proc, pid_namespace=iso.processes == "pid namespace")
        duration = time.monotonic() - start
        os.set_blocking(read_fd, False)
        try:
            reported = os.read(read_fd, 4096)
        except BlockingIOError:
            reported = b""
        passed = (not timed_out) and proc.returncode == 0 and reported.strip() == token.encode()
        if timed_out:
            return ExecResult(False, "timed out", f"killed after {limits.timeout_s:g} s", None, duration)
        if passed:
            return ExecResult(True, "passed", "", 0, duration)
        detail = _last_line(os.path.join(root, "stderr"))
        rc = proc.returncode
        if not detail:
            if rc is not None and rc < 0:
                detail = f"killed by signal {signal.Signals(-rc).name}" if -rc in signal.valid_signals() else f"signal {-rc}"
            else:
                detail = f"exit code {rc} before the end of the program"
        return ExecResult(False, "failed", detail, rc, duration)
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        shutil.rmtree(root, ignore_errors=True)


def run_programs(
    sources: Sequence[str], limits: Optional[SandboxLimits] = None, workers: int = 2, progress: bool = False
) -> List[ExecResult]:
    """Run many programs, ``workers`` at a time (each in its own sandbox); results in input order."""
    from concurrent.futures import ThreadPoolExecutor

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}.")
    limits = limits or SandboxLimits()
    isolation(limits)  # probe once, before the threads start
    results: List[Optional[ExecResult]] = [None] * len(sources)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sources), desc="executing", unit="prog")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run_program, src, limits): i for i, src in enumerate(sources)}
        from concurrent.futures import as_completed

        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return [r for r in results if r is not None]
