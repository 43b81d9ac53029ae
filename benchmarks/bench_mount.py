#!/usr/bin/env python3
"""Read throughput of a shardfs FUSE mount against plain-file reads in the same cache state.

Builds (once, reused) a synthetic bf16 safetensors model (shardfs.synth, seed 0) in
--workdir, starts its own redis-server on 127.0.0.1, ingests the model (R=2) to 3 local
file:// nodes and, unless --skip-http, to 3 `shardfs node serve` processes on 127.0.0.1
(a second Redis database of the same server). Then, for each state, times a sequential
read of the whole file (4 MiB readinto loop, in a child process) through the mount and of
the original file in the same state: one warm-up pass of each, then the median of --reps.

    state               shardfs side                                   baseline               target
    cold, file nodes    empty cache dir, fresh mount, caches dropped   original, cold         >= 0.8
    cold, HTTP nodes    same, HTTP-node index                          original, cold         >= 0.7
    cold, cached        full cache dir, fresh mount, caches dropped    original, cold         >= 0.9
    warm                full cache dir in page cache, fresh mount      original in page cache >= 0.3
    hot                 second read through the same mount             original in page cache >= 0.65
    safetensors mmap    safe_open(np)+get_tensor of every key, cold,   same on original, cold >= 0.9 (on)
                        header-driven prefetch on, then off                                   >= 0.7 (off)
    memory              daemon VmHWM during the cold file-node read    -                      <= 512 MiB

Cold states need root (sync; echo 3 > /proc/sys/vm/drop_caches); without it they are
skipped. After each drop the run waits until the kernel's free page reporting has handed
the freed memory back to the hypervisor (--settle; see REPORTED below): without the wait, a
cold read refills the page cache with memory the host still backs, several times faster to
write than the memory of a machine that is really cold, and the baseline gains more from
that than the mount does. numpy has no bfloat16, so the safetensors state needs ml_dtypes (importable, or
installed in WORKDIR/pydeps with `pip install --no-deps --target WORKDIR/pydeps ml_dtypes`).
GB/s are decimal (1e9 bytes). Everything started is stopped and the run-* directory is
removed at the end (the model and the daemon logs of the last run stay in --workdir).

    python benchmarks/bench_mount.py [--size 2GiB] [--workdir /var/tmp/shardfs-bench] [--reps 3] [--skip-http]
                                     [--settle auto|SECONDS]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

from _common import free_port, stop, wait_port  # noqa: E402
from shardfs.mounttab import mounts  # noqa: E402
from shardfs.units import human, parse_size  # noqa: E402

# Free page reporting (virtio-balloon): a guest returns freed memory to the hypervisor a few
# seconds after freeing it, and the next write to such a page faults on the host. Measured
# here: 2 GiB written into fresh memory ran at 0.95 GB/s, into reused memory at 9 GB/s, and
# a plain `dd` of a file read at 1.8 GB/s right after drop_caches but 0.64 GB/s 10 s later,
# once the ~2 GiB of page cache drop_caches freed had been reported. A read right after the
# drop therefore refills the page cache with memory the hypervisor still backs: warm memory,
# not a cold machine. Cold reads here wait until reporting has gone quiet (--settle).
REPORTED = "/sys/module/page_reporting/parameters/reported_kib"
SETTLE_QUIET = 3.0  # seconds without a new report: the freed pages are back with the host
SETTLE_MAX = 30.0


def reported_kib() -> int:
    try:
        with open(REPORTED) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def first_touch() -> tuple[float, float]:
    """GB/s writing 1 GiB into fresh anonymous memory, and into memory already touched."""
    import mmap
    block = 64 << 20
    src = bytes(block)
    t = time.perf_counter()
    for _ in range(16):
        with mmap.mmap(-1, block) as m:
            m[:] = src
    fresh = (16 * block) / (time.perf_counter() - t) / 1e9
    with mmap.mmap(-1, block) as m:
        m[:] = src
        t = time.perf_counter()
        for _ in range(16):
            m[:] = src
        reused = (16 * block) / (time.perf_counter() - t) / 1e9
    return fresh, reused


MODEL_NAME = "bench/model.safetensors"
BUF = 4 << 20
STALL = 60.0  # seconds without read progress before a read counts as hung


# -- child process: the timed reads ----------------------------------------------------------

def child_main(argv) -> int:
    """`bench_mount.py _child read|st PATH [--hash]`: prints one JSON line {bytes, seconds[, sha256]}."""
    mode, path = argv[0], argv[1]
    do_hash = "--hash" in argv
    if mode == "read":
        buf = bytearray(BUF)
        mv = memoryview(buf)
        h = hashlib.sha256() if do_hash else None
        n = 0
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while True:
                k = f.readinto(buf)
                if not k:
                    break
                n += k
                if h is not None:
                    h.update(mv[:k])
        dt = time.perf_counter() - t0
        out = {"bytes": n, "seconds": dt}
        if h is not None:
            out["sha256"] = h.hexdigest()
        print(json.dumps(out), flush=True)
        return 0
    if mode == "st":
        import numpy as np
        try:
            import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy
        except ImportError:
            print(json.dumps({"error": "ml_dtypes is not importable (numpy has no bfloat16)"}), flush=True)
            return 3
        from safetensors import safe_open
        n = tensors = 0
        acc = 0
        t0 = time.perf_counter()
        with safe_open(path, "np") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                acc += int(t.reshape(-1).view(np.uint8)[0])
                n += t.nbytes
                tensors += 1
                del t
        dt = time.perf_counter() - t0
        print(json.dumps({"bytes": n, "seconds": dt, "tensors": tensors, "acc": acc}), flush=True)
        return 0
    raise SystemExit(f"unknown child mode {mode!r}")


# -- helpers ---------------------------------------------------------------------------------


def proc_status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = v.strip()
    except OSError:
        pass
    return out


def kib_field(status: dict, key: str) -> int | None:
    v = status.get(key)
    return int(v.split()[0]) * 1024 if v else None


def pid_alive(pid: int) -> bool:
    st = proc_status(pid)
    return bool(st) and not st.get("State", "").startswith(("Z", "X"))


def rchar(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def mounted(mp: str) -> bool:
    """In the mount table (true for a stale FUSE mount too, unlike os.path.ismount)."""
    return mp in mounts()


def page_in_dir(root: str) -> int:
    """Read every file under root the buffered way, so its pages sit in the page cache."""
    total = 0
    for d, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                while chunk := f.read(4 << 20):
                    total += len(chunk)
    return total


# Proactive reclaim in the guest: a DAMON scheme that pages out memory it samples as idle
# (found here: action "pageout" on physical memory, up to 128 MiB/s). It takes page cache
# pages a few seconds after they were read, so "in the page cache" is a state that has to be
# made right before it is measured, and checked: resident_fraction before and after the read.
RECLAIM = "/sys/kernel/mm/damon/admin/kdamonds"


def reclaim_note() -> str:
    """What the bench found of the guest's proactive reclaim, as one line (or "")."""
    try:
        for k in sorted(os.listdir(RECLAIM)):
            d = os.path.join(RECLAIM, k)
            if not k.isdigit() or open(os.path.join(d, "state")).read().strip() != "on":
                continue
            schemes = os.path.join(d, "contexts", "0", "schemes")
            actions = [open(os.path.join(schemes, x, "action")).read().strip()
                       for x in sorted(os.listdir(schemes)) if x.isdigit()]
            if "pageout" in actions:
                return "DAMON proactive reclaim (pageout) is on: page cache is paged out within seconds"
    except OSError:
        pass
    return ""


