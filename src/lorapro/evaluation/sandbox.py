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
  write), ``RLIMIT_NPROC`` (processes and threads; stops fork bombs), no core files and no POSIX message queues;
* **a read-only view of the machine** (a mount namespace): every mount is read-only; one tmpfs of ``disk_mb``
  MiB is mounted on ``/tmp`` and shared by ``/dev/shm``, ``/var/tmp`` and the working directory ``/tmp/work``,
  so the total the program can write is capped (``RLIMIT_FSIZE`` alone caps each file) and all of it vanishes
  with the namespace when the program ends. It imports from read-only bind mounts of the import directories, and
  holds no other descriptor than stdin, stdout, stderr and its result pipe (a directory descriptor opened before
  the privilege drop would lead it, through ``..``, into directories it may not enter);
* **no root**: when the evaluator runs as root (CI, containers) the child drops to an unprivileged uid/gid
  (65534, "nobody", by default) before running the program. This matters: the kernel does not enforce
  ``RLIMIT_NPROC`` for root, and root could read any file. When the evaluator is not root, the program runs in a
  new user namespace as the evaluating user with every capability dropped, so it cannot undo the mounts (and the
  read-only view keeps it from deleting that user's files);
* **no network**: a new network namespace (no interfaces up, so even 127.0.0.1 is unreachable), from
  ``unshare --net`` or ``os.unshare`` (Python >= 3.12, root). Where neither is possible, a socket guard refuses to
  create Python sockets; that is best effort only (C extensions or ``ctypes`` can bypass it);
* **its own IPC namespace**: System V shared memory and message queues it creates vanish with it;
* no set-uid escalation (``no_new_privs``).

Which of these were in effect is reported by :func:`isolation` and written into every HumanEval result; where the
machine allows no mount namespace, a warning says so once per process and the ``warning`` entry of the report
names what is missing. The fallbacks: as root, Unix permissions of uid 65534, with what it left in ``/tmp``,
``/var/tmp`` and ``/dev/shm`` removed after the programs (no total cap); not root and no user namespaces, the
program runs as the evaluating user and can write and delete whatever that user can.

Limits (not provided): the program can read world-readable files (``/etc/passwd``, the Python installation) and,
without root, every file the evaluating user can read (the view is read-only, not hidden; the last line of its
stderr goes into the result); programs running at the same time share the sandbox uid, so ``RLIMIT_NPROC`` counts
their processes together.

**Scores of untrusted submissions.** A program passes when the child sees it run to the end and writes a secret
token to a pipe. That guards against accidents (``sys.exit(0)`` half way through the tests), not against an
adversary: the tests run in the same interpreter as the program, which can read the token from memory, patch the
test's ``check`` or return an object that compares equal to anything. No token in the same interpreter can be
out of its reach. HumanEval scores of model samples are meaningful; scores of code written to game the score
(a public leaderboard, an RL reward) need a stronger boundary: run the tests in a separate process that receives
only serialised return values, and run the whole evaluation in a container or VM.
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
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

__all__ = ["SandboxLimits", "ExecResult", "Isolation", "SandboxSetupError", "isolation", "run_program", "run_programs"]

_CHILD = str(Path(__file__).with_name("_sandbox_child.py"))
_NOBODY = 65534
# Test hook: pretend the machine cannot create mount namespaces, to exercise the fallbacks.
_ALLOW_MOUNT_NAMESPACE = True


class SandboxSetupError(RuntimeError):
    """The sandbox could not be built for a program (a problem of the machine, not of the program)."""


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
    disk_mb: int = 64  # everything the program writes (tmpfs; RAM-backed, so kept small)

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}.")
        for name in ("memory_mb", "file_size_mb", "max_processes", "disk_mb"):
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
    user: str  # "uid 65534 / gid 65534" | "current user (...)"
    filesystem: str  # what keeps the program from writing and reading the host's files
    drop_to: Optional[tuple]  # (uid, gid) the child switches to, or None
    try_unshare_in_child: bool
    mount: bool = False  # the child builds the read-only view and the tmpfs (prefix has --mount)
    drop_caps: bool = False  # the child is root of a user namespace and drops every capability
    import_via_fds: bool = False  # no mount namespace and the interpreter is out of the sandbox user's reach
    sweep_uid: Optional[int] = None  # remove what this uid left in /tmp, /var/tmp, /dev/shm after the programs
    warning: Optional[str] = None  # what is missing, said once per process and kept in every report

    def describe(self, limits: SandboxLimits) -> Dict[str, object]:
        return {
            "network": self.network,
            "process_tree_kill": self.processes,
            "user": self.user,
            "filesystem": self.filesystem,
            "timeout_s": limits.timeout_s,
            "cpu_s": limits.effective_cpu_s,
            "memory_mb": limits.memory_mb,
            "file_size_mb": limits.file_size_mb,
            "disk_mb": limits.disk_mb if self.mount else None,
            "max_processes": limits.max_processes,
            "warning": self.warning,
        }


