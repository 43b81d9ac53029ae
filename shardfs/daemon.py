"""The mount daemon: wires the index, the tree, the reader and the control socket to pyfuse3.

Redis is only asked in worker threads with short timeouts, and never on the read path:
opening a model loads its manifest and chunk locations once and keeps them in memory and
as a local snapshot (<cache>/snapshots), so open files keep reading and known models stay
listed and openable while Redis is away. A poll loop notices new, replaced and removed
models (the index's epoch counter) within POLL seconds.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import signal
import socket
import time
from dataclasses import dataclass

import pyfuse3
import trio

from .cache import ChunkCache
from .errors import ChunkUnavailable, CorruptChunk, IndexUnavailable, KeyMismatch, NotFound, ShardfsError
from .index import Index, k_version, lease_holder
from .manifest import Manifest
from .pool import NodePool
from .reader import OpenModel, Reader
from .vfs import FileEntry, IdentityConflict, Tree

log = logging.getLogger("shardfs.daemon")

POLL = 2.0
# A version open in this mount is leased in the index, so `gc` keeps it (and its chunks)
# even after it was replaced; renewed every POLL while open, lapses this long after close.
READ_LEASE_TTL = float(os.environ.get("SHARDFS_READ_LEASE_TTL", "120"))
# An open that renews a read lease waits on Redis this long at most (a hung Redis would cost
# every such open the client's whole socket timeout and connect); the renewal goes on in
# its thread, and the open goes on as with Redis away.
LEASE_WAIT = 1.0


@dataclass
class MountConfig:
    mountpoint: str
    cache_dir: str
    cache_size: int
    read_ahead: int = 64 << 20
    mem_limit: int = 128 << 20
    allow_other: bool = False
    control_path: str = ""
    notify_store: bool = True
    prefetch: bool = True
    cache_local_nodes: bool = False  # reads also cache chunks of nodes on the cache's filesystem
    keyring: object = None  # crypto.Keyring for encrypted models, or None


def sd_notify(message: str) -> None:
    """Tell systemd (if it started us with NOTIFY_SOCKET) about our state."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as e:  # (a socket inherited from elsewhere, e.g. in a container: the mount goes on)
        log.warning("cannot tell systemd %r at NOTIFY_SOCKET=%s: %s", message.split("\n")[0], addr, e)


