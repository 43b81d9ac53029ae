"""The read path without a kernel: a real file:// node and a real disk cache under trio.

`notify` stands where pyfuse3.notify_store is in the mount: it records what would be pushed
into the kernel's page cache, so the tests can check which bytes go there and which chunks
the reader loads for them (the mount tests check the same end to end, through the kernel)."""

import os
import threading
from functools import partial

import numpy as np
import pytest
import trio
import trio.testing

from shardfs import envelope
from shardfs.cache import ChunkCache
from shardfs.errors import CorruptChunk
from shardfs.index import Node
from shardfs.manifest import Manifest
from shardfs.pool import NodePool
from shardfs.reader import PAGE, ByteBudget, OpenModel, Reader
from shardfs.stores import init_root, open_store


def setup(tmp_path, lengths, data=None):
    """A 'model' of random bytes (or `data`) cut at the given chunk lengths, stored on one file node."""
    if data is None:
        data = np.random.default_rng(5).integers(0, 256, sum(lengths), dtype=np.uint8).tobytes()
    url = f"file://{tmp_path}/node"
    init_root(f"{tmp_path}/node", adopt=True)  # (as `node add` makes it: a store never makes its root)
    store = open_store(url)
    entries, pos = [], 0
    for n in lengths:
        cid, blob, _ = envelope.encode(data[pos:pos + n])
        store.put(cid.hex(), blob)
        entries.append((cid, n))
        pos += n
    man = Manifest.build(entries)
    m = OpenModel(1, 7, "m.bin", len(data), "", man, {c.hex(): ["n1"] for c, _ in entries})
    pool = NodePool({"n1": Node("n1", url)})
    cache = ChunkCache(str(tmp_path / "cache"), 1 << 30, free_floor=0)
    return data, m, pool, cache


async def with_reader(pool, cache, fn, push=True, **kw):
    pushes = []

    def notify(inode, off, buf):
        pushes.append((off, bytes(buf)))
        return True

    reader = Reader(pool, cache, notify=notify if push else None, **kw)
    async with trio.open_nursery() as n:
        reader.attach(n)
        await fn(reader, pushes)
        n.cancel_scope.cancel()


def test_reads_that_hand_over_a_whole_chunk_spare_it_from_prefetch(tmp_path):
    lengths = [3 * PAGE + 10, 2 * PAGE + 7, 4 * PAGE + 1]
    data, m, pool, cache = setup(tmp_path, lengths)

    async def main(reader, pushes):
        off1, end1 = m.manifest.offsets[1], m.manifest.offsets[2]
        p0, p1 = off1 // PAGE * PAGE, -(-end1 // PAGE) * PAGE
        # the kernel reads whole pages; chunk 1 in two reads: held only after the second
        assert bytes(await reader.read(m, p0, PAGE)) == data[p0:p0 + PAGE]
        assert not m.in_kernel
        assert bytes(await reader.read(m, p0 + PAGE, p1 - p0 - PAGE)) == data[p0 + PAGE:p1]
        assert m.in_kernel == {1}  # (chunks 0 and 2 only had their shared pages read)
        # the kernel asking again means it dropped the pages: no longer assumed held
        await reader.read(m, p0, PAGE)
        assert 1 not in m.in_kernel

    trio.run(with_reader, pool, cache, main, False)  # no pushes: reads alone hand chunks over


