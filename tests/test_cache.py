"""The local chunk cache as a unit: fills, verification on load, O_DIRECT fills, LRU bounds."""

import os
import shutil
import subprocess

import numpy as np
import pytest

from shardfs import envelope
from shardfs.cache import ChunkCache
from shardfs.synth import tensor_bytes


def decoded_chunk(rows: int, extra: int = 0) -> tuple[str, memoryview]:
    """A chunk as the read path holds it: decoded from a zstd-g2 envelope (a page-aligned view)."""
    raw = tensor_bytes(np.random.default_rng(rows), (rows, 1024), "BF16") + b"\x07" * extra
    cid, blob, codec = envelope.encode(raw, "zstd-g2")
    assert codec == envelope.CODEC_ZSTD_GROUP2
    data = envelope.decode(blob, cid)
    assert bytes(data) == raw
    return cid.hex(), data


def takes_o_direct(d) -> bool:
    try:
        os.close(os.open(os.path.join(d, "probe"), os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
        return True
    except OSError:
        return False


def resident_bytes(path: str) -> int | None:
    if not shutil.which("fincore"):
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                         capture_output=True, text=True)
    return int(out.stdout.split()[0]) if out.returncode == 0 and out.stdout.strip() else None


@pytest.mark.parametrize("extra", [0, 1, 4095, 4097])
def test_direct_fill_roundtrips_any_length(tmp_path, extra):
    cache = ChunkCache(str(tmp_path / "c"), 1 << 30, free_floor=0)
    h, data = decoded_chunk(512, extra)
    assert cache.put(h, data)
    assert cache.direct == takes_o_direct(tmp_path)  # else the fill fell back to the plain way
    assert os.path.getsize(cache.path(h)) == len(data)
    res = resident_bytes(cache.path(h))
    if res is not None and cache.direct:  # the aligned head bypassed the page cache: at most the tail is there
        assert res <= 4096, res
    assert bytes(cache.get(h)) == bytes(data)
    # the cache survives a restart and still verifies what it holds
    again = ChunkCache(str(tmp_path / "c"), 1 << 30, free_floor=0)
    assert bytes(again.get(h)) == bytes(data)


def test_unaligned_buffers_and_plain_bytes_fill_the_plain_way(tmp_path):
    cache = ChunkCache(str(tmp_path / "c"), 1 << 30, free_floor=0)
    raw = os.urandom(3 * 4096 + 17)
    cid = envelope.chunk_id(raw).hex()
    odd = memoryview(b"x" + raw)[1:]  # almost surely not page-aligned
    assert cache.put(cid, odd)
    assert cache.get(cid) == raw
    small = b"tiny chunk"
    assert cache.put(envelope.chunk_id(small).hex(), small)
    assert cache.get(envelope.chunk_id(small).hex()) == small


def test_damaged_entry_is_dropped_not_served(tmp_path):
    cache = ChunkCache(str(tmp_path / "c"), 1 << 30, free_floor=0)
    h, data = decoded_chunk(256)
    cache.put(h, data)
    with open(cache.path(h), "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    assert cache.get(h) is None
    assert cache.corrupt == 1 and not os.path.exists(cache.path(h))


def test_lru_keeps_usage_under_the_limit(tmp_path):
    chunks = [decoded_chunk(64 + i) for i in range(8)]
    size = len(chunks[0][1])
    cache = ChunkCache(str(tmp_path / "c"), 4 * size, free_floor=0)
    for h, data in chunks:
        assert cache.put(h, data)
        assert cache.used <= 4 * size * 1.01
    assert cache.get(chunks[0][0]) is None  # the oldest went first
    assert bytes(cache.get(chunks[-1][0])) == bytes(chunks[-1][1])


def test_counters_are_exact_under_parallel_gets(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    cache = ChunkCache(str(tmp_path / "c"), 1 << 30, free_floor=0)
    raw = b"chunk" * 100
    h = envelope.chunk_id(raw).hex()
    assert cache.put(h, raw)
    absent = "0" * 64

    def work(_):
        for _ in range(200):
            assert cache.get(h) == raw
            assert cache.get(absent) is None
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(work, range(8)))
    assert (cache.hits, cache.misses) == (1600, 1600)


def test_parallel_fills_stay_within_the_limit_and_do_not_call_it_full(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    chunks = [(envelope.chunk_id(raw).hex(), raw) for raw in (os.urandom(64 << 10) for _ in range(32))]
    cache = ChunkCache(str(tmp_path / "c"), 4 * (64 << 10), free_floor=0)
    peak, evict = [], cache._maybe_evict

    def watched_evict():  # called after each fill lands: usage before the LRU trims it
        peak.append(cache.used)
        evict()
    cache._maybe_evict = watched_evict
    with ThreadPoolExecutor(8) as ex:
        stored = list(ex.map(lambda c: cache.put(*c), chunks))
    assert max(peak) <= cache.limit, "parallel fills were admitted past the limit"
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache.root) for f in fs
                  if len(f) == 64)
    assert cache.used == on_disk <= cache.limit  # fills being written count before they land
    assert sum(stored) >= 4 and cache.full == ""  # a fill skipped while others land is not "full"
    for h, raw in chunks:
        got = cache.get(h)
        assert got is None or bytes(got) == raw


def test_a_fill_outpaced_by_other_fills_keeps_evicting_and_does_not_call_it_full(tmp_path):
    # The interleaving behind a flake under load: each entry this fill evicts, another
    # thread's fill takes at once. What eviction could free must be counted anew each step;
    # counted once, it ran out after three steps and the cache called itself full ("limit")
    # with nothing pinned.
    k = 64 << 10
    cache = ChunkCache(str(tmp_path / "c"), 4 * k, free_floor=0)
    for raw in (os.urandom(k) for _ in range(3)):
        assert cache.put(envelope.chunk_id(raw).hex(), raw)
    others = [os.urandom(k) for _ in range(6)]
    evict_one, trim, landed = cache._evict_one, cache._maybe_evict, []

    def evict_then_another_fill_lands(hex_id):
        stuck = evict_one(hex_id)
        if others:
            raw = others.pop()
            cache._maybe_evict = lambda: None  # (its own trim has yet to run)
            assert cache._write(envelope.chunk_id(raw).hex(), raw)  # takes the room just freed
            cache._maybe_evict = trim
            landed.append(raw)
        return stuck
    cache._evict_one = evict_then_another_fill_lands
    mine = os.urandom(2 * k)  # needs one entry evicted: each time, another fill takes its room
    assert cache.put(envelope.chunk_id(mine).hex(), mine)
    assert len(landed) == 6 and cache.full == ""
    assert cache.used <= cache.limit and envelope.chunk_id(mine).hex() in cache


def test_a_fill_that_cannot_fit_evicts_nothing_and_says_why(tmp_path, caplog):
    k = 64 << 10
    raws = [os.urandom(k) for _ in range(4)]
    ids = [envelope.chunk_id(r).hex() for r in raws]
    cache = ChunkCache(str(tmp_path / "c"), 4 * k, free_floor=0)
    for h, r in zip(ids[:3], raws):
        assert cache.put(h, r)
    cache.pin("model", ids[:2])
    big = os.urandom(3 * k)  # would fit only if a pinned entry went
    assert not cache.put(envelope.chunk_id(big).hex(), big)
    assert ids[2] in cache, "a fill that could not fit anyway evicted an entry"
    assert cache.full == "limit" and cache.stats()["full"] is True
    assert not cache.put(envelope.chunk_id(big).hex(), big)
    assert sum("is full (" in r.getMessage() for r in caplog.records) == 1  # said once
    assert "128.0 KiB of its 256.0 KiB limit is pinned" in caplog.text
    assert cache.put(ids[3], raws[3])  # a chunk that fits goes in; the LRU then drops the unpinned one
    assert cache.full == "" and "has room again" in caplog.text and ids[2] not in cache
    huge = os.urandom(5 * k)
    assert not cache.put(envelope.chunk_id(huge).hex(), huge)
    assert cache.full == "chunk" and all(h in cache for h in ids[:2] + ids[3:])  # (not "pinned")


def test_pins_that_cannot_be_saved_change_nothing(tmp_path):
    from shardfs.errors import ShardfsError
    c = ChunkCache(str(tmp_path / "c"), 64 << 20)
    c.pin("a", ["aa" * 32])
    (tmp_path / "c" / "pins.json.tmp").mkdir()  # the save's temp file cannot be written
    with pytest.raises(ShardfsError, match="cannot save the pins"):
        c.pin("b", ["bb" * 32])
    with pytest.raises(ShardfsError, match="cannot save the pins"):
        c.unpin("a")
    assert c.pins() == ["a"] and c.pinned("aa" * 32) and not c.pinned("bb" * 32)
    assert ChunkCache(str(tmp_path / "c"), 64 << 20).pins() == ["a"]  # and on disk


def test_pins_reach_the_disk_before_they_replace_the_last(tmp_path, monkeypatch):
    """The pins file is the one file of the cache that no hash checks: a crash that left it
    empty lost every pin. Its bytes are synced before the rename, the directory after."""
    c = ChunkCache(str(tmp_path / "c"), 64 << 20)
    calls = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(a, b):
        calls.append(("rename", str(a)))
        real_rename(a, b)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    c.pin("a", ["aa" * 32])
    tmp = str(tmp_path / "c" / "pins.json.tmp")
    assert calls == [("fsync", tmp), ("rename", tmp), ("fsync", str(tmp_path / "c"))], calls
    assert ChunkCache(str(tmp_path / "c"), 64 << 20).pins() == ["a"]


def test_a_read_error_that_says_nothing_about_the_entry_keeps_it(tmp_path):
    """A read error dropped the entry from the byte count but left its file: the cache
    could outgrow its limit by such files until a restart. Out of file descriptors, the
    entry is a miss this time and stays; an entry whose file went is forgotten."""
    import resource
    cache = ChunkCache(str(tmp_path / "c"), 64 << 20, free_floor=0)
    h, data = decoded_chunk(512)
    assert cache.put(h, data)
    used = cache.used
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (0, hard))  # every open fails: EMFILE
    try:
        assert cache.get(h) is None  # EMFILE
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert cache.used == used and h in cache and os.path.exists(cache.path(h))
    assert bytes(cache.get(h)) == bytes(data)
    os.unlink(cache.path(h))
    assert cache.get(h) is None and h not in cache and cache.used == used - len(data)


