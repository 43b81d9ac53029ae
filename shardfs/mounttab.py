"""The mount table, read without touching a mount: a FUSE mount whose daemon is stopped or
hung never answers a stat of its root, so code that must cope with such a mount (umount,
a new mount on the same path) finds it here and stats it only in a thread it can leave."""

from __future__ import annotations

import os
import re
import subprocess
import threading

ANSWER_TIMEOUT = 5.0  # a live daemon answers a stat of its root in milliseconds


def _unescape(path: bytes) -> str:
    # the kernel escapes space, tab, newline and backslash in paths as \ooo; names need not be UTF-8
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), path))


def mounts() -> dict[str, tuple[str, str]]:
    """Mountpoint -> (filesystem type, device "major:minor"), from /proc/self/mountinfo; the
    last mount on a path wins. A shardfs mount's type is "fuse.shardfs"."""
    out = {}
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split()
                tail = line.split(b" - ", 1)[1].split() if b" - " in line else []
                if len(fields) < 5 or len(tail) < 2:
                    continue
                fstype, source = tail[:2]
                kind = "fuse.shardfs" if (fstype, source) == (b"fuse", b"shardfs") else os.fsdecode(fstype)
                out[_unescape(fields[4])] = (kind, fields[2].decode())
    except OSError:
        pass
    return out


def resolve(path: str, hops: int = 40) -> str:
    """os.path.realpath without a stat of the path itself when it is a mountpoint (a symlink
    to a mountpoint names that mount)."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    if not name:
        return path  # "/"
    full = os.path.join(os.path.realpath(parent), name)
    if full in mounts() or hops == 0:
        return full
    if os.path.islink(full):  # (an lstat of a name that is not a mountpoint: it never enters a mount)
        return resolve(os.path.join(os.path.dirname(full), os.readlink(full)), hops - 1)
    return full


def within(fn, *args, timeout: float = ANSWER_TIMEOUT):
    """fn(*args), the OSError it raised, or None if it has not returned in time: for a call
    that may wait on a FUSE daemon that is stopped or hung. The call left waiting stays in a
    daemon thread; process exit ends it (unless the daemon had already taken the request and
    never answers: the kernel then waits for it, which a stopped daemon never does)."""
    box: list = []

    def run():
        try:
            box.append(fn(*args))
        except OSError as e:
            box.append(e)
    t = threading.Thread(target=run, name=f"{fn.__name__} {args}", daemon=True)
    t.start()
    t.join(timeout)
    return box[0] if box else None


def stat_within(path: str, timeout: float = ANSWER_TIMEOUT) -> os.stat_result | OSError | None:
    return within(os.stat, path, timeout=timeout)


def daemon_pids(mp: str) -> list[int]:
    """Python processes running `shardfs mount MP --foreground` (the daemon, however it was
    started: `mount` spawns it so, systemd runs it so) for the mountpoint mp (resolved). A
    wrapper (sudo, timeout, strace) is not a daemon; an argument is compared as an absolute
    path, never resolved (that could wait on some other hung mount)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if not os.path.basename(os.readlink(f"/proc/{pid}/exe")).startswith("python"):
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [os.fsdecode(a) for a in f.read().split(b"\0")]
            if "--foreground" not in args or "mount" not in args or not any("shardfs" in a for a in args):
                continue
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if mp in (os.path.abspath(os.path.join(cwd, a)) for a in args[args.index("mount") + 1:]
                  if not a.startswith("-")):
            found.append(int(pid))
    return found


def abort_connection(dev: str) -> bool:
    """Abort the FUSE connection of the mount with device dev ("0:53"): every request waiting
    on its daemon fails at once (ECONNABORTED), as if the daemon had died."""
    minor = dev.split(":")[-1]
    conns = "/sys/fs/fuse/connections"
    if not os.path.isdir(os.path.join(conns, minor)) and os.geteuid() == 0 and os.path.isdir(conns):
        # (systemd mounts the fusectl filesystem at boot; a container may not have it)
        subprocess.run(["mount", "-t", "fusectl", "fusectl", conns], capture_output=True)
    try:
        with open(os.path.join(conns, minor, "abort"), "w") as f:
            f.write("1")
        return True
    except OSError:
        return False
