"""The local chunk cache: verified, decompressed chunks as files named by their id.

    <dir>/chunks/<hex[:2]>/<hex>   one raw chunk
    <dir>/pins.json                pinned model names -> chunk ids

Content-addressed, so models that share chunks share cache entries. Bounded by bytes:
when usage passes the high watermark (or free disk falls below the floor), the least
recently used unpinned entries go until usage is under the low watermark. A fill first
makes room for itself within the limit and the floor (counting fills still being
written); when only pinned entries would be left and there is still no room, the chunk
is not cached (the cache is "full", and says why). LRU order survives restarts through
file mtimes, which hits refresh (at most once a minute).

Fills are atomic (tmp file + rename) but not fsynced: every entry is hashed against its
id when it is loaded, so an entry torn by a crash or damaged on disk is dropped and
fetched again, never served. The pins file is the exception: nothing could tell a torn
one from no pins, so it is fsynced before it replaces the last. A cache that cannot be written (full, read-only, gone)
only costs speed: `put` reports False once and readers are served from memory.

Thread-safe: the daemon calls it from worker threads; one lock guards the index.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict

from . import directio, envelope
from .errors import ShardfsError
from .stores import chunk_relpath, disk_id, fsync_dir
from .units import human

# read errors that say nothing about the entry: a miss this time, the entry stays
TRANSIENT = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EINTR}

log = logging.getLogger("shardfs.cache")

HIGH_WATER = 0.95
LOW_WATER = 0.85
TOUCH_EVERY = 60.0
FULL_LOG_EVERY = 60.0  # a cache that keeps filling up and making room says so at most this often


# why a fill found no room (ChunkCache.full), in words
FULL_WHY = {"disk": "its disk is down to the free floor", "limit": "pinned chunks take its whole limit",
            "chunk": "chunks are larger than its whole limit"}


class ChunkCache:
    def __init__(self, root: str, limit: int, free_floor: int | None = None, direct: bool = True):
        self.root = os.path.abspath(root)
        self.limit = limit
        os.makedirs(os.path.join(self.root, "chunks"), exist_ok=True)
        # Disk space left to others: 1 GiB, or 5% of a small filesystem (a 1 GiB floor on a
        # 2 GiB cache disk would leave the cache no room at all)
        self.free_floor = free_floor if free_floor is not None else default_free_floor(self.root)
        self._lock = threading.Lock()
        self._pins_lock = threading.Lock()  # one pins.json writer at a time (_change_pins)
        self._lru: OrderedDict[str, int] = OrderedDict()  # hex -> size, oldest first
        self._touched: dict[str, float] = {}
        self._pins: dict[str, list[str]] = {}
        self._pinned: set[str] = set()
        self.used = 0
        self._pinned_used = 0  # bytes of indexed entries that are pinned (what eviction cannot free)
        self._pinned_count = 0
        self.hits = self.misses = self.evictions = self.corrupt = 0
        self.write_failed = False
        self._reserved = 0  # bytes of fills being written (admitted by _make_room)
        # why the last fill found no room, even counting every unpinned entry: "limit" (pinned
        # entries fill it), "chunk" (the chunk is larger than the whole limit) or "disk" (its
        # disk is at the free floor); "" while fills fit
        self.full = ""
        self._said_full, self._full_said_at = False, -FULL_LOG_EVERY
        # Fill and load entries with O_DIRECT where the filesystem allows it (directio.py):
        # the chunk is in the mounted file's page cache already, so a second cached copy
        # only costs a memcpy per byte (~1/5 of a cold read's CPU, measured) and memory.
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.disk = disk_id(self.root)  # which filesystem it is on (Reader: nodes on the same one)
        self._scan()
        self._load_pins()
        if self.used > self.limit:  # (started with a smaller limit than the entries take)
            self._maybe_evict()

    # -- startup ---------------------------------------------------------------------

    def _scan(self) -> None:
        for name, size in self._entries_on_disk():
            self._lru[name] = size
            self.used += size

    def _entries_on_disk(self, tidy: bool = True) -> list[tuple[str, int]]:
        """(hex, size) of each entry on disk, least recently used first; with `tidy`, removes
        the tmp files of fills a killed daemon left."""
        entries = []
        base = os.path.join(self.root, "chunks")
        for d in os.listdir(base):
            sub = os.path.join(base, d)
            if not os.path.isdir(sub):
                continue
            for name in os.listdir(sub):
                path = os.path.join(sub, name)
                if name.startswith(".tmp-"):  # left by a killed daemon: never complete
                    if tidy:
                        _unlink(path)
                    continue
                if not envelope_id_ok(name):
                    continue
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                entries.append((st.st_mtime, name, st.st_size))
        return [(name, size) for _mtime, name, size in sorted(entries)]

    def _count_pinned(self) -> None:
        """(Caller holds the lock, or is __init__.) Count the indexed pinned entries anew."""
        sizes = [self._lru[h] for h in self._pinned if h in self._lru]
        self._pinned_used, self._pinned_count = sum(sizes), len(sizes)

    def _load_pins(self) -> None:
        path = os.path.join(self.root, "pins.json")
        try:
            with open(path) as f:
                pins = json.load(f)
            if not isinstance(pins, dict) or not all(
                    isinstance(k, str) and isinstance(v, list) and all(isinstance(h, str) for h in v)
                    for k, v in pins.items()):
                raise ValueError("not a table of model names to chunk ids")
            self._pins = pins
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            # kept aside, not overwritten by the next pin: the names in it are the admin's to see
            aside = path + ".unreadable"
            try:
                os.replace(path, aside)
                kept = f"; kept as {aside}"
            except OSError:
                kept = ""
            log.warning("ignoring unreadable pins file %s (%s): nothing is pinned%s; pin the models again",
                        path, getattr(e, "strerror", None) or e, kept)
        self._pinned = {h for hs in self._pins.values() for h in hs}
        self._count_pinned()

    def _change_pins(self, change) -> bool:
        """Save the pins `change` (a function of the current ones; None: no change) makes,
        then use them; on a failed save (a full disk) nothing changes, on disk or in memory,
        and the caller gets one ShardfsError. Whether anything changed. The file is written
        outside the cache's lock (the pins of large models are megabytes of JSON: every
        fill and lookup would wait), one writer at a time."""
        with self._pins_lock:
            with self._lock:
                pins = change(dict(self._pins))
            if pins is None:
                return False
            self._save_pins(pins)
            with self._lock:
                self._pins = pins
                self._pinned = {h for hs in pins.values() for h in hs}
                self._count_pinned()
            return True

    def _save_pins(self, pins: dict[str, list[str]]) -> None:
        path = os.path.join(self.root, "pins.json")
        tmp = path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(pins, f)
                f.flush()
                os.fsync(f.fileno())  # (renamed over the old file only once its bytes are on disk:
            os.rename(tmp, path)      # a crash must not leave an empty pins file, every pin lost)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise ShardfsError(f"cannot save the pins in {self.root}: {e.strerror}; nothing changed") from None
        try:
            fsync_dir(self.root)
        except OSError as e:  # (the new pins are in place; only a crash now could undo them)
            log.warning("cannot sync the cache directory %s after saving its pins: %s", self.root, e.strerror)

    def lost(self) -> None:
        """The cache directory was removed or replaced under the mount: index what is in it
        now (nothing, when it was made again); the pins stay, written to it anew."""
        with self._pins_lock:
            with self._lock:  # (fills wait: none lands between the scan and the index)
                try:
                    os.makedirs(os.path.join(self.root, "chunks"), exist_ok=True)
                    found = self._entries_on_disk(tidy=False)  # (fills under way write tmp files there)
                except OSError as e:
                    log.warning("cache %s cannot be read again: %s", self.root, e.strerror or e)
                    found = []
                self._lru = OrderedDict(found)
                self._touched.clear()
                self.used = sum(size for _h, size in found)
                self._count_pinned()
                self.full = ""
                pins = dict(self._pins)
            if pins:
                try:
                    self._save_pins(pins)
                except ShardfsError as e:
                    log.warning("%s", e)

    # -- entries ---------------------------------------------------------------------

    def path(self, hex_id: str) -> str:
        return os.path.join(self.root, "chunks", chunk_relpath(hex_id))

    def __contains__(self, hex_id: str) -> bool:
        with self._lock:
            return hex_id in self._lru

    def get(self, hex_id: str, keyring=None) -> bytes | None:
        """The verified raw chunk, or None on a miss. Damaged entries are dropped."""
        now = time.monotonic()
        with self._lock:
            known = hex_id in self._lru
            touch = known and now - self._touched.get(hex_id, 0) > TOUCH_EVERY
            if touch:
                self._touched[hex_id] = now
        if not known:
            self._count("misses")
            return None
        # Its mtime keeps the LRU order across restarts. Set before the read: an entry served
        # from a mapping is checked against the mtime it had then (directio.changed_since_mapped).
        if touch:
            try:
                os.utime(self.path(hex_id))
            except OSError:
                pass
        try:
            raw, direct = directio.read_whole(self.path(hex_id), self.direct, pin=True)  # verified below
        except OSError as e:
            if e.errno not in TRANSIENT:  # gone, or unreadable for good: not counted any more
                self.discard(hex_id)  # (the file too: kept, it was outside the byte count)
            self._count("misses")
            return None
        if self.direct and not direct:
            self._refuses_direct()
        if envelope.chunk_id(raw, keyring) != bytes.fromhex(hex_id):
            self._count("corrupt")
            log.warning("cache entry %s is damaged; dropped and fetched again", hex_id)
            self.discard(hex_id)
            self._count("misses")
            return None
        self._count("hits")
        with self._lock:
            if hex_id in self._lru:
                self._lru.move_to_end(hex_id)
        return raw

    def put(self, hex_id: str, raw) -> bool:
        """Store a verified chunk. False if the cache could not take it (logged once)."""
        with self._lock:
            if hex_id in self._lru:
                return True
        if not self._make_room(len(raw)):
            return False
        try:
            return self._write(hex_id, raw)
        finally:
            with self._lock:
                self._reserved -= len(raw)

    def _write(self, hex_id: str, raw) -> bool:
        path = self.path(hex_id)
        tmp = None
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
            try:
                if not directio.write_all(fd, raw, self.direct) and self.direct:
                    self._refuses_direct()
            finally:
                os.close(fd)
            with self._lock:  # (in place and indexed at once: an evict between the two unlinked
                os.rename(tmp, path)  # the new file and left its entry indexed, with no file)
                tmp = None
                self._index(hex_id, len(raw))
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):  # filled by someone else since _make_room
                self._now_full("disk", f"writing an entry failed: {e.strerror}")
                return False
            self._cannot_write(e.strerror or str(e))
            return False
        finally:
            if tmp:
                _unlink(tmp)
        with self._lock:
            recovered, self.write_failed = self.write_failed, False
        if recovered:
            log.warning("cache %s is writable again", self.root)
        self._maybe_evict()
        return True

    def _index(self, hex_id: str, size: int) -> None:
        """(Caller holds the lock.)"""
        if hex_id in self._lru:
            return
        self._lru[hex_id] = size
        self.used += size
        if hex_id in self._pinned:
            self._pinned_used += size
            self._pinned_count += 1

    def _cannot_write(self, why: str) -> None:
        with self._lock:  # fills run in parallel threads: say it once
            first, self.write_failed = not self.write_failed, True
        if first:
            log.warning("cache %s cannot be written (%s); serving reads without it", self.root, why)

    def _count(self, name: str) -> None:
        with self._lock:  # from parallel threads: a bare += can lose counts
            setattr(self, name, getattr(self, name) + 1)

    def _refuses_direct(self) -> None:
        with self._lock:  # parallel threads: say it once
            first, self.direct = self.direct, False
        if first:
            log.info("cache %s refuses O_DIRECT; using the page cache", self.root)

    def discard(self, hex_id: str) -> bool:
        """Drop an entry (damaged, or gone from disk), its file too if it can be removed.
        Whether it was indexed."""
        with self._lock:  # (file and entry at once: see _write)
            _unlink(self.path(hex_id))
            return self._forget(hex_id)

    def _evict_one(self, hex_id: str) -> str:
        """Evict an entry to make room: '' if it went (or was gone already), else why its file
        cannot be removed, and it stays: counted as gone, it would free nothing on the disk,
        and making room would go on to drop every intact entry."""
        with self._lock:
            why = _unlink(self.path(hex_id))
            if why:
                return why
            if self._forget(hex_id):
                self.evictions += 1
            return ""

    def _forget(self, hex_id: str) -> bool:
        """(Caller holds the lock.)"""
        size = self._lru.pop(hex_id, None)
        self._touched.pop(hex_id, None)  # (one per chunk ever hit, on a long-lived mount)
        if size is None:
            return False
        self.used -= size
        if hex_id in self._pinned:
            self._pinned_used -= size
            self._pinned_count -= 1
        return True

    def _free_disk(self) -> int:
        try:
            return shutil.disk_usage(self.root).free
        except OSError:
            return 1 << 62

    def _oldest_unpinned(self) -> str | None:
        """The least recently used entry eviction may take (caller holds the lock).

        Pinned entries met on the way go to the recent end (where a pinned entry stands in
        the order means nothing while it is pinned): a large pinned model warmed long ago
        would otherwise be walked past at every eviction (measured: 51.7 s for one fill with
        20k pinned entries in front)."""
        if self._pinned_count >= len(self._lru):
            return None
        while True:
            h = next(iter(self._lru))
            if h not in self._pinned:
                return h
            self._lru.move_to_end(h)

    def _make_room(self, size: int) -> bool:
        """Before a fill: evict least recently used entries until `size` more bytes stay
        within the limit and above the disk's free floor, counting the fills other threads
        are writing, and reserve them (put gives them back). If evicting every unpinned entry
        would not be enough, evict nothing and return False: the chunk is served without
        being cached, rather than written only to be evicted again."""
        full = detail = stuck = None
        while True:
            free = self._free_disk()
            with self._lock:
                over_limit = self.used + self._reserved + size - self.limit
                short_disk = self.free_floor + self._reserved + size - free
                if over_limit <= 0 and short_disk <= 0:
                    self._reserved += size
                    break
                # what evicting could free at most, now: fills other threads landed meanwhile
                # count too (computed once, it called the cache full while they stood there)
                evictable = self.used - self._pinned_used
                victim = self._oldest_unpinned()
                need = max(over_limit, short_disk)
                if victim is None or need > evictable:
                    if need - self._reserved <= evictable:
                        full = "busy"  # fills still being written hold the room: skip this one quietly
                    elif size > self.limit:
                        full, detail = "chunk", f"a {human(size)} chunk is larger than its {human(self.limit)} limit"
                    elif over_limit > evictable:
                        full = "limit"
                        detail = f"{human(self._pinned_used)} of its {human(self.limit)} limit is pinned"
                    else:
                        full = "disk"
                        detail = f"{human(free)} free on its disk, which it keeps above {human(self.free_floor)}"
                    break
            stuck = self._evict_one(victim)
            if stuck:
                break
        if stuck:
            self._cannot_write(stuck)
            return False
        if full is None:
            self._room_again()
            return True
        if full != "busy":
            self._now_full(full, detail)
        return False

    def _now_full(self, reason: str, detail: str) -> None:
        now = time.monotonic()
        with self._lock:
            self.full = reason
            say = not self._said_full and now - self._full_said_at > FULL_LOG_EVERY
            if say:
                self._said_full, self._full_said_at = True, now
        if say:
            log.warning("cache %s is full (%s); reads are served without caching until there is room",
                        self.root, detail)

    def _room_again(self) -> None:
        with self._lock:
            self.full = ""
            say, self._said_full = self._said_full, False
        if say:
            log.warning("cache %s has room again", self.root)

    def _maybe_evict(self) -> None:
        if self.used <= self.limit * HIGH_WATER and self._free_disk() >= self.free_floor:
            return
        target = self.limit * LOW_WATER
        while True:
            with self._lock:
                if self.used <= target and self._free_disk() >= self.free_floor:
                    return
                victim = self._oldest_unpinned()
                if victim is None:
                    return
            if self._evict_one(victim):
                return  # (it cannot be removed: the next fill says so)

    # -- admin -----------------------------------------------------------------------

    def evict(self, hex_ids, unremoved: list | None = None) -> int:
        """Drop the given chunks (pinned or not); returns bytes freed. An entry whose file
        cannot be removed (a read-only cache directory) is dropped all the same, not counted
        as freed: (bytes, why) go to `unremoved`."""
        freed = 0
        for h in hex_ids:
            with self._lock:  # (file and entry at once: see _write)
                size = self._lru.get(h, 0)
                why = _unlink(self.path(h))
                if not self._forget(h):
                    continue
                if not why:
                    freed += size
                    self.evictions += 1
            if why and unremoved is not None:
                unremoved.append((size, why))
        if freed:
            self._room_again()  # (the next fill checks again)
        return freed

    def evict_all(self, unremoved: list | None = None) -> int:
        with self._lock:
            hexes = list(self._lru)
        return self.evict(hexes, unremoved)

    def pin(self, name: str, hex_ids) -> None:
        """(Blocking: writes the pins file. The daemon calls it from a worker thread.)"""
        ids = sorted(set(hex_ids))
        self._change_pins(lambda pins: {**pins, name: ids})

    def unpin(self, name: str) -> bool:
        """(Blocking, as pin.) Whether `name` was pinned."""
        found = self._change_pins(lambda pins: {k: v for k, v in pins.items() if k != name} if name in pins else None)
        if found:
            self._room_again()  # (the next fill checks again)
        return found

    def pinned_except(self, names) -> set[str]:
        """The chunks pinned by models other than `names`."""
        with self._lock:
            return {h for n, hs in self._pins.items() if n not in names for h in hs}

    def pinned(self, hex_id: str) -> bool:
        return hex_id in self._pinned  # (a set replaced whole under the lock: safe to read)

    def pins(self) -> list[str]:
        with self._lock:
            return sorted(self._pins)

    def cached_bytes(self, hex_ids) -> int:
        with self._lock:
            return sum(self._lru.get(h, 0) for h in set(hex_ids))

    def cached_of(self, hex_ids, lengths) -> tuple[int, int]:
        """(bytes in the cache, bytes in all) of these chunks, each distinct chunk once: a
        model whose chunks repeat (runs of zeros) is all cached at less than its size."""
        distinct = dict(zip(hex_ids, lengths))
        return self.cached_bytes(distinct), sum(distinct.values())

    def stats(self) -> dict:
        with self._lock:
            return {"dir": self.root, "used": self.used, "limit": self.limit, "entries": len(self._lru),
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "corrupt": self.corrupt, "writable": not self.write_failed, "full": bool(self.full),
                    "full_reason": self.full, "free_floor": self.free_floor, "pins": sorted(self._pins)}


def default_free_floor(path: str) -> int:
    try:
        total = shutil.disk_usage(path).total
    except OSError:
        return 1 << 30
    return min(1 << 30, total // 20)


def envelope_id_ok(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def _unlink(path: str) -> str:
    """Remove a file; '' once it is gone (or was), else why it is still there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        return e.strerror or str(e)
    return ""