def test_evict_on_a_read_only_cache_dir_counts_nothing_it_did_not_free(tmp_path):
    """`cache evict` on a read-only cache directory said "evicted 80 MiB" and exit 0: the
    entries were forgotten, their files all still there."""
    import subprocess
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    k = 64 << 10
    cache = ChunkCache(str(tmp_path / "c"), 16 * k, free_floor=0)
    raws = [os.urandom(k) for _ in range(3)]
    ids = [envelope.chunk_id(r).hex() for r in raws]
    for h, r in zip(ids, raws):
        assert cache.put(h, r)
    subprocess.run(["mount", "--bind", cache.root, cache.root], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", cache.root], check=True)
        unremoved = []
        assert cache.evict(ids[:2], unremoved) == 0
        assert [n for n, _ in unremoved] == [k, k] and "Read-only" in unremoved[0][1]
        assert cache.evictions == 0 and ids[0] not in cache  # (not served any more, all the same)
    finally:
        subprocess.run(["umount", cache.root], check=True)
    assert all(os.path.exists(cache.path(h)) for h in ids)
    assert cache.evict([ids[2]]) == k and not os.path.exists(cache.path(ids[2]))


def test_eviction_does_not_walk_a_pinned_model_at_every_step(tmp_path):
    """A large pinned model warmed long ago stands at the old end of the LRU order; each
    eviction walked past all of it (one fill took 51.7 s with 20k pinned entries in front).
    Counted in membership tests of the pinned set, not in seconds."""
    k = 1024
    n = 2000
    cache = ChunkCache(str(tmp_path / "c"), 1 << 40, free_floor=0, direct=False)
    raws = [os.urandom(k) for _ in range(2 * n)]
    ids = [envelope.chunk_id(r).hex() for r in raws]
    for h, r in zip(ids, raws):
        assert cache.put(h, r)
    cache.pin("big", ids[:n])  # the oldest half

    class Counting(set):
        looks = 0

        def __contains__(self, h):
            Counting.looks += 1
            return super().__contains__(h)
    cache._pinned = Counting(cache._pinned)
    cache.limit = cache.used + k  # the next fill fits, and passes the high watermark
    extra = os.urandom(k)
    assert cache.put(envelope.chunk_id(extra).hex(), extra)
    evicted = cache.evictions
    assert evicted >= 0.1 * 2 * n  # down to the low watermark: a tenth of the entries
    assert all(h in cache for h in ids[:n]) and all(os.path.exists(cache.path(h)) for h in ids[:n])
    assert sum(h in cache for h in ids[n:]) == n - evicted
    assert cache.stats()["used"] == sum(os.path.getsize(cache.path(h)) for h in ids if h in cache) + k
    assert Counting.looks < 4 * (n + evicted), Counting.looks  # (was about n x evicted: 800k)


def test_an_evict_during_a_fill_leaves_no_entry_without_its_file(tmp_path, monkeypatch):
    """`cache evict` between a fill's rename and its indexing unlinked the new file, and the
    fill then indexed it: an entry counted (and pinned) with no file."""
    import threading
    from shardfs import cache as cache_mod
    cache = ChunkCache(str(tmp_path / "c"), 1 << 30, free_floor=0, direct=False)
    raw = os.urandom(5000)
    h = envelope.chunk_id(raw).hex()
    renamed, evicted = threading.Event(), threading.Event()
    real_rename = os.rename

    def rename(src, dst):
        real_rename(src, dst)
        if dst == cache.path(h):
            renamed.set()
            evicted.wait(1)  # the evict runs here if it can (it cannot while the fill holds the lock)

    def evict():
        renamed.wait()
        cache.evict([h])
        evicted.set()
    t = threading.Thread(target=evict)
    t.start()
    monkeypatch.setattr(cache_mod.os, "rename", rename)
    assert cache.put(h, raw)
    t.join()
    assert (h in cache) == os.path.exists(cache.path(h))
    assert cache.used == (len(raw) if h in cache else 0)


def test_a_cache_whose_entries_cannot_be_removed_keeps_them(tmp_path, monkeypatch):
    """A read-only, nearly full cache disk: each eviction's unlink failed, the entry was
    forgotten all the same, and one fill that found no room forgot every intact entry."""
    import errno
    from shardfs import cache as cache_mod
    k = 4096
    cache = ChunkCache(str(tmp_path / "c"), 1 << 30, free_floor=1 << 20, direct=False)
    monkeypatch.setattr(cache, "_free_disk", lambda: 2 << 20)
    raws = [os.urandom(k) for _ in range(9)]
    ids = [envelope.chunk_id(r).hex() for r in raws]
    for h, r in zip(ids, raws):
        assert cache.put(h, r)
    monkeypatch.setattr(cache, "_free_disk", lambda: (1 << 20) + 1000)  # near the floor ...

    def erofs(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(cache_mod.os, "unlink", erofs)  # ... and read-only
    monkeypatch.setattr(cache_mod.tempfile, "mkstemp", erofs)
    extra = os.urandom(k)
    assert not cache.put(envelope.chunk_id(extra).hex(), extra)
    assert cache.write_failed and cache.evictions == 0
    assert all(bytes(cache.get(h)) == r for h, r in zip(ids, raws))
    assert cache.used == 9 * k


def test_a_pins_file_that_is_not_a_table_is_kept_aside_not_a_crash(tmp_path, caplog):
    root = tmp_path / "c"
    root.mkdir()
    (root / "pins.json").write_text('["a", "b"]')
    cache = ChunkCache(str(root), 1 << 30, free_floor=0)
    assert cache.pins() == []
    assert (root / "pins.json.unreadable").read_text() == '["a", "b"]'
    assert "ignoring unreadable pins file" in caplog.text and "pin the models again" in caplog.text
    cache.pin("m", ["ab" * 32])
    assert cache.pins() == ["m"] and (root / "pins.json.unreadable").exists()


def test_a_cache_started_with_a_smaller_limit_evicts_down_to_it(tmp_path):
    k = 64 << 10
    raws = [os.urandom(k) for _ in range(10)]
    cache = ChunkCache(str(tmp_path / "c"), 1 << 30, free_floor=0)
    for r in raws:
        assert cache.put(envelope.chunk_id(r).hex(), r)
    again = ChunkCache(str(tmp_path / "c"), 5 * k, free_floor=0)
    assert again.used <= 5 * k and again.stats()["entries"] == again.used // k
    assert sum(len(f) for _d, _s, f in os.walk(os.path.join(again.root, "chunks"))) == again.used // k


def test_a_cache_directory_removed_and_made_again_is_indexed_anew_and_keeps_its_pins(tmp_path):
    k = 64 << 10
    raws = [os.urandom(k) for _ in range(4)]
    ids = [envelope.chunk_id(r).hex() for r in raws]
    cache = ChunkCache(str(tmp_path / "c"), 1 << 30, free_floor=0)
    for h, r in zip(ids, raws):
        assert cache.put(h, r)
    cache.pin("m", ids[:2])
    shutil.rmtree(cache.root)
    cache.lost()
    assert cache.used == 0 and cache.stats()["entries"] == 0 and cache.cached_bytes(ids) == 0
    assert cache.pins() == ["m"] and os.path.exists(os.path.join(cache.root, "pins.json"))
    assert cache.put(ids[0], raws[0]) and cache.used == k
    assert ChunkCache(cache.root, 1 << 30, free_floor=0).pins() == ["m"]
