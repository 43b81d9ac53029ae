"""Load: many concurrent readers of a mount, every byte checked against the source files.

Used by the fast test suite (seconds) and by benchmarks/soak.py (minutes). Bounded in
time and in requests; reads only local files and the mount.
"""

from __future__ import annotations

import mmap
import os
import random
import threading
import time
from dataclasses import dataclass, field

SIZES = (4 << 10, 64 << 10, 1 << 20, 4 << 20)


@dataclass
class SoakReport:
    reads: int = 0
    bytes: int = 0
    errors: list = field(default_factory=list)
    latencies: list = field(default_factory=list)
    seconds: float = 0.0
    daemon_peak_rss: int | None = None

    def summary(self) -> str:
        lat = sorted(self.latencies) or [0.0]
        p50 = lat[len(lat) // 2] * 1e3
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3
        rss = f", daemon peak RSS {self.daemon_peak_rss / 2**20:.0f} MiB" if self.daemon_peak_rss else ""
        return (f"{self.reads} reads, {self.bytes / 2**20:.0f} MiB in {self.seconds:.1f}s "
                f"({self.bytes / max(self.seconds, 1e-9) / 2**20:.0f} MiB/s), latency p50 {p50:.2f} ms "
                f"p99 {p99:.2f} ms, errors {len(self.errors)}{rss}")


def peak_rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run(pairs: dict[str, str], seconds: float, readers: int = 16, seed: int = 0,
        max_reads: int = 1_000_000, daemon_pid: int | None = None) -> SoakReport:
    """pairs: mounted path -> source path. Readers mix sequential, random and mmap reads."""
    rep = SoakReport()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    refs = {}
    for mounted, source in pairs.items():
        f = open(source, "rb")
        refs[mounted] = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        f.close()
    paths = sorted(pairs)

    def record(lat, n, err=None):
        with lock:
            rep.reads += 1
            rep.bytes += n
            rep.latencies.append(lat)
            if err:
                rep.errors.append(err)

    def reader(k):
        rng = random.Random(seed * 1000 + k)
        path = paths[k % len(paths)] if k % 4 else paths[0]  # a quarter share one model
        ref = refs[path]
        size = len(ref)
        mode = ("seq", "random", "mmap", "random")[k % 4]
        pos = 0
        with open(path, "rb", buffering=0) as f:
            mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) if mode == "mmap" else None
            try:
                while time.monotonic() < deadline and rep.reads < max_reads:
                    n = rng.choice(SIZES)
                    off = pos if mode == "seq" else rng.randrange(size)
                    t0 = time.perf_counter()
                    try:
                        data = mm[off:off + n] if mm is not None else os.pread(f.fileno(), n, off)
                    except OSError as e:
                        record(time.perf_counter() - t0, 0, f"{path}@{off}: {e}")
                        continue
                    lat = time.perf_counter() - t0
                    ok = data == ref[off:off + n]
                    record(lat, len(data), None if ok else f"{path}@{off}+{n}: wrong bytes")
                    pos = (off + len(data)) % size
            finally:
                if mm is not None:
                    mm.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=reader, args=(k,), daemon=True) for k in range(readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    rep.seconds = time.monotonic() - t0
    for mm in refs.values():
        mm.close()
    if daemon_pid:
        rep.daemon_peak_rss = peak_rss(daemon_pid)
    return rep
