"""The sandbox against hostile programs: each must fail its test and leave the host intact.

Every test checks the outcome (failed / timed out) and the host afterwards: files still there, no process of the
sandbox left running, no connection received. CI runs as root, which is exactly the case where the sandbox must
drop privileges; tests that rely on that are skipped for non-root runs (where the program runs as the user).
"""

import dataclasses
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from lorapro.evaluation.sandbox import SandboxLimits, isolation, run_program, run_programs

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="privilege drop is only done (and needed) when running as root")

# Short limits keep the hostile tests fast and gentle on a 2-core host.
FAST = SandboxLimits(timeout_s=3.0, max_processes=8, memory_mb=512)


def _sandbox_processes():
    """Live processes that belong to a sandbox: owned by the sandbox uid or running the child launcher."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        if (IS_ROOT and uid == FAST.uid) or "_sandbox_child.py" in cmd:
            found.append((int(pid), uid, cmd[:80]))
    return found


@pytest.fixture
def host_dir():
    """A directory of the host that the sandbox can see (``/tmp`` is the program's own tmpfs)."""
    d = tempfile.mkdtemp(prefix=".sandbox-victim-", dir=Path(__file__).resolve().parent)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_leftovers():
    # Only new processes count: sandboxes of other test runs on the same machine may come and go meanwhile.
    before = set(_sandbox_processes())
    yield
    deadline = time.monotonic() + 5
    while set(_sandbox_processes()) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not set(_sandbox_processes()) - before, "a sandboxed process outlived its run"


def test_isolation_is_reported():
    iso = isolation(FAST).describe(FAST)
    assert iso["timeout_s"] == 3.0 and iso["max_processes"] == 8 and iso["cpu_s"] == 4
    if IS_ROOT:
        assert iso["user"].startswith("uid 65534")
    if isolation(FAST).mount:
        assert iso["disk_mb"] == FAST.disk_mb and iso["warning"] is None
        assert iso["filesystem"].startswith("read-only view of /") and iso["network"] == "network namespace"


def test_passing_and_failing_programs():
    assert run_program("from typing import List\nimport math, collections.abc\nassert math.gcd(12, 18) == 6\n", FAST).passed
    r = run_program("assert 1 + 1 == 3\n", FAST)
    assert not r.passed and r.status == "failed" and "AssertionError" in r.detail


def test_early_exit_is_not_a_pass():
    for src in ("import sys\nsys.exit(0)\nassert False\n", "import os\nos._exit(0)\nassert False\n"):
        r = run_program(src, FAST)
        assert not r.passed and r.status == "failed"


def test_never_terminating_program_is_killed_at_the_timeout():
    limits = SandboxLimits(timeout_s=1.5, max_processes=8)
    start = time.monotonic()
    r = run_program("while True:\n    pass\n", limits)
    assert r.status == "timed out" and not r.passed
    assert time.monotonic() - start < 1.5 + 3.0


def test_sleeping_children_in_their_own_session_are_killed():
    # A child that leaves the process group (setsid) and would sleep for 100 s: the whole tree must go.
    src = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(100)\ntime.sleep(100)\n"
    r = run_program(src, SandboxLimits(timeout_s=1.0, max_processes=8))
    assert r.status == "timed out"
    if isolation(FAST).processes != "pid namespace":
        pytest.skip("without a PID namespace a setsid() child escapes the process-group kill (documented)")


def test_fork_bomb_is_contained():
    # Both flavours: one that dies on the first refused fork and one that keeps trying until the timeout.
    start = time.monotonic()
    r1 = run_program("import os\nwhile True:\n    os.fork()\n", FAST)
    r2 = run_program("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n", FAST)
    assert not r1.passed and not r2.passed
    assert r2.status == "timed out"
    assert time.monotonic() - start < 2 * FAST.timeout_s + 5
    # The host can still start processes right away.
    assert run_program("assert True\n", FAST).passed


def test_socket_to_localhost_fails():
    received = []
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except (socket.timeout, OSError):
                continue
            received.append(conn.recv(100))
            conn.close()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        src = (
            "import socket\n"
            f"s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "s.sendall(b'exfiltrated')\n"
            "s.close()\n"
        )
        # Control: the same client works outside the sandbox, so the failure below is the sandbox's doing.
        c = socket.create_connection(("127.0.0.1", port), timeout=2)
        c.sendall(b"control")
        c.close()
        deadline = time.monotonic() + 2
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        assert received == [b"control"]
        r = run_program(src, FAST)
        time.sleep(0.3)
        assert not r.passed and r.status == "failed"
        assert received == [b"control"], "the sandboxed program reached the host's loopback"
    finally:
        stop.set()
        t.join(2)
        server.close()


@needs_root
def test_deleting_files_outside_its_directory_fails(host_dir):
    victim_dir = host_dir / "data"
    victim_dir.mkdir()
    victim = victim_dir / "precious.txt"
    victim.write_text("keep me")
    os.chmod(host_dir, 0o755)  # even a directory the sandbox user can look into
    src = (
        "import os, shutil\n"
        f"os.remove({str(victim)!r})\n"
        f"shutil.rmtree({str(victim_dir)!r})\n"
    )
    r = run_program(src, FAST)
    assert not r.passed and ("PermissionError" in r.detail or "Read-only file system" in r.detail)
    assert victim.read_text() == "keep me"


@needs_root
def test_reading_a_private_file_outside_its_directory_fails(host_dir):
    os.chmod(host_dir, 0o755)
    secret = host_dir / "secret.txt"
    secret.write_text("s3cret")
    os.chmod(secret, 0o600)
    assert secret.stat().st_uid == 0 and stat.S_IMODE(secret.stat().st_mode) == 0o600
    # The program passes only if it can read the file.
    r = run_program(f"assert open({str(secret)!r}).read() == 's3cret'\n", FAST)
    assert not r.passed and "PermissionError" in r.detail
    # Control: a world-readable file in the same place is readable (the failure is about permissions).
    public = host_dir / "public.txt"
    public.write_text("hello")
    os.chmod(public, 0o644)
    assert run_program(f"assert open({str(public)!r}).read() == 'hello'\n", FAST).passed
    assert secret.read_text() == "s3cret"


def test_working_directory_is_private_and_removed():
    src = (
        "import os\n"
        "open('scratch.txt', 'w').write('x' * 10)\n"
        "print(os.getcwd())\n"
        "assert os.path.exists('scratch.txt')\n"
        "assert oct(os.stat('.').st_mode & 0o777) == '0o700'\n"
    )
    before = set(Path(tempfile.gettempdir()).glob("lorapro-sandbox-*"))
    assert run_program(src, FAST).passed
    assert set(Path(tempfile.gettempdir()).glob("lorapro-sandbox-*")) == before


def test_file_size_and_memory_limits():
    limits = SandboxLimits(timeout_s=5.0, file_size_mb=1, memory_mb=256, max_processes=8)
    r = run_program("open('big.bin', 'wb').write(b'0' * (4 * 2**20))\n", limits)
    assert not r.passed  # killed by SIGXFSZ or refused with EFBIG
    r = run_program("x = bytearray(1024 * 2**20)\n", limits)
    assert not r.passed and "MemoryError" in r.detail


def test_run_programs_keeps_order():
    srcs = ["assert True\n", "assert False\n", "import time\ntime.sleep(0.2)\n", "raise ValueError('x')\n"]
    res = run_programs(srcs, FAST, workers=2)
    assert [r.passed for r in res] == [True, False, True, False]


# A program that walks ".." from every descriptor it holds (/proc/self/fd/N) and passes only if it reaches a
# file or a directory listing that Unix permissions should hide from it.
_DESCRIPTOR_ESCAPE = """
import os
target, listing = {target!r}, {listing!r}
for fd in os.listdir('/proc/self/fd'):
    for up in range(8):
        base = '/proc/self/fd/' + fd + '/..' * up
        try:
            if open(base + '/' + target).read() == 'SECRET=1':
                print('read the secret through', base)
                break
        except OSError:
            pass
        try:
            if listing in os.listdir(base):
                print('listed', base)
                break
        except OSError:
            pass
    else:
        continue
    break
else:
    raise AssertionError('no escape')
"""


@needs_root
def test_descriptors_do_not_lead_out_of_a_private_directory(monkeypatch, host_dir):
    # The evaluator's Python lives in a virtual environment inside a root-only (0700) directory, next to a
    # world-readable secret and folder (a project checked out under /root). The interpreter is started as root;
    # nothing the program holds may lead it back into that directory. (Without a mount namespace it imports
    # through such descriptors: warned and reported, see test_without_a_mount_namespace_root_warns_and_sweeps.)
    _needs_mount_namespace()
    os.chmod(host_dir, 0o700)
    project = host_dir / "project"
    project.mkdir(mode=0o755)
    (project / ".env").write_text("SECRET=1")
    os.chmod(project / ".env", 0o644)
    (project / "private-notes").mkdir(mode=0o755)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(project / ".venv")], check=True)
    monkeypatch.setattr(sys, "executable", str(project / ".venv" / "bin" / "python"))
    # Control: by name the secret is out of reach.
    r = run_program(f"open({str(project / '.env')!r}).read()\n", FAST)
    assert not r.passed and "PermissionError" in r.detail
    r = run_program(_DESCRIPTOR_ESCAPE.format(target=".env", listing="private-notes"), FAST)
    assert not r.passed and "no escape" in r.detail, r


