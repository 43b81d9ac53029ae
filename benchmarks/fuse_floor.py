#!/usr/bin/env python3
"""What FUSE itself allows on this machine: a trivial pyfuse3 file served from memory.

No chunks, no decoding, no hashing: one 1 GiB file whose bytes sit in the serving process's
memory (already touched). It is read with 4 MiB `readinto` calls after drop_caches and the
same settle as bench_mount.py (free page reporting gone quiet), in three ways per repetition:

    plain   the same bytes as a plain file on the work directory's disk (the baseline)
    reply   the trivial file, every byte handed over in replies to the kernel's reads
    push    the same, and from the open on two threads push the file in 4 MiB pieces into
            the page cache (notify_store), as the shardfs daemon pushes fetched chunks

Prints GB/s per read, medians of --reps after a warm-up, and each against plain. The mount
raises the bdi read_ahead_kb to 1024 as shardfs does (root). shardfs's cold states are this
floor plus its own work (fetch, decode, verify): see README, Benchmarks.

    python benchmarks/fuse_floor.py [--workdir /var/tmp/shardfs-bench] [--reps 4]
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

SIZE = 1 << 30
PIECE = 4 << 20
INO = 2


def serve(mountpoint: str, push: bool) -> None:
    """The trivial file system (runs in a child process until unmounted)."""
    from concurrent.futures import ThreadPoolExecutor

    import pyfuse3
    import trio

    data = memoryview(bytearray(os.urandom(1 << 20)) * (SIZE >> 20))
    pushers = ThreadPoolExecutor(2)

    class Ops(pyfuse3.Operations):
        async def getattr(self, ino, ctx=None):
            a = pyfuse3.EntryAttributes()
            if ino == pyfuse3.ROOT_INODE:
                a.st_mode = stat.S_IFDIR | 0o555
            elif ino == INO:
                a.st_mode, a.st_size = stat.S_IFREG | 0o444, SIZE
            else:
                raise pyfuse3.FUSEError(errno.ENOENT)
            a.st_ino, a.attr_timeout, a.entry_timeout = ino, 300, 300
            return a

        async def lookup(self, parent, name, ctx=None):
            if parent == pyfuse3.ROOT_INODE and name == b"f":
                return await self.getattr(INO)
            raise pyfuse3.FUSEError(errno.ENOENT)

        async def open(self, ino, flags, ctx):
            if push:
                for at in range(0, SIZE, PIECE):
                    pushers.submit(pyfuse3.notify_store, INO, at, data[at:at + PIECE])
            return pyfuse3.FileInfo(fh=ino, keep_cache=True)

        async def read(self, fh, off, size):
            return data[off:off + size]

    def read_ahead():
        dev = os.stat(mountpoint).st_dev  # (from a thread: the kernel asks this process)
        try:
            with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb", "w") as f:
                f.write("1024")
        except OSError:
            pass

    async def main():
        pyfuse3.init(Ops(), mountpoint, {"fsname=fusefloor", "ro", "noatime"})
        try:
            async with trio.open_nursery() as n:
                n.start_soon(pyfuse3.main)
                await trio.to_thread.run_sync(read_ahead)
                print("ready", flush=True)
        finally:
            pushers.shutdown(cancel_futures=True)
            pyfuse3.close()

    trio.run(main)


def read_all(path: str) -> float:
    buf = bytearray(PIECE)
    t0, n = time.perf_counter(), 0
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(buf):
            n += k
    return n / (time.perf_counter() - t0) / 1e9


def drop_and_settle() -> None:
    from bench_mount import REPORTED, SETTLE_MAX, SETTLE_QUIET, reported_kib
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    if not os.path.exists(REPORTED):
        return
    t0 = changed = time.monotonic()
    last = reported_kib()
    while time.monotonic() - changed < SETTLE_QUIET and time.monotonic() - t0 < SETTLE_MAX:
        time.sleep(0.25)
        if (now := reported_kib()) != last:
            last, changed = now, time.monotonic()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/var/tmp/shardfs-bench", help="where the plain file goes")
    ap.add_argument("--reps", type=int, default=4, help="timed repetitions after the warm-up (default 4)")
    ap.add_argument("--serve", nargs=2, metavar=("MOUNTPOINT", "reply|push"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], args.serve[1] == "push")
        return 0
    if os.geteuid() != 0:
        print("fuse_floor: needs root (drop_caches, read_ahead_kb)", file=sys.stderr)
        return 1
    os.makedirs(args.workdir, exist_ok=True)
    plain = os.path.join(args.workdir, "fuse-floor-plain.bin")
    if not os.path.exists(plain) or os.path.getsize(plain) != SIZE:
        with open(plain + ".tmp", "wb") as f:
            for _ in range(SIZE >> 20):
                f.write(os.urandom(1 << 20))
        os.replace(plain + ".tmp", plain)
    mnt = tempfile.mkdtemp(prefix="fuse-floor-")
    got: dict[str, list[float]] = {"plain": [], "reply": [], "push": []}
    try:
        for rep in range(args.reps + 1):
            for way in got:
                if way == "plain":
                    drop_and_settle()
                    speed = read_all(plain)
                else:
                    child = subprocess.Popen([sys.executable, __file__, "--serve", mnt, way],
                                             stdout=subprocess.PIPE, text=True)
                    try:
                        if child.stdout.readline().strip() != "ready":
                            print(f"fuse_floor: the {way} file system did not start", file=sys.stderr)
                            return 1
                        drop_and_settle()
                        speed = read_all(os.path.join(mnt, "f"))
                    finally:
                        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
                        child.wait(timeout=30)
                print(f"{'warm-up' if rep == 0 else f'rep {rep}'}  {way:5}  {speed:.2f} GB/s", flush=True)
                if rep:
                    got[way].append(speed)
    finally:
        os.rmdir(mnt)
    base = statistics.median(got["plain"])
    for way, speeds in got.items():
        med = statistics.median(speeds)
        print(f"{way:5}  median {med:.2f} GB/s  ({', '.join(f'{s:.2f}' for s in speeds)})  "
              f"vs plain {med / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
