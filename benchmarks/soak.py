"""The long soak: 16 concurrent readers (sequential, random 4 KiB..4 MiB, mmap) of three
models through a mount whose cache is smaller than the working set, every byte checked.
Every --evict-every seconds `cache evict --all` drops the cache and the kernel's pages of
the models under the readers, so their reads keep reaching the daemon (else, after the
first pass, the kernel's page cache answers them all).

    python benchmarks/soak.py --seconds 600

Everything runs on loopback: its own redis-server, 3 `shardfs node serve` nodes, one mount.
Bounded by --seconds and --max-reads; cleans up after itself. Exit 1 if any read failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shardfs import soak  # noqa: E402
from shardfs.synth import write_safetensors  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--max-reads", type=int, default=5_000_000)
    ap.add_argument("--readers", type=int, default=16)
    ap.add_argument("--model-mib", type=int, default=256)
    ap.add_argument("--evict-every", type=float, default=5, help="seconds between evictions (0: never)")
    ap.add_argument("--workdir", default="/var/tmp")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="shardfs-soak-", dir=a.workdir)
    procs, mnt = [], os.path.join(work, "mnt")
    port = free_port()
    env = {**os.environ, "SHARDFS_HOME": os.path.join(work, "home"), "SHARDFS_REDIS": f"redis://127.0.0.1:{port}/0"}

    def sh(*args):
        return subprocess.run([sys.executable, "-m", "shardfs", *map(str, args)], env=env, check=True,
                              capture_output=True, text=True).stdout

    try:
        procs.append(subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                       "--dir", work], stdout=subprocess.DEVNULL))
        wait_port(port)
        for i in range(3):
            p = free_port()
            procs.append(subprocess.Popen([sys.executable, "-m", "shardfs", "node", "serve", "--root",
                                           os.path.join(work, f"node{i}"), "--listen", f"127.0.0.1:{p}"],
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_port(p)
            sh("node", "add", f"http://127.0.0.1:{p}")
        srcs = {}
        for i in range(3):
            path = os.path.join(work, f"m{i}.safetensors")
            write_safetensors(path, a.model_mib << 20, seed=100 + i)
            sh("put", path, "--name", f"soak/m{i}.safetensors")
            srcs[f"soak/m{i}.safetensors"] = path
        os.makedirs(mnt)
        # working set is 3x the cache; the nodes share the cache's disk: cache their chunks anyway
        out = sh("mount", mnt, "--cache-size", f"{a.model_mib}MiB", "--cache-local-nodes")
        pid = int(out.split("daemon pid ")[1].split(",")[0])
        print(f"soak: {a.readers} readers, {a.seconds:.0f}s, 3 x {a.model_mib} MiB models, cache {a.model_mib} MiB",
              flush=True)
        stop, evictions = threading.Event(), []

        def evict():
            while a.evict_every > 0 and not stop.wait(a.evict_every):
                evictions.append(subprocess.run([sys.executable, "-m", "shardfs", "cache", "evict", "--all",
                                                 "--mount", mnt], env=env, capture_output=True).returncode)
        evictor = threading.Thread(target=evict, daemon=True)
        evictor.start()
        try:
            rep = soak.run({os.path.join(mnt, k): v for k, v in srcs.items()}, a.seconds, a.readers,
                           max_reads=a.max_reads, daemon_pid=pid)
        finally:
            stop.set()
            evictor.join()
        print(rep.summary())
        print(f"cache evict --all ran {len(evictions)} times during the reads, "
              f"{sum(1 for rc in evictions if rc)} failed")
        print(sh("cache", "stats", "--mount", mnt))
        for e in rep.errors[:20]:
            print("ERROR", e)
        return 1 if rep.errors else 0
    finally:
        subprocess.run([sys.executable, "-m", "shardfs", "umount", mnt], env=env, capture_output=True)
        for p in procs:
            p.terminate()
            p.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