# Passes only if no mount the program can reach is writable, apart from its own tmpfs (/tmp, shared by /dev/shm,
# /var/tmp and the work dir) and its own /proc.
_WRITABLE_VIEW = r"""
import os
writable = []
for line in open('/proc/self/mountinfo'):
    point = line.split()[4].encode().decode('unicode_escape')
    if point in ('/tmp', '/dev/shm', '/var/tmp', '/proc') or point.startswith('/proc/'):
        continue
    try:
        if not os.statvfs(point).f_flag & os.ST_RDONLY:
            writable.append(point)
    except OSError:
        pass  # out of its reach
assert not writable, writable
"""

# Many files, each well under the per-file limit, spread over every place it may write.
_FILL_THE_DISK = """
import os
for place in ('.', '/tmp', '/dev/shm'):
    for i in range(12):
        with open(os.path.join(place, 'fill-%d' % i), 'wb') as f:
            f.write(b'x' * 2**19)
"""

# Files and folders in every shared scratch place, and a System V shared-memory segment (kernel memory that
# outlives its creator unless removed).
_LEAVE_FILES = """
import ctypes, os
for place in ('/tmp', '/var/tmp', '/dev/shm'):
    open(os.path.join(place, {name!r}), 'w').write('left behind')
    os.mkdir(os.path.join(place, {name!r} + '.d'))
    open(os.path.join(place, {name!r} + '.d', 'inner'), 'w').write('left behind')
libc = ctypes.CDLL(None, use_errno=True)
assert libc.shmget({key}, 2**20, 0o1600) >= 0, ctypes.get_errno()  # IPC_CREAT | 0600
"""