@dataclasses.dataclass
class ExecResult:
    """Outcome of one program. ``status`` is ``"passed"``, ``"failed"`` or ``"timed out"``."""

    passed: bool
    status: str
    detail: str
    returncode: Optional[int]
    duration_s: float


def _probe(iso: Isolation, uid: int, gid: int) -> bool:
    """Does the whole chain work here? Runs a small program with ``iso`` (a setup failure is a no); it imports a
    pure-Python and a C-extension module, which must still be reachable after the privilege drop."""
    try:
        return _launch("import decimal, json\n", SandboxLimits(uid=uid, gid=gid), iso).passed
    except (OSError, subprocess.SubprocessError, SandboxSetupError):
        return False


def _import_dirs_out_of_reach() -> List[str]:
    """Import directories of ``python -I`` that a user other than their owner could not reach by name."""
    try:
        out = subprocess.run(
            [sys.executable, "-I", "-c", "import json, sys; print(json.dumps(sys.path))"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
        entries = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        return [sys.prefix]
    blocked = []
    for entry in entries:
        if not entry or not os.path.isdir(entry):
            continue
        real = os.path.realpath(entry)
        parts = Path(real).parents
        if not os.stat(real).st_mode & stat.S_IROTH or not all(os.stat(p).st_mode & stat.S_IXOTH for p in [real, *parts]):
            blocked.append(real)
    return blocked


_WEAK = "WARNING: the HumanEval sandbox cannot isolate programs well on this machine: "


def _candidates(uid: int, gid: int) -> Iterator[Isolation]:
    """What to try, strongest first (a generator, so that a fallback is only worked out when it is needed)."""
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    unshare = shutil.which("unshare")
    ns = ("--net", "--ipc", "--pid", "--fork", "--kill-child")  # --ipc: SysV shared memory dies with the program
    mnt = ("--mount", "--mount-proc")
    read_only = "read-only view of /; private tmpfs for the work dir, /tmp, /var/tmp and /dev/shm"
    if is_root:
        as_nobody = dict(user=f"uid {uid} / gid {gid}", drop_to=(uid, gid))
        if unshare and _ALLOW_MOUNT_NAMESPACE:
            yield Isolation(prefix=(unshare, *ns, *mnt, "--"), network="network namespace", processes="pid namespace",
                            filesystem=read_only, try_unshare_in_child=False, mount=True, **as_nobody)
        # No mount namespace: Unix permissions of the sandbox user are all that protects the files.
        blocked = _import_dirs_out_of_reach()
        warning = (
            f"no mount namespace, so the program (uid {uid}) can write world-writable places such as /tmp and "
            "/dev/shm without a total cap (what it leaves there is removed after the programs) and read every "
            "world-readable file"
        )
        if blocked:
            warning += (
                f"; the Python installation ({', '.join(blocked)}) is out of uid {uid}'s reach, so the program "
                "imports through directory descriptors opened as root, and '..' from them leads into the "
                "directories above. Install Python where every user can read it"
            )
        weak = dict(filesystem=f"Unix permissions of uid {uid}; no total disk cap", import_via_fds=bool(blocked),
                    sweep_uid=uid, warning=warning, **as_nobody)
        if unshare:
            yield Isolation(prefix=(unshare, *ns, "--"), network="network namespace", processes="pid namespace",
                            try_unshare_in_child=False, **weak)
        in_child = sys.version_info >= (3, 12)
        yield Isolation(prefix=(), network="network namespace (os.unshare)" if in_child else "socket guard (best effort)",
                        processes="process group", try_unshare_in_child=in_child, **weak)
        return
    me = f"current user (uid {os.getuid()})"
    if unshare and _ALLOW_MOUNT_NAMESPACE:
        yield Isolation(prefix=(unshare, "--user", "--map-root-user", *ns, *mnt, "--"), network="network namespace",
                        processes="pid namespace", user=me + " in a user namespace, no capabilities",
                        filesystem=read_only, drop_to=None, try_unshare_in_child=False, mount=True, drop_caps=True)
    weak = dict(user=me, filesystem="none: runs as the evaluating user", drop_to=None, try_unshare_in_child=False,
                warning="not root and no user namespace with a mount namespace (util-linux unshare, "
                "kernel.unprivileged_userns_clone), so the program runs as the evaluating user and can read, write "
                "and delete every file that user can (your results included) and fill the disk")
    if unshare:
        yield Isolation(prefix=(unshare, "--user", "--map-root-user", *ns, "--"), network="network namespace",
                        processes="pid namespace", **weak)
    yield Isolation(prefix=(), network="socket guard (best effort)", processes="process group", **weak)


@functools.lru_cache(maxsize=None)
def _isolation(uid: int, gid: int) -> Isolation:
    # The first that works; the last (no namespaces, no prefix) always does.
    iso = next(c for c in _candidates(uid, gid) if not c.prefix or _probe(c, uid, gid))
    if iso.warning:  # once per process, i.e. once per evaluation run
        warnings.warn(_WEAK + iso.warning + ". Run untrusted code in a container or VM.", RuntimeWarning, stacklevel=3)
    return iso


def isolation(limits: Optional[SandboxLimits] = None) -> Isolation:
    """The isolation this machine provides (probed once per process by running a trivial program)."""
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


_running = 0
_running_lock = threading.Lock()


def _sweep(uid: int) -> None:
    """Remove what ``uid`` left in the shared scratch places (fallback without a mount namespace)."""
    for place in ("/tmp", "/var/tmp", "/dev/shm"):
        try:
            entries = list(os.scandir(place))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)  # fd-based on Linux: safe against symlink swaps
                else:
                    os.unlink(entry.path)
            except OSError:
                pass


def run_program(source: str, limits: Optional[SandboxLimits] = None) -> ExecResult:
    """Run the Python program ``source`` in the sandbox; it passes when it runs to the end without raising.

    Raises :class:`SandboxSetupError` when the sandbox could not be built (the program did not run).
    """
    global _running
    limits = limits or SandboxLimits()
    iso = isolation(limits)
    with _running_lock:
        _running += 1
    try:
        return _launch(source, limits, iso)
    finally:
        with _running_lock:
            _running -= 1
            # Programs share the sandbox uid: sweep only when none is running, so no program loses its files.
            if iso.sweep_uid is not None and _running == 0:
                _sweep(iso.sweep_uid)


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _launch(source: str, limits: SandboxLimits, iso: Isolation) -> ExecResult:
    root = tempfile.mkdtemp(prefix="lorapro-sandbox-")  # 0700, ours; holds the program and its output files
    start = time.monotonic()
    read_fd = write_fd = -1
    try:
        if iso.mount:  # the child reads the program here and runs it from /tmp/work in its own tmpfs
            workdir, program, home = root, os.path.join(root, "program.py"), "/tmp/work"
        else:
            workdir = home = os.path.join(root, "work")
            os.mkdir(workdir, 0o700)
            program = os.path.join(workdir, "program.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        if iso.drop_to is not None and not iso.mount:
            uid, gid = iso.drop_to
            os.chmod(root, 0o711)  # the sandbox user may pass through to work/, not list or read our files
            os.chown(workdir, uid, gid)
            os.chown(program, uid, gid)
        token = secrets.token_hex(16)
        read_fd, write_fd = os.pipe()
        spec = {
            "workdir": workdir,
            "program": program,
            "netns": bool(iso.prefix),
            "try_unshare": iso.try_unshare_in_child,
            "mount": iso.mount,
            "disk_bytes": limits.disk_mb * 2**20,
            "drop_caps": iso.drop_caps,
            "import_via_fds": iso.import_via_fds,
            "cpu_s": limits.effective_cpu_s,
            "memory_bytes": limits.memory_mb * 2**20,
            "file_size_bytes": limits.file_size_mb * 2**20,
            "max_processes": limits.max_processes,
            "drop_to": list(iso.drop_to) if iso.drop_to else None,
            "result_fd": write_fd,
        }
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": home,
            "TMPDIR": home,
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
        reported = _read_all(read_fd)
        ran = reported.startswith(b"ready\n")  # written by the child once the sandbox stood, before the program
        if not ran and not timed_out:
            raise SandboxSetupError(
                "The sandbox could not be set up, so the program was not run (exit code "
                f"{proc.returncode}): {_last_line(os.path.join(root, 'stderr')) or 'no message'}. Isolation in use: "
                f"{iso.describe(limits)}. This is a problem of the machine, not of the program."
            )
        if timed_out:
            return ExecResult(False, "timed out", f"killed after {limits.timeout_s:g} s", None, duration)
        if proc.returncode == 0 and reported == b"ready\n" + token.encode() + b"\n":
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
