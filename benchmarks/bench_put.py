#!/usr/bin/env python3
"""Ingest throughput of `shardfs put` against a plain `cp` of the same file.

Builds a synthetic bf16 safetensors model (shardfs.synth), starts its own redis-server on
127.0.0.1, and times, after one warm-up pass of each, the median of --reps repetitions of

    cp MODEL DIR/           plain cp, no sync; the copy is removed between repetitions
    cp MODEL DIR/ && sync   for reference: a durable copy, which is what put makes (twice)
    shardfs put MODEL       R=2 over 3 local file:// nodes, --force, on empty node
                            directories and an empty index, so nothing deduplicates

and with --http the same put over 3 `shardfs node serve` processes on 127.0.0.1. The put
time is the CLI's wall clock (interpreter start-up included). Prints throughputs and the
ratio put/cp; the target is >= 0.5. Everything it starts and writes is removed at the end.

    python benchmarks/bench_put.py [--size 2GiB] [--workdir /var/tmp/shardfs-bench] [--http]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

from _common import free_port, stop, wait_port  # noqa: E402
from shardfs.synth import write_safetensors  # noqa: E402
from shardfs.units import human, parse_size  # noqa: E402




class Bench:
    def __init__(self, args):
        self.args = args
        os.makedirs(args.workdir, exist_ok=True)
        self.dir = tempfile.mkdtemp(prefix="run-", dir=args.workdir)
        self.procs: list[subprocess.Popen] = []
        self.redis = None
        self.redis_port = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDFS_")}
        self.env["SHARDFS_HOME"] = os.path.join(self.dir, "home")
        self.env["PYTHONPATH"] = ROOT + os.pathsep + self.env.get("PYTHONPATH", "")
        self.node_procs: list[subprocess.Popen] = []
        self.rep = 0

    # -- services ---------------------------------------------------------------------

    def start_redis(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            sys.exit("bench_put: redis-server is not on PATH")
        self.redis_port = free_port()
        rdir = os.path.join(self.dir, "redis")
        os.makedirs(rdir)
        self.redis = subprocess.Popen(
            [exe, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", rdir, "--save", "",
             "--appendonly", "no", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(self.redis)
        wait_port(self.redis_port, self.redis, "redis-server")
        self.env["SHARDFS_REDIS"] = f"redis://127.0.0.1:{self.redis_port}/0"

    def flush_index(self) -> None:
        import redis
        redis.Redis(host="127.0.0.1", port=self.redis_port).flushall()

    def stop_nodes(self) -> None:
        for p in self.node_procs:
            stop(p)
            self.procs.remove(p)
        self.node_procs = []

    def fresh_nodes(self, http: bool) -> list[str]:
        """An empty index and 3 empty node directories, registered; returns the node roots."""
        self.stop_nodes()
        for d in os.listdir(self.dir):
            if d.startswith("nodes-"):
                shutil.rmtree(os.path.join(self.dir, d))
        self.flush_index()
        self.rep += 1
        roots, urls = [], []
        for i in range(3):
            root = os.path.join(self.dir, f"nodes-{self.rep}", f"n{i}")
            os.makedirs(root)
            open(os.path.join(root, ".shardfs-node"), "w").close()  # (a node directory made ahead: see README)
            roots.append(root)
            if http:
                port = free_port()
                p = subprocess.Popen([sys.executable, "-m", "shardfs", "node", "serve", "--root", root,
                                      "--listen", f"127.0.0.1:{port}"], env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                self.procs.append(p)
                self.node_procs.append(p)
                wait_port(port, p, "shardfs node serve")
                urls.append(f"http://127.0.0.1:{port}")
            else:
                urls.append("file://" + root)
        for url in urls:
            self.cli("node", "add", url)
        return roots

    def cli(self, *args) -> str:
        r = subprocess.run([sys.executable, "-m", "shardfs", *args], env=self.env, capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise RuntimeError(f"shardfs {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
        return r.stdout

    # -- measurements -----------------------------------------------------------------

    def time_cp(self, model: str, sync: bool = False) -> float:
        dest = os.path.join(self.dir, "cp-dest")
        os.makedirs(dest, exist_ok=True)
        os.sync()  # start from clean page cache state: no earlier writeback in the timing
        t0 = time.perf_counter()
        subprocess.run(["cp", model, dest + "/"], check=True)
        if sync:
            os.sync()
        dt = time.perf_counter() - t0
        os.unlink(os.path.join(dest, os.path.basename(model)))
        return dt

    def time_put(self, model: str, http: bool) -> tuple[float, str]:
        roots = self.fresh_nodes(http)
        os.sync()  # the previous repetition's writeback is not this one's
        t0 = time.perf_counter()
        out = self.cli("put", model, "--name", "bench.safetensors", "--replicas", "2", "--force",
                       "--no-progress")
        dt = time.perf_counter() - t0
        stored = sum(os.path.getsize(os.path.join(d, f)) for r in roots for d, _, fs in os.walk(r) for f in fs)
        if "(0 already stored)" not in out:
            raise RuntimeError(f"put deduplicated although the nodes were empty: {out.strip()}")
        return dt, f"{out.strip()} [on disk: {human(stored)} over 3 nodes]"

    def close(self) -> None:
        for p in reversed(self.procs):
            stop(p)
        self.procs = []
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            os.rmdir(self.args.workdir)  # only if nothing else lives there
        except OSError:
            pass



def measure(label, fn, reps):
    fn()  # warm-up, not counted
    times = []
    for _ in range(reps):
        times.append(fn())
    med = statistics.median(times)
    print(f"  {label:<28} " + "  ".join(f"{t:6.2f}s" for t in times) + f"   median {med:.2f}s", flush=True)
    return med


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("2GiB"), help="model size (default 2GiB)")
    ap.add_argument("--workdir", default="/var/tmp/shardfs-bench",
                    help="scratch directory; a run-* directory is made inside and removed at the end")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions after the warm-up (default 3)")
    ap.add_argument("--http", action="store_true", help="also time put over 3 `shardfs node serve` nodes")
    args = ap.parse_args()

    def on_term(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)

    b = Bench(args)
    try:
        model = os.path.join(b.dir, "synthetic.safetensors")
        t0 = time.perf_counter()
        size = write_safetensors(model, args.size, seed=7)
        print(f"model: {human(size)} synthetic bf16 safetensors ({time.perf_counter() - t0:.1f}s to build), "
              f"{os.cpu_count()} CPUs, workdir {b.dir}", flush=True)
        b.start_redis()

        print(f"timings (warm-up pass first, then {args.reps} reps):")
        cp = measure("cp", lambda: b.time_cp(model), args.reps)
        cp_sync = measure("cp && sync", lambda: b.time_cp(model, sync=True), args.reps)
        last = {}

        def put_once(http):
            dt, line = b.time_put(model, http)
            last[http] = line
            return dt
        put = measure("shardfs put, 3 file:// nodes", lambda: put_once(False), args.reps)
        put_http = measure("shardfs put, 3 http nodes", lambda: put_once(True), args.reps) if args.http else None

        mib = size / 2**20
        print("results:")
        print(f"  last put (file://): {last[False]}")
        if args.http:
            print(f"  last put (http):    {last[True]}")
        print(f"  cp                        {mib / cp:8.1f} MiB/s")
        print(f"  cp && sync                {mib / cp_sync:8.1f} MiB/s   (reference: put/(cp && sync) = "
              f"{cp_sync / put:.2f})")
        print(f"  put, file:// nodes, R=2   {mib / put:8.1f} MiB/s   put/cp = {cp / put:.2f}  "
              f"({'meets' if cp / put >= 0.5 else 'BELOW'} the 0.5 target)")
        if args.http:
            print(f"  put, http nodes, R=2      {mib / put_http:8.1f} MiB/s   put/cp = {cp / put_http:.2f}  "
                  f"({'meets' if cp / put_http >= 0.5 else 'BELOW'} the 0.5 target)")
        return 0
    finally:
        b.close()


if __name__ == "__main__":
    sys.exit(main())