_SHM_KEY = 0x10000 + os.getpid() % 0x10000


def _shm_segments(key):
    rows = [line.split() for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]]
    return [int(r[1]) for r in rows if int(r[0]) == key]


def _left_on_host(name):
    """What a program that ran _LEAVE_FILES.format(name=name, key=_SHM_KEY) left on the host (then removed)."""
    found = [Path(p) / n for p in ("/tmp", "/var/tmp", "/dev/shm") for n in (name, name + ".d") if (Path(p) / n).exists()]
    for p in found:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    for shmid in _shm_segments(_SHM_KEY):
        found.append(f"shm segment {shmid}")
        subprocess.run(["ipcrm", "-m", str(shmid)], check=False)
    return found


def _needs_mount_namespace():
    if not isolation(FAST).mount:
        pytest.skip(f"no mount namespace on this machine (warned and reported): {isolation(FAST).warning}")


def test_the_host_is_read_only_to_the_program():
    _needs_mount_namespace()
    r = run_program(_WRITABLE_VIEW, FAST)
    assert r.passed, r.detail


def test_a_strict_umask_does_not_weaken_the_sandbox():
    # With umask 077 the import directories' mount points came out 0700: the probe failed and the evaluator fell
    # back to the weaker sandbox.
    _needs_mount_namespace()
    src = Path(__file__).resolve().parents[2] / "src"
    code = (
        "import os; os.umask(0o077)\n"
        "from lorapro.evaluation.sandbox import isolation, run_program\n"
        "assert isolation().mount, isolation().warning\n"
        "assert run_program('import json, decimal').passed\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_total_disk_use_is_capped():
    _needs_mount_namespace()
    # 36 files of 0.5 MiB, each far under the 1 MiB file limit; 18 MiB in total against a 4 MiB cap.
    limits = SandboxLimits(timeout_s=5.0, file_size_mb=1, disk_mb=4, max_processes=8, memory_mb=512)
    r = run_program(_FILL_THE_DISK, limits)
    assert not r.passed and "No space left on device" in r.detail, r
    # Control: the same program fits a cap large enough for it.
    assert run_program(_FILL_THE_DISK, dataclasses.replace(limits, disk_mb=32)).passed


def test_files_left_in_tmp_and_shm_are_removed():
    if not isolation(FAST).mount and isolation(FAST).sweep_uid is None:
        pytest.skip("the program runs as the evaluating user: its files cannot be told apart (warned and reported)")
    name = f"lorapro-leftover-{os.getpid()}"
    _left_on_host(name)
    r = run_program(_LEAVE_FILES.format(name=name, key=_SHM_KEY), FAST)
    assert r.passed, r.detail
    assert _left_on_host(name) == []


@needs_root
def test_without_a_mount_namespace_root_warns_and_sweeps(monkeypatch):
    # The fallback for machines that refuse mount namespaces to root (e.g. containers without CAP_SYS_ADMIN).
    from lorapro.evaluation import sandbox

    monkeypatch.setattr(sandbox, "_ALLOW_MOUNT_NAMESPACE", False)
    sandbox._isolation.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no mount namespace"):
            iso = isolation(FAST)
        report = iso.describe(FAST)
        assert not iso.mount and report["disk_mb"] is None and "no total disk cap" in report["filesystem"]
        assert "no mount namespace" in report["warning"]
        if iso.import_via_fds:  # this Python lives under a private directory (pyenv under /root)
            assert "'..' from them leads into the directories above" in report["warning"]
        name = f"lorapro-leftover-{os.getpid()}"
        _left_on_host(name)
        assert run_program(_LEAVE_FILES.format(name=name, key=_SHM_KEY), FAST).passed
        assert _left_on_host(name) == []
    finally:
        sandbox._isolation.cache_clear()


@pytest.mark.xfail(
    strict=True,
    reason="documented limit (sandbox module doc, README): the program shares the interpreter that holds the pass "
    "token, so a hostile program can forge a pass; untrusted submissions need a stronger boundary",
)
def test_a_program_cannot_forge_its_pass():
    src = (
        "import os, sys\n"
        "child = sys._getframe(0).f_back.f_locals\n"  # the sandbox child's main(), which holds the token
        "os.write(child['result_fd'], child['token'] + b'\\n')\n"
        "os._exit(0)\n"
        "assert False, 'the tests fail'\n"
    )
    assert not run_program(src, FAST).passed


# The evaluator as an ordinary user: loads sandbox.py on its own (the lorapro package needs torch, which that
# user's Python may lack) and reports the isolation, the warnings and each program's outcome as JSON.
_EVALUATOR = r"""
import dataclasses, importlib.util, json, sys, warnings
spec = importlib.util.spec_from_file_location("sandbox_under_test", sys.argv[1])
sb = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = sb
spec.loader.exec_module(sb)
sb._ALLOW_MOUNT_NAMESPACE = sys.argv[2] == "mount"
limits = sb.SandboxLimits(**json.loads(sys.argv[3]))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    iso = sb.isolation(limits)
results = [dataclasses.asdict(sb.run_program(p, limits)) for p in json.loads(sys.stdin.read())]
print(json.dumps({"isolation": iso.describe(limits), "warnings": [str(w.message) for w in caught], "results": results}))
"""

NON_ROOT_UID = 65534


def _as_ordinary_user():
    """(command prefix, Python) to run the evaluator as a non-root user; skips where that is impossible."""
    if not IS_ROOT:
        return [], sys.executable
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is needed to run the evaluator as an ordinary user")
    prefix = [setpriv, f"--reuid={NON_ROOT_UID}", f"--regid={NON_ROOT_UID}", "--clear-groups"]
    for python in dict.fromkeys([sys.executable, "/usr/bin/python3", shutil.which("python3") or ""]):
        # It must be able to start itself again (the sandbox starts sys.executable).
        probe = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'pass'], check=True)"
        if python and subprocess.run([*prefix, python, "-c", probe], capture_output=True, cwd="/").returncode == 0:
            return prefix, python
    pytest.skip(f"no Python interpreter that uid {NON_ROOT_UID} may run (this one lives under a private directory)")