class Daemon:
    def __init__(self, cfg: MountConfig, index_factory):
        self.cfg = cfg
        self.index_factory = index_factory  # () -> Index; called in threads
        self.idx: Index | None = None
        self.uid, self.gid = os.getuid(), os.getgid()
        self.tree = Tree()
        self.control_path = cfg.control_path
        self._lock_file = _lock_cache_dir(cfg.cache_dir)
        if self._lock_file is None:
            raise ShardfsError(f"cache directory {cfg.cache_dir} is used by another shardfs mount; "
                               f"give this one its own --cache-dir")
        self._lock_lost = False
        self.snap_dir = os.path.join(cfg.cache_dir, "snapshots")
        os.makedirs(self.snap_dir, exist_ok=True)
        self.cache = ChunkCache(os.path.join(cfg.cache_dir, "data"), cfg.cache_size)
        self.pool = NodePool({})
        self.reader = Reader(self.pool, self.cache, mem_limit=cfg.mem_limit, readahead_max=cfg.read_ahead,
                             refresh_locs=self._refresh_locs,
                             notify=self._notify_store if cfg.notify_store else None,
                             cache_local_nodes=cfg.cache_local_nodes)
        self.models: dict[int, OpenModel] = {}
        self.open_count: dict[int, int] = {}
        self.epoch = None
        self.redis_ok = True
        self.index_conflict: str | None = None  # set once the index is found reset under the mount
        self._changed: set[str] = set()  # names whose version changed, for follow_pins
        # held by follow_pins and by the control socket's pin and unpin: an unpin while
        # follow_pins opened the new version was undone by it, and a pin that opened the old
        # version while follow_pins passed the name by (not pinned yet) stayed on the old one
        self.pin_lock = trio.Lock()
        self._pin_stuck: dict[str, tuple] = {}  # name -> (version, error) already warned about
        self._model_locks: dict[int, trio.Lock] = {}
        self.holder = lease_holder()  # for read leases
        self._leased: dict[int, float] = {}  # version -> when (monotonic) its lease was last taken
        self.polls = 0  # index polls done (cache stats: what "a few polls later" can wait on)
        self._stale_snapshots: list[int] = []
        self._bad_records: set[str] = set()  # malformed version records already logged
        self._prefetching: dict[int, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None

    # -- header-driven prefetch --------------------------------------------------------

    def opened(self, m: OpenModel) -> None:
        self.open_count[m.vid] = self.open_count.get(m.vid, 0) + 1
        if self.cfg.prefetch and self._nursery is not None and m.vid not in self._prefetching \
                and m.name.endswith((".safetensors", ".gguf")):
            scope = self._prefetching[m.vid] = trio.CancelScope()
            self._nursery.start_soon(self._prefetch, m, scope)

    def closed(self, m: OpenModel) -> None:
        self.open_count[m.vid] -= 1
        if self.open_count[m.vid] == 0:
            m.forget_pieces()  # only a help while the file is being loaded
            self.stop_prefetch(m)

    async def _prefetch(self, m: OpenModel, scope: trio.CancelScope) -> None:
        with scope:
            try:
                await self.reader.prefetch(m)
            except (ChunkUnavailable, CorruptChunk):
                pass
            except Exception:  # a bug in prefetch must not end the mount
                log.exception("prefetch of %s failed", m.name)
        if self._prefetching.get(m.vid) is scope:
            del self._prefetching[m.vid]

    # -- index -----------------------------------------------------------------------

    def _index(self) -> Index:
        if self.idx is None:
            self.idx = self.index_factory()
        return self.idx

    def load_catalogue(self, force: bool = False) -> bool:
        """Refresh nodes and the model list if the epoch or the index id moved (at start-up,
        before trio runs). True if changed."""
        fetched = self.fetch_catalogue(force)
        changed = self.apply_catalogue(fetched)
        if changed:
            self._save_catalogue(*fetched[1:], self._kept_snapshots())
        return changed

    def fetch_catalogue(self, force: bool = False):
        """Worker thread: (epoch, nodes, models) from the index if the epoch or the index id
        moved since the last one applied, else None. The tree is the trio thread's: handlers
        read it between awaits, so only apply_catalogue changes it."""
        idx = self._index()
        epoch = idx.state()
        if epoch == self.epoch and not force:
            return None
        nodes = idx.nodes()
        models = idx.models()
        bad = []
        vers = idx.versions(list(models.values()), bad)
        for e in bad:  # one damaged record must not hide every later change
            if str(e) not in self._bad_records:
                self._bad_records.add(str(e))
                log.error("%s; that model is left out of the mount", e)
        return epoch, nodes, {v.name: (v.vid, v.size, v.created, v.sha256) for v in vers}

    def apply_catalogue(self, fetched) -> bool:
        """Trio thread (or before trio runs): show a fetched catalogue. True if it changed."""
        if fetched is None:
            return False
        epoch, nodes, cat = fetched
        was = self.epoch[1] if self.epoch else None
        self.epoch = epoch
        if self.index_conflict is not None:
            return False  # (it takes no more updates: see _conflict)
        if was is not None and epoch[1] != was:  # (FLUSHALL, another Redis, a backup of another index)
            self._conflict(f"the index's id is {epoch[1] or 'gone (the index was emptied)'}, not {was} as "
                           f"when this mount read it")
            return False
        if not self._apply(cat):
            return False
        self.pool.update(nodes)
        return True

    def _apply(self, cat) -> bool:
        """Show this catalogue; False (and the tree unchanged) if it conflicts with it."""
        try:
            changed = self.tree.update(cat)
        except IdentityConflict as e:
            self._conflict(str(e))
            return False
        if changed:
            log.info("catalogue: %d model(s), %d changed", len(cat), len(changed))
            self._changed |= changed
        return True

    def _conflict(self, why: str) -> None:
        if self.index_conflict is None:
            log.error("the Redis index was reset or restored under this mount: %s. Its version ids "
                      "start over, so this mount keeps showing the models it had (never another "
                      "version's bytes) and takes no more updates; remount to see the index as it is", why)
        self.index_conflict = why

    async def follow_pins(self) -> None:
        """Trio thread: a pin is of a name, so it moves to the name's new version (whose
        chunks LRU must then leave alone, and the old one's no longer); a removed name's
        pin goes with it."""
        async with self.pin_lock:
            await self._follow_pins()

    async def _follow_pins(self) -> None:
        changed, self._changed = self._changed, set()
        for name in sorted(changed & set(self.cache.pins())):
            entry = self.tree.current.get(name)
            try:
                if entry is None:
                    await trio.to_thread.run_sync(self.cache.unpin, name, abandon_on_cancel=False)
                    log.info("unpinned %s: it was removed", name)
                    self._pin_stuck.pop(name, None)
                    continue
                m = await self.open_model(entry)
                await trio.to_thread.run_sync(self.cache.pin, name, m.hexes, abandon_on_cancel=False)
            except (ShardfsError, OSError) as e:
                self._changed.add(name)  # try again at the next poll
                # once per version and reason: a version under another key fails every poll
                why = (entry and entry.vid, str(e))
                (log.debug if self._pin_stuck.get(name) == why else log.warning)(
                    "cannot %s yet: %s", f"unpin {name} (removed)" if entry is None
                    else f"move the pin of {name} to its current version", e)
                self._pin_stuck[name] = why
                continue
            self._pin_stuck.pop(name, None)
            log.info("the pin of %s moved to its version %d; `shardfs cache warm %s` fetches it",
                     name, entry.vid, name)

    def _kept_snapshots(self) -> set[int]:
        """Trio thread: the versions whose snapshots are worth keeping: current, or open here."""
        return {e.vid for e in self.tree.current.values()} | set(self.models) | set(self._model_locks)

    def _save_catalogue(self, nodes, cat, keep: set[int]) -> None:
        """Worker thread: save the catalogue; delete the snapshots of other versions (replaced
        while this mount was down, too: nothing else would)."""
        data = {"nodes": {k: vars(v) for k, v in nodes.items()}, "models": cat}
        _write_json(os.path.join(self.snap_dir, "catalogue.json"), data)
        try:
            names = os.listdir(self.snap_dir)
        except OSError:
            return
        for name in names:
            stem = name[:-len(".json")]
            if name.endswith(".json") and stem.isdigit() and int(stem) not in keep:
                try:
                    os.unlink(os.path.join(self.snap_dir, name))
                except OSError:
                    pass

    def load_saved_catalogue(self) -> bool:
        try:
            with open(os.path.join(self.snap_dir, "catalogue.json")) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return False
        from .index import Node
        self.pool.update({k: Node(**v) for k, v in data["nodes"].items()})
        self._apply({k: tuple(v) for k, v in data["models"].items()})
        return True

    def _refresh_locs(self, hex_id: str) -> list[str]:
        if not self.redis_ok:
            return []  # (a hung Redis would hold this read for the client's timeout per chunk)
        try:
            self.pool.update(self._index().nodes())
            return self._index().locations(hex_id)
        except Exception as e:  # noqa: BLE001 - Redis away: keep the locations we have
            log.debug("cannot refresh locations of %s: %s", hex_id, e)
            return []

    async def poll_loop(self) -> None:
        while True:
            await trio.sleep(POLL)
            try:
                reading = [vid for vid, n in self.open_count.items() if n > 0]
                stale, self._stale_snapshots = self._stale_snapshots, []
                fetched = await trio.to_thread.run_sync(self._poll_index, reading, stale, abandon_on_cancel=True)
                if self.apply_catalogue(fetched):
                    await trio.to_thread.run_sync(self._save_catalogue, *fetched[1:], self._kept_snapshots(),
                                                  abandon_on_cancel=False)
                await self.follow_pins()
                if not self.redis_ok:
                    log.warning("Redis at %s is back", self._index().url)
                self.redis_ok = True
            except Exception as e:  # noqa: BLE001 - any index failure: keep serving the snapshot
                if self.redis_ok:
                    log.warning("index unavailable (%s); serving the last known models", e)
                self.redis_ok = False
                self.idx = None if isinstance(e, IndexUnavailable) else self.idx
            self._stale_snapshots += self.forget_unused()
            self.polls += 1

    def forget_unused(self) -> list[int]:
        """Trio thread: drop the in-memory state of versions neither current nor open (a
        long-running mount would otherwise keep the manifest of every version it ever
        opened: megabytes per large model). Returns their ids; the next poll deletes their
        snapshots. Opening one again (an old inode the kernel still knows) reloads it."""
        current = {e.vid for e in self.tree.current.values()}
        gone = [vid for vid in self.models
                if vid not in current and not self.open_count.get(vid) and vid not in self._prefetching]
        for vid in gone:
            del self.models[vid]
            self.open_count.pop(vid, None)
            self._leased.pop(vid, None)
            self._model_locks.pop(vid, None)
        return gone

    def _check_lock(self) -> None:
        """Worker thread: the cache directory deleted (or replaced) under the mount takes its
        lock file along, and a second mount could then lock the new one: lock it again."""
        path = os.path.join(self.cfg.cache_dir, ".lock")
        try:
            held, there = os.fstat(self._lock_file.fileno()), os.stat(path)
            if (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino):
                return
        except OSError:
            pass
        try:
            new = _lock_cache_dir(self.cfg.cache_dir)
            why = "another mount now uses it: unmount one of them"
            if new is not None:
                os.makedirs(self.snap_dir, mode=0o700, exist_ok=True)
        except OSError as e:  # (not the index's failure: the poll goes on)
            new, why = None, f"it cannot be made again: {e.strerror or e}"
        if new is None:
            if not self._lock_lost:
                log.error("cache directory %s was removed or replaced under this mount; %s", self.cfg.cache_dir, why)
            self._lock_lost = True
            return
        self._lock_file.close()
        self._lock_file, self._lock_lost = new, False
        log.warning("cache directory %s was removed or replaced under this mount; made it again (its "
                    "entries and snapshots went with it; the pins are written to it again)", self.cfg.cache_dir)
        self.cache.lost()

    def _poll_index(self, reading: list[int], stale: list[int]):
        """Worker thread: delete the snapshots of forgotten versions, renew the leases of the
        versions open here, fetch the catalogue if it changed (fetch_catalogue)."""
        self._check_lock()
        for vid in stale:
            if vid in self.models:
                continue  # opened again meanwhile
            try:
                os.unlink(self._snap_path(vid))
            except OSError:
                pass
        if reading:
            self._lease(self._index(), reading)
        return self.fetch_catalogue()

    # -- models ----------------------------------------------------------------------

    async def cached_bytes_of(self, entries: list[FileEntry]) -> dict[int, tuple[int, int]]:
        """(bytes in the disk cache, bytes in all) of each version's distinct chunks
        (ChunkCache.cached_of; `cache stats`), without opening
        the versions: a version not open here costs a look at its manifest, in batches, and
        nothing is kept (opening every model of a large catalogue would keep every manifest
        and location table in memory, and write a snapshot of each). Versions whose manifest
        cannot be had (Redis down, not opened before) are left out."""
        out, todo = {}, []
        for e in entries:
            m = self.models.get(e.vid)
            if m is not None:
                out[e.vid] = self.cache.cached_of(m.hexes, m.manifest.lengths)
            else:
                todo.append(e.vid)

        def look(vids):
            got = {}
            for ver in self._index().versions(vids):
                try:
                    got[ver.vid] = self.cache.cached_of([c.hex() for c in ver.manifest.ids], ver.manifest.lengths)
                except ShardfsError:
                    pass  # a damaged record: opening it says so
            return got

        for at in range(0, len(todo) if self.redis_ok else 0, 64):
            try:
                out.update(await trio.to_thread.run_sync(look, todo[at:at + 64], abandon_on_cancel=True))
            except Exception:  # noqa: BLE001 - the index is away: what is open here is all we know
                break
        return out

    async def open_model(self, entry: FileEntry) -> OpenModel:
        m = self.models.get(entry.vid)
        if m is not None:
            if self.redis_ok and time.monotonic() - self._leased.get(entry.vid, -math.inf) > READ_LEASE_TTL / 2:
                # loaded long ago, closed since: its lease may have lapsed, and the poll renews
                # it only later (up to POLL s): a gc meanwhile would drop it under this reader
                with trio.move_on_after(LEASE_WAIT):
                    await trio.to_thread.run_sync(self._lease_again, entry, abandon_on_cancel=True)
                    return m
                log.info("Redis did not answer in %g s to renew the read lease of %s; opening it "
                         "without waiting further", LEASE_WAIT, entry.name)
                self._lease_later(entry.vid)
            return m
        lock = self._model_locks.setdefault(entry.vid, trio.Lock())
        try:
            async with lock:
                m = self.models.get(entry.vid)
                if m is None:
                    m = await trio.to_thread.run_sync(self._load_model, entry, abandon_on_cancel=True)
                    self.models[entry.vid] = m
        finally:  # a load that failed leaves no lock behind (forget_unused drops the others)
            if entry.vid not in self.models and not lock.locked() and self._model_locks.get(entry.vid) is lock:
                del self._model_locks[entry.vid]
        return m

    def _lease(self, idx: Index, vids: list[int]) -> None:
        """Worker thread: lease these versions for READ_LEASE_TTL, and note when."""
        now = time.monotonic()
        idx.lease_versions(self.holder, vids, READ_LEASE_TTL)
        self._leased.update(dict.fromkeys(vids, now))

    def _lease_again(self, entry: FileEntry) -> None:
        """Worker thread: lease a loaded version again before it is opened; NotFound if gc
        dropped it meanwhile. With Redis away it goes on as the mount does then (no gc runs
        without Redis either)."""
        try:
            idx = self._index()
            self._lease(idx, [entry.vid])
            there = idx.r.exists(k_version(entry.vid))
        except Exception as e:  # noqa: BLE001 - the index is away: serve what is loaded
            log.debug("cannot lease %s (version %d) again: %s", entry.name, entry.vid, e)
            self._lease_later(entry.vid)
            return
        if not there:
            raise NotFound(f"{entry.name} (version {entry.vid}) was replaced and gc has dropped it")

    def _lease_later(self, vid: int) -> None:
        """An open could not renew vid's lease: the next open asks again only after a poll
        (a hung Redis must not cost every open its wait, nor pile up renewal threads)."""
        self._leased[vid] = max(self._leased.get(vid, -math.inf), time.monotonic() - READ_LEASE_TTL / 2 + POLL)

    def _snap_path(self, vid: int) -> str:
        return os.path.join(self.snap_dir, f"{vid}.json")

    def _load_model(self, entry: FileEntry) -> OpenModel:
        """Worker thread: manifest + locations from Redis, else from the local snapshot."""
        try:
            if not self.redis_ok and os.path.exists(self._snap_path(entry.vid)):
                # (a hung Redis would cost this open the client's timeout before the snapshot)
                raise IndexUnavailable("Redis did not answer the last poll")
            idx = self._index()
            # leased before it is loaded: a gc that drops it first makes this load fail
            # (NotFound), one that comes later keeps it
            self._lease(idx, [entry.vid])
            ver = idx.version(entry.vid)
            if (ver.name, ver.size, ver.sha256, ver.created) != (entry.name, entry.size, entry.sha256, entry.created):
                raise IndexUnavailable(f"cannot load {entry.name} (version {entry.vid}): that version id "
                                       f"is {ver.name!r} in the index now (reset or restored under this "
                                       f"mount; remount to see it)")
            manifest = ver.manifest
            hexes = sorted({c.hex() for c in manifest.ids})
            infos = idx.chunk_info(hexes)
            locs = {h: (i["locs"] if i else []) for h, i in zip(hexes, infos)}
            key = ver.stats.get("key")
            _write_json(self._snap_path(entry.vid), {
                "vid": entry.vid, "name": entry.name, "size": ver.size, "sha256": ver.sha256, "key": key,
                "manifest": base64.b64encode(ver.manifest_blob).decode(), "locs": locs})
        except NotFound:
            raise
        except Exception as e:  # noqa: BLE001 - Redis away or record damaged: try the snapshot
            try:
                with open(self._snap_path(entry.vid)) as f:
                    snap = json.load(f)
            except (OSError, ValueError):
                raise IndexUnavailable(f"cannot load {entry.name} (version {entry.vid}): {e}") from None
            if (snap.get("name"), snap.get("size"), snap.get("sha256")) != (entry.name, entry.size, entry.sha256):
                raise IndexUnavailable(f"cannot load {entry.name} (version {entry.vid}): {e}; its local "
                                       f"snapshot is of another version") from None
            try:
                manifest = Manifest.decode(base64.b64decode(snap["manifest"]))
                locs, key = dict(snap["locs"]), snap.get("key")
            except (KeyError, TypeError, ValueError, CorruptChunk) as bad:
                raise IndexUnavailable(f"cannot load {entry.name} (version {entry.vid}): {e}; its local "
                                       f"snapshot is damaged ({bad})") from None
            log.info("loaded %s from its local snapshot (index: %s)", entry.name, e)
        if manifest.size != entry.size:
            raise IndexUnavailable(f"{entry.name}: manifest covers {manifest.size} bytes, "
                                   f"version says {entry.size}")
        kr = self.cfg.keyring
        if key and (kr is None or kr.fingerprint != key):
            raise KeyMismatch(f"{entry.name} is encrypted with key {key}; this mount has "
                              + (f"key {kr.fingerprint}" if kr else "no --key-file"))
        return OpenModel(entry.vid, entry.inode, entry.name, entry.size, entry.sha256, manifest, locs,
                         keyring=kr if key else None)

    def _notify_store(self, inode: int, offset: int, data: bytes) -> bool:
        try:
            pyfuse3.notify_store(inode, offset, data)
            return True
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EBADF):
                log.debug("notify_store(%d, %d) failed: %s", inode, offset, e)
            return False

    def entry_by_name(self, name: str) -> FileEntry:
        entry = self.tree.current.get(name)
        if entry is None:
            raise NotFound(f"no model named {name!r} in this mount")
        return entry

    def stop_prefetch(self, m: OpenModel) -> None:
        """Trio thread: cancel a running prefetch of m (it restarts at the next open)."""
        if m.vid in self._prefetching:
            self._prefetching.pop(m.vid).cancel()

    async def drop_kernel_pages(self, m: OpenModel) -> None:
        """After a model's chunks were evicted: stop its prefetch and drop the kernel's
        cached pages of it. The invalidation runs in a thread: the kernel may wait on pages
        locked by reads that only this trio thread answers."""
        self.stop_prefetch(m)
        m.kernel_dropped()
        await trio.to_thread.run_sync(self._invalidate, m)

    def _invalidate(self, m: OpenModel) -> None:
        try:
            pyfuse3.invalidate_inode(m.inode, attr_only=False)
        except OSError:
            pass  # the kernel does not know the inode: nothing cached


