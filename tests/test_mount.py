"""Real mounts: `shardfs mount` in a subprocess, read with ordinary tools and loaders."""

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import CACHE_LOCAL, add_nodes, ctrl_c_default, gone, needs_fuse, sha256_file, wait_for

pytestmark = needs_fuse




@pytest.fixture
def store(cli, nodes, model_small, tmp_path):
    """3 HTTP nodes, R=2, the small model under two names plus a second model."""
    ns = add_nodes(cli, nodes, 3)
    cli("put", model_small, "--name", "org/small.safetensors", "--chunk-size", "1MiB")
    other = tmp_path / "other.bin"
    other.write_bytes(os.urandom(3 << 20) + bytes(12345))
    cli("put", other, "--name", "org/deep/other.bin", "--chunk-size", "1MiB")
    return {"nodes": ns, "small": model_small, "other": other}


def test_tree_sizes_modes_xattrs(store, mounts):
    m = mounts()
    st = os.stat(m.file("org/small.safetensors"))
    assert st.st_size == os.path.getsize(store["small"])
    assert st.st_mode & 0o777 == 0o444
    assert os.stat(m.file("org")).st_mode & 0o777 == 0o555
    assert sorted(os.listdir(m.file("org"))) == ["deep", "small.safetensors"]
    out = subprocess.run(["ls", "-l", m.file("org/deep")], capture_output=True, text=True).stdout
    assert f" {os.path.getsize(store['other'])} " in out
    out = subprocess.run(["ls", "-a", m.file("org")], capture_output=True, text=True, check=True).stdout
    assert out.split() == [".", "..", "deep", "small.safetensors"]  # (readdir gives "." and "..")
    assert os.stat(m.file("org/deep/..")).st_ino == os.stat(m.file("org")).st_ino
    assert os.getxattr(m.file("org/small.safetensors"), "user.shardfs.sha256").decode() == sha256_file(store["small"])
    assert int(os.getxattr(m.file("org/small.safetensors"), "user.shardfs.version")) >= 1
    assert int(os.getxattr(m.file("org/small.safetensors"), "user.shardfs.cached_bytes")) == 0
    stats = json.loads(m.cli("cache", "stats", "--json", "--mount", m.path).stdout)
    assert stats["versions_in_memory"] == 0  # an xattr loads no model (`getfattr -R` over a catalogue)
    sv = os.statvfs(m.path)
    assert sv.f_blocks * sv.f_frsize >= os.path.getsize(store["small"])


def test_cp_and_sha256_match(store, mounts, tmp_path):
    m = mounts()
    dest = tmp_path / "copy"
    subprocess.run(["cp", m.file("org/small.safetensors"), dest], check=True)
    assert sha256_file(dest) == sha256_file(store["small"])
    assert sha256_file(m.file("org/deep/other.bin")) == sha256_file(store["other"])
    # second read through the same mount comes from the kernel page cache: same bytes
    assert sha256_file(m.file("org/small.safetensors")) == sha256_file(store["small"])


def test_numpy_memmap_and_safetensors(store, mounts, cli, tmp_path):
    from safetensors import safe_open

    from shardfs.synth import write_safetensors
    f16 = tmp_path / "f16.safetensors"  # numpy has no bfloat16: load an fp16 model with framework="np"
    write_safetensors(str(f16), 12 << 20, seed=5, dtype="F16")
    cli("put", f16, "--name", "org/f16.safetensors", "--chunk-size", "1MiB")
    m = mounts()
    a = np.memmap(m.file("org/small.safetensors"), dtype=np.uint8, mode="r")
    b = np.memmap(store["small"], dtype=np.uint8, mode="r")
    assert np.array_equal(a[::4097], b[::4097]) and np.array_equal(a[-1000:], b[-1000:])
    assert np.array_equal(a, b)
    with safe_open(m.file("org/f16.safetensors"), "np") as fm, safe_open(str(f16), "np") as fo:
        assert list(fm.keys()) == list(fo.keys())
        for k in fo.keys():
            assert np.array_equal(fm.get_tensor(k), fo.get_tensor(k)), k


def _random_reads(path, ref, n, errors, seed):
    rng = random.Random(seed)
    size = len(ref)
    with open(path, "rb") as f:
        for _ in range(n):
            off = rng.randrange(size)
            length = rng.choice([4096, 65536, 1 << 20, 4 << 20])
            f.seek(off)
            if f.read(length) != ref[off:off + length]:
                errors.append((path, off, length))


