"""`shardfs put`: file -> chunks -> envelopes -> R nodes -> one atomic publish.

The main thread reads the file in order and feeds the whole-file SHA-256; worker
threads hash, encode and upload chunks (BLAKE3, lz4 and socket/file I/O release the
GIL). At most `inflight` chunks are in memory at once. Nothing becomes visible until
every chunk is on R nodes; then Index.publish_all makes the version visible in one
MULTI/EXEC (a folder put: every file's version at once, see PutSession). If anything
fails or the user interrupts, the lease is dropped and the uploaded chunks are left for
`shardfs gc`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import signal
import stat
import sys
import threading
import time
import uuid
from collections import Counter, deque
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import redis

from . import envelope
from .chunker import DEFAULT_CHUNK, check_chunk_size, plan_spans
from .errors import NoNodes, NodeError, ShardfsError, UsageError
from .index import LAPSED, Index
from .manifest import Manifest
from .names import check_name
from .placement import rank
from .pool import NodePool
from .stores import init_root
from .units import human

LEASE_TTL = float(os.environ.get("SHARDFS_LEASE_TTL", "60"))
GC_WAIT = 30.0
INFLIGHT_BYTES = 96 << 20  # raw chunks read ahead and being encoded/uploaded, at most


@dataclass
class PutResult:
    vid: int
    name: str
    size: int
    stored_new: int
    chunks: int
    deduped: int
    replicas: int
    seconds: float
    codecs: Counter = field(default_factory=Counter)


# What this process has published, for the word of a put cut short after its publish.
published: list[PutResult] = []
# The names of a publish under way: when Redis fails there, it may or may not have applied it.
publishing: list[str] = []


@contextlib.contextmanager
def signals_held(signums=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP)):
    """Ctrl-C, SIGTERM and SIGHUP wait until the block is done, then act as usual: a put
    interrupted inside Redis's EXEC could not tell whether its model had been published.
    (The block is publish_all: a few Redis round trips, each bounded by the socket timeout.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    old = {n: signal.signal(n, lambda signum, _frame: got.append(signum)) for n in signums}
    try:
        yield
    finally:
        for n, handler in old.items():
            signal.signal(n, signal.SIG_DFL if handler is None else handler)  # (None: set outside Python)
        if got:
            signal.raise_signal(got[0])


def open_source(path: str):
    """Open FILE for reading or raise one clear UsageError."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise UsageError(f"{path}: broken symbolic link (to {os.readlink(path)}, which does not exist)") from None
        raise UsageError(f"{path}: no such file") from None
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path} is not a regular file")
    try:
        return open(path, "rb", buffering=0)
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {e.strerror}") from None


def live_nodes(pool: NodePool) -> dict[str, float]:
    """Active nodes that answer a health probe: id -> weight. NoNodes if none."""
    health = pool.probe()
    live = {nid: pool.nodes[nid].weight for nid, h in health.items()
            if not isinstance(h, NodeError) and pool.nodes[nid].state == "active"}
    if not live:
        why = "; ".join(f"{nid} {pool.nodes[nid].url}: {h}" for nid, h in health.items()
                        if isinstance(h, NodeError)) or "every node is draining"
        raise NoNodes(f"no usable nodes ({why})")
    return live


class Uploader:
    """Places one chunk on R nodes, skipping nodes that fail during this put."""

    def __init__(self, idx: Index, pool: NodePool, live: dict[str, float], replicas: int, put_id: str,
                 keyring=None):
        self.keyring = keyring
        self.idx, self.pool, self.live, self.replicas, self.put_id = idx, pool, dict(live), replicas, put_id
        self.failed: dict[str, str] = {}
        self.lacking: set[str] = set()  # nodes found without a chunk the index lists there
        self.lapsed = False  # the put's lease lapsed and gc ended it (PutSession._heartbeat)
        self.used: set[str] = set()  # nodes holding copies this put relies on (see publish_all)
        self._lock = threading.Lock()
        self._storing: dict[str, threading.Event] = {}  # chunk -> set once its first store ends

    def store(self, raw, codec: str | None = None) -> tuple[bytes, int, int | None, bool]:
        """Returns (chunk id, stored bytes, codec or None if deduplicated, deduplicated)."""
        cid = envelope.chunk_id(raw, self.keyring)
        hex_id = cid.hex()
        # A chunk repeated within the file (zeroed or tied tensors) is stored by the first
        # worker to reach it; the others wait for that and then find it stored, so it is
        # uploaded and counted once.
        with self._lock:
            first = self._storing.get(hex_id)
            if first is None:
                self._storing[hex_id] = threading.Event()
        if first is not None:
            first.wait()
            return self._store(cid, hex_id, raw, codec)
        try:
            return self._store(cid, hex_id, raw, codec)
        finally:
            with self._lock:  # (gone once set: a later repeat finds the chunk stored; an entry
                self._storing.pop(hex_id).set()  # per chunk of a 1 TiB file was ~0.3 GB)

    def _store(self, cid: bytes, hex_id: str, raw, codec: str | None) -> tuple[bytes, int, int | None, bool]:
        if self.lapsed:
            raise ShardfsError(LAPSED)
        deadline = time.monotonic() + GC_WAIT
        while (state := self.idx.lease_chunk(self.put_id, hex_id, LEASE_TTL)) == "deleting":
            if time.monotonic() > deadline:
                raise ShardfsError(f"chunk {hex_id[:16]} is stuck in garbage collection (a gc stopped part-way, "
                                   f"or one a node did not answer, leaves the chunks it claimed until the "
                                   f"next gc): run `shardfs gc`, then put again")
            time.sleep(0.2)
        have = set()
        if state == "ok":
            listed = [n for n in self.idx.locations(hex_id) if n in self.live and n not in self.failed]
            # Dedup checks that the copies the index lists are there: one deleted behind the
            # index's back is stored again, not trusted (a stat on a file node, a HEAD on HTTP)
            have = {n for n in listed if self._holds(n, hex_id)}
            if len(have) >= self.replicas:
                with self._lock:
                    self.used |= have
                return cid, 0, None, True
        _, blob, codec = envelope.encode(raw, codec, cid=cid, keyring=self.keyring, aligned=True)
        errors, failed_here = [], set()
        for nid in rank(hex_id, self.live):
            if len(have) >= self.replicas:
                break
            if nid in have or nid in self.failed:
                continue
            if not self.idx.add_locations(hex_id, [nid]):  # before the upload: gc can always find it
                raise ShardfsError(LAPSED)  # (gc took the chunk: only an unleased one can go)
            try:
                self.pool.store(nid).put(hex_id, blob)
                if not self.idx.listed(hex_id, nid):  # gc took the chunk while it was being stored
                    self._take_back(hex_id, nid)  # (this put paused past its lease)
                    raise ShardfsError(LAPSED)
                have.add(nid)
            except NodeError as e:
                # (unless another running put leases the chunk: it may have stored it there;
                # and kept if the node may have stored it before its answer was lost: gc
                # finds a copy only through its listing, and verify drops a missing one)
                if not e.unsure:
                    self.idx.drop_unleased(hex_id, nid, self.put_id)
                with self._lock:  # workers run in parallel: say it once per node, one whole line
                    if nid not in self.failed:
                        self.failed[nid] = str(e)
                        sys.stderr.write(f"shardfs: warning: skipping node {nid} for the rest of this put: {e}\n")
                errors.append(str(e))
                failed_here.add(nid)
        if len(have) < self.replicas:
            with self._lock:  # nodes given up on earlier in this put are the reason too
                errors += [f"node {nid} failed earlier in this put: {why}" for nid, why in self.failed.items()
                           if nid not in failed_here]
            raise NoNodes(f"could not store chunk {hex_id[:16]} on {self.replicas} nodes "
                          f"(stored on {len(have)}): " + "; ".join(errors or ["not enough live nodes"]))
        with self._lock:
            self.used |= have
        self.idx.record_chunk(hex_id, len(raw), len(blob), codec, [])
        return cid, len(blob), codec, False

    def _take_back(self, hex_id: str, nid: str) -> None:
        """Delete a copy just stored of a chunk gc has taken meanwhile: no record leads gc
        to it any more (Index.mark_orphan). Left in place if another put owns it now, or
        if the node or Redis fails here."""
        try:
            if self.idx.mark_orphan(hex_id):
                try:
                    self.pool.store(nid).delete(hex_id)
                finally:
                    self.idx.unmark_orphan(hex_id)
        except (NodeError, redis.RedisError):
            pass

    def _holds(self, nid: str, hex_id: str) -> bool:
        """Whether node nid still has a chunk the index lists there. A node that cannot tell
        (a disk not mounted under its directory?) is skipped for the rest of the put, as a
        failed one is: writing there could hide chunks under a mountpoint."""
        try:
            if self.pool.store(nid).has(hex_id):
                return True
        except NodeError as e:
            with self._lock:
                if nid not in self.failed:
                    self.failed[nid] = str(e)
                    sys.stderr.write(f"shardfs: warning: skipping node {nid} for the rest of this put: {e}\n")
            return False
        with self._lock:
            if nid not in self.lacking:
                self.lacking.add(nid)
                sys.stderr.write(f"shardfs: warning: node {nid} lacks chunks the index lists there (deleted "
                                 "behind its back?); this put stores them again (`shardfs verify` checks "
                                 "every model)\n")
        return False


@dataclass
class Stored:
    """A file whose chunks are all on their nodes, ready to publish under `name`."""
    name: str
    manifest: Manifest
    size: int
    sha256: str
    chunk_size: int
    stats: dict
    result: PutResult  # vid 0 until published


class PutSession:
    """One put: its nodes, its lease on the chunks it stores, and its publish.

    A folder put stores every file under one lease and then publishes them all, and
    removes what the new folder no longer has, in one MULTI/EXEC (Index.publish_all): a
    put that fails part-way publishes nothing, never a folder of old and new files."""

    def __init__(self, idx: Index, *, replicas: int | None = None, default_node_url: str | None = None,
                 keyring=None):
        self.idx, self.keyring = idx, keyring
        nodes = idx.nodes()
        # the embedded default node, when it is (or is about to be) used: recreate its
        # directory if it is gone; other setups never get one made
        if default_node_url and (not nodes or any(n.url == default_node_url for n in nodes.values())):
            why = init_root(default_node_url[len("file://"):], adopt=not nodes)
            if why:
                raise UsageError(f"cannot make the local node directory {default_node_url[len('file://'):]}: {why}")
        if not nodes and default_node_url:
            node = idx.add_node(default_node_url)
            print(f"shardfs: no nodes registered; using local node {node.id} {node.url}", file=sys.stderr)
            nodes = idx.nodes()
        if not nodes:
            raise NoNodes("no nodes registered; add one with `shardfs node add URL`")
        self.pool = NodePool(nodes)
        try:
            live = live_nodes(self.pool)
            self.replicas = replicas if replicas is not None else min(2, len(live))
            if self.replicas < 1:
                raise UsageError("--replicas must be at least 1")
            if self.replicas > len(live):
                raise NoNodes(f"{self.replicas} replicas asked for but only {len(live)} live node(s)")
            self.put_id = uuid.uuid4().hex
            idx.start_put(self.put_id, LEASE_TTL)
        except BaseException:
            self.pool.close()
            raise
        self.uploader = Uploader(idx, self.pool, live, self.replicas, self.put_id, keyring)
        self._stop = threading.Event()
        threading.Thread(target=self._heartbeat, daemon=True).start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(LEASE_TTL / 3):
            try:
                if not self.idx.renew_put(self.put_id, LEASE_TTL):
                    self.uploader.lapsed = True  # gc ended this put: stop uploading for nothing
                    return
            except Exception:  # noqa: BLE001 - a Redis blip: retry; publish checks the lease is live
                continue

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_) -> None:
        self._stop.set()
        try:
            self.idx.end_put(self.put_id)  # (unpublished chunks are left for gc)
        except redis.RedisError as e:  # (not in place of what the put did, or why it failed)
            if exc_type is not None and issubclass(exc_type, redis.RedisError):
                return  # (the put failed on Redis: its one error line says so)
            print(f"shardfs: warning: could not end this put's lease (Redis: {e}); it lapses within "
                  f"{LEASE_TTL:g} s", file=sys.stderr)
        finally:
            self.pool.close()

    def store(self, src, name: str, chunk_size: int, progress: bool | None) -> Stored:
        """Store an open file's chunks on their nodes; nothing is published yet."""
        size = os.fstat(src.fileno()).st_size
        return _ingest(self, src, size, name, chunk_size, progress)

    def publish(self, stored: list[Stored], force: bool, remove=()) -> list[PutResult]:
        """Publish every stored file, and remove the models named in `remove`, at once."""
        with signals_held():
            publishing[:] = [s.name for s in stored]
            try:
                vids = self.idx.publish_all(
                    [(s.name, s.manifest, s.size, s.sha256, s.chunk_size, self.replicas, s.stats) for s in stored],
                    force, put_id=self.put_id, lease_margin=LEASE_TTL / 3, remove=remove, nodes=self.uploader.used)
            except redis.RedisError:
                raise  # (publishing stays set: the error line says the outcome is not known)
            except BaseException:
                publishing.clear()  # (refused: a name taken, a lapsed lease; nothing applied)
                raise
            publishing.clear()
            for s, vid in zip(stored, vids):
                s.result.vid = vid
                published.append(s.result)
        return [s.result for s in stored]


def put_file(idx: Index, path: str, name: str, *, replicas: int | None = None,
             chunk_size: int = DEFAULT_CHUNK, force: bool = False, progress: bool | None = None,
             default_node_url: str | None = None, keyring=None) -> PutResult:
    check_name(name)
    check_chunk_size(chunk_size)
    with open_source(path) as src:
        if idx.current_vid(name) is not None and not force:
            raise UsageError(f"model {name!r} already exists; use --force to replace it")
        conflict = idx.path_conflict(name)  # (checked again at publish: this saves the upload)
        if conflict:
            raise UsageError(conflict)
        with PutSession(idx, replicas=replicas, default_node_url=default_node_url, keyring=keyring) as put:
            return put.publish([put.store(src, name, chunk_size, progress)], force)[0]


def _changed(before: os.stat_result, after: os.stat_result) -> bool:
    """Whether a file was written to between two fstats (same size included: a rewrite in place
    would publish a mix of old and new bytes whose own hash matches)."""
    return (before.st_size, before.st_mtime_ns, before.st_ctime_ns) != (after.st_size, after.st_mtime_ns,
                                                                       after.st_ctime_ns)


def _ingest(put: PutSession, src, size, name, chunk_size, progress) -> Stored:
    t0 = time.monotonic()
    before = os.fstat(src.fileno())
    idx, uploader, keyring = put.idx, put.uploader, put.keyring
    sha = keyring.file_hash() if keyring else hashlib.sha256()  # (crypto.py: keyed for sealed models)
    # Each worker spends much of a chunk's time waiting on fsync and Redis, so more workers
    # than cores keep the CPUs busy (2 cores, 4 MiB chunks: 4 workers 5.6-6.8 s for 2 GiB,
    # 16 workers 5.0 s). The raw chunks read ahead (workers + 2) stay under INFLIGHT_BYTES
    # down to 2 workers (24 MiB chunks); larger chunks take 4 x chunk, plus encode buffers.
    workers = max(2, min(max(16, 2 * (os.cpu_count() or 2)), INFLIGHT_BYTES // chunk_size - 2))
    inflight = threading.Semaphore(workers + 2)
    bar = _progress(size, name, progress)
    # Futures in submission order; each is replaced by its small result as soon as it and
    # those before it are done, so memory does not grow with the number of chunks (a Future
    # per chunk of a 1 TiB file was ~0.5 GB).
    futures: deque = deque()
    results = []
    failed = threading.Event()

    # Read buffers are recycled: a fresh 4 MiB bytearray per chunk is zero-filled and
    # faulted in page by page, which was ~10% of put's CPU on these VMs.
    spare: queue.SimpleQueue = queue.SimpleQueue()

    def job(buf, raw, codec):
        try:
            return uploader.store(raw, codec)
        except BaseException:
            failed.set()
            raise
        finally:
            if len(buf) == chunk_size:
                spare.put(buf)
            inflight.release()

    ex = ThreadPoolExecutor(workers, thread_name_prefix="put")
    try:
        spans = _read(src, plan_spans, src, size, chunk_size)  # reads the safetensors header
        for span in spans:
            off, length = span.offset, span.length
            inflight.acquire()
            if length <= chunk_size:
                try:
                    buf = spare.get_nowait()
                except queue.Empty:
                    buf = bytearray(chunk_size)
            else:
                buf = bytearray(length)  # a header chunk can exceed the chunk size
            raw = memoryview(buf)[:length]
            got = _read(src, read_full, src, raw)
            if got != length:
                raise ShardfsError(f"{src.name} changed size while reading (short read at {off}); nothing was "
                                   "published (`shardfs gc` reclaims the chunks stored so far)")
            sha.update(raw)
            futures.append(ex.submit(job, buf, raw, span.codec))
            # (and wait for the oldest once many are queued behind it: one slow store let every
            # later chunk's Future pile up, the whole file's at once)
            while futures and (futures[0].done() or len(futures) >= 4 * workers):
                results.append(futures.popleft().result())  # (a failed store raises here)
            if failed.is_set():
                break
            if bar:
                bar.update(length)
        if failed.is_set():  # the first failure, not the wait for the stores before it
            wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:
                if f.done() and f.exception():
                    raise f.exception()
        while futures:
            results.append(futures.popleft().result())
        if _read(src, src.read, 1):
            if not size:  # (a /proc or /sys file says 0 bytes and then reads as text)
                raise ShardfsError(f"{src.name} reports a size of 0 but has data (a /proc or /sys file?); "
                                   "copy it to a regular file and put that")
            raise ShardfsError(f"{src.name} grew while reading; nothing was published (`shardfs gc` reclaims the "
                               "chunks stored so far): put it again when it is complete")
        if _changed(before, os.fstat(src.fileno())):
            raise ShardfsError(f"{src.name} was written to while being put; nothing was published (`shardfs gc` "
                               "reclaims the chunks stored so far): put it again when it is complete")
        manifest = Manifest.build((cid, span.length) for (cid, *_), span in zip(results, spans))
        by_dtype: dict[str, list[int]] = {}
        for (_, stored, _, _), span in zip(results, spans):
            if stored:  # per dtype: raw and stored bytes of the chunks this put stored
                d = by_dtype.setdefault(span.dtype or "unknown", [0, 0])
                d[0] += span.length
                d[1] += stored
        codecs = Counter(envelope.CODEC_NAMES[c] for _, _, c, _ in results if c is not None)
        stored_new = sum(s for _, s, _, _ in results)
        deduped = sum(1 for *_, d in results if d)
        stats = {"raw": size, "stored_new": stored_new, "codecs": dict(codecs), "deduped_chunks": deduped,
                 "key": keyring.fingerprint if keyring else None,
                 "file_hash": "hmac-sha256" if keyring else "sha256",
                 "dtypes": {k: {"raw": r, "stored": s} for k, (r, s) in sorted(by_dtype.items())},
                 "stored": _stored_total(idx, manifest)}
    except BaseException:
        for f in futures:
            f.cancel()
        raise
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
        if bar:
            bar.close()
    result = PutResult(0, name, size, stored_new, len(manifest), deduped, put.replicas,
                       time.monotonic() - t0, codecs)
    return Stored(name, manifest, size, sha.hexdigest(), chunk_size, stats, result)


def read_full(src, view) -> int:
    """Bytes read into view: until it is full or the file ends. (One readinto may return
    less without the file ending: network and FUSE filesystems do.)"""
    got = 0
    while got < len(view):
        n = src.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _read(src, fn, *args):
    """A read of the source file; an I/O error becomes one clear ShardfsError."""
    try:
        return fn(*args)
    except OSError as e:
        raise ShardfsError(f"{src.name}: read failed: {e.strerror or e}") from None


def _stored_total(idx: Index, manifest: Manifest) -> int:
    """Stored (compressed) bytes of one copy of the model's unique chunks."""
    return idx.stored_bytes(set(manifest.ids))


def _progress(total: int, name: str, enabled: bool | None):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"put {name}",
                file=sys.stderr, dynamic_ncols=True)


def summary(res: PutResult) -> str:
    rate = res.size / res.seconds if res.seconds > 0 else 0
    ratio = res.stored_new / res.size if res.size else 0
    return (f"put {res.name} version {res.vid}: {human(res.size)} in {res.chunks} chunks "
            f"({res.deduped} already stored), {human(res.stored_new)} new stored bytes per replica "
            f"(ratio {ratio:.3f}), R={res.replicas}, {res.seconds:.1f}s, {human(rate)}/s")
