"""The read path: offset -> chunks -> memory buffer -> disk cache -> nodes.

This is the one module that combines the cache, the nodes and the codec, so a read can
be followed from top to bottom here:

    read(model, off, size)
      for each chunk the range touches:   chunk(model, i)
        memory buffer hit                 -> bytes
        else join or start one flight     -> _fill (worker thread, under fetch_limiter):
                                               cache.get (hash-checked) or
                                               pool.read (failover, decode, hash-check);
                                               waiting readers get it, then cache.put
                                               (unless it came from a node on the
                                               cache's own filesystem: see _fill); a
                                               chunk from nodes is also pushed whole
                                               into the page cache
      sequential reads also start flights for the next `window` bytes (readahead)

Concurrency invariants (trio, single thread; only `await` points switch tasks):
- `_flights[h]` exists exactly while one _fill for chunk h runs (its cache write
  included); every reader of h waits on that flight's event, so a chunk is fetched once
  however many readers want it.
- _fill runs in the reader's long-lived nursery, not in the requesting task, so a
  cancelled read never leaves a flight without an owner.
- Errors are not remembered: the flight is removed when it ends, and the next reader
  tries again (another replica may have come back).
Decoding, hashing and disk I/O run in worker threads, never on the trio thread.
"""

from __future__ import annotations

import io
import logging
import mmap
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import trio

from . import directio
from .cache import FULL_WHY, ChunkCache
from .chunker import safetensors_named
from .errors import ChunkUnavailable, CorruptChunk
from .manifest import Manifest
from .pool import NodePool

log = logging.getLogger("shardfs.reader")

MAX_PUSHING = 4  # notify_store pushes waiting or running at once (each holds a chunk)
PAGE = mmap.PAGESIZE
MAX_PIECES = 4096  # per open model: bytes of chunks that share a page, waiting for the rest
# A handle that has read this many bytes in sequence streams the file (dd, cp, a hash, a
# loader copying a large tensor): prefetch stands down until it has been quiet this long.
STREAM_RUN = 64 << 20
STREAM_QUIET = 0.25


@dataclass
class OpenModel:
    vid: int
    inode: int
    name: str
    size: int
    sha256: str
    manifest: Manifest
    locs: dict[str, list[str]]
    hexes: list[str] = field(default_factory=list)
    keyring: object = None  # set for an encrypted version
    # chunks the kernel holds in its page cache: pushed, or handed over by reads in full
    in_kernel: set[int] = field(default_factory=set)
    served: dict[int, int] = field(default_factory=dict)  # chunk -> bitmask of its pages read
    # Chunks start where tensors start, rarely on a page boundary, and the kernel takes a
    # pushed page only if the push covers all of it. So the pages two chunks share are
    # assembled here from each chunk's piece and pushed once complete: page -> {chunk: bytes},
    # or None from its assembly until its push is over (so it is not assembled again meanwhile)
    pieces: dict[int, dict[int, bytes] | None] = field(default_factory=dict)
    streamed_at: float = float("-inf")  # trio clock of the last read by a streaming handle
    pushing: set[int] = field(default_factory=set)  # chunks whose pages a push is handing over

    def __post_init__(self):
        self.hexes = [c.hex() for c in self.manifest.ids]

    def kernel_dropped(self) -> None:
        """Trio thread: the kernel's pages of this file are being dropped (cache evict)."""
        self.in_kernel.clear()
        self.served.clear()
        self.pieces.clear()

    def forget_pieces(self) -> None:
        """Drop the recorded pieces of shared pages (the file's last handle closed), but not
        the marks of pages being pushed."""
        self.pieces = {at: None for at, have in self.pieces.items() if have is None}


@dataclass
class ReadState:
    """Per open file: where the last read ended and the current readahead window."""
    next_off: int = 0
    window: int = 0
    run: int = 0  # bytes read in sequence up to next_off