def test_concurrent_readers_same_and_different_models(store, mounts):
    m = mounts(CACHE_LOCAL)
    refs = {"org/small.safetensors": store["small"].read_bytes(), "org/deep/other.bin": store["other"].read_bytes()}
    errors = []
    threads = [threading.Thread(target=_random_reads, args=(m.file(name), refs[name], 40, errors, i))
               for i, name in enumerate(list(refs) * 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stats = json.loads(m.cli("cache", "stats", "--json", "--mount", m.path).stdout)
    # single-flight: no chunk was fetched more than once by 8 concurrent readers (counted
    # against the models' chunks: a fill still being written is fetched, not yet an entry)
    chunks = sum(r["chunks"] for r in json.loads(m.cli("ls", "--json").stdout) if r["name"] in refs)
    assert 0 < stats["chunks_fetched"] <= chunks


def test_evict_on_a_read_only_cache_dir_says_what_it_could_not_remove(store, mounts):
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    m = mounts()
    m.cli("cache", "warm", "org/deep/other.bin", "--mount", m.path)
    data = os.path.join(m.cache_dir, "data")
    subprocess.run(["mount", "--bind", data, data], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", data], check=True)
        r = m.cli("cache", "evict", "--all", "--mount", m.path, check=False)
    finally:
        subprocess.run(["umount", data], check=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout == "" and len(r.stderr.splitlines()) == 1, (r.stdout, r.stderr)
    assert "evicted 0 B, but" in r.stderr and "could not be removed" in r.stderr and "Read-only" in r.stderr
    assert open(m.file("org/deep/other.bin"), "rb").read() == store["other"].read_bytes()


def test_a_cache_dir_deleted_under_the_mount_is_made_again_and_locked(store, mounts, cli, tmp_path):
    """rm -rf of the cache directory took the lock file along: a second mount then took the
    same directory, and snapshots of models opened later silently failed to be written."""
    m = mounts()
    assert open(m.file("org/small.safetensors"), "rb").read(100) == store["small"].read_bytes()[:100]
    m.cli("cache", "pin", "org/small.safetensors", "--mount", m.path)
    m.cli("cache", "warm", "org/small.safetensors", "--mount", m.path)
    shutil.rmtree(m.cache_dir)
    data = os.path.join(m.cache_dir, "data")
    wait_for(lambda: os.path.exists(os.path.join(data, "pins.json")), timeout=20,
             what="the mount making its cache directory again, with its pins")
    # Its entries went with it: the stats said 100% cached of files no longer there, and
    # the pins were lost at the next restart.
    st = m.stats()
    files = [os.path.join(d, f) for d, _s, fs in os.walk(os.path.join(data, "chunks")) for f in fs]
    assert st["cache"]["entries"] == len(files) and st["cache"]["used"] == sum(map(os.path.getsize, files))
    assert st["cache"]["pins"] == ["org/small.safetensors"], st["cache"]
    (tmp_path / "second").mkdir()
    r = cli("mount", tmp_path / "second", "--cache-dir", m.cache_dir, check=False)
    if r.returncode == 0:  # (the defect: two daemons on one cache directory)
        cli("umount", tmp_path / "second")
    assert r.returncode != 0 and "used by another shardfs mount" in r.stderr, (r.returncode, r.stderr)
    assert open(m.file("org/deep/other.bin"), "rb").read() == store["other"].read_bytes()
    snaps = os.listdir(os.path.join(m.cache_dir, "snapshots"))
    assert any(n.endswith(".json") and n != "catalogue.json" for n in snaps), snaps  # the new open's snapshot
    assert "was removed or replaced under this mount" in open(m.log).read()


def test_a_cache_dir_that_cannot_be_made_again_leaves_the_index_polls_alone(store, mounts):
    """A plain file where the cache directory was: taking the lock again raised out of the
    poll, which then counted the index as away and renewed no read lease any more."""
    m = mounts()
    with open(m.file("org/small.safetensors"), "rb") as f:
        assert f.read(100) == store["small"].read_bytes()[:100]
        shutil.rmtree(m.cache_dir)
        open(m.cache_dir, "w").close()
        try:
            wait_for(lambda: "cannot be made again" in open(m.log).read(), timeout=20, what="the mount saying so")
            stats = m.stats()
            assert stats["redis_ok"] is True, stats
            assert "index unavailable" not in open(m.log).read()
            assert f.read() == store["small"].read_bytes()[100:]
        finally:
            os.unlink(m.cache_dir)


def test_warm_of_a_model_the_limit_barely_takes_says_raise_the_cache_size(store, mounts):
    """Above 95% of its limit the cache trims to 85%: a model just under the limit does not
    stay whole, and the disk (with room to spare) is not the one to blame."""
    m = mounts("--cache-size", "3200KiB")  # other.bin: 3 MiB + 12345 bytes, in 1 MiB chunks
    r = m.cli("cache", "warm", "org/deep/other.bin", "--mount", m.path, check=False)
    assert r.returncode == 1 and "stayed in the cache" in r.stderr, r.stderr
    assert "raise --cache-size" in r.stderr and "free floor" not in r.stderr, r.stderr


def test_a_model_larger_than_the_whole_cache_is_named_so_when_pinned_and_warmed(store, mounts):
    """Pinning it printed only "pinned:", and a warm's failure then advised to warm fewer or
    pin them."""
    m = mounts("--cache-size", "2MiB")  # other.bin: 3 MiB + 12345 bytes
    r = m.cli("cache", "warm", "org/deep/other.bin", "--mount", m.path, check=False)
    assert r.returncode == 1 and "is more than the cache's whole limit (2.0 MiB): raise --cache-size" in r.stderr
    assert "pin them" not in r.stderr, r.stderr
    r = m.cli("cache", "pin", "org/deep/other.bin", "--mount", m.path)
    assert r.stdout == "pinned: org/deep/other.bin\n"
    assert r.stderr == ("shardfs: warning: the pinned models' chunks take 3.0 MiB, more than the cache's 2.0 MiB "
                        "limit: they cannot all stay cached; raise --cache-size\n"), r.stderr


def test_evict_and_warm_during_reads(store, mounts):
    m = mounts()
    ref = store["small"].read_bytes()
    errors, stop = [], threading.Event()

    def reader():
        i = 0
        while not stop.is_set():
            _random_reads(m.file("org/small.safetensors"), ref, 10, errors, i)
            i += 1

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            m.cli("cache", "evict", "org/small.safetensors", "--mount", m.path)
            m.cli("cache", "warm", "org/small.safetensors", "--mount", m.path)
        m.cli("cache", "evict", "--all", "--mount", m.path)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    m.cli("cache", "warm", "org/", "--mount", m.path)
    stats = json.loads(m.cli("cache", "stats", "--json", "--mount", m.path).stdout)
    assert all(x["cached_pct"] == 100.0 for x in stats["models"]), stats["models"]
    assert sha256_file(m.file("org/small.safetensors")) == sha256_file(store["small"])


def pinned_a_beside_b(cli, nodes, tmp_path, mounts, a_size):
    """Models a (a_size) and b (6 MiB) in 1 MiB chunks, a mount whose 8 MiB cache cannot
    hold both, and a pinned there. Returns (mount, a's file, b's file)."""
    cli("node", "add", nodes(1)[0].url)
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(os.urandom(a_size))
    b.write_bytes(os.urandom(6 << 20))
    cli("put", a, "--name", "a", "--chunk-size", "1MiB")
    cli("put", b, "--name", "b", "--chunk-size", "1MiB")
    m = mounts("--cache-size", "8MiB", CACHE_LOCAL)
    m.cli("cache", "pin", "a", "--mount", m.path)
    return m, a, b


def test_pin_keeps_a_model_through_lru_pressure(cli, nodes, tmp_path, mounts):
    m, a, b = pinned_a_beside_b(cli, nodes, tmp_path, mounts, 6 << 20)
    m.cli("cache", "warm", "a", "--mount", m.path)
    assert sha256_file(m.file("b")) == sha256_file(b)  # b does not fit next to a: LRU must evict b's chunks, not a's
    stats = json.loads(m.cli("cache", "stats", "--json", "--mount", m.path).stdout)
    by = {x["name"]: x for x in stats["models"]}
    assert by["a"]["pinned"] and by["a"]["cached_pct"] == 100.0
    assert stats["cache"]["used"] <= 8 << 20 and stats["cache"]["evictions"] > 0
    m.cli("cache", "unpin", "a", "--mount", m.path)
    r = m.cli("cache", "unpin", "a", "--mount", m.path, check=False)
    assert r.returncode != 0 and "not pinned" in r.stderr


def test_unpin_takes_a_folder_as_pin_does(store, mounts):
    m = mounts()
    m.cli("cache", "pin", "org/", "--mount", m.path)

    def pinned():
        stats = json.loads(m.cli("cache", "stats", "--json", "--mount", m.path).stdout)
        return sorted(x["name"] for x in stats["models"] if x["pinned"])
    assert pinned() == ["org/deep/other.bin", "org/small.safetensors"]
    m.cli("cache", "unpin", "org/deep/", "--mount", m.path)  # was "not pinned: org/deep/"
    assert pinned() == ["org/small.safetensors"]
    m.cli("cache", "unpin", "org/", "--mount", m.path)
    assert pinned() == []
    r = m.cli("cache", "unpin", "org/", "--mount", m.path, check=False)
    assert r.returncode != 0 and "not pinned: org/" in r.stderr


def test_a_pin_follows_its_name_to_a_new_version_and_goes_with_a_removed_one(cli, nodes, tmp_path, mounts):
    m, a, b = pinned_a_beside_b(cli, nodes, tmp_path, mounts, 5 << 20)
    a.write_bytes(os.urandom(5 << 20))
    cli("put", a, "--name", "a", "--chunk-size", "1MiB", "--force")  # a new version of the pinned name
    wait_for(lambda: sha256_file(m.file("a")) == sha256_file(a), timeout=15, what="the new version")

    def pinned_hexes():
        with open(os.path.join(m.cache_dir, "data", "pins.json")) as f:
            return set(json.load(f).get("a", []))
    from shardfs.index import Index
    import redis as redis_lib
    idx = Index(redis_lib.Redis.from_url(cli.env["SHARDFS_REDIS"]), cli.env["SHARDFS_REDIS"])
    new = {c.hex() for c in idx.model("a").manifest.ids}
    wait_for(lambda: pinned_hexes() == new, timeout=15, what="the pin moving to the new version")
    m.cli("cache", "warm", "a", "--mount", m.path)
    assert sha256_file(m.file("b")) == sha256_file(b)  # LRU pressure: b's chunks go, the new a's stay
    by = {x["name"]: x for x in json.loads(m.cli("cache", "stats", "--json", "--mount", m.path).stdout)["models"]}
    assert by["a"]["pinned"] and by["a"]["cached_pct"] == 100.0, by
    cli("rm", "a")
    wait_for(lambda: "a" not in json.loads(m.cli("cache", "stats", "--json", "--mount", m.path).stdout)["cache"]["pins"],
             timeout=15, what="the pin of the removed name gone")


def test_a_removed_pinned_model_whose_pin_cannot_be_saved_yet_is_unpinned_later(cli, nodes, tmp_path, mounts):
    """Removing a pinned model whose pin could not be dropped (the pins file cannot be
    written) raised inside the index poll, and the mount then took the index for away at
    every poll: `cache stats` said redis_ok false for good. Now it warns, goes on, and
    drops the pin once the file can be written."""
    m, a, b = pinned_a_beside_b(cli, nodes, tmp_path, mounts, 2 << 20)
    stuck = os.path.join(m.cache_dir, "data", "pins.json.tmp")
    os.mkdir(stuck)  # the save's temp file cannot be written
    cli("rm", "a")
    wait_for(lambda: "cannot unpin a (removed) yet" in open(m.log).read(), timeout=15, what="the warning")

    def stats():
        return json.loads(m.cli("cache", "stats", "--json", "--mount", m.path).stdout)
    polls = stats()["polls"]
    wait_for(lambda: stats()["polls"] >= polls + 2, timeout=15, what="two more polls")
    assert stats()["redis_ok"] is True and stats()["cache"]["pins"] == ["a"]
    os.rmdir(stuck)
    wait_for(lambda: stats()["cache"]["pins"] == [], timeout=15, what="the pin of the removed name gone")
    assert stats()["redis_ok"] is True
    assert sha256_file(m.file("b")) == sha256_file(b)


def lease_ends(redis_proc) -> tuple[int, list[float]]:
    """Redis's clock (ms) and the ends of the mounts' leases on the versions they have open."""
    from shardfs.index import K_READING
    r = redis_proc.client()
    sec, usec = r.time()
    return sec * 1000 + usec // 1000, [end for _, end in r.zrange(K_READING, 0, -1, withscores=True)]


def test_publish_replace_remove_while_mounted(store, mounts, cli, tmp_path, redis_proc):
    # (the mount renews its lease on the versions it has open at each poll, every 2 s: with
    # an 8 s lease a renewal may run 6 s late on a loaded machine before it lapses)
    cli.env["SHARDFS_READ_LEASE_TTL"] = "8"
    m = mounts()
    new = tmp_path / "new.bin"
    new.write_bytes(b"version one\n" * 50000)
    cli("put", new, "--name", "fresh/model.bin")
    wait_for(lambda: os.path.exists(m.file("fresh/model.bin")), timeout=10, what="new model in the mount")
    old = open(m.file("fresh/model.bin"), "rb")
    first = old.read(100)
    new.write_bytes(b"version two\n" * 70000)
    cli("put", new, "--name", "fresh/model.bin", "--force")
    wait_for(lambda: os.path.getsize(m.file("fresh/model.bin")) == 12 * 70000, timeout=10,
             what="replaced model")
    with open(m.file("fresh/model.bin"), "rb") as f:
        assert f.read() == b"version two\n" * 70000
    # gc keeps the replaced version while the mount has it open (past the grace, and past
    # the end of the lease it first took: only its renewals keep it) ...
    now, ends = lease_ends(redis_proc)
    assert ends, "the mount holds no lease on the versions it has open"
    wait_for(lambda: lease_ends(redis_proc)[0] > max(ends), timeout=30, what="the leases taken so far ending")
    r = cli("gc", "--grace", "0")
    assert "dropped 0 replaced" in r.stdout, r.stdout
    # ... and that reader reads the old bytes to the end
    assert first + old.read() == b"version one\n" * 50000
    old.close()
    # closed: the lease is released or lapses, and then gc takes the old version
    runs = []

    def gc_dropped_it():
        runs.append(cli("gc", "--grace", "0").stdout)
        return "dropped 1 replaced" in runs[-1]
    wait_for(gc_dropped_it, timeout=30, what="gc dropping the closed version")
    assert "deleted 1 unreferenced" in runs[-1], runs
    with open(m.file("fresh/model.bin"), "rb") as f:
        assert f.read() == b"version two\n" * 70000
    # the daemon forgets a version that is neither current nor open (memory and snapshot);
    # stats reports on every model without opening (and so keeping) any of them
    snaps = os.path.join(m.cache_dir, "snapshots")
    stats = json.loads(cli("cache", "stats", "--json", "--mount", m.path).stdout)
    v2 = next(x["version"] for x in stats["models"] if x["name"] == "fresh/model.bin")
    assert all(x["cached"] is not None for x in stats["models"]), stats["models"]
    wait_for(lambda: set(os.listdir(snaps)) == {"catalogue.json", f"{v2}.json"}, timeout=10,
             what="snapshot of the forgotten version deleted")
    assert os.stat(os.path.join(snaps, "catalogue.json")).st_mode & 0o077 == 0  # it holds node tokens
    assert json.loads(cli("cache", "stats", "--json", "--mount", m.path).stdout)["versions_in_memory"] == 1
    cli("rm", "fresh/model.bin")
    wait_for(lambda: not os.path.exists(m.file("fresh/model.bin")), timeout=10, what="removed model")


def test_a_damaged_version_record_hides_that_model_only(store, mounts, cli, redis_proc):
    """One malformed version record failed every catalogue poll: no later model appeared,
    and `cache stats` called a healthy Redis unreachable."""
    m = mounts()
    r = redis_proc.client()
    vid = int(r.hget("shardfs:models", "org/deep/other.bin"))
    r.hset(f"shardfs:v:{vid}", "size", "not a number")
    cli("put", store["other"], "--name", "after.bin", "--chunk-size", "1MiB")
    wait_for(lambda: os.path.exists(m.file("after.bin")), timeout=15, what="a model put after the damage")
    assert not os.path.exists(m.file("org/deep/other.bin"))
    assert sha256_file(m.file("org/small.safetensors")) == sha256_file(store["small"])
    assert json.loads(m.cli("cache", "stats", "--json", "--mount", m.path).stdout)["redis_ok"] is True
    with open(m.log) as f:
        assert f"malformed version record {vid}" in f.read()


def test_snapshots_of_versions_replaced_while_unmounted_are_deleted(store, mounts, cli):
    m = mounts()
    assert sha256_file(m.file("org/deep/other.bin")) == sha256_file(store["other"])  # loaded: a snapshot
    snaps = os.path.join(m.cache_dir, "snapshots")
    old = {n for n in os.listdir(snaps) if n != "catalogue.json"}
    assert len(old) == 1
    m.umount()
    cli("put", store["small"], "--name", "org/deep/other.bin", "--force", "--chunk-size", "1MiB")
    m.mount()
    wait_for(lambda: not old & set(os.listdir(snaps)), timeout=10, what="the replaced version's snapshot deleted")
    assert sha256_file(m.file("org/deep/other.bin")) == sha256_file(store["small"])


def test_an_index_reset_under_the_mount_never_serves_another_versions_bytes(cli, nodes, mounts, redis_proc, tmp_path):
    ns = add_nodes(cli, nodes, 1)
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"A" * (3 << 20))
    b.write_bytes(b"B" * (3 << 20))  # same size: only the bytes tell them apart
    cli("put", a, "--name", "first.bin")
    m = mounts()
    assert open(m.file("first.bin"), "rb").read() == a.read_bytes()
    ino = os.stat(m.file("first.bin")).st_ino
    # the index is lost (FLUSHALL, a backup restored, the last second of the AOF): ids start over
    redis_proc.client().flushall()
    # (the emptied index is a reset already: a mount that polled just then showed no models
    # and only caught the reset at the reused id, in CI)
    wait_for(lambda: json.loads(m.cli("cache", "stats", "--json", "--mount", m.path).stdout)["index_conflict"],
             timeout=30, what="the mount noticing the reset")
    assert os.listdir(m.path) == ["first.bin"]
    cli("node", "add", ns[0].url)
    cli("put", b, "--name", "second.bin")  # version 1 again, of another model
    m.wait_polls(2)  # (the mount would have shown it by now)
    # the mount keeps what it had, with its bytes, and shows nothing under the reused id
    assert os.listdir(m.path) == ["first.bin"] and os.stat(m.file("first.bin")).st_ino == ino
    assert open(m.file("first.bin"), "rb").read() == a.read_bytes()
    assert "INDEX RESET" in m.cli("cache", "stats", "--mount", m.path).stdout
    m.umount()
    m2 = mounts()  # a new mount sees the index as it is
    assert os.listdir(m2.path) == ["second.bin"]
    assert open(m2.file("second.bin"), "rb").read() == b.read_bytes()


def test_a_model_opened_long_after_its_last_read_is_leased_before_the_open_returns(
        store, mounts, cli, redis_proc, tmp_path):
    """A version loaded earlier and closed since was opened without a lease: the mount's
    poll renews the leases of open versions only every 2 s, so a put --force and a gc
    --grace 0 in between dropped the version, and its chunks, under the new reader (EIO)."""
    import io

    import redis as redis_py

    from shardfs.index import Index
    from shardfs.ingest import put_file
    from shardfs.maintenance import gc
    cli.env["SHARDFS_READ_LEASE_TTL"] = "4"  # (lapses 4 s after close; re-leased at open past 2 s)
    m = mounts()
    name, ref = "org/deep/other.bin", store["other"].read_bytes()
    with open(m.file(name), "rb") as f:
        assert f.read(4096) == ref[:4096]  # loaded (and leased), then closed
    _, ends = lease_ends(redis_proc)
    wait_for(lambda: lease_ends(redis_proc)[0] > max(ends), timeout=30, what="the lease lapsing")
    m.cli("cache", "evict", name, "--mount", m.path)  # (its chunks must come from the nodes)
    idx = Index(redis_py.Redis.from_url(redis_proc.url), redis_proc.url)
    new = tmp_path / "new.bin"
    new.write_bytes(os.urandom(1 << 20))
    with open(m.file(name), "rb") as f:  # then, at once (before the mount's next poll):
        put_file(idx, str(new), name, force=True, chunk_size=1 << 20, progress=False)
        dropped = []
        gc(idx, out=io.StringIO(), first=lambda: dropped.extend(idx.prune_versions(0)))
        assert dropped == [], "gc dropped a version a mount had just opened"
        assert f.read() == ref  # the old bytes, to the end


def test_rm_and_gc_under_an_open_reader_let_it_read_to_the_end(store, mounts, cli):
    cli.env["SHARDFS_READ_LEASE_TTL"] = "8"  # (renewed every 2 s while open; lapses 8 s after close)
    m = mounts()
    ref = store["other"].read_bytes()
    f = open(m.file("org/deep/other.bin"), "rb")
    first = f.read(1 << 20)
    r = cli("rm", "org/deep/other.bin")
    assert "1 kept while a mount reads it" in r.stdout, r.stdout
    wait_for(lambda: not os.path.exists(m.file("org/deep/other.bin")), timeout=10, what="the name gone")
    r = cli("gc", "--grace", "0")
    assert "dropped 0 " in r.stdout, r.stdout  # the open version stays, and its chunks
    m.cli("cache", "evict", "--all", "--mount", m.path)  # the rest must come from the nodes again
    assert first + f.read() == ref
    f.close()
    runs = []

    def gc_dropped_it():  # closed: the lease goes, and gc then takes the version and its chunks
        runs.append(cli("gc", "--grace", "0").stdout)
        return "dropped version" in runs[-1]
    wait_for(gc_dropped_it, timeout=30, what="gc dropping the removed version")
    assert "of org/deep/other.bin" in runs[-1] and "deleted 4 unreferenced" in runs[-1], runs


def test_writes_fail_with_erofs(store, mounts):
    m = mounts()
    for action in (lambda: open(m.file("org/small.safetensors"), "r+b"),
                   lambda: open(m.file("org/new"), "wb"),
                   lambda: os.mkdir(m.file("org/d")),
                   lambda: os.unlink(m.file("org/small.safetensors")),
                   lambda: os.rename(m.file("org/small.safetensors"), m.file("org/x")),
                   lambda: os.chmod(m.file("org/small.safetensors"), 0o644)):
        with pytest.raises(OSError) as e:
            action()
        assert e.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    fd = os.open(m.file("org/small.safetensors"), os.O_RDONLY | os.O_APPEND)  # (writes nothing: was EROFS)
    try:
        assert os.read(fd, 100) == store["small"].read_bytes()[:100]
        with pytest.raises(OSError) as e:
            os.write(fd, b"x")
        assert e.value.errno == errno.EBADF
    finally:
        os.close(fd)


def test_replica_killed_during_cold_read(cli, nodes, model_256, mounts, tmp_path):
    ns = add_nodes(cli, nodes, 3)
    cli("put", model_256, "--name", "big.safetensors")
    m = mounts("--no-prefetch")  # (prefetch could fetch every chunk before the kill)
    h = hashlib.sha256()
    with open(m.file("big.safetensors"), "rb") as f:
        h.update(f.read(32 << 20))
        ns[0].kill()
        while data := f.read(1 << 20):
            h.update(data)
    assert h.hexdigest() == sha256_file(model_256)
    stats = json.loads(m.cli("cache", "stats", "--json", "--mount", m.path).stdout)
    assert stats["failovers"] > 0, stats  # the dead replica was asked, and its chunks came from another


def one_node_and_a_model(cli, nodes, tmp_path, size: int):
    """One HTTP node server, and m.bin (`size` random bytes, 1 MiB chunks) put on it."""
    n = nodes(1)[0]
    cli("node", "add", n.url)
    src = tmp_path / "m.bin"
    src.write_bytes(os.urandom(size))
    cli("put", src, "--name", "m.bin", "--chunk-size", "1MiB")
    return n, src


def test_chunk_bad_on_every_replica_gives_eio_for_that_range_only(cli, nodes, tmp_path, mounts):
    n, src = one_node_and_a_model(cli, nodes, tmp_path, 4 << 20)
    victim = sorted(n.chunk_files())[0]
    blob = bytearray(open(victim, "rb").read())
    blob[-1] ^= 0xFF
    open(victim, "wb").write(bytes(blob))
    m = mounts()
    ref = src.read_bytes()
    good, bad = 0, 0
    with open(m.file("m.bin"), "rb", buffering=0) as f:
        for off in range(0, 4 << 20, 1 << 20):
            f.seek(off)
            try:
                assert f.read(1 << 20) == ref[off:off + (1 << 20)]  # never wrong bytes
                good += 1
            except OSError as e:
                assert e.errno == errno.EIO
                bad, bad_at = bad + 1, off
    assert (good, bad) == (3, 1)
    blob[-1] ^= 0xFF  # repaired: the range reads, and the log says so
    open(victim, "wb").write(bytes(blob))
    with open(m.file("m.bin"), "rb", buffering=0) as f:
        f.seek(bad_at)
        assert f.read(1 << 20) == ref[bad_at:bad_at + (1 << 20)]
    assert "is readable again" in open(m.log).read()
    m.cli("cache", "evict", "--all", "--mount", m.path)  # (out of the kernel and the daemon's memory)
    blob[-1] ^= 0xFF  # damaged again: EIO again, and logged again, not muted by the first time
    open(victim, "wb").write(bytes(blob))
    with open(m.file("m.bin"), "rb", buffering=0) as f:
        assert _eio_at(f, bad_at)
    assert open(m.log).read().count("unreadable") == 2


def _eio_at(f, off) -> bool:
    f.seek(off)
    try:
        f.read(1 << 20)
        return False
    except OSError as e:
        assert e.errno == errno.EIO
        return True


def test_umount_busy_says_why_and_stale_mount_recovers(store, mounts, cli):
    m = mounts()
    f = open(m.file("org/small.safetensors"), "rb")
    r = m.umount(check=False)
    assert r.returncode != 0 and "busy" in r.stderr and str(os.getpid()) in r.stderr
    assert "Traceback" not in r.stderr
    f.close()
    import mmap  # a memory map alone (safetensors, torch.load(mmap=True)) keeps the mount busy too
    with open(m.file("org/small.safetensors"), "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    r = m.umount(check=False)
    assert r.returncode != 0 and f"{os.getpid()} (" in r.stderr
    mm.close()
    os.kill(m.pid, signal.SIGKILL)
    wait_for(lambda: gone(m.pid),
             what="daemon to die")
    with pytest.raises(OSError) as e:
        os.listdir(m.path)
    assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)  # (the latter a moment after the death)
    r = m.umount()
    assert "stale" in r.stdout
    m.mount()  # a new mount on the recovered mountpoint, same cache: no partial entries served
    assert sha256_file(m.file("org/small.safetensors")) == sha256_file(store["small"])
    m.umount()
    assert not os.path.ismount(m.path)


def test_a_mount_whose_daemon_does_not_answer_is_named_and_force_unmounted(store, mounts, cli):
    """A stopped (or stuck) daemon made `shardfs umount`, and a new `mount` there, hang for
    ever in a stat of the mount's root. They now say so, and `umount --force` cuts the daemon
    off: a read waiting on it fails instead of hanging, the mountpoint is free again."""
    from shardfs.mounttab import mounts as mount_table
    m = mounts()
    path = m.file("org/small.safetensors")
    os.kill(m.pid, signal.SIGSTOP)
    try:
        time.sleep(1.5)  # past the root's attribute timeout: a stat now has to ask the daemon
        reader = subprocess.Popen([sys.executable, "-c", "import sys; open(sys.argv[1], 'rb').read()", path],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        r = cli("umount", m.path, check=False, timeout=60)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert f"pid {m.pid}) does not answer" in r.stderr and "umount --force" in r.stderr, r.stderr
        r = cli("mount", m.path, "--cache-dir", m.cache_dir, check=False, timeout=60)
        assert r.returncode == 1 and "does not answer" in r.stderr and "umount --force" in r.stderr, r.stderr
        for op in ("stats", "warm"):  # (a warm waits for a word from it, not for the warm to end)
            r = cli("cache", op, *(["org/small.safetensors"] if op == "warm" else []), "--mount", m.path,
                    check=False, timeout=60, env={"SHARDFS_CONTROL_WAIT": "2"})
            assert r.returncode == 1 and r.stderr.count("\n") == 1 and "not answered for 2 s" in r.stderr, r.stderr
        assert reader.poll() is None  # (still waiting on the stopped daemon)
        r = cli("umount", "--force", m.path, timeout=60)
        assert "forced" in r.stdout
        _, err = reader.communicate(timeout=30)
        assert reader.returncode != 0 and "ConnectionAbortedError" in err.splitlines()[-1], err
        wait_for(lambda: gone(m.pid), what="the daemon to stop")
        assert str(m.path) not in mount_table()
    finally:
        if not gone(m.pid):
            os.kill(m.pid, signal.SIGCONT)
    m.mount()  # the mountpoint is free, and the cache the killed daemon left serves exact bytes
    assert sha256_file(path) == sha256_file(store["small"])


def test_a_daemon_killed_a_moment_ago_is_recovered_at_once(store, mounts, cli, tmp_path):
    """Right after the kill the kernel still answers stat from cached attributes; the control
    socket that nobody listens on any more says the mount is stale. (Through a symlink too.)"""
    m = mounts()
    os.stat(m.path)  # (attributes cached)
    (tmp_path / "link").symlink_to(m.path)
    os.kill(m.pid, signal.SIGKILL)
    wait_for(lambda: gone(m.pid),
             what="daemon to die")
    r = cli("umount", tmp_path / "link")
    assert "recovered stale mountpoint" in r.stdout, r.stdout
    from shardfs.control import socket_path
    assert not os.path.exists(socket_path(m.path))  # the dead daemon's control socket went with it
    m.mount()
    assert sha256_file(m.file("org/small.safetensors")) == sha256_file(store["small"])


def test_mount_refuses_clearly(cli, redis_proc, tmp_path, base_env):
    from conftest import Cli
    r = cli("mount", tmp_path / "nope", check=False)
    assert r.returncode != 0 and "does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "mp").mkdir()
    bad = Cli({**base_env, "SHARDFS_REDIS": "redis://127.0.0.1:1/0"})
    r = bad("mount", tmp_path / "mp", check=False)
    assert r.returncode != 0 and "127.0.0.1:1" in r.stderr and "Traceback" not in r.stderr


def test_a_control_socket_that_cannot_be_made_fails_the_mount_in_one_line(store, cli, tmp_path):
    """The error came out of trio's nursery inside an exception group, which the mount did
    not unwrap: the parent said only that the daemon stopped, systemd got a traceback."""
    from shardfs.control import socket_path
    mp = tmp_path / "mp"
    mp.mkdir()
    sp = socket_path(str(mp))
    os.makedirs(sp)  # a non-empty directory where the socket goes: it cannot be replaced
    open(os.path.join(sp, "x"), "w").close()
    try:
        r = cli("mount", mp, "--cache-dir", tmp_path / "c", check=False)
        fg = cli("mount", mp, "--cache-dir", tmp_path / "c", "--foreground", check=False, timeout=60)
    finally:
        shutil.rmtree(sp)
    for res in (r, fg):
        assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
        assert f"cannot mount {mp}: cannot make the control socket {sp}" in res.stderr, res.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.ismount(mp)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_mount_interrupted_while_its_daemon_starts_leaves_no_mount(cli, tmp_path, sig):
    """Ctrl-C while `mount` waited for its daemon said "interrupted", and the daemon (in a
    session of its own) mounted anyway, behind the user's back. SIGTERM (`timeout 10 shardfs
    mount ...`) killed the command silently, with the same result."""
    from shardfs.mounttab import mounts as mount_table
    mp = tmp_path / "mp"
    mp.mkdir()
    # the daemon (only it: "--foreground") starts 3 s late, so the interrupt surely comes first
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(
        "import time\n"
        "if b'--foreground' in open('/proc/self/cmdline', 'rb').read().split(b'\\0'):\n"
        "    time.sleep(3)\n")
    env = {**cli.env, "PYTHONPATH": f"{slow}{os.pathsep}{cli.env['PYTHONPATH']}"}
    proc = subprocess.Popen([sys.executable, "-m", "shardfs", "mount", str(mp), "--cache-dir", str(tmp_path / "c")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ctrl_c_default)

    def daemons():
        return subprocess.run(["pgrep", "-f", f"mount {mp} --foreground"], capture_output=True,
                              text=True).stdout.split()
    wait_for(daemons, timeout=30, what="the mount daemon to start")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    said = "interrupted" if sig == signal.SIGINT else "terminated"
    assert proc.returncode == 128 + sig and f"shardfs: {said}; the mount daemon was stopped, nothing is mounted" \
        in err, (proc.returncode, out, err)
    time.sleep(5)  # (long enough for a daemon left running to have mounted)
    assert str(mp) not in mount_table() and not daemons()  # (ismount says False on a stale mount)


def test_a_control_socket_directory_others_can_write_is_refused(cli, tmp_path):
    """The socket directory sits in the temp dir: one another user made first (or left open)
    let them swap the socket for theirs, or leave a dead one that makes a live mount look
    killed. Here its mode is opened up; a link or another owner is refused the same way."""
    from shardfs.control import private_dir
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    d = tmp / f"shardfs-{os.geteuid()}"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o777)
    env = {"TMPDIR": str(tmp)}
    mp = tmp_path / "mp"
    mp.mkdir()
    r = cli("mount", mp, "--cache-dir", tmp_path / "c", check=False, env=env)
    assert r.returncode != 0 and "not private to this user" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not os.path.ismount(mp)
    assert not private_dir(str(d))
    os.chmod(d, 0o700)
    assert private_dir(str(d))
    (tmp_path / "link").symlink_to(d)
    assert not private_dir(str(tmp_path / "link"))
    assert not private_dir(str(d), uid=os.geteuid() + 1)


def test_an_unreachable_notify_socket_does_not_stop_the_mount(store, cli, tmp_path):
    """sd_notify's OSError escaped into the daemon's nursery after the mount was reported
    ready, and tore it down (NOTIFY_SOCKET inherited in a container, say)."""
    from conftest import Cli
    cli = Cli({**cli.env, "NOTIFY_SOCKET": str(tmp_path / "no-such.sock")})
    mp = tmp_path / "mp"
    mp.mkdir()
    cli("mount", mp, "--cache-dir", tmp_path / "c")
    try:
        time.sleep(1)  # (the READY=1 notification follows the mount's readiness)
        assert os.path.ismount(mp)
        assert sha256_file(mp / "org" / "small.safetensors") == sha256_file(store["small"])
    finally:
        cli("umount", mp)


def test_mounting_over_a_non_empty_directory_warns(store, cli, tmp_path):
    mp = tmp_path / "full"
    mp.mkdir()
    (mp / "mine.txt").write_text("hidden while mounted")
    r = cli("mount", mp, "--cache-dir", tmp_path / "c")
    try:
        assert "warning: mountpoint" in r.stderr and "is not empty" in r.stderr, r.stderr
        assert "mine.txt" not in os.listdir(mp)
    finally:
        cli("umount", mp)
    assert (mp / "mine.txt").read_text() == "hidden while mounted"


def test_a_mount_under_nohup_keeps_running_through_sighup(store, cli, tmp_path):
    """SIGHUP unmounts (a terminal closed), but not where it was ignored from the start, as
    `nohup shardfs mount` asks: catching it overrode that."""
    mp = tmp_path / "mp"
    mp.mkdir()
    r = subprocess.run([sys.executable, "-m", "shardfs", "mount", str(mp), "--cache-dir", str(tmp_path / "c")],
                       env=cli.env, capture_output=True, text=True, timeout=120,
                       preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert r.returncode == 0, r.stderr
    pid = int(r.stdout.split("daemon pid ")[1].split(")")[0].split(",")[0])
    log = r.stdout.split(", log ")[1].rsplit(")", 1)[0]
    try:
        os.kill(pid, signal.SIGHUP)
        os.kill(pid, signal.SIGTERM)  # (signals arrive in order: a SIGHUP it took would come first)
        wait_for(lambda: not os.path.ismount(mp), timeout=30, what="unmount on SIGTERM")
        text = open(log).read()
        assert "signal 15: unmounting" in text and "signal 1:" not in text, text[-2000:]
    finally:
        if os.path.ismount(mp):
            cli("umount", mp, check=False)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_sigterm_unmounts_cleanly(store, mounts, sig):
    """(SIGHUP: the terminal of a --foreground mount closed; it killed the daemon and left the
    mount stale.)"""
    m = mounts()
    assert os.path.ismount(m.path)
    os.kill(m.pid, sig)
    wait_for(lambda: not os.path.ismount(m.path), timeout=10, what=f"unmount on signal {sig}")
    assert os.listdir(m.path) == []


def test_redis_stopped_while_mounted(store, mounts, redis_proc):
    m = mounts()
    ref = store["small"].read_bytes()
    f = open(m.file("org/small.safetensors"), "rb")
    assert f.read(1000) == ref[:1000]
    redis_proc.stop()
    wait_for(lambda: json.loads(m.cli("cache", "stats", "--json", "--mount", m.path).stdout)["redis_ok"] is False,
             timeout=30, what="the mount noticing Redis is gone")
    assert f.read() == ref[1000:]  # an open file keeps reading
    f.close()
    assert "small.safetensors" in os.listdir(m.file("org"))  # known models stay listed and openable
    assert sha256_file(m.file("org/small.safetensors")) == sha256_file(store["small"])
    redis_proc.start()
    m.cli("put", store["other"], "--name", "after/redis.bin")
    wait_for(lambda: os.path.exists(m.file("after/redis.bin")), timeout=15, what="catch-up after Redis returns")


def test_sigterm_unmounts_at_once_while_a_read_waits_on_a_hung_node(cli, nodes, tmp_path, mounts):
    """A node that takes connections and answers nothing holds a read for up to
    READ_DEADLINE (120 s). A SIGTERM then (systemd stopping the unit) made the daemon wait
    for that fetch before it unmounted, with the mount answering nobody meanwhile. Now the
    fetch is left behind: the daemon unmounts and exits, and the waiting read fails."""
    from shardfs.mounttab import mounts as mount_table
    n, src = one_node_and_a_model(cli, nodes, tmp_path, 6 << 20)
    m = mounts("--no-prefetch")
    path = m.file("m.bin")
    os.stat(path)
    n.proc.send_signal(signal.SIGSTOP)
    try:
        reader = subprocess.Popen([sys.executable, "-c", "import sys; open(sys.argv[1], 'rb').read()", path],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert reader.poll() is None  # (waiting on the hung node)
        os.kill(m.pid, signal.SIGTERM)
        wait_for(lambda: gone(m.pid), timeout=5, what="the daemon to exit")  # (not the node's 10 s timeout)
        _, err = reader.communicate(timeout=30)
        assert reader.returncode != 0 and "Error" in err.splitlines()[-1], err
        assert str(m.path) not in mount_table()
        assert "unmounted" in open(m.log).read()
    finally:
        n.proc.send_signal(signal.SIGCONT)


def test_redis_hung_while_mounted(store, mounts, redis_proc, cli):
    """A Redis that takes connections and answers nothing (SIGSTOP: a hung host) costs
    timeouts, never a stuck mount: an open file reads on, a model loaded before opens again
    (the renewal of its read lease gives up after the socket timeout), known models stay
    listed, and everything catches up once Redis answers again. The open that renews the
    read lease waits on Redis for LEASE_WAIT only, not for the client's timeout."""
    cli.env["SHARDFS_READ_LEASE_TTL"] = "4"  # a model loaded 2 s ago is leased again when opened
    m = mounts()
    ref = store["small"].read_bytes()
    path = m.file("org/small.safetensors")
    f = open(path, "rb")
    assert f.read(1000) == ref[:1000]
    redis_proc.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(2.5)  # past half the lease: the next open asks the hung Redis
        with open(path, "rb") as g:
            assert g.read() == ref
        assert "did not answer in 1 s to renew the read lease of org/small.safetensors" in open(m.log).read()
        assert f.read() == ref[1000:]  # the file open all along
        f.close()
        assert "small.safetensors" in os.listdir(m.file("org"))
        wait_for(lambda: json.loads(m.cli("cache", "stats", "--json", "--mount", m.path).stdout)["redis_ok"] is False,
                 timeout=60, what="the mount noticing Redis does not answer")
        assert sha256_file(path) == sha256_file(store["small"])
    finally:
        redis_proc.proc.send_signal(signal.SIGCONT)
    m.cli("put", store["other"], "--name", "after/hang.bin")
    wait_for(lambda: os.path.exists(m.file("after/hang.bin")), timeout=30, what="catch-up after Redis answers")
    assert sha256_file(m.file("after/hang.bin")) == sha256_file(store["other"])


def test_a_mount_restarted_while_redis_is_down_starts_from_its_saved_model_list(store, mounts, redis_proc):
    m = mounts()
    assert sha256_file(m.file("org/small.safetensors")) == sha256_file(store["small"])  # opened: snapshot kept
    m.umount()
    redis_proc.stop()
    r = m.cli("mount", m.path, "--cache-dir", m.cache_dir)  # (a systemd restart during the outage)
    assert "warning" in r.stderr and "cache dir saw last" in r.stderr, r.stderr
    m.pid = int(r.stdout.split("daemon pid ")[1].split(",")[0])
    assert sorted(os.listdir(m.file("org"))) == ["deep", "small.safetensors"]
    assert sha256_file(m.file("org/small.safetensors")) == sha256_file(store["small"])
    with pytest.raises(OSError) as e:  # never opened here: nothing saved of it
        open(m.file("org/deep/other.bin"), "rb").read()
    assert e.value.errno == errno.EIO
    redis_proc.start()
    wait_for(lambda: json.loads(m.cli("cache", "stats", "--json", "--mount", m.path).stdout)["redis_ok"],
             timeout=30, what="the mount reaching Redis again")
    assert sha256_file(m.file("org/deep/other.bin")) == sha256_file(store["other"])


def test_a_mount_restarted_while_redis_hangs_opens_models_from_their_snapshots(store, mounts, redis_proc):
    """A Redis that takes connections and answers nothing at start-up: the mount starts from
    its saved model list and loads models opened before from their snapshots at once, not
    after a Redis timeout per model; it reaches Redis again once Redis answers."""
    m = mounts()
    assert sha256_file(m.file("org/small.safetensors")) == sha256_file(store["small"])  # opened: snapshot kept
    m.umount()
    redis_proc.proc.send_signal(signal.SIGSTOP)
    try:
        r = m.cli("mount", m.path, "--cache-dir", m.cache_dir)
        assert "warning" in r.stderr and "cache dir saw last" in r.stderr, r.stderr
        m.pid = int(r.stdout.split("daemon pid ")[1].split(",")[0])
        m.log = r.stdout.split(", log ")[1].rsplit(")", 1)[0]
        assert json.loads(m.cli("cache", "stats", "--json", "--mount", m.path).stdout)["redis_ok"] is False
        assert sha256_file(m.file("org/small.safetensors")) == sha256_file(store["small"])
        log = open(m.log).read()
        assert "loaded org/small.safetensors from its local snapshot (index: Redis did not answer" in log, log
    finally:
        redis_proc.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: json.loads(m.cli("cache", "stats", "--json", "--mount", m.path).stdout)["redis_ok"],
             timeout=30, what="the mount reaching Redis again")
    assert sha256_file(m.file("org/deep/other.bin")) == sha256_file(store["other"])


def test_model_folder_put_mount_and_rm(cli, nodes, tmp_path, mounts):
    """A Hugging Face-style folder becomes a folder in the mount and loads from it."""
    from safetensors import safe_open

    from shardfs.synth import write_safetensors
    n = nodes(1)[0]
    cli("node", "add", n.url)
    src = tmp_path / "tiny-model"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "synthetic", "hidden_size": 4096}))
    (src / "tokenizer.json").write_text(json.dumps({"vocab": {"a": 0, "b": 1}}))
    weight_map = {}
    for i in (1, 2):
        shard = f"model-0000{i}-of-00002.safetensors"
        write_safetensors(str(src / shard), 4 << 20, seed=10 + i, dtype="F16")
        with safe_open(str(src / shard), "np") as f:
            weight_map.update({f"s{i}.{k}": shard for k in f.keys()})
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (src / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (src / ".cache" / "huggingface").mkdir(parents=True)
    (src / ".cache" / "huggingface" / "config.json.metadata").write_text("x")
    r = cli("put", src, "--name", "org/tiny-model")
    assert r.stdout.count("put org/tiny-model/") == 5
    assert "leaving out 2 hidden entries (names starting with '.'): .cache/, .gitattributes" in r.stderr
    assert cli("put", src, "--name", "org/tiny-model", check=False).returncode != 0  # clash without --force
    m = mounts()
    root = m.file("org/tiny-model")
    assert sorted(os.listdir(root)) == sorted(x for x in os.listdir(src) if not x.startswith("."))
    index = json.load(open(os.path.join(root, "model.safetensors.index.json")))
    for shard in set(index["weight_map"].values()):
        with safe_open(os.path.join(root, shard), "np") as fm, safe_open(str(src / shard), "np") as fo:
            for k in fo.keys():
                assert np.array_equal(fm.get_tensor(k), fo.get_tensor(k))
    assert json.load(open(os.path.join(root, "config.json")))["hidden_size"] == 4096
    cli("rm", "org/tiny-model/")
    wait_for(lambda: not os.path.exists(root), timeout=10, what="folder removed from the mount")
    assert "no models" in cli("ls").stdout


def test_chunks_of_nodes_on_the_cache_disk_are_read_without_a_second_copy(store, mounts):
    """The test's HTTP nodes keep their chunks on the cache's filesystem (their /health says
    which): by default a read serves those chunks without writing them to the cache; pin and
    warm still cache them."""
    m = mounts("--no-prefetch")

    def stats():
        return json.loads(m.cli("cache", "stats", "--json", "--mount", m.path).stdout)

    assert sha256_file(m.file("org/small.safetensors")) == sha256_file(store["small"])
    st = stats()
    assert st["cache"]["entries"] == 0 and st["local_uncached"] == st["chunks_fetched"] > 0, st
    assert int(os.getxattr(m.file("org/small.safetensors"), "user.shardfs.cached_bytes")) == 0
    assert "not cached" in m.cli("cache", "stats", "--mount", m.path).stdout
    m.cli("cache", "pin", "org/deep/other.bin", "--mount", m.path)
    assert sha256_file(m.file("org/deep/other.bin")) == sha256_file(store["other"])
    m.cli("cache", "warm", "org/small.safetensors", "--mount", m.path)
    by = {x["name"]: x for x in stats()["models"]}
    assert by["org/deep/other.bin"]["cached_pct"] == 100.0 and by["org/small.safetensors"]["cached_pct"] == 100.0


@pytest.mark.parametrize("prefetch", [True, False])
def test_header_driven_prefetch(store, mounts, prefetch):
    # (the reader's own readahead kept small: grown over a few sequential kernel reads, its
    # default 64 MiB window took in this whole 24 MiB file and pushed it without any prefetch)
    m = mounts(CACHE_LOCAL, "--read-ahead", "1MiB", *([] if prefetch else ["--no-prefetch"]))
    path = m.file("org/small.safetensors")

    def cached():
        return int(os.getxattr(path, "user.shardfs.cached_bytes"))

    def stats():
        return json.loads(m.cli("cache", "stats", "--json", "--mount", m.path).stdout)

    def served():
        return stats()["bytes_served"]

    def prefetching():
        return any(x["prefetching"] for x in stats()["models"])

    size = os.path.getsize(store["small"])
    with open(path, "rb") as f:
        f.read(8)  # a loader reads the header, then maps the file
        if prefetch:
            wait_for(lambda: cached() == size and not prefetching(), timeout=30,
                     what="the tensors to be prefetched and pushed")
            pushed = stats()["bytes_pushed"]
            assert size // 2 < pushed <= size, (pushed, size)  # whole pages, each pushed once
        else:
            time.sleep(1.5)
            assert cached() < size // 2
        before = served()
        assert sha256_file(path) == sha256_file(store["small"])
        fuse_reads = served() - before
    if prefetch:
        # prefetched chunks were pushed into the page cache: the kernel answered the reads.
        # Usually it reads nothing through FUSE, but not always 0: kernels with proactive
        # reclaim (these VMs run DAMON `pageout` on unmapped page cache) may drop pushed pages
        # nobody has touched yet, and reading those single pages found them gone. The assembly
        # of the pages two chunks share is tested without a kernel in test_reader.py.
        assert fuse_reads < size // 8, (fuse_reads, size)
    else:
        assert fuse_reads > size // 8, (fuse_reads, size)  # only pushes of what readers asked for


def test_hung_node_is_raced_by_a_hedged_request(cli, nodes, tmp_path, mounts):
    ns = add_nodes(cli, nodes, 3)
    src = tmp_path / "m.bin"
    src.write_bytes(os.urandom(12 << 20))
    cli("put", src, "--name", "m.bin", "--chunk-size", "1MiB")
    m = mounts()
    ns[0].proc.send_signal(signal.SIGSTOP)  # accepts connections, never answers
    try:
        assert sha256_file(m.file("m.bin")) == sha256_file(src)
    finally:
        ns[0].proc.send_signal(signal.SIGCONT)
    stats = json.loads(m.cli("cache", "stats", "--json", "--mount", m.path).stdout)
    assert stats["hedges"] > 0


def test_unwritable_cache_still_serves_reads_with_one_warning(store, mounts, tmp_path):
    m = mounts(CACHE_LOCAL)
    chunks = os.path.join(m.cache_dir, "data", "chunks")
    shutil.rmtree(chunks)
    open(chunks, "w").close()  # a file where the cache's directory should be: every fill fails
    assert sha256_file(m.file("org/small.safetensors")) == sha256_file(store["small"])
    stats = json.loads(m.cli("cache", "stats", "--json", "--mount", m.path).stdout)
    assert stats["cache"]["writable"] is False
    log = open(next(os.path.join(d, f) for d, _, fs in os.walk(m.cli.env["SHARDFS_HOME"]) for f in fs
                    if f.startswith("mount-"))).read()
    assert log.count("cannot be written") == 1
    # warm promises the chunks are in the cache: here it cannot keep that, and says so
    r = m.cli("cache", "warm", "org/deep/other.bin", "--mount", m.path, check=False)
    assert r.returncode != 0 and "could not be written to the cache" in r.stderr and "not writable" in r.stderr, r
    assert "Traceback" not in r.stderr


def test_metrics_are_scraped_from_the_mount_and_a_node(cli, tmp_path, mounts):
    import urllib.request

    from conftest import NodeProc, free_port, start_listening
    mount_port = free_port()
    node = NodeProc(str(tmp_path / "mnode"))
    import sys

    metrics_port = {}

    def launch(port):  # (waited for on its own port, which it opens after the metrics one: a
        # taken port, either of them, ends the process, and start_listening tries other ports;
        # the metrics port was port - 1, and a port taken there left the test waiting in vain)
        metrics_port[port] = free_port()
        return subprocess.Popen([sys.executable, "-m", "shardfs", "node", "serve", "--root", node.root,
                                 "--listen", f"127.0.0.1:{port}", "--metrics", f"127.0.0.1:{metrics_port[port]}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    node.port, node.proc = start_listening(launch, "node server with metrics")
    node.url, node_port = f"http://127.0.0.1:{node.port}", metrics_port[node.port]
    try:
        cli("node", "add", node.url)
        src = tmp_path / "m.bin"
        src.write_bytes(os.urandom(3 << 20))
        cli("put", src, "--name", "m.bin", "--chunk-size", "1MiB")
        m = mounts(CACHE_LOCAL, "--metrics", f"127.0.0.1:{mount_port}")
        assert sha256_file(m.file("m.bin")) == sha256_file(src)

        def scrape(port):
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

        def value(text, name):
            return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

        # cache fills are written behind the readers: the last one may still be on its way
        wait_for(lambda: value(scrape(mount_port), "shardfs_cache_bytes") == 3 << 20, timeout=10,
                 what="the third chunk's cache fill")
        mt = scrape(mount_port)
        # chunks pushed into the page cache (notify_store) are served by the kernel, not counted here
        assert value(mt, "shardfs_bytes_served_total") > 0
        assert value(mt, "shardfs_cache_misses_total") >= 3
        assert value(mt, 'shardfs_fetch_seconds_count{node="n1"}') == 3
        for name in ("shardfs_failovers_total", "shardfs_corrupt_copies_total", "shardfs_cache_evictions_total"):
            assert name in mt
        nt = scrape(node_port)
        assert value(nt, 'shardfs_node_requests_total{method="PUT",status="201"}') == 3
        # every chunk was sent once (a file response's length was not counted: 0 chunk bytes)
        assert value(nt, "shardfs_node_bytes_sent_total") >= sum(os.path.getsize(f) for f in node.chunk_files())
        assert value(nt, "shardfs_node_chunks") == 3
    finally:
        node.stop()


def test_empty_checkpoint_file_opens_and_mount_survives(cli, nodes, tmp_path, mounts):
    add_nodes(cli, nodes, 1)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    cli("put", tmp_path / "empty.safetensors")
    m = mounts()
    assert open(m.file("empty.safetensors"), "rb").read() == b""

    def prefetched():  # (the open registered its prefetch: it runs now or has run)
        stats = json.loads(m.cli("cache", "stats", "--json", "--mount", m.path).stdout)
        return not stats["models"][0]["prefetching"]
    wait_for(prefetched, timeout=30, what="the empty file's prefetch to end")  # it must not end the mount
    assert os.path.ismount(m.path) and os.listdir(m.path) == ["empty.safetensors"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_mount_and_control_socket_are_private_to_the_owner(store, mounts):
    from shardfs.control import socket_path
    m = mounts()
    as_nobody = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]
    r = subprocess.run(as_nobody + ["cat", m.file("org/small.safetensors")], capture_output=True)
    assert r.returncode != 0 and b"Permission denied" in r.stderr  # no --allow-other: owner only
    probe = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
             "s.sendall(b'{\"op\": \"stats\"}\\n'); print(s.recv(100))")
    py = "/usr/bin/python3"  # the test's own python may live under root's private home
    if os.access(py, os.X_OK):
        r = subprocess.run(as_nobody + [py, "-c", probe, socket_path(m.path, uid=0)], capture_output=True, text=True)
        assert r.returncode != 0 and "PermissionError" in r.stderr, r.stderr  # refused at connect
    assert open(m.file("org/small.safetensors"), "rb").read(8)  # the owner still reads
    import socket
    for bad, words in ((b"[1]\n", "one JSON object"), (b"{\"op\": 1\n", "")):  # answered, never left hanging
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(socket_path(m.path))
            s.sendall(bad)
            answer = json.loads(s.makefile("rb").readline())
            assert answer["ok"] is False and words in answer["error"], answer


def test_a_warmed_model_whose_chunks_repeat_is_all_cached_in_stats(cli, nodes, tmp_path, mounts):
    """cache stats counts each distinct chunk once; it divided that by the file's size, so
    a warmed model with runs of zeros showed as half cached (here: 50.0)."""
    add_nodes(cli, nodes, 1)
    z = tmp_path / "z.bin"
    z.write_bytes(os.urandom(1 << 20) + bytes(3 << 20))  # chunks: one random, three the same
    cli("put", z, "--name", "z.bin", "--chunk-size", "1MiB")
    m = mounts(CACHE_LOCAL)
    row = next(x for x in m.stats()["models"] if x["name"] == "z.bin")
    assert row["cached_pct"] in (0.0, None), row
    m.cli("cache", "warm", "z.bin", "--mount", m.path)
    row = next(x for x in m.stats()["models"] if x["name"] == "z.bin")
    assert row["cached_pct"] == 100.0 and row["cached"] == 2 << 20, row
    assert os.getxattr(m.file("z.bin"), "user.shardfs.cached_bytes") == str(2 << 20).encode()
    assert open(m.file("z.bin"), "rb").read() == z.read_bytes()


def test_ctrl_c_on_cache_warm_stops_the_warm(cli, nodes, tmp_path, mounts):
    """The client said "interrupted" and the daemon went on warming the whole model."""
    n, src = one_node_and_a_model(cli, nodes, tmp_path, 40 << 20)
    m = mounts("--no-prefetch")
    n.proc.send_signal(signal.SIGSTOP)  # (the warm waits on its first fetches)
    try:
        warm = subprocess.Popen([sys.executable, "-m", "shardfs", "cache", "warm", "m.bin", "--mount", m.path],
                                env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=ctrl_c_default)
        wait_for(lambda: m.stats()["versions_in_memory"] == 1, timeout=30, what="the warm to start")
        warm.send_signal(signal.SIGINT)
        _, err = warm.communicate(timeout=30)
        assert warm.returncode == 130 and err.endswith(
            "interrupted; the mount stops warming (what it fetched stays cached)\n"), (warm.returncode, err)
        wait_for(lambda: "cache warm of m.bin stopped: its client left" in open(m.log).read(), timeout=30,
                 what="the daemon to stop the warm")  # (at its next keep-alive line)
    finally:
        n.proc.send_signal(signal.SIGCONT)
    m.wait_polls(2)
    row = next(x for x in m.stats()["models"] if x["name"] == "m.bin")
    assert row["cached"] < 20 << 20, row  # the fetches under way then, not the rest
    assert open(m.file("m.bin"), "rb").read() == src.read_bytes()


def test_evicting_a_model_keeps_the_chunks_a_pinned_model_shares(cli, nodes, tmp_path, mounts):
    """`cache evict b` dropped the chunks b shares with pinned a: a's pin undone by a sibling's evict."""
    add_nodes(cli, nodes, 1)
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(os.urandom(4 << 20))
    b.write_bytes(a.read_bytes() + os.urandom(1 << 20))  # its first four chunks are a's
    for f in (a, b):
        cli("put", f, "--name", f.name, "--chunk-size", "1MiB")
    m = mounts(CACHE_LOCAL)
    m.cli("cache", "pin", "a.bin", "--mount", m.path)
    m.cli("cache", "warm", "a.bin", "b.bin", "--mount", m.path)
    r = m.cli("cache", "evict", "b.bin", "--mount", m.path)
    assert r.stdout.strip() == "evicted 1.0 MiB; kept 4.0 MiB of chunks that pinned models share " \
                               "(`cache unpin` them first to evict those too)", r.stdout
    by = {x["name"]: x for x in m.stats()["models"]}
    assert by["a.bin"]["cached_pct"] == 100.0 and by["b.bin"]["cached"] == 4 << 20, by
    assert m.cli("cache", "evict", "a.bin", "--mount", m.path).stdout.strip() == "evicted 4.0 MiB"  # its own pin: asked for
    assert open(m.file("b.bin"), "rb").read() == b.read_bytes()


def test_a_cache_dir_the_daemon_cannot_use_is_named_in_one_line(cli, tmp_path):
    """An OSError while the daemon set up its cache directory reached the command only as
    "mount daemon exited; see LOG": the reason was in the log alone."""
    mp = tmp_path / "mp"
    mp.mkdir()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "snapshots").write_text("a file where the daemon keeps a folder")
    r = cli("mount", mp, "--cache-dir", cache, check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == f"shardfs: error: cannot use cache directory {cache}: File exists " \
                               f"({cache / 'snapshots'})", r.stderr
    assert not os.path.ismount(mp)