def resident_fraction(root: str) -> float:
    """Share of the bytes of the files under root that are in the page cache (cachestat)."""
    from shardfs import directio
    total = resident = 0
    for d, _dirs, files in os.walk(root):
        for name in files:
            try:
                fd = os.open(os.path.join(d, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                size = os.fstat(fd).st_size
                total += size
                resident += resident_bytes(directio, fd, size)
            finally:
                os.close(fd)
    return resident / total if total else 0.0


def resident_bytes(directio, fd: int, size: int) -> int:
    import ctypes
    span, stat = directio._CachestatRange(0, size), directio._Cachestat()
    if directio._libc.syscall(451, ctypes.c_uint(fd), ctypes.byref(span), ctypes.byref(stat), ctypes.c_uint(0)):
        return size if directio.resident(fd, size) else 0  # (no cachestat: all or nothing)
    return min(size, stat.nr_cache * directio.PAGE)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    buf = bytearray(BUF)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(buf):
            h.update(mv[:k])
    return h.hexdigest()


def gbps(size: int, seconds: float) -> float:
    return size / 1e9 / seconds


class StateError(Exception):
    """A state could not be measured (shardfs error, hang, skipped prerequisite)."""


# -- the benchmark ---------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        os.makedirs(args.workdir, exist_ok=True)
        self.dir = tempfile.mkdtemp(prefix="run-", dir=args.workdir)
        self.mp = os.path.join(self.dir, "mnt")
        os.makedirs(self.mp)
        self.home = os.path.join(self.dir, "home")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDFS_")}
        self.env["SHARDFS_HOME"] = self.home
        self.env["PYTHONPATH"] = ROOT + os.pathsep + self.env.get("PYTHONPATH", "")
        pydeps = os.path.join(args.workdir, "pydeps")
        self.child_env = dict(self.env)
        if os.path.isdir(pydeps):
            self.child_env["PYTHONPATH"] = self.env["PYTHONPATH"] + os.pathsep + pydeps
        self.procs: list[subprocess.Popen] = []
        self.child: subprocess.Popen | None = None
        self.redis_url = None
        self.daemon_pid: int | None = None
        self.anomalies: list[str] = []
        self.cache_size = None
        self.model = None
        self.size = 0
        self.sha256 = None
        self.can_drop = False
        self.settled: list[float] = []  # seconds waited after each drop_caches
        self.cache_seq = 0

    def note(self, msg: str) -> None:
        """Something that looks wrong in shardfs (or the setup); repeated in the summary."""
        print(f"  !! {msg}", flush=True)
        self.anomalies.append(msg)

    # -- services -------------------------------------------------------------------------

    def start_redis(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("bench_mount: redis-server is not on PATH")
        port = free_port()
        rdir = os.path.join(self.dir, "redis")
        os.makedirs(rdir)
        p = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", rdir, "--save", "",
                              "--appendonly", "no", "--protected-mode", "yes", "--databases", "4"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(p)
        wait_port(port, p, "redis-server")
        self.redis_url = f"redis://127.0.0.1:{port}"

    def env_for(self, db: int) -> dict:
        return {**self.env, "SHARDFS_REDIS": f"{self.redis_url}/{db}"}

    def start_node_server(self, root: str) -> str:
        port = free_port()
        log = open(os.path.join(self.dir, f"node-{port}.log"), "ab")
        p = subprocess.Popen([sys.executable, "-m", "shardfs", "node", "serve", "--root", root,
                              "--listen", f"127.0.0.1:{port}"], env=self.env, stdout=log, stderr=log,
                             start_new_session=True)
        log.close()
        self.procs.append(p)
        wait_port(port, p, "shardfs node serve")
        return f"http://127.0.0.1:{port}"

    def cli(self, env, *args, timeout=600, check=True) -> subprocess.CompletedProcess:
        try:
            r = subprocess.run([sys.executable, "-m", "shardfs", *args], env=env, capture_output=True,
                               text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise StateError(f"`shardfs {' '.join(args)}` did not finish in {timeout}s") from None
        if check and r.returncode != 0:
            raise StateError(f"`shardfs {' '.join(args)}` exited {r.returncode}: "
                             f"{(r.stderr or r.stdout).strip()[-500:]}")
        return r

    # -- model and ingest -------------------------------------------------------------------

    def build_model(self) -> None:
        from shardfs.synth import write_safetensors
        a = self.args
        path = os.path.join(a.workdir, f"synthetic-bf16-seed0-{a.size}.safetensors")
        meta_path = path + ".json"
        meta = None
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            if os.path.getsize(path) != meta["size"] or meta.get("request") != a.size:
                meta = None
        except (OSError, ValueError, KeyError):
            meta = None
        if meta is None:
            t0 = time.perf_counter()
            tmp = path + ".tmp"
            size = write_safetensors(tmp, a.size, seed=0, dtype="BF16")
            os.rename(tmp, path)
            sha = sha256_file(path)
            meta = {"request": a.size, "size": size, "sha256": sha}
            with open(meta_path, "w") as f:
                json.dump(meta, f)
            print(f"model: built {path} ({human(size)}) in {time.perf_counter() - t0:.1f}s", flush=True)
        else:
            print(f"model: reusing {path} ({human(meta['size'])})", flush=True)
        self.model, self.size, self.sha256 = path, meta["size"], meta["sha256"]
        self.cache_size = 2 * self.size + (1 << 30)

    def ingest(self, db: int, http: bool) -> None:
        env = self.env_for(db)
        kind = "http" if http else "file"
        for i in range(3):
            root = os.path.join(self.dir, f"nodes-{kind}", f"n{i}")
            os.makedirs(root)
            open(os.path.join(root, ".shardfs-node"), "w").close()  # (a node directory made ahead: see README)
            url = self.start_node_server(root) if http else "file://" + root
            self.cli(env, "node", "add", url, timeout=60)
        t0 = time.perf_counter()
        r = self.cli(env, "put", self.model, "--name", MODEL_NAME, "--replicas", "2", "--no-progress",
                     timeout=3600)
        dt = time.perf_counter() - t0
        print(f"ingest ({kind} nodes, redis db {db}): {r.stdout.strip()}  [wall {dt:.1f}s]", flush=True)
        info = json.loads(self.cli(env, "info", MODEL_NAME, "--json", timeout=60).stdout)
        if info["sha256"] != self.sha256:
            self.note(f"shardfs info sha256 {info['sha256']} != the model's {self.sha256} ({kind} nodes)")

    # -- OS caches, mounts --------------------------------------------------------------------

    def drop_caches(self) -> None:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        self.settle()

    def settle(self) -> None:
        """After drop_caches, wait until the guest has handed the freed pages back to the
        hypervisor (free page reporting), so a cold read starts on memory as cold as its
        cache: see REPORTED. --settle 0 reads at once; a number waits that many seconds."""
        t0 = time.monotonic()
        if self.args.settle == "auto":
            if not os.path.exists(REPORTED):
                return
            last_change, last = t0, reported_kib()
            while time.monotonic() - last_change < SETTLE_QUIET and time.monotonic() - t0 < SETTLE_MAX:
                time.sleep(0.25)
                now = reported_kib()
                if now != last:
                    last, last_change = now, time.monotonic()
        elif float(self.args.settle) > 0:
            time.sleep(float(self.args.settle))
        self.settled.append(time.monotonic() - t0)

    def check_drop(self) -> None:
        try:
            self.drop_caches()
            self.can_drop = True
        except OSError as e:
            print(f"cannot drop the page cache ({e.strerror}; needs root): cold states will be SKIPPED",
                  flush=True)

    def fresh_cache_dir(self, tag: str) -> str:
        for d in os.listdir(self.dir):
            if d.startswith(f"cache-{tag}-"):
                shutil.rmtree(os.path.join(self.dir, d), ignore_errors=True)
        self.cache_seq += 1
        return os.path.join(self.dir, f"cache-{tag}-{self.cache_seq}")

    def mount(self, db: int, cache_dir: str, *extra: str) -> int:
        if mounted(self.mp):
            self.note("mountpoint still mounted before a mount; unmounting first")
            self.umount()
        r = self.cli(self.env_for(db), "mount", self.mp, "--cache-dir", cache_dir,
                     "--cache-size", str(self.cache_size), *extra, timeout=120)
        m = re.search(r"daemon pid (\d+)", r.stdout)
        pid = int(m.group(1)) if m else None
        if pid is None:
            pg = subprocess.run(["pgrep", "-f", f"shardfs.*mount {self.mp}"], capture_output=True, text=True)
            pids = [int(x) for x in pg.stdout.split()]
            pid = pids[0] if pids else None
            self.note(f"`shardfs mount` did not print the daemon pid: {r.stdout.strip()!r}")
        if pid is None:
            raise StateError("cannot find the mount daemon's pid")
        self.daemon_pid = pid
        path = os.path.join(self.mp, MODEL_NAME)
        if not os.path.exists(path):
            raise StateError(f"{path} does not exist after mounting; listing: {os.listdir(self.mp)}")
        return pid

    def umount(self) -> None:
        """Unmount (retrying while busy), wait for the daemon to exit; never leave a stale mount."""
        pid, self.daemon_pid = self.daemon_pid, None
        if mounted(self.mp):
            last = ""
            for attempt in range(5):
                r = subprocess.run([sys.executable, "-m", "shardfs", "umount", self.mp], env=self.env,
                                   capture_output=True, text=True, timeout=60)
                if r.returncode == 0 and not mounted(self.mp):
                    if attempt:
                        self.note(f"umount needed {attempt + 1} attempts (last error: {last})")
                    break
                last = (r.stderr or r.stdout).strip()
                time.sleep(1)
            else:
                self.note(f"`shardfs umount` failed 5 times ({last}); lazy-unmounting")
                subprocess.run(["fusermount3", "-u", "-z", self.mp], capture_output=True)
        if pid is not None:
            deadline = time.monotonic() + 20
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(pid):
                self.note(f"daemon pid {pid} still running 20s after unmount; SIGTERM")
                try:
                    os.kill(pid, signal.SIGTERM)
                    deadline = time.monotonic() + 5
                    while pid_alive(pid) and time.monotonic() < deadline:
                        time.sleep(0.05)
                    if pid_alive(pid):
                        self.note(f"daemon pid {pid} ignored SIGTERM; SIGKILL")
                        os.kill(pid, signal.SIGKILL)
                        time.sleep(0.5)
                except ProcessLookupError:
                    pass
        if mounted(self.mp):
            subprocess.run([sys.executable, "-m", "shardfs", "umount", self.mp], env=self.env,
                           capture_output=True, timeout=60)
            if mounted(self.mp):
                subprocess.run(["fusermount3", "-u", "-z", self.mp], capture_output=True)
            if mounted(self.mp):
                self.note(f"{self.mp} is STILL mounted after cleanup")

    def cache_stats(self) -> dict | None:
        try:
            r = self.cli(self.env, "cache", "stats", "--json", "--mount", self.mp, timeout=60)
            return json.loads(r.stdout)
        except (StateError, ValueError) as e:
            self.note(f"cache stats failed: {e}")
            return None

    # -- timed reads ------------------------------------------------------------------------

    def run_child(self, mode: str, path: str, do_hash: bool = False) -> dict:
        """Run a timed read in a child; watch for hangs; sample the daemon's RSS meanwhile."""
        total = max(600.0, self.size / 5e6)
        cmd = [sys.executable, os.path.abspath(__file__), "_child", mode, path] + (["--hash"] if do_hash else [])
        self.child = p = subprocess.Popen(cmd, env=self.child_env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True)
        t0 = last_t = time.monotonic()
        last_rc = -1
        rss_max = 0
        try:
            while p.poll() is None:
                time.sleep(0.2)
                now = time.monotonic()
                if self.daemon_pid:
                    rss = kib_field(proc_status(self.daemon_pid), "VmRSS")
                    if rss:
                        rss_max = max(rss_max, rss)
                rc = rchar(p.pid) if mode == "read" else None
                if rc is not None and rc != last_rc:
                    last_rc, last_t = rc, now
                if mode == "read" and now - last_t > STALL:
                    raise StateError(f"read of {path} HUNG: no progress for {STALL:.0f}s after "
                                     f"{human(max(last_rc, 0))}; daemon alive: "
                                     f"{pid_alive(self.daemon_pid) if self.daemon_pid else '-'}")
                if now - t0 > total:
                    raise StateError(f"{mode} of {path} did not finish in {total:.0f}s")
            out, err = p.communicate()
        finally:
            if p.poll() is None:
                p.kill()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    self.note(f"reader child {p.pid} did not die after SIGKILL (stuck in the kernel?)")
            self.child = None
        if p.returncode != 0:
            msg = (out.strip().splitlines() or [""])[-1] + " " + err.strip()[-600:]
            raise StateError(f"{mode} of {path} failed (exit {p.returncode}): {msg.strip()}")
        res = json.loads(out.strip().splitlines()[-1])
        if mode == "read" and res["bytes"] != self.size:
            raise StateError(f"read {res['bytes']} bytes from {path}, expected {self.size}")
        if do_hash and res.get("sha256") != self.sha256:
            self.note(f"CONTENT MISMATCH: {path} read back sha256 {res.get('sha256')}, expected {self.sha256}")
        res["rss_max"] = rss_max
        if self.daemon_pid:
            res["hwm"] = kib_field(proc_status(self.daemon_pid), "VmHWM")
            res["rss_end"] = kib_field(proc_status(self.daemon_pid), "VmRSS")
        return res

    def mnt_path(self) -> str:
        return os.path.join(self.mp, MODEL_NAME)

    # -- measurement driver -------------------------------------------------------------------

    def measure(self, shard_fn, base_fn):
        """Warm-up pass of each, then reps interleaved; returns (shard times, base times, infos)."""
        s_times, b_times, infos = [], [], []
        for rep in range(self.args.reps + 1):
            warm = rep == 0
            res = shard_fn(warm)
            b = base_fn(warm)
            label = "warm-up" if warm else f"rep {rep}"
            extra = ""
            if res.get("resident"):
                extra += ", cache files resident {:.0%} before, {:.0%} after".format(*res["resident"])
            if res.get("hwm"):
                extra += f", daemon VmHWM {human(res['hwm'])}"
            if res.get("rss_max"):
                extra += f", sampled RSS max {human(res['rss_max'])}"
            if res.get("stats"):
                st = res["stats"]
                c = st["cache"]
                extra += (f", chunks fetched {st.get('chunks_fetched')}, cache hits/misses {c['hits']}/"
                          f"{c['misses']}, failovers {st.get('failovers')}"
                          + (f", hedges {st['hedges']}" if "hedges" in st else ""))
            print(f"    {label:<8} shardfs {res['seconds']:7.2f}s {gbps(self.size, res['seconds']):6.2f} GB/s | "
                  f"baseline {b['seconds']:7.2f}s {gbps(self.size, b['seconds']):6.2f} GB/s{extra}", flush=True)
            infos.append(res)
            if not warm:
                s_times.append(res["seconds"])
                b_times.append(b["seconds"])
        return s_times, b_times, infos

    # baseline reads

    def base_cold(self, mode="read"):
        def fn(warm):
            self.drop_caches()
            return self.run_child(mode, self.model)
        return fn

    def base_hot(self, mode="read"):
        def fn(warm):
            if warm:
                self.run_child(mode, self.model)  # fill the page cache
            return self.run_child(mode, self.model)
        return fn

    # shardfs reads

    def shard_cold(self, db: int, tag: str, mode="read", stats=True, mount_args=()):
        def fn(warm):
            cache = self.fresh_cache_dir(tag)
            try:
                self.mount(db, cache, *mount_args)
                self.drop_caches()
                res = self.run_child(mode, self.mnt_path(), do_hash=warm and mode == "read")
                if stats:
                    res["stats"] = self.cache_stats()
                return res
            finally:
                self.umount()
        return fn

    def shard_cold_cached(self, cache_dir: str):
        def fn(warm):
            try:
                self.mount(0, cache_dir)
                self.drop_caches()
                res = self.run_child("read", self.mnt_path(), do_hash=warm)
                res["stats"] = self.cache_stats()
                return res
            finally:
                self.umount()
        return fn

    def shard_warm(self, cache_dir: str):
        def fn(warm):
            try:
                self.mount(0, cache_dir)
                # Loaded on every pass, right before the read: the daemon reads and writes
                # entries with O_DIRECT, and this VM's proactive reclaim (DAMON pageout, see
                # RECLAIM) pages cache files out within seconds of their last read.
                n = page_in_dir(cache_dir)
                before = resident_fraction(cache_dir)
                res = self.run_child("read", self.mnt_path())
                after = resident_fraction(cache_dir)
                res["stats"] = self.cache_stats()
                res["resident"] = (before, after)
                if warm:
                    print(f"    cache files read into the page cache before each read: {human(n)}", flush=True)
                return res
            finally:
                self.umount()
        return fn

    def shard_hot(self):
        def fn(warm):
            if warm:
                self.run_child("read", self.mnt_path())  # the first read through this mount
            return self.run_child("read", self.mnt_path())
        return fn

    def warm_cache(self, cache_dir: str) -> None:
        try:
            self.mount(0, cache_dir)
            t0 = time.perf_counter()
            r = self.cli(self.env, "cache", "warm", MODEL_NAME, "--mount", self.mp, timeout=3600)
            dt = time.perf_counter() - t0
            print(f"    cache warm: {r.stdout.strip()} in {dt:.1f}s ({gbps(self.size, dt):.2f} GB/s)", flush=True)
            st = self.cache_stats()
            if st:
                pct = st["models"][0]["cached_pct"] if st["models"] else None
                print(f"    cache after warm: {human(st['cache']['used'])} in {st['cache']['entries']} chunks, "
                      f"model cached {pct}%", flush=True)
                if pct != 100.0:
                    self.note(f"after `cache warm` the model is {pct}% cached, not 100%")
        finally:
            self.umount()

    def daemon_log_report(self) -> None:
        logdir = os.path.join(self.home, "logs")
        keep = os.path.join(self.args.workdir, "last-run-logs")
        shutil.rmtree(keep, ignore_errors=True)
        os.makedirs(keep, exist_ok=True)
        for d in (logdir, self.dir):
            if not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                if name.endswith(".log"):
                    shutil.copy(os.path.join(d, name), keep)
        bad = []
        for name in sorted(os.listdir(keep)):
            with open(os.path.join(keep, name), errors="replace") as f:
                for line in f:
                    if re.search(r"WARNING|ERROR|CRITICAL|Traceback|Exception", line) and \
                            "no --token-file" not in line:
                        bad.append(f"{name}: {line.rstrip()}")
        print(f"\ndaemon/node logs kept in {keep}: {len(bad)} warning/error line(s)")
        for line in bad[:30]:
            print("  " + line[:300])
        if len(bad) > 30:
            print(f"  ... {len(bad) - 30} more")

    def close(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.kill()
        try:
            self.umount()
        except Exception as e:  # noqa: BLE001 - keep cleaning up
            print(f"cleanup: umount failed: {e}", file=sys.stderr)
        # a daemon we lost track of (e.g. interrupted mid-mount)
        pg = subprocess.run(["pgrep", "-f", f"shardfs.*mount {self.mp}"], capture_output=True, text=True)
        for pid in map(int, pg.stdout.split()):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if mounted(self.mp):
            subprocess.run(["fusermount3", "-u", "-z", self.mp], capture_output=True)
        for p in reversed(self.procs):
            stop(p)
        self.procs = []
        try:
            self.daemon_log_report()
        except OSError as e:
            print(f"cleanup: cannot keep logs: {e}", file=sys.stderr)
        if not mounted(self.mp):
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            print(f"cleanup: {self.mp} is still mounted; leaving {self.dir}", file=sys.stderr)


# -- main ------------------------------------------------------------------------------------

def fmt_row(state, shard, base, ratio, target, result) -> str:
    return f"| {state} | {shard} | {base} | {ratio} | {target} | {result} |"


def source_state() -> tuple[str, str]:
    """(git HEAD + dirty marker for shardfs/, fingerprint of shardfs/*.py): the code a mount runs."""
    r = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    head = r.stdout.strip() or "?"
    d = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "shardfs"], capture_output=True, text=True)
    if d.stdout.strip():
        head += " (shardfs/ has uncommitted changes)"
    h = hashlib.sha256()
    src = os.path.join(ROOT, "shardfs")
    for name in sorted(os.listdir(src)):
        if name.endswith(".py"):
            with open(os.path.join(src, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return head, h.hexdigest()[:12]


def system_info() -> None:
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = human(int(line.split()[1]) * 1024)
    except OSError:
        pass
    print(f"date:   {time.strftime('%Y-%m-%d %H:%M:%S %z')}")
    print(f"kernel: {os.uname().release}")
    print(f"nproc:  {os.cpu_count()} (usable {len(os.sched_getaffinity(0))})")
    print(f"memory: {mem}")
    print(f"python: {sys.version.split()[0]} ({sys.executable})")
    head, fp = source_state()
    print(f"shardfs: git {head}, sources {fp}", flush=True)
    fresh, reused = first_touch()
    reporting = "active" if os.path.exists(REPORTED) else "absent"
    print(f"memory writes: {fresh:.2f} GB/s into fresh pages, {reused:.2f} GB/s into reused ones "
          f"(free page reporting {reporting})", flush=True)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        return child_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("2GiB"), help="model size (default 2GiB)")
    ap.add_argument("--workdir", default="/var/tmp/shardfs-bench",
                    help="keeps the model; a run-* directory is made inside and removed at the end")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions after the warm-up (default 3)")
    ap.add_argument("--skip-http", action="store_true", help="skip the HTTP-node ingest and state")
    ap.add_argument("--settle", default="auto", metavar="auto|SECONDS",
                    help="after each drop_caches wait until free page reporting has returned the freed "
                         "memory to the hypervisor (auto, the default; no wait where the kernel has no "
                         "page reporting), a fixed number of seconds, or 0 to read at once")
    args = ap.parse_args()
    args.workdir = os.path.abspath(args.workdir)
    if args.reps < 1:
        ap.error("--reps must be at least 1")
    if args.settle != "auto":
        try:
            if not 0 <= float(args.settle) <= 600:  # (also refuses nan)
                raise ValueError
        except ValueError:
            ap.error(f"--settle must be auto or a number of seconds from 0 to 600, not {args.settle!r}")
    sys.path.insert(0, ROOT)

    def on_term(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    system_info()
    rows: list[tuple] = []
    b = Bench(args)

    def row(state, shard, base, target, op, bound):
        if shard is None:
            r = (state, "-", "-", "-", f"{op} {bound}", base)  # base holds the reason
        else:
            s = statistics.median(shard)
            bb = statistics.median(base)
            ratio = bb / s  # throughput ratio = baseline time / shardfs time
            ok = ratio >= bound
            r = (state, f"{gbps(b.size, s):.2f}", f"{gbps(b.size, bb):.2f}", f"{ratio:.2f}", f"{op} {bound}",
                 "PASS" if ok else "MISS")
        rows.append(r)
        print("  => " + fmt_row(*r), flush=True)

    src = [source_state()]  # the code mounts run; re-checked before each state and at the end

    def check_source(where):
        now = source_state()
        if now[1] != src[0][1]:
            b.note(f"shardfs sources changed during the run ({where}): git {src[0][0]} -> {now[0]}, "
                   f"sources {src[0][1]} -> {now[1]}; mounts after this run the new code")
            src[0] = now

    def state(title, fn):
        check_source(f"before {title!r}")
        print(f"\n== {title}  [{time.strftime('%H:%M:%S')}]", flush=True)
        try:
            fn()
        except StateError as e:
            b.note(f"{title}: {e}")
            return e
        return None

    try:
        print(f"workdir: {b.dir}")
        if reclaim_note():
            print(f"machine: {reclaim_note()} (warm state: loaded before each read, residency printed)")
        b.build_model()
        b.check_drop()
        b.start_redis()
        print(f"redis: {b.redis_url} (db 0: file nodes, db 1: http nodes)", flush=True)
        b.ingest(0, http=False)
        http_err = None
        if not args.skip_http:
            try:
                b.ingest(1, http=True)
            except (StateError, RuntimeError) as e:
                http_err = str(e)
                b.note(f"HTTP ingest failed: {e}")
        print(f"\nreads: sequential readinto({human(BUF)}) of {human(b.size)} in a child process; "
              f"warm-up pass, then median of {args.reps}", flush=True)

        hwm_cold = []
        cold_reason = "SKIPPED (cannot drop caches)"

        # 1. cold, file nodes
        def cold_file():
            s, bb, infos = b.measure(b.shard_cold(0, "file"), b.base_cold())
            hwm_cold.extend(i["hwm"] for i in infos if i.get("hwm"))
            row("cold, file nodes", s, bb, None, ">=", 0.8)
        if b.can_drop:
            e = state("cold, file nodes (empty cache dir, fresh mount, caches dropped)", cold_file)
            if e:
                row("cold, file nodes", None, f"ERROR: {e}"[:200], None, ">=", 0.8)
        else:
            row("cold, file nodes", None, cold_reason, None, ">=", 0.8)

        # 2. cold, HTTP nodes
        def cold_http():
            s, bb, infos = b.measure(b.shard_cold(1, "http"), b.base_cold())
            row("cold, HTTP nodes", s, bb, None, ">=", 0.7)
        if args.skip_http:
            row("cold, HTTP nodes", None, "SKIPPED (--skip-http)", None, ">=", 0.7)
        elif http_err:
            row("cold, HTTP nodes", None, f"ERROR: ingest failed: {http_err}"[:200], None, ">=", 0.7)
        elif b.can_drop:
            e = state("cold, HTTP nodes (empty cache dir, fresh mount, caches dropped)", cold_http)
            if e:
                row("cold, HTTP nodes", None, f"ERROR: {e}"[:200], None, ">=", 0.7)
        else:
            row("cold, HTTP nodes", None, cold_reason, None, ">=", 0.7)

        # 3. cold, cached
        cached_dir = os.path.join(b.dir, "cache-full")
        cache_ready = {"ok": False}

        def prepare_cache():
            b.warm_cache(cached_dir)
            cache_ready["ok"] = True

        e = state("preparing a full cache dir (`shardfs cache warm`)", prepare_cache)
        if e:
            # fall back to filling it by one read through a mount
            def fill_by_read():
                shutil.rmtree(cached_dir, ignore_errors=True)
                try:
                    b.mount(0, cached_dir)
                    b.run_child("read", b.mnt_path())
                finally:
                    b.umount()
                cache_ready["ok"] = True
            state("filling the cache dir by one read instead", fill_by_read)

        def cold_cached():
            s, bb, _ = b.measure(b.shard_cold_cached(cached_dir), b.base_cold())
            row("cold, cached", s, bb, None, ">=", 0.9)
        if not cache_ready["ok"]:
            row("cold, cached", None, "ERROR: could not fill the cache", None, ">=", 0.9)
        elif b.can_drop:
            e = state("cold, cached (full cache dir, fresh mount, caches dropped)", cold_cached)
            if e:
                row("cold, cached", None, f"ERROR: {e}"[:200], None, ">=", 0.9)
        else:
            row("cold, cached", None, cold_reason, None, ">=", 0.9)

        # 4. warm
        def warm():
            s, bb, _ = b.measure(b.shard_warm(cached_dir), b.base_hot())
            row("warm", s, bb, None, ">=", 0.3)
        if cache_ready["ok"]:
            e = state("warm (cache files in page cache, fresh mount each pass)", warm)
            if e:
                row("warm", None, f"ERROR: {e}"[:200], None, ">=", 0.3)
        else:
            row("warm", None, "ERROR: could not fill the cache", None, ">=", 0.3)

        # 5. hot
        def hot():
            try:
                b.mount(0, cached_dir)
                s, bb, _ = b.measure(b.shard_hot(), b.base_hot())
            finally:
                b.umount()
            row("hot", s, bb, None, ">=", 0.65)
        e = state("hot (repeated reads through one mount)", hot)
        if e:
            row("hot", None, f"ERROR: {e}"[:200], None, ">=", 0.65)

        # 6. safetensors mmap load, cold, file nodes: header-driven prefetch on (the default) and off.
        # Issue 3 asks >= 0.7; issue 6 asks >= 0.9 with prefetch on.
        for label, mount_args, bound in (("prefetch on", (), 0.9), ("prefetch off", ("--no-prefetch",), 0.7)):
            name = f"safetensors mmap load, cold, file nodes, {label}"

            def st_cold(mount_args=mount_args, name=name, bound=bound):
                s, bb, infos = b.measure(b.shard_cold(0, "st", mode="st", mount_args=mount_args),
                                         b.base_cold(mode="st"))
                row(name, s, bb, None, ">=", bound)
            if not b.can_drop:
                row(name, None, cold_reason, None, ">=", bound)
            else:
                e = state(f"safetensors mmap load (safe_open np + get_tensor of every key), cold, file nodes, {label}",
                          st_cold)
                if e:
                    row(name, None, f"ERROR: {e}"[:200], None, ">=", bound)

        # 7. memory
        if hwm_cold:
            peak = max(hwm_cold)
            r = ("memory: daemon peak RSS (VmHWM), cold read", human(peak), "-", "-", "<= 512 MiB",
                 "PASS" if peak <= 512 << 20 else "MISS")
            print(f"\n== memory: daemon VmHWM per cold file-node pass: {', '.join(human(x) for x in hwm_cold)}")
        else:
            r = ("memory: daemon peak RSS (VmHWM), cold read", "-", "-", "-", "<= 512 MiB",
                 "no cold file-node read measured")
        rows.append(r)
        print("  => " + fmt_row(*r), flush=True)
        check_source("at the end")
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    except (StateError, RuntimeError) as e:
        print(f"\nsetup failed: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        b.close()
        if rows:
            print(f"\n## shardfs mount read benchmark ({human(b.size)} synthetic bf16 safetensors, "
                  f"median of {args.reps} after a warm-up; GB/s = 1e9 bytes/s; ratio = shardfs / baseline)\n")
            print(fmt_row("state", "shardfs GB/s", "baseline GB/s", "ratio", "target", "result"))
            print("|---|---:|---:|---:|---|---|")
            for r in rows:
                print(fmt_row(*r))
        if b.settled:
            print(f"\ncold reads began after drop_caches and a wait (--settle {args.settle}) of median "
                  f"{statistics.median(b.settled):.1f}s (max {max(b.settled):.1f}s) over {len(b.settled)} drops")
        if b.anomalies:
            print("\nanomalies seen during the run:")
            for a in b.anomalies:
                print(f"- {a}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