class _Flight:
    __slots__ = ("event", "stored", "data", "error", "keep", "store", "jumpy", "push")

    def __init__(self, keep: bool):
        self.event = trio.Event()  # data (or error) is there
        self.stored = trio.Event()  # the flight is over: the chunk is in the disk cache, or failed
        self.data = None
        self.error = None
        self.keep = keep  # a reader wants it: keep it in memory (and push it, see push)
        self.store = False  # warm wants it in the disk cache, wherever it comes from
        self.jumpy = False  # a reader not reading in sequence wants it (see _fill)
        self.push = True  # readers' _keep also pushes it into the page cache (see _fill)


class ByteBudget:
    """Bytes of chunks held at once (trio thread only), granted in arrival order, so a large
    chunk is not overtaken forever by small ones. A chunk larger than the whole budget
    still goes, alone, so no size of chunk can wait forever."""

    def __init__(self, total: int):
        self.total = total
        self.used = 0
        self.peak = 0
        self._waiting: deque[list] = deque()  # [bytes, trio.Event], first come first served

    def _fits(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.total

    def _take(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    async def acquire(self, n: int) -> None:
        if not self._waiting and self._fits(n):
            self._take(n)  # (no checkpoint after: a cancel there would leak the bytes)
            return
        entry = [n, trio.Event()]
        self._waiting.append(entry)
        try:
            await entry[1].wait()
        except BaseException:  # cancelled: leave the queue, or give back what was granted
            if entry[1].is_set():
                self.release(n)
            else:
                self._waiting.remove(entry)
                self._grant()
            raise

    def release(self, n: int) -> None:
        self.used -= n
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self._fits(self._waiting[0][0]):
            n, event = self._waiting.popleft()
            self._take(n)
            event.set()


class MemBuffer:
    """Recently used raw chunks, bounded by bytes."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._d: OrderedDict[str, bytes] = OrderedDict()

    def get(self, h):
        data = self._d.get(h)
        if data is not None:
            self._d.move_to_end(h)
        return data

    def put(self, h, data):
        if h in self._d:
            return
        self._d[h] = data
        self.used += len(data)
        while self.used > self.limit and len(self._d) > 1:
            _, old = self._d.popitem(last=False)
            self.used -= len(old)

    def drop(self, h):
        data = self._d.pop(h, None)
        if data is not None:
            self.used -= len(data)

    def clear(self):
        self._d.clear()
        self.used = 0


class Reader:
    def __init__(self, pool: NodePool, cache: ChunkCache | None, *, mem_limit: int = 128 << 20,
                 fetchers: int = 8, readahead_max: int = 64 << 20, refresh_locs=None, notify=None,
                 cache_local_nodes: bool = False):
        self.pool = pool
        self.cache = cache
        # Whether reads also fill the cache with chunks from nodes on the cache's own
        # filesystem (warm always does). Those chunks are on the reader's disk already: a
        # decoded second copy there costs that disk 1.5x the chunk's stored bytes in writes
        # during the read, which made a cold read from such nodes 1.7x slower (measured).
        self.cache_local_nodes = cache_local_nodes
        self.local_uncached = 0  # chunks read from such nodes and, so, not cached
        self.mem = MemBuffer(mem_limit)
        self.fetch_limiter = trio.CapacityLimiter(fetchers)
        # Chunks being fetched, decoded and written to the cache are memory on top of the
        # buffer: as much again at most, however large the chunks (8 x 64 MiB would be 512 MiB).
        # Not below 4 default chunks, or a tiny --memory would fetch one chunk at a time.
        self.flight_bytes = ByteBudget(max(mem_limit, 16 << 20))
        self.readahead_max = readahead_max
        self.stream_run = STREAM_RUN
        self.refresh_locs = refresh_locs  # blocking fn(hex) -> list of node ids, or None
        self.notify = notify  # fn(inode, offset, data): push a filled chunk into the page cache
        self._notify_limiter = trio.CapacityLimiter(2)
        self.stopping = False  # stop_pushing()
        # chunks in hand for prefetch, across every open file: half the fetch slots, so
        # readers' page faults always find a free one, and a quarter of the memory budget
        self._prefetch_slots = trio.Semaphore(max(1, fetchers // 2))
        self._prefetch_bytes = ByteBudget(max(1, mem_limit // 4))
        self._pushing = 0
        self._flights: dict[str, _Flight] = {}
        self._nursery: trio.Nursery | None = None
        self._unavailable_logged: set[str] = set()
        self.bytes_served = 0
        self.bytes_pushed = 0  # put into the page cache by notify_store (not by read replies)
        self.fetched = 0

    def attach(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    # -- chunks ----------------------------------------------------------------------

    async def chunk(self, m: OpenModel, i: int, keep: bool = True, stored: bool = False,
                    sequential: bool = False) -> bytes:
        """The raw bytes of chunk i. keep=False (prefetch, warm) leaves it out of the memory
        buffer, so background work never crowds out what readers use.
        stored=True also puts it in the disk cache, wherever it comes from, and waits until
        it is there (warm). sequential: asked for by a handle reading in sequence (see _fill)."""
        h = m.hexes[i]
        data = self.mem.get(h)
        if data is not None and self._dropped_if_written(m, i, data):
            data = None
        if data is None:
            flight = self._start(m, i, keep, sequential)
            flight.store = flight.store or stored
        else:
            flight = self._flights.get(h) if stored else None
            if flight is not None:
                flight.store = True
            else:
                if stored and self.cache is not None and h not in self.cache:
                    # in memory, not on disk: its fill found the cache full or unwritable then
                    await trio.to_thread.run_sync(self.cache.put, h, data, abandon_on_cancel=False)
                return data
        await (flight.stored if stored else flight.event).wait()
        if flight.data is None:
            raise flight.error
        return flight.data

    def _dropped_if_written(self, m: OpenModel, i: int, data) -> bool:
        """Whether `data` (chunk i, or part of it) is a cache entry mapped from the page cache
        that was written in place since its hash was checked (directio.changed_since_mapped);
        if so it leaves the memory buffer, to be loaded and checked again (damaged, it is
        dropped and fetched anew)."""
        if not directio.changed_since_mapped(data):
            return False
        log.warning("%s: cache entry %s was changed on disk while in use; loading it again", m.name, m.hexes[i])
        self.mem.drop(m.hexes[i])
        return True

    def _start(self, m: OpenModel, i: int, keep: bool = True, sequential: bool = False) -> _Flight:
        h = m.hexes[i]
        flight = self._flights.get(h)
        if flight is None:
            flight = self._flights[h] = _Flight(keep)
            self._nursery.start_soon(self._fill, m, i, flight)
        elif keep and not flight.keep:
            flight.keep = True
            if flight.data is not None:  # already fetched, its cache write under way
                self._keep(m, i, flight.data, flight.push)
        if keep and not sequential:
            flight.jumpy = True
        return flight

    async def _fill(self, m: OpenModel, i: int, flight: _Flight) -> None:
        h = m.hexes[i]
        size = m.manifest.lengths[i]
        try:
            async with self.fetch_limiter:
                await self.flight_bytes.acquire(size)
                try:
                    # (abandoned when cancelled, at shutdown: a hung node must not hold the
                    # unmount for its timeout; the thread only reads, and its result goes)
                    data, source = await trio.to_thread.run_sync(self._load, m, h, abandon_on_cancel=True)
                    if len(data) != size:  # (its bytes hash to its id: the manifest is what is wrong)
                        raise CorruptChunk(f"chunk is {len(data)} bytes, the manifest says {size}")
                    self.fetched += source != "cache"
                    if h in self._unavailable_logged:  # (so that a later failure is logged again)
                        self._unavailable_logged.discard(h)
                        log.info("%s: chunk %s is readable again", m.name, h)
                    flight.data = data
                    flight.event.set()  # readers go on at once: the disk-cache write follows
                    # A chunk from the disk cache that only readers reading in sequence
                    # asked for goes to the kernel in their replies: pushing it as well cost
                    # more than it saved (warm dd, medians of 6: 0.58 GB/s pushed, 0.81 not;
                    # cold-cached even). From nodes the push pays (0.49 -> 0.63), and so it
                    # does for a reader jumping about (one push instead of a round trip per
                    # readahead window). Prefetch pushes either way.
                    flight.push = source != "cache" or flight.jumpy
                    if flight.keep:
                        self._keep(m, i, data, flight.push)
                    if source != "cache" and self.cache is not None:
                        if source == "node" or flight.store or self.cache.pinned(h):
                            # Write-behind, still holding the fetch slot: fills run ahead of
                            # the disk by at most the slots, and the flight (with its data)
                            # stays joinable until the entry exists, so nobody fetches the
                            # chunk twice. (No await since the load: a warm that joined by
                            # now set flight.store; a later one finds the flight over.)
                            await trio.to_thread.run_sync(self.cache.put, h, data, abandon_on_cancel=False)
                        else:
                            self.local_uncached += 1
                finally:
                    self.flight_bytes.release(size)
        except (ChunkUnavailable, CorruptChunk) as e:
            flight.error = e
            if h not in self._unavailable_logged:
                self._unavailable_logged.add(h)
                log.error("%s: chunk %s at offset %d unreadable: %s", m.name, h, m.manifest.offsets[i], e)
        except BaseException as e:  # noqa: BLE001 - a bug: surface it to the reader as EIO too
            flight.error = ChunkUnavailable(f"internal error: {e!r}")
            if not isinstance(e, Exception):
                raise  # cancellation at shutdown: waiting readers get the error, nothing to log
            log.exception("unexpected error filling chunk %s", h)
        finally:
            del self._flights[h]
            flight.event.set()
            flight.stored.set()

    def _keep(self, m: OpenModel, i: int, data, push: bool = True) -> None:
        """A reader wants chunk i: keep it in memory and, with `push`, push it into the page cache."""
        self.mem.put(m.hexes[i], data)
        if not push or self.notify is None or self.stopping:
            return
        # In a thread, never on the trio thread: the kernel may hold these pages locked for
        # a read that only this trio thread can answer. Bounded: a push that would wait is
        # skipped (the kernel will just ask for the pages), but not the pages this chunk
        # completes that it shares with its neighbours: small, and without them a reader
        # of a pushed neighbour stops to ask for one page.
        body = self._pushing < MAX_PUSHING
        pages = shared_pages(m, i, data)
        if body or pages:
            self._pushing += 1
            self._nursery.start_soon(self._push, m, i, data, pages, body)

    async def _push(self, m: OpenModel, i: int, data, pages, body: bool) -> None:
        try:
            await self._push_now(m, i, data, pages, body)
        finally:
            self._pushing -= 1

    async def _push_now(self, m: OpenModel, i: int, data, pages=None, body: bool = True) -> None:
        """Push chunk i's whole pages (with `body`) and `pages`, the pages it shares with its
        neighbours that are complete now (by default, shared_pages)."""
        if pages is None:
            pages = shared_pages(m, i, data)
        # once is enough: prefetch and a reader's fill can both come to push a chunk
        own = whole_pages(m, i)
        if not body or own[1] <= own[0] or i in m.pushing or held(m, i, *own):
            own = None
        if own is None and not pages:
            return
        if own is not None:
            m.pushing.add(i)
        try:
            pushed = await trio.to_thread.run_sync(self._push_pages, m, i, data, own, pages,
                                                   limiter=self._notify_limiter, abandon_on_cancel=True)
        finally:
            if own is not None:
                m.pushing.discard(i)
            for at, _page in pages:  # pushed (recorded below) or not: assembled again if needed
                if m.pieces.get(at, ()) is None:
                    del m.pieces[at]
        for a, b in pushed:  # (a shared page counts for each chunk it holds a part of)
            self.bytes_pushed += b - a
            for j in m.manifest.span(a, b - a):
                handed_over(m, j, a, b)

    def _push_pages(self, m: OpenModel, i: int, data, own, pages) -> list[tuple[int, int]]:
        """Worker thread: push `own`, the range [lo, hi) of chunk i's whole pages (or None),
        then `pages`. Returns the ranges the kernel took.

        Whole pages only: the kernel keeps a page that a push covers in part, not marked up
        to date, and a reader that finds it asks for that page alone, and waits. The pages
        at the chunk's ends come whole from shared_pages once both sides are here. (A cold
        dd of the 1 GiB bench model made 157-164 reads of one or two pages when pushes
        covered pages in part, 80-91 since; its speed did not change beyond the noise.)"""
        if directio.changed_since_mapped(data):  # (a mapped entry written since: the kernel keeps
            return []                            # what is pushed, so push nothing; reads reload it)
        start = m.manifest.offsets[i]
        wanted = list(pages)
        if own is not None:
            lo, hi = own
            wanted.insert(0, (lo, memoryview(data)[lo - start:hi - start]))
        pushed = []
        for at, part in wanted:
            if self.stopping:
                break
            if self.notify(m.inode, at, part):
                pushed.append((at, at + len(part)))
        return pushed

    def stop_pushing(self) -> None:
        """At shutdown: start no more page-cache pushes (idle() then waits for those under way)."""
        self.stopping = True

    async def idle(self) -> None:
        """Wait until no page-cache push runs (before the FUSE session is closed)."""
        while self._notify_limiter.borrowed_tokens:  # (one task may hold only one token)
            await trio.sleep(0.01)

    def _load(self, m: OpenModel, h: str) -> tuple[bytes, str]:
        """Worker thread: the verified raw chunk from the disk cache or the nodes, and where
        it came from: "cache", "local" (a node on the cache's filesystem) or "node"."""
        if self.cache is not None:
            data = self.cache.get(h, m.keyring)
            if data is not None:
                return data, "cache"
        try:
            data, nid = self.pool.read_from(h, m.locs.get(h, []), m.keyring)
        except ChunkUnavailable:
            if self.refresh_locs is None:
                raise
            fresh = self.refresh_locs(h)  # locations may have changed (repair, new nodes)
            if not fresh or set(fresh) == set(m.locs.get(h, [])):
                raise
            m.locs[h] = fresh
            data, nid = self.pool.read_from(h, fresh, m.keyring)
        local = (self.cache is not None and not self.cache_local_nodes and self.cache.disk is not None
                 and self.pool.disk_of(nid) == self.cache.disk)
        return data, "local" if local else "node"

    # -- reads -----------------------------------------------------------------------

    async def read(self, m: OpenModel, off: int, size: int, state: ReadState | None = None) -> bytes:
        end = min(off + size, m.size)
        if off >= end:
            return b""
        span = m.manifest.span(off, end - off)
        m.in_kernel.difference_update(span)  # the kernel asks: it does not hold these (any more)
        if state is not None:
            self._readahead(m, span, off, end, state)
        # Ranges of chunks whose pushes left out a page the kernel now wants come from the
        # recorded pieces, taken before any await (a push can complete the page meanwhile).
        ranges = []
        for i in span:
            start = m.manifest.offsets[i]
            lo, hi = max(off, start), min(end, start + m.manifest.lengths[i])
            ranges.append((i, start, lo, hi, page_piece(m, i, lo, hi)))
        stale: set[int] = set()
        while True:
            parts = []
            for i, start, lo, hi, piece in ranges:
                if piece is None or i in stale:
                    data = await self.chunk(m, i, sequential=state is not None and state.window > 0)
                    piece = data[lo - start:hi - start]
                parts.append(piece)
            # A part from a mapped cache entry was checked when it was taken; a write into the
            # entry while later parts were awaited would reach this reply: check them again.
            again = {r[0] for r, part in zip(ranges, parts) if self._dropped_if_written(m, r[0], part)}
            if not again:
                break
            for i in again & stale:  # written to again and again: from the nodes
                if self.cache is not None:
                    await trio.to_thread.run_sync(self.cache.discard, m.hexes[i])
            stale |= again
        for i, _start, lo, hi, _piece in ranges:  # only once the whole reply is in hand
            handed_over(m, i, lo, hi)
        out = parts[0] if len(parts) == 1 else b"".join(parts)
        self.bytes_served += len(out)
        return out

    def _readahead(self, m: OpenModel, span: range, off: int, end: int, st: ReadState) -> None:
        chunk = m.manifest.lengths[span.start] or 1
        if off == st.next_off or (st.window and abs(off - st.next_off) <= chunk):
            st.window = min(max(st.window * 2, 2 * chunk), self.readahead_max)
            st.run += end - off
        else:
            st.window = st.run = 0
        if st.run >= self.stream_run:
            m.streamed_at = trio.current_time()
        st.next_off = end
        if not st.window or end >= m.size:
            return
        budget = max(1, self.mem.limit // (2 * chunk))
        for j in m.manifest.span(end, st.window):
            if len(self._flights) >= budget:
                break
            h = m.hexes[j]
            if j not in m.in_kernel and h not in self._flights and self.mem.get(h) is None:
                self._start(m, j, sequential=True)  # (a pushed chunk is in the page cache: the kernel has it)

    async def warm(self, m: OpenModel, progress=None) -> int:
        """Fetch every chunk of a model into the cache. `progress(done, total)` is called
        after each chunk. Raises the first ChunkUnavailable after trying every chunk."""
        done = 0
        errors, unstored = [], []
        slots = trio.Semaphore(self.fetch_limiter.total_tokens)

        async def one(i):
            nonlocal done
            try:
                await self.chunk(m, i, keep=False, stored=True)
                if self.cache is not None and m.hexes[i] not in self.cache:
                    unstored.append(i)  # fetched, but the cache could not take it
                    return
                done += m.manifest.lengths[i]
                if progress is not None:
                    progress(done, m.size)
            except (ChunkUnavailable, CorruptChunk) as e:
                errors.append(e)
            finally:
                slots.release()

        async with trio.open_nursery() as n:
            for i in range(len(m.manifest)):
                await slots.acquire()
                n.start_soon(one, i)
        if errors:
            raise ChunkUnavailable(f"{m.name}: {len(errors)} chunk(s) could not be fetched; first: {errors[0]}")
        for i in list(unstored):  # once more, one at a time: other fills held the room before
            try:
                await self.chunk(m, i, keep=False, stored=True)
            except (ChunkUnavailable, CorruptChunk) as e:
                raise ChunkUnavailable(f"{m.name}: a chunk could not be fetched: {e}") from None
            if m.hexes[i] in self.cache:
                unstored.remove(i)
                done += m.manifest.lengths[i]
        if unstored:
            why = ("it is not writable" if self.cache.write_failed else
                   f"it is full: {FULL_WHY.get(self.cache.full, self.cache.full)}" if self.cache.full else
                   "other reads kept filling it")
            raise ChunkUnavailable(f"{m.name}: {len(unstored)} chunk(s) could not be written to the cache "
                                   f"{self.cache.root}: {why}")
        return done

    async def prefetch(self, m: OpenModel) -> None:
        """Header-driven prefetch: bring a checkpoint's tensor data in, in the order loaders
        read it (prefetch_order).

        Started when a safetensors or GGUF file is opened; cancelled when its last handle
        closes. Each chunk is fetched (or loaded from the disk cache) and pushed into the
        kernel's page cache, so the page faults of an mmap loader touching tensors in any
        order are answered by the kernel without a round trip to this daemon. While it is
        pushed, each chunk is also in the memory buffer: a loader right behind the push, whose
        faults reach the daemon before the pages land, must find it there, not on disk.
        Without page-cache pushes (notify off) it only fills the disk cache. All prefetches
        together hold at most half the fetch slots' worth of chunks, and at most a quarter of
        the memory budget in bytes: a chunk is let go only
        after its push, so prefetch cannot outrun the kernel's copying, and a reopened file
        is not pushed again."""
        if not len(m.manifest):
            return
        first = await self.chunk(m, 0)
        order = await trio.to_thread.run_sync(prefetch_order, first, m)  # parses JSON: not here
        if order is None:
            return
        slots = self._prefetch_slots
        push = self.notify is not None

        async def one(i):
            try:
                # Joins a fetch already under way. Without pushes (a diagnostic mode), filling
                # the disk cache is all prefetch does, so it stores chunks from nodes on the
                # cache's own filesystem too, as warm does.
                data = await self.chunk(m, i, keep=False, stored=not push)
                if push:
                    # A loader is often right behind: until the push lands, its faults on this
                    # chunk reach the daemon, and must find it in memory, not reload it from disk.
                    self.mem.put(m.hexes[i], data)
                    await self._push_now(m, i, data)
            except (ChunkUnavailable, CorruptChunk):
                pass  # the reader that needs it gets the error; prefetch just moves on
            finally:
                slots.release()
                self._prefetch_bytes.release(m.manifest.lengths[i])

        async with trio.open_nursery() as n:
            for i in order:
                await _until_not_streamed(m)
                if push:
                    if i in m.in_kernel:
                        continue  # already in the page cache (unless the kernel dropped it)
                elif self.cache is not None and m.hexes[i] in self.cache:
                    continue  # already local, and there is nothing more to do with it
                await slots.acquire()
                try:
                    await self._prefetch_bytes.acquire(m.manifest.lengths[i])
                except BaseException:
                    slots.release()
                    raise
                n.start_soon(one, i)
        log.debug("prefetched %s", m.name)

    def forget(self, hexes) -> None:
        for h in hexes:
            self.mem.drop(h)


async def _until_not_streamed(m: OpenModel) -> None:
    """Wait while a handle streams the model (see STREAM_RUN). Readahead serves such a
    reader in its own order; prefetch going on in name order would take fetch slots, memory
    and copies into the kernel from it (measured, dd of the 2 GiB bench model through a
    fresh mount, medians of 4: warm 0.52 GB/s with prefetch running, 0.92 without; cold
    cached 0.78 and 0.90). Prefetch goes on where it was once the stream ends or jumps, and
    passes by every chunk the stream handed to the kernel."""
    while (wait := m.streamed_at + STREAM_QUIET - trio.current_time()) > 0:
        await trio.sleep(wait)


def shared_pages(m: OpenModel, i: int, data) -> list[tuple[int, bytes]]:
    """Record chunk i's pieces of the pages it shares with other chunks; return the shared
    pages this completes, as (offset, bytes), ready to push."""
    off = m.manifest.offsets[i]
    end = off + len(data)
    done = []
    for at in {off // PAGE * PAGE, (end - 1) // PAGE * PAGE} if end > off else ():
        stop = min(at + PAGE, m.size)
        owners = m.manifest.span(at, stop - at)
        if len(owners) < 2:
            continue  # the page is this chunk's alone: its own push covers it
        if held(m, i, at, stop):
            continue  # pushed (or read) already: assembled again, it would be pushed twice
        if m.pieces.get(at, ()) is None:
            continue  # assembled, its push under way (held once it is over)
        have = m.pieces.setdefault(at, {})
        have[i] = bytes(data[max(at, off) - off:min(stop, end) - off])
        if len(have) == len(owners):
            done.append((at, b"".join(have[j] for j in owners)))
            m.pieces[at] = None  # (the caller pushes it: _push_now clears the mark)
    while len(m.pieces) > MAX_PIECES:  # a loader that never reads the neighbours: forget
        del m.pieces[next(iter(m.pieces))]
    return done


def whole_pages(m: OpenModel, i: int) -> tuple[int, int]:
    """The bytes of chunk i on pages of its own, [lo, hi): what its push covers (at the end of
    the file, its partial last page too). Empty (hi <= lo) for a chunk within one shared page."""
    start = m.manifest.offsets[i]
    end = start + m.manifest.lengths[i]
    return -(-start // PAGE) * PAGE, (end if end == m.size else end // PAGE * PAGE)


def held(m: OpenModel, i: int, lo: int, hi: int) -> bool:
    """Whether the kernel holds every page of chunk i in [lo, hi) (page-aligned), as far as
    handed_over has recorded."""
    if i in m.in_kernel:
        return True
    first = m.manifest.offsets[i] // PAGE
    a, b = lo // PAGE - first, -(-hi // PAGE) - first
    want = ((1 << (b - a)) - 1) << a
    return m.served.get(i, 0) & want == want


def handed_over(m: OpenModel, i: int, lo: int, hi: int) -> None:
    """A read reply or a push handed the kernel bytes [lo, hi) of chunk i. Once they have
    covered every page of the chunk, the kernel holds it, and prefetch and readahead pass it
    by instead of loading it again. Kept per page, not as a byte count: the kernel re-reads
    pages it dropped, and a count would then call a chunk complete that is not."""
    start = m.manifest.offsets[i]
    end = start + m.manifest.lengths[i]
    first = start // PAGE
    # the pages whose part in this chunk the read covered whole: [a, b)
    a = lo // PAGE if lo % PAGE == 0 or lo == start else lo // PAGE + 1
    b = (hi - 1) // PAGE + 1 if hi % PAGE == 0 or hi == end else (hi - 1) // PAGE
    if b <= a:
        return
    mask = m.served.get(i, 0) | (((1 << (b - a)) - 1) << (a - first))
    if mask == (1 << ((end - 1) // PAGE + 1 - first)) - 1:
        m.served.pop(i, None)
        m.in_kernel.add(i)
    else:
        m.served[i] = mask


def page_piece(m: OpenModel, i: int, lo: int, hi: int):
    """Bytes [lo, hi) of chunk i from its recorded piece of a shared page, if it has one
    covering them (saves reloading a whole chunk to answer for one page of it)."""
    at = lo // PAGE * PAGE
    if hi - 1 >= at + PAGE:
        return None
    piece = (m.pieces.get(at) or {}).get(i)
    if piece is None:
        return None
    first = max(at, m.manifest.offsets[i])  # where the piece starts in the file
    return piece[lo - first:hi - first]


def prefetch_order(head, m: OpenModel) -> list[int] | None:
    """The chunks holding a checkpoint's tensor data, in the order loaders touch them, or
    None if `head` (the first chunk) does not start a known format.

    safetensors loaders walk `safe_open(...).keys()`, which is sorted by name, and that
    is not always file order (a file written layer by layer puts layers.10 after layers.9,
    sorting puts it after layers.1). Following the name order, a loader finds each tensor
    ready instead of racing the prefetch to it. GGUF and a header larger than the first
    chunk: file order."""
    named = None
    if len(head) >= 9 and head[8:9] == b"{":
        named = safetensors_named(io.BytesIO(head), m.size)
    if named:
        order: dict[int, None] = {}
        # Bounded work: tensors that alias one range (legal, if odd) would otherwise cost
        # tensors x chunks (100k tensors over 2048 chunks: 17 s of this thread per open).
        budget = 4 * len(m.manifest) + len(named)
        for _name, s, e, _d in sorted(named):
            span = m.manifest.span(s, e - s)
            budget -= len(span)
            if budget < 0:  # the rest in file order
                first = min(s for _n, s, _e, _d in named)
                order.update(dict.fromkeys(i for i in m.manifest.span(first, m.size - first) if i not in order))
                break
            order.update(dict.fromkeys(span))
        return list(order)
    start = tensor_data_start(head, m.size)
    return None if start is None else list(m.manifest.span(start, m.size - start))


def tensor_data_start(head: bytes, size: int) -> int | None:
    """Where a checkpoint's tensor data starts, if `head` (its first bytes) is a known format.

    safetensors: u64 header length + JSON header, then the tensors, in file order.
    GGUF: b"GGUF" magic; put cuts its header into the first chunk (chunker.gguf_tensors),
    so prefetch starts right after that chunk."""
    if len(head) >= 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 2 <= n <= size - 8:
            return 8 + n
    if head[:4] == b"GGUF":
        return min(len(head), size)
    return None
