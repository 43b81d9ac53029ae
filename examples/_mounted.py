"""What every loader example shares: a throwaway one-machine shardfs with a mount.

`mounted({"org/model.pt": "/path/model.pt"})` starts from an empty SHARDFS_HOME (the embedded
redis-server and the default local node, no configuration), puts each file or folder under
its name, mounts, yields the mountpoint, and always unmounts and cleans up, also on failure.

Pass `--keep` to an example to keep the workspace for a look afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile


# where an example makes its workspace (an embedded Redis, a local node, a mountpoint)
WORK_DIR = os.environ.get("SHARDFS_EXAMPLE_DIR", "/var/tmp")


def shardfs(*args: str) -> None:
    print("$ shardfs " + " ".join(args), flush=True)
    r = subprocess.run([sys.executable, "-m", "shardfs", *args])
    if r.returncode != 0:
        sys.exit(f"example failed at: shardfs {' '.join(args)}")


@contextlib.contextmanager
def mounted(models: dict[str, str]):
    work = tempfile.mkdtemp(prefix="shardfs-example-", dir=WORK_DIR)
    os.environ["SHARDFS_HOME"] = os.path.join(work, "home")
    os.environ.pop("SHARDFS_REDIS", None)
    mnt = os.path.join(work, "models")
    os.makedirs(mnt)
    mounted_ok = False
    try:
        for name, path in models.items():
            shardfs("put", path, "--name", name)
        shardfs("mount", mnt)
        mounted_ok = True
        yield mnt
        shardfs("umount", mnt)
        mounted_ok = False
    finally:
        if mounted_ok:  # failed while mounted: this process may still map the file, so detach lazily
            if subprocess.run(["fusermount3", "-u", "-z", mnt]).returncode == 0:
                print(f"unmounted {mnt} (lazily: it goes away when this process exits)")
        pidfile = os.path.join(os.environ["SHARDFS_HOME"], "redis", "redis.pid")
        if os.path.exists(pidfile):
            with open(pidfile) as f, contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(f.read()), signal.SIGTERM)
        if "--keep" in sys.argv:
            print(f"workspace kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def original_or(make, filename: str) -> str:
    """The file or folder named on the command line, else `make(path)` writes one to a scratch dir."""
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if args:
        return args[0]
    path = os.path.join(scratch_dir(), filename)
    make(path)
    return path


def scratch_dir() -> str:
    """A directory for the example's original files, removed at exit."""
    import atexit

    d = tempfile.mkdtemp(prefix="shardfs-example-src-", dir=WORK_DIR)
    atexit.register(shutil.rmtree, d, True)
    return d