def test_a_shared_page_is_answered_from_the_pieces_not_by_reloading_the_chunk(tmp_path):
    lengths = [3 * PAGE + 10, 2 * PAGE + 7, 4 * PAGE + 1]
    data, m, pool, cache = setup(tmp_path, lengths)

    async def main(reader, pushes):
        chunk = await reader.chunk(m, 1, keep=False)
        await reader._push_now(m, 1, chunk)  # as prefetch does
        # chunk 1's whole pages pushed; its two shared pages wait for chunks 0 and 2
        first, last = -(-m.manifest.offsets[1] // PAGE) * PAGE, m.manifest.offsets[2] // PAGE * PAGE
        assert pushes == [(first, data[first:last])]
        assert 1 not in m.in_kernel
        reader.mem.clear()
        hits, fetched = cache.hits, reader.fetched
        page = m.manifest.offsets[1] // PAGE * PAGE
        # the kernel asks for the page chunk 0 and chunk 1 share: chunk 0 is loaded,
        # chunk 1's part comes from its piece
        assert bytes(await reader.read(m, page, PAGE)) == data[page:page + PAGE]
        assert reader.fetched == fetched + 1 and cache.hits == hits  # chunk 0 only, from the node
        # pushing chunk 2 completes the page it shares with chunk 1: pushed whole
        await reader._push_now(m, 2, await reader.chunk(m, 2, keep=False))
        last = (m.manifest.offsets[2]) // PAGE * PAGE
        assert (last, data[last:last + PAGE]) in pushes
        assert last not in m.pieces
        assert 1 in m.in_kernel  # its pages: pushed, read, pushed with chunk 2's piece

    trio.run(with_reader, pool, cache, main)


def test_pushes_take_whole_pages_only(tmp_path):
    """The kernel keeps a page a push covers only in part without marking it up to date, and
    a reader finding it asks for it alone and waits: every push is of whole pages (or runs
    to the end of the file), and together with the replies they hand over every chunk."""
    from shardfs.reader import ReadState

    lengths = [PAGE + 100, 3 * PAGE + 5, 2 * PAGE - 3, 5 * PAGE + 7, PAGE // 2]
    data, m, pool, cache = setup(tmp_path, lengths)

    async def main(reader, pushes):
        st = ReadState()
        got = b"".join([bytes(await reader.read(m, off, 2 * PAGE, st)) for off in range(0, len(data), 2 * PAGE)])
        assert got == data
        while reader._pushing or reader._flights:
            await trio.sleep(0.01)
        assert pushes
        for off, buf in pushes:
            assert off % PAGE == 0 and (len(buf) % PAGE == 0 or off + len(buf) == len(data)), (off, len(buf))
            assert buf == data[off:off + len(buf)]
        assert m.in_kernel == set(range(len(lengths)))

    trio.run(with_reader, pool, cache, main)


def test_shared_pages_are_pushed_when_the_chunk_push_is_skipped(tmp_path, monkeypatch):
    """With pushes bounded (MAX_PUSHING) a chunk's own push may be skipped; the page it
    completes with a neighbour still goes, or a reader of the pushed neighbour would stop at it."""
    import shardfs.reader

    lengths = [2 * PAGE + 100, 3 * PAGE + 5, PAGE]
    data, m, pool, cache = setup(tmp_path, lengths)

    async def main(reader, pushes):
        await reader.chunk(m, 0)  # pushed (its whole pages)
        while reader._pushing:
            await trio.sleep(0.01)
        monkeypatch.setattr(shardfs.reader, "MAX_PUSHING", 0)
        await reader.chunk(m, 1)  # its own push skipped: only the page it shares with chunk 0
        while reader._pushing:
            await trio.sleep(0.01)
        shared = m.manifest.offsets[1] // PAGE * PAGE
        assert pushes == [(0, data[:2 * PAGE]), (shared, data[shared:shared + PAGE])]
        assert m.in_kernel == {0}

    trio.run(with_reader, pool, cache, main)


def test_a_chunk_is_pushed_once_when_prefetch_and_a_reader_both_bring_it(tmp_path):
    """Prefetch pushes each chunk it brings, and so does a reader's fill: together, once
    (an mmap load of the bench model pushed 1.35 GB for a 1.07 GB file before)."""
    lengths = [4 * PAGE, 4 * PAGE, 4 * PAGE]
    data, m, pool, cache = setup(tmp_path, lengths)

    async def main(reader, pushes):
        got = await reader.chunk(m, 1)  # a reader's fill: its push is under way
        await reader._push_now(m, 1, got)  # prefetch, with the same chunk
        while reader._pushing:
            await trio.sleep(0.01)
        await reader._push_now(m, 1, got)  # the kernel holds it now
        assert pushes == [(4 * PAGE, data[4 * PAGE:8 * PAGE])]
        assert m.in_kernel == {1} and not m.pushing
        await reader.read(m, 4 * PAGE, PAGE)  # the kernel asks again: it dropped the pages
        await reader._push_now(m, 1, got)
        assert len(pushes) == 2

    trio.run(with_reader, pool, cache, main)


def test_a_pushed_chunk_is_not_pushed_again_while_its_shared_pages_wait(tmp_path):
    """A chunk starting and ending mid-page is held in full only once its neighbours' pieces
    complete the pages at its ends; its own pages, pushed, are not pushed again meanwhile."""
    lengths = [2 * PAGE + 100, 3 * PAGE + 5, PAGE]
    data, m, pool, cache = setup(tmp_path, lengths)

    async def main(reader, pushes):
        got = await reader.chunk(m, 1, keep=False)
        await reader._push_now(m, 1, got)
        await reader._push_now(m, 1, got)  # (prefetch coming to it after a reader's fill)
        assert len(pushes) == 1 and 1 not in m.in_kernel

    trio.run(with_reader, pool, cache, main)


def test_a_shared_page_is_not_assembled_again_while_its_push_is_under_way(tmp_path):
    """Prefetch and a reader's fill can both come to push two neighbours. While the push of
    the page they share waits (the kernel holds it locked for a read), their second pushes
    assembled it again and pushed it twice (a one-page excess in bytes_pushed, ~1 CI run
    in 8)."""
    lengths = [2 * PAGE + 100, 3 * PAGE + 5, PAGE]
    data, m, pool, cache = setup(tmp_path, lengths)
    shared = 2 * PAGE
    release = threading.Event()
    pushes = []

    def notify(inode, off, buf):
        if off == shared and not release.is_set():
            release.wait(10)  # the kernel's lock on the page
        pushes.append((off, bytes(buf)))
        return True

    async def main():
        reader = Reader(pool, cache, notify=notify)
        async with trio.open_nursery() as n:
            reader.attach(n)
            d0 = await reader.chunk(m, 0, keep=False)
            d1 = await reader.chunk(m, 1, keep=False)
            await reader._push_now(m, 0, d0)  # its own pages; its piece of the shared page waits
            n.start_soon(reader._push_now, m, 1, d1)  # completes the shared page: its push waits
            while m.pieces.get(shared) is not None:
                await trio.sleep(0.01)
            await reader._push_now(m, 0, d0)
            await reader._push_now(m, 1, d1)
            release.set()
        assert [off for off, _ in pushes].count(shared) == 1, [off for off, _ in pushes]
        assert dict(pushes)[shared] == data[shared:shared + PAGE]
        assert shared not in m.pieces  # (the mark goes with the push)

    trio.run(main)


def test_sequential_reads_leave_chunks_from_the_disk_cache_to_their_replies(tmp_path):
    """A chunk decoded from a node is pushed whole; a chunk from the disk cache is pushed only
    for a reader jumping about (one push instead of a round trip per kernel readahead),
    not for one reading in sequence, whose replies carry it at less cost."""
    from shardfs.reader import ReadState

    lengths = [4 * PAGE, 4 * PAGE, 4 * PAGE]
    data, m, pool, cache = setup(tmp_path, lengths)
    for i in (1, 2):
        assert cache.put(m.hexes[i], data[4 * PAGE * i:4 * PAGE * (i + 1)])

    async def settled(reader):
        await trio.sleep(0.05)  # (readahead flights under way finish and push, or not)
        while reader._pushing or reader._flights:
            await trio.sleep(0.01)

    async def main(reader, pushes):
        st = ReadState()
        assert bytes(await reader.read(m, 0, PAGE, st)) == data[:PAGE]  # its readahead: chunks 1, 2
        await settled(reader)
        assert pushes == [(0, data[:4 * PAGE])]  # decoded from the node: pushed whole
        assert bytes(await reader.read(m, 4 * PAGE, 4 * PAGE, st)) == data[4 * PAGE:8 * PAGE]
        await settled(reader)
        assert cache.hits == 2 and [off for off, _ in pushes] == [0]  # the cache's: replies only
        reader.mem.clear()
        assert bytes(await reader.read(m, 9 * PAGE, PAGE)) == data[9 * PAGE:10 * PAGE]  # no handle state: a jump
        await settled(reader)
        assert cache.hits == 3 and [off for off, _ in pushes] == [0, 8 * PAGE]
        assert pushes[1][1] == data[8 * PAGE:]

    trio.run(with_reader, pool, cache, main)


def test_pages_read_twice_do_not_complete_a_chunk():
    """Coverage is kept per page: reading one page of a chunk twice, or every byte count's
    worth of it in overlapping reads, does not mark it held; covering every page does."""
    from shardfs.reader import handed_over

    lengths = [PAGE + 10, 5 * PAGE + 7, PAGE]
    man = Manifest.build((bytes([k]) * 32, n) for k, n in enumerate(lengths))
    m = OpenModel(1, 7, "m.bin", sum(lengths), "", man, {})
    s, e = man.offsets[1], man.offsets[1] + lengths[1]
    first_page_end = (s // PAGE + 1) * PAGE
    for _ in range(6):  # as many bytes as the chunk, all on its first page
        handed_over(m, 1, s, first_page_end)
    assert 1 not in m.in_kernel
    handed_over(m, 1, first_page_end + 10, e)  # a read starting mid-page covers that page's rest only
    assert 1 not in m.in_kernel
    handed_over(m, 1, first_page_end, first_page_end + PAGE)
    assert 1 in m.in_kernel and 1 not in m.served


def test_chunks_in_flight_stay_within_the_memory_budget(tmp_path):
    """However large the chunks, fetches in flight hold at most --memory bytes; a chunk
    larger than the whole budget still loads, alone."""
    lengths = [64 * 1024] * 12 + [300 * 1024]
    data, m, pool, cache = setup(tmp_path, lengths)
    seen = []

    async def main():
        reader = Reader(pool, cache, fetchers=8)
        reader.flight_bytes = ByteBudget(200 * 1024)  # as --memory 200KiB would be, without the floor
        real_load = reader._load

        def load(m_, h):
            seen.append((m_.manifest.lengths[m_.hexes.index(h)], reader.flight_bytes.used))
            return real_load(m_, h)
        reader._load = load
        async with trio.open_nursery() as n:
            reader.attach(n)
            got = {}

            async def one(i):
                got[i] = bytes(await reader.chunk(m, i, keep=False))
            async with trio.open_nursery() as readers:
                for i in range(len(lengths)):
                    readers.start_soon(one, i)
            n.cancel_scope.cancel()
        for i, (off, n_) in enumerate(zip(m.manifest.offsets, lengths)):
            assert got[i] == data[off:off + n_]
        assert reader.flight_bytes.used == 0
        return reader.flight_bytes.peak

    peak = trio.run(main)
    assert sorted(n_ for n_, _ in seen) == sorted(lengths)  # each chunk loaded once
    assert [used for n_, used in seen if n_ == 300 * 1024] == [300 * 1024]  # the big one: alone
    assert max(used for n_, used in seen if n_ < 300 * 1024) <= 200 * 1024
    assert peak == 300 * 1024
    assert max(used for n_, used in seen if n_ < 300 * 1024) >= 128 * 1024  # small ones in parallel


def test_byte_budget_grants_in_arrival_order_and_survives_cancellation():
    async def main():
        b = ByteBudget(100)
        order = []
        holds = {k: trio.Event() for k in "ABC"}

        async def want(name, n):
            await b.acquire(n)
            order.append(name)
            await holds[name].wait()
            b.release(n)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(want, "A", 60)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(want, "B", 60)  # does not fit beside A: waits
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(want, "C", 10)  # would fit, but B came first
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(0.05):  # a waiter cancelled in the queue takes nothing
                await b.acquire(5)
            assert order == ["A"] and b.used == 60
            holds["A"].set()
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(order[1:]) == ["B", "C"] and b.used == 70  # both granted when A left
            holds["B"].set()
            holds["C"].set()
        assert b.used == 0 and b.peak == 70

    trio.run(main)


def test_chunks_of_a_node_on_the_cache_filesystem_are_cached_only_when_asked(tmp_path):
    """A file node under tmp_path shares the cache's filesystem: reads serve its chunks
    without a second copy on that disk; warm and pins still cache them; a cache on another
    filesystem (or cache_local_nodes) fills on read as before."""
    lengths = [PAGE * 3, PAGE * 5, PAGE * 2, PAGE * 4]
    data, m, pool, cache = setup(tmp_path, lengths)
    assert cache.disk is not None and pool.disk_of("n1") == cache.disk

    async def settled(r):  # every flight over, its cache write included (they run in threads)
        while r._flights:
            await trio.sleep(0.005)

    def reader_for(cache, **kw):
        return Reader(pool, cache, cache_local_nodes=kw.get("cache_local_nodes", False))

    async def main():
        async with trio.open_nursery() as n:
            r = reader_for(cache)
            r.attach(n)
            assert bytes(await r.read(m, 0, len(data))) == data
            await settled(r)
            assert cache.stats()["entries"] == 0 and r.local_uncached == len(lengths)
            # a warm that joins the flight of a read still fetching the chunk stores it too
            r.mem.clear()
            go = threading.Event()
            plain = pool.read_from

            def held(*a):
                go.wait(10)
                return plain(*a)
            pool.read_from = held
            n.start_soon(r.chunk, m, 0)
            await trio.testing.wait_all_tasks_blocked()  # the read's flight waits in held()
            assert m.hexes[0] in r._flights
            async with trio.open_nursery() as w:
                w.start_soon(partial(r.chunk, m, 0, keep=False, stored=True))
                await trio.testing.wait_all_tasks_blocked()
                go.set()
            pool.read_from = plain
            assert m.hexes[0] in cache
            cache.pin("m.bin", [m.hexes[1]])
            assert bytes(await r.read(m, m.manifest.offsets[1], lengths[1])) == data[m.manifest.offsets[1]:][:lengths[1]]
            await settled(r)
            assert m.hexes[1] in cache  # pinned: cached on read
            assert await r.warm(m) == len(data)
            assert all(h in cache for h in m.hexes)

            other = ChunkCache(str(tmp_path / "cache2"), 1 << 30, free_floor=0)
            other.disk = "another-machine:1"
            r2 = reader_for(other)
            r2.attach(n)
            assert bytes(await r2.read(m, 0, len(data))) == data
            await settled(r2)
            assert other.stats()["entries"] == len(lengths) and r2.local_uncached == 0

            third = ChunkCache(str(tmp_path / "cache3"), 1 << 30, free_floor=0)
            r3 = reader_for(third, cache_local_nodes=True)
            r3.attach(n)
            assert bytes(await r3.read(m, 0, len(data))) == data
            await settled(r3)
            assert third.stats()["entries"] == len(lengths) and r3.local_uncached == 0
            n.cancel_scope.cancel()
    trio.run(main)


def test_disk_of_never_fails_a_read_and_follows_url_changes(tmp_path):
    _data, _m, pool, cache = setup(tmp_path, [PAGE])
    calls = []

    def health(used=True):
        calls.append(1)
        raise OSError(116, "Stale file handle")  # not a NodeError: must not escape either
    pool.store("n1").health = health
    assert pool.disk_of("n1") is None and pool.disk_of("n1") is None
    assert len(calls) == 1  # a failed ask is not repeated for every chunk
    init_root(str(tmp_path / "node2"), adopt=True)
    pool.update({"n1": Node("n1", f"file://{tmp_path}/node2")})  # a new URL: asked again
    assert pool.disk_of("n1") == cache.disk


def test_prefetch_stands_down_while_a_handle_streams_the_file(tmp_path):
    """A reader going through the file front to back (dd, cp) is served by readahead; the
    header-driven prefetch waits until it has been quiet for STREAM_QUIET, then pushes
    only what the stream did not hand to the kernel."""
    import io

    from shardfs.chunker import plan_spans
    from shardfs.reader import STREAM_QUIET, ReadState
    from shardfs.synth import tensor_bytes
    from test_model_aware import write_st

    rng = np.random.default_rng(9)
    write_st(tmp_path / "m.safetensors", [(f"layers.{i}.w", "BF16", [16, 4096], tensor_bytes(rng, (16, 4096), "BF16"))
                                          for i in range(12)])
    data = (tmp_path / "m.safetensors").read_bytes()
    spans = plan_spans(io.BytesIO(data), len(data), 1 << 20)  # the header, then one chunk per tensor
    data, m, pool, cache = setup(tmp_path, [s.length for s in spans], data)
    for i, h in enumerate(m.hexes):  # reads in sequence of cached chunks push nothing: only prefetch does
        assert cache.put(h, data[m.manifest.offsets[i]:m.manifest.offsets[i] + m.manifest.lengths[i]])
    times = []

    async def main(reader, pushes):
        real = reader.notify
        clock = trio.lowlevel.current_clock()  # (its time can be read from the notifying thread)
        reader.notify = lambda *a: times.append(clock.current_time()) or real(*a)
        reader.stream_run = 4 * m.manifest.lengths[1]
        st, streamed = ReadState(), m.manifest.offsets[7]  # the header and tensors 0-5
        for off in range(0, streamed, 16 * PAGE):
            n = min(16 * PAGE, streamed - off)
            assert bytes(await reader.read(m, off, n, st)) == data[off:off + n]
        assert m.in_kernel >= set(range(1, 7))
        await reader.prefetch(m)
        assert times and min(times) >= m.streamed_at + STREAM_QUIET  # (on trio's clock, as the reader)
        pushed = {off for off, buf in pushes if len(buf) > PAGE}
        assert pushed == {-(-m.manifest.offsets[i] // PAGE) * PAGE for i in range(7, len(m.manifest))}  # (whole pages)
        for off, buf in pushes:
            assert buf == data[off:off + len(buf)]

    trio.run(partial(with_reader, readahead_max=1), pool, cache, main)  # (in sequence, hardly any readahead)


def cached_in_memory(tmp_path, lengths):
    """setup(), with every chunk in the disk cache and its entry in the page cache: the
    reader loads such entries through a locked mapping of the file (directio.pinned_map)."""
    import resource
    if os.geteuid() != 0 and resource.getrlimit(resource.RLIMIT_MEMLOCK)[0] < 4 << 20:
        pytest.skip("RLIMIT_MEMLOCK too low here to lock the chunks")
    data, m, pool, cache = setup(tmp_path, lengths)
    for i, h in enumerate(m.hexes):
        assert cache.put(h, data[m.manifest.offsets[i]:m.manifest.offsets[i] + m.manifest.lengths[i]])
        with open(cache.path(h), "rb") as f:
            f.read()
    return data, m, pool, cache


def write_in_place(path, at: int, byte: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes([byte]), at)
    finally:
        os.close(fd)


def test_a_mapped_cache_entry_written_in_place_is_not_served_again(tmp_path, caplog):
    """Entries in the page cache are served from a shared mapping of the file, checked once
    when loaded: a write into the file in place afterwards changed the bytes the memory
    buffer went on serving (wrong bytes, and the cache never counted it damaged)."""
    from shardfs import directio
    data, m, pool, cache = cached_in_memory(tmp_path, [1 << 20, 1 << 20])
    off = m.manifest.offsets[1]

    async def main(reader, pushes):
        first = await reader.read(m, off, 8192)
        assert bytes(first) == data[off:off + 8192]
        assert isinstance(reader.mem.get(m.hexes[1]).obj, directio.MappedPages)  # (what this test is about)
        write_in_place(cache.path(m.hexes[1]), 100, data[off + 100] ^ 0xFF)  # the mapped pages change
        assert bytes(await reader.read(m, off, 8192)) == data[off:off + 8192]
        assert bytes(await reader.read(m, 0, 8192)) == data[:8192]  # (an untouched entry serves on)

    trio.run(partial(with_reader, push=False), pool, cache, main)
    assert cache.corrupt == 1 and "changed on disk while in use" in caplog.text  # counted, and said
    assert m.hexes[1] not in cache  # dropped (the node it came from again is on this disk: not refilled)


def test_a_mapped_part_written_while_a_later_part_loads_is_checked_again(tmp_path, caplog):
    """A reply over two chunks: the first, mapped, was checked when taken; a write into its
    entry while the second chunk loaded reached the reply."""
    from shardfs import directio
    data, m, pool, cache = cached_in_memory(tmp_path, [1 << 20, 1 << 20])
    get, wrote = cache.get, []

    def get_writing_the_first(h, keyring=None):  # the second chunk loads: the first is written meanwhile
        if h == m.hexes[1] and not wrote:
            write_in_place(cache.path(m.hexes[0]), (1 << 20) - 10, data[(1 << 20) - 10] ^ 0xFF)
            wrote.append(1)
        return get(h, keyring)
    cache.get = get_writing_the_first

    async def main(reader, pushes):
        assert bytes(await reader.read(m, 0, 8192)) == data[:8192]
        assert isinstance(reader.mem.get(m.hexes[0]).obj, directio.MappedPages)
        off = (1 << 20) - 8192
        assert bytes(await reader.read(m, off, 16384)) == data[off:off + 16384]
        assert wrote

    trio.run(partial(with_reader, push=False), pool, cache, main)
    assert cache.corrupt == 1 and "changed on disk while in use" in caplog.text


def test_a_mapped_entry_evicted_from_the_disk_is_served_on_from_memory(tmp_path, caplog):
    """Eviction unlinks the file, which no one can then write by its name: that is not a
    write (it was taken for one: a warning and a fetch from the nodes)."""
    data, m, pool, cache = cached_in_memory(tmp_path, [1 << 20])
    h = m.hexes[0]

    async def main(reader, pushes):
        assert bytes(await reader.read(m, 0, 8192)) == data[:8192]
        assert cache.evict([h]) == 1 << 20  # the LRU or an admin
        assert bytes(await reader.read(m, 8192, 8192)) == data[8192:16384]
        assert cache.put(h, data)  # and filled again (another inode at the same path)
        assert bytes(await reader.read(m, 16384, 8192)) == data[16384:24576]
        assert reader.fetched == 0 and cache.hits == 1  # all from the one load

    trio.run(partial(with_reader, push=False), pool, cache, main)
    assert "changed on disk" not in caplog.text


def test_a_manifest_whose_lengths_disagree_with_its_chunks_gives_an_error_not_shifted_bytes(tmp_path):
    """Chunks are checked against their ids, lengths only in the manifest. A damaged manifest
    that moves a boundary (two chunks' lengths off by the same amount, the size unchanged)
    would have had every read past it served shifted bytes, and a short one at its end: now
    the chunk whose length disagrees is an error (EIO at the mount), the others read on."""
    lengths = [3 * PAGE, 2 * PAGE, 3 * PAGE]
    data, m, pool, cache = setup(tmp_path, lengths)
    ids = m.manifest.ids
    bad = Manifest.build([(ids[0], 3 * PAGE), (ids[1], 2 * PAGE + 100), (ids[2], 3 * PAGE - 100)])
    m = OpenModel(1, 7, "m.bin", len(data), "", bad, m.locs)

    async def main(reader, pushes):
        assert bytes(await reader.read(m, 0, 3 * PAGE)) == data[:3 * PAGE]
        for off in (3 * PAGE, 6 * PAGE):
            with pytest.raises(CorruptChunk, match="the manifest says"):
                await reader.read(m, off, PAGE)

    trio.run(with_reader, pool, cache, main)


def test_a_manifest_listing_one_chunk_with_two_lengths_is_refused():
    cid = envelope.chunk_id(b"x" * 10)
    blob = Manifest.build([(cid, 10), (cid, 11)]).encode()
    with pytest.raises(CorruptChunk, match="two lengths"):
        Manifest.decode(blob)
    assert Manifest.decode(Manifest.build([(cid, 10), (cid, 10)]).encode()).lengths == (10, 10)


def test_no_push_starts_once_pushing_is_stopped(tmp_path):
    """At shutdown the daemon stops pushes before it stops serving FUSE (a push can wait on
    pages the kernel holds locked for a read only the serving loop answers): reads still
    answer, nothing more goes to the page cache."""
    lengths = [3 * PAGE, 2 * PAGE + 5, 3 * PAGE]
    data, m, pool, cache = setup(tmp_path, lengths)

    async def main(reader, pushes):
        await reader._push_now(m, 0, await reader.chunk(m, 0, keep=False))  # as prefetch does
        assert pushes == [(0, data[:3 * PAGE])]
        reader.stop_pushing()
        await reader._push_now(m, 2, await reader.chunk(m, 2, keep=False))
        assert bytes(await reader.read(m, 3 * PAGE, len(data) - 3 * PAGE)) == data[3 * PAGE:]
        await trio.testing.wait_all_tasks_blocked()
        assert pushes == [(0, data[:3 * PAGE])]

    trio.run(with_reader, pool, cache, main)