def _lock_cache_dir(cache_dir: str):
    """The cache directory's lock file, locked (made with the directory if need be), or None
    if another mount holds it."""
    os.makedirs(cache_dir, exist_ok=True)
    f = open(os.path.join(cache_dir, ".lock"), "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


_snapshot_failed = False  # said once: a mount that cannot write its snapshots loses its fallback


def _write_json(path: str, data) -> None:
    """Write a snapshot, readable by this account only: the catalogue holds node tokens."""
    global _snapshot_failed
    tmp = path + ".tmp"
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except FileNotFoundError:  # the directory was removed (with the cache): make it again
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)  # (a .tmp left by an older version may be 0644)
            json.dump(data, f)
        os.rename(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if not _snapshot_failed:
            log.warning("cannot write the snapshot %s (%s): while Redis is away, models not saved there "
                        "cannot be opened", path, e.strerror or e)
        _snapshot_failed = True
        return
    if _snapshot_failed:
        log.warning("snapshots are written again")
    _snapshot_failed = False


def raise_read_ahead(mountpoint: str, kb: int) -> str:
    """Raise the mount's bdi read_ahead_kb (root only). Returns what happened, for the log."""
    try:
        dev = os.stat(mountpoint).st_dev
    except OSError as e:
        return f"cannot stat mountpoint: {e}"
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
        return f"read_ahead_kb={kb}"
    except OSError as e:
        return f"read_ahead_kb unchanged ({path}: {e.strerror})"


async def run(daemon: Daemon, ready) -> None:
    """Serve until SIGTERM/SIGINT/SIGHUP or an unmount. `ready()` is called once mounted."""
    from .fuse_ops import ShardOps

    cfg = daemon.cfg
    ops = ShardOps(daemon)
    opts = {"fsname=shardfs", "subtype=shardfs", "ro", "default_permissions", "noatime"}
    if cfg.allow_other:
        opts.add("allow_other")
    # Signals are caught from before the mount exists: a SIGTERM in between would kill the
    # process with the kernel mount left behind, stale. (SIGHUP: the terminal of a
    # --foreground mount closed.)
    from .cli import stop_signals  # (SIGHUP unless ignored: `nohup shardfs mount --foreground`)
    with trio.open_signal_receiver(signal.SIGINT, *stop_signals()) as sigs:
        pyfuse3.init(ops, cfg.mountpoint, opts)
        try:
            await _serve(daemon, ready, sigs)
            with trio.move_on_after(5):
                await daemon.reader.idle()  # no notify_store thread may outlive the session
        finally:
            pyfuse3.close(unmount=True)
            log.info("unmounted %s", cfg.mountpoint)


async def _serve(daemon: Daemon, ready, sigs) -> None:
    from . import control
    cfg = daemon.cfg
    async with trio.open_nursery() as n:
        daemon.reader.attach(n)
        daemon._nursery = n

        async def fuse_main():
            await pyfuse3.main()  # returns when the kernel unmounts us (fusermount3 -u)
            n.cancel_scope.cancel()
        n.start_soon(fuse_main)
        n.start_soon(daemon.poll_loop)
        await n.start(control.serve, daemon)

        async def after_mount():
            how = await trio.to_thread.run_sync(raise_read_ahead, cfg.mountpoint, 1024)
            log.info("mounted %s (%s)", cfg.mountpoint, how)
            ready()
        n.start_soon(after_mount)
        async for sig in sigs:
            log.info("signal %d: unmounting", sig)
            sd_notify("STOPPING=1")
            break
        # Pushes under way end while FUSE is still served: the kernel can hold a push's
        # pages locked for a read only this loop answers, and a push blocked so at the close
        # would hold the session (and the process) for ever.
        daemon.reader.stop_pushing()
        with trio.move_on_after(5):
            await daemon.reader.idle()
        n.cancel_scope.cancel()
