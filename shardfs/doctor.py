"""`shardfs doctor`: one line per check, and what to do about each failure."""

from __future__ import annotations

import os
import shutil
import tempfile

from .errors import NodeError, ShardfsError

LOW_FREE = 1 << 30


def checks(redis_flag: str | None, cache_dir: str):
    """Yield (ok: bool | None, name, detail, advice); None means a warning."""
    if not os.path.exists("/dev/fuse"):
        yield False, "fuse device", "/dev/fuse is missing", "modprobe fuse; in a container pass --device /dev/fuse"
    else:
        try:
            os.close(os.open("/dev/fuse", os.O_RDWR))
            yield True, "fuse device", "/dev/fuse opens read-write", ""
        except OSError as e:
            yield False, "fuse device", f"/dev/fuse: {e.strerror}", "run as root or join the group that owns /dev/fuse"
    exe = shutil.which("fusermount3")
    yield (exe is not None, "fusermount3", exe or "not on PATH",
           "apt-get install fuse3" if exe is None else "")
    from .connect import open_index
    # (reported with the cache dir, below; the node lines compare disks with it)
    why, cache_dir, to_make = _existing(cache_dir)
    try:
        idx = open_index(redis_flag, timeout=3.0)
        yield True, "redis", f"{idx.url} answers", ""
    except ShardfsError as e:
        yield False, "redis", str(e), ("start Redis, or fix the URL (--redis, SHARDFS_REDIS or the config "
                                       "file: see `shardfs config show`)")
        idx = None
    if idx is not None:
        from .pool import NodePool
        from .stores import disk_id
        cache_disk = disk_id(cache_dir) if why is None else None
        pool = NodePool(idx.nodes())
        if not pool.nodes:
            yield None, "nodes", "no nodes registered", "`shardfs put` registers a local node; or `shardfs node add URL`"
        for nid, h in pool.probe(used=True).items():
            url = pool.nodes[nid].url
            if isinstance(h, NodeError):
                yield False, f"node {nid}", f"{url}: {h}", "start the node (shardfs node serve / systemctl start " \
                    "shardfs-node@...) or `shardfs node rm` it and `shardfs verify --repair`"
            elif h.get("free") is None:
                yield True, f"node {nid}", f"{url}: up (does not report free space)", ""
            elif h["free"] < LOW_FREE:
                yield None, f"node {nid}", f"{url}: only {h['free'] >> 20} MiB free", \
                    "free space or add nodes; puts skip full nodes"
            else:
                local = "; on the cache's disk: mounts read its chunks without caching them" \
                    if cache_disk is not None and h.get("disk") == cache_disk else ""
                yield True, f"node {nid}", f"{url}: up, {h['free'] / 2**30:.1f} GiB free{local}", ""
        pool.close()
    if why:
        yield False, "cache dir", f"{cache_dir}: {why}", "mount refuses it; choose another --cache-dir"
    else:
        yield from _cache_room(cache_dir, to_make)
    bdi = "/sys/class/bdi"
    if os.geteuid() == 0 and os.path.isdir(bdi):
        yield True, "read-ahead", "running as root: the mount raises read_ahead_kb to 1024", ""
    else:
        yield None, "read-ahead", "not root: FUSE reads stay at 128 KiB (about half the speed)", \
            "mount as root (systemd unit) to get 1 MiB requests"


def _existing(path: str) -> tuple[str | None, str, str]:
    """A check creates nothing (a mistyped --cache-dir used to be made, parents and all):
    (why it cannot be a directory or None, the nearest existing directory at or above path,
    what of path a mount would create there)."""
    if not path:
        return "empty path", path, ""
    path = os.path.abspath(path)
    at = path
    while not os.path.exists(at):
        at = os.path.dirname(at)
    if not os.path.isdir(at):
        return f"{at} is not a directory", path, ""
    return None, at, os.path.relpath(path, at) if at != path else ""


def _cache_room(cache_dir: str, to_make: str = ""):
    try:
        with tempfile.NamedTemporaryFile(dir=cache_dir):
            pass
        from .cache import default_free_floor
        from .units import human
        free, floor = shutil.disk_usage(cache_dir).free, default_free_floor(cache_dir)
        room = free - floor  # what the cache may fill: it leaves `floor` of its disk to others
        made = f" (a mount creates {to_make} in it)" if to_make else ""
        yield (room >= LOW_FREE or None), "cache dir", \
            f"{cache_dir} writable{made}, {human(free)} free, of which the cache leaves {human(floor)} to others", \
            "" if room >= LOW_FREE else "give --cache-dir a disk with more room"
    except OSError as e:
        yield None, "cache dir", f"{cache_dir}: {e.strerror}", \
            "reads still work but bypass the cache; choose a writable --cache-dir"


def run(redis_flag: str | None, cache_dir: str) -> bool:
    ok = True
    for good, name, detail, advice in checks(redis_flag, cache_dir):
        tag = {True: "ok  ", None: "warn", False: "FAIL"}[good]
        print(f"{tag}  {name}: {detail}" + (f"  -> {advice}" if advice and good is not True else ""))
        ok = ok and good is not False
    return ok