def _run_as_ordinary_user(programs, host_dir, mount=True, **limits):
    prefix, python = _as_ordinary_user()
    unshare = shutil.which("unshare")
    userns = unshare and subprocess.run(
        [*prefix, unshare, "--user", "--map-root-user", "--mount", "true"], capture_output=True, text=True, cwd="/"
    )
    if not userns or userns.returncode != 0:
        pytest.skip(f"the kernel forbids unprivileged user namespaces here: {userns and userns.stderr.strip()}")
    script = host_dir / "evaluator.py"
    script.write_text(_EVALUATOR)
    sandbox_py = Path(__file__).resolve().parents[2] / "src" / "lorapro" / "evaluation" / "sandbox.py"
    out = subprocess.run(
        [*prefix, python, "-I", str(script), str(sandbox_py), "mount" if mount else "no-mount", json.dumps(limits)],
        input=json.dumps(programs), capture_output=True, text=True, cwd=str(host_dir), timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_non_root_evaluator_gets_a_read_only_view_and_a_private_tmpfs(host_dir):
    os.chmod(host_dir, 0o755)
    if IS_ROOT:
        os.chown(host_dir, NON_ROOT_UID, NON_ROOT_UID)
    result = host_dir / "results.jsonl"  # the evaluating user's own file, in that user's own directory
    result.write_text("keep me")
    if IS_ROOT:
        os.chown(result, NON_ROOT_UID, NON_ROOT_UID)
    name = f"lorapro-leftover-{os.getpid()}"
    _left_on_host(name)
    remount_rw = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.mount(None, b'/', None, 32 | 4096, None)\n"  # MS_REMOUNT | MS_BIND, i.e. read-write again
        "libc.umount2(b'/tmp', 2)\n"
    )
    programs = [
        "import math, collections.abc\nassert math.gcd(12, 18) == 6\n",
        _WRITABLE_VIEW,
        f"import os\nos.remove({str(result)!r})\n",
        f"open({str(result)!r}, 'w').write('overwritten')\n",
        remount_rw + f"import os\nos.remove({str(result)!r})\n",
        _FILL_THE_DISK,
        _LEAVE_FILES.format(name=name, key=_SHM_KEY),
    ]
    out = _run_as_ordinary_user(programs, host_dir, timeout_s=5.0, file_size_mb=1, disk_mb=4, max_processes=16)
    iso, res = out["isolation"], out["results"]
    assert iso["warning"] is None and out["warnings"] == []
    assert iso["user"].startswith("current user") and iso["filesystem"].startswith("read-only view")
    assert iso["network"] == "network namespace" and iso["process_tree_kill"] == "pid namespace"
    assert [r["passed"] for r in res] == [True, True, False, False, False, False, True], res
    assert all("Read-only file system" in r["detail"] for r in res[2:5]), res
    assert "No space left on device" in res[5]["detail"]
    assert result.read_text() == "keep me"
    assert _left_on_host(name) == []


def test_non_root_evaluator_without_namespaces_says_so(host_dir):
    os.chmod(host_dir, 0o755)
    out = _run_as_ordinary_user([], host_dir, mount=False)
    assert out["isolation"]["filesystem"].startswith("none")
    assert "runs as the evaluating user" in out["isolation"]["warning"]
    assert len(out["warnings"]) == 1 and "runs as the evaluating user" in out["warnings"][0]
