"""The Redis index: the only module that knows key names.

Keys (all under "shardfs:"):

    models              hash  name -> current version id
    mv:<name>           list  every version id of a name still kept, oldest first
    v:<vid>             hash  name, manifest, size, sha256, created, chunk_size, replicas, stats
    vseq                int   last version id (version ids double as stable inode numbers)
    c:<hex>             hash  raw, stored, codec, refs, state ("pending" | "ok" | "deleting")
    l:<hex>             set   node ids holding (or, while "pending", being sent) the chunk
    nodes               hash  node id -> JSON {url, weight, state, token}
    nseq                int   last node number
    puts                zset  put id -> lease expiry (ms since epoch)
    put:<putid>         set   chunk ids a running put relies on
    epoch               int   bumped on every publish and removal; mounts poll it
    id                  str   random, set by the first publish, removal or prune: a new one
                              means the index was reset or restored (its counters started over)
    reading             zset  "<vid>:<mount id>" -> lease expiry (ms): versions open in a mount
    removed             set   version ids of removed models kept (record, chunk refs) because a
                              mount still read them; prune_versions drops each once unleased

Invariants that keep chunks alive (gc never deletes a chunk something relies on):
- `refs` counts the versions whose manifest names the chunk; publish and rm change it in
  the same MULTI/EXEC that adds or removes the version.
- A put adds each chunk to its lease set (LEASE_LUA) *before* it relies on the chunk
  existing; gc claims a chunk (CLAIM_LUA) only when refs == 0 and no live lease holds
  it, and marks it "deleting" first. Both scripts run atomically in Redis, so either the
  put's lease comes first (gc skips the chunk) or the claim does (the put sees
  "deleting", waits for gc to finish, then uploads afresh).
- A replaced version stays (its readers keep reading it) until prune_versions drops it:
  replaced longer ago than a grace period and leased by no mount. Mounts lease the
  versions they have open before loading them and renew while they stay open.
- A chunk record is created ("pending") and each target node is added to its locations
  *before* the upload, so a put killed mid-way leaves only records that gc can find and
  reclaim, never an untracked file on a node.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import redis

from .errors import BadRecord, CorruptChunk, IndexUnavailable, NameClash, NotFound, ShardfsError, UsageError
from .manifest import Manifest

log = logging.getLogger("shardfs.index")

P = "shardfs:"
K_MODELS = P + "models"
K_VSEQ = P + "vseq"
K_NODES = P + "nodes"
K_NSEQ = P + "nseq"
K_NODE_URLS = P + "node-urls"  # url (no trailing /) -> node id: one registration per url
K_PUTS = P + "puts"
K_EPOCH = P + "epoch"
K_INDEX_ID = P + "id"
LEASE_PREFIX = P + "put:"
K_READING = P + "reading"  # zset "<vid>:<mount id>" -> lease expiry (ms): versions a mount has open
K_REMOVED = P + "removed"  # set of version ids of removed models that a mount still reads
K_GC = P + "gc"  # the running gc's token (SET NX PX): one gc at a time
K_COPIES = P + "copies-lock"  # held by `node rm` and `verify --repair` (see Index.copies_lock)
LAPSED = ("this put's lease on its chunks lapsed (Redis was unreachable, or the put paused, too long) "
          "and gc may have taken them; nothing was published, run put again")

# KEYS: node-urls, nodes; ARGV: url, node id, node record. Claims the url and records the
# node in one step; returns the id already holding the url, or nil when registered.
ADD_NODE_LUA = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
    return redis.call('HGET', KEYS[1], ARGV[1])
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return false
"""


PUBLISH_RETRIES = 200  # attempts a publish makes while watched keys keep changing under it


def k_version(vid: int) -> str:
    return f"{P}v:{vid}"


def k_model_versions(name: str) -> str:
    return f"{P}mv:{name}"


def _lease_set_ttl(ttl: float) -> int:
    """Redis expiry (s) of a put's lease set: a minute past its lease, kept by each renewal."""
    return int(ttl) + 60


def k_chunk(hex_id: str) -> str:
    return f"{P}c:{hex_id}"


def k_locs(hex_id: str) -> str:
    return f"{P}l:{hex_id}"


LEASE_LUA = """
local st = redis.call('HGET', KEYS[1], 'state')
if st == 'deleting' then return 'deleting' end
redis.call('SADD', KEYS[2], ARGV[1])
if redis.call('TTL', KEYS[2]) < 0 then redis.call('EXPIRE', KEYS[2], ARGV[2]) end
if not st then
  redis.call('HSET', KEYS[1], 'state', 'pending')
  return 'absent'
end
if st == 'pending' then return 'absent' end
return st
"""

# Every change gc makes to a chunk's record is a script that first checks gc's token in
# KEYS[3]: a gc that paused past its lock's expiry (and so may run beside another) changes
# nothing more. A claim also ends the puts whose leases lapsed: that changes K_PUTS, which a
# publish watches, so a put that checked its lease and then paused past it (between the
# check and its EXEC) cannot publish once gc has claimed a chunk it relied on.
CLAIM_LUA = """
if redis.call('GET', KEYS[3]) ~= ARGV[4] then return -1 end
local refs = tonumber(redis.call('HGET', KEYS[1], 'refs') or '0')
if refs > 0 then return 0 end
if redis.call('HGET', KEYS[1], 'state') == 'deleting' then return 1 end
for _, p in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[2], '+inf')) do
  if redis.call('SISMEMBER', ARGV[3] .. p, ARGV[1]) == 1 then return 0 end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[2])
redis.call('HSET', KEYS[1], 'state', 'deleting')
return 1
"""

# A location is added only to a chunk that has a record: gc forgets record and locations
# together, and a put (or repair) that lapsed meanwhile must not make a location set that no
# record leads gc to.
ADD_LOCS_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SADD', KEYS[2], unpack(ARGV))
return 1
"""

# A put paused past its lease (Ctrl-Z, a VM pause) may finish an upload after gc took the
# chunk: a file no record leads gc to. It takes that file back under gc's own mark, which
# makes other puts of the chunk wait (LEASE_LUA): only while no record exists (one that does
# belongs to a put that stores the chunk again: the file is its now). The mark expires by
# itself should the put die before it drops it.
ORPHAN_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'deleting')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""
UNMARK_LUA = """
if redis.call('HGET', KEYS[1], 'state') == 'deleting' and redis.call('HLEN', KEYS[1]) == 1 then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# verify --repair drops a broken copy's location only while no running put leases the chunk:
# such a put may have just stored it again on that node (it leases before it looks).
# (ARGV[5]: a put that drops a copy it failed to store is not stopped by its own lease)
DROP_LUA = """
for _, p in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[2], '+inf')) do
  if p ~= ARGV[5] and redis.call('SISMEMBER', ARGV[3] .. p, ARGV[1]) == 1 then return -1 end
end
return redis.call('SREM', KEYS[1], ARGV[4])
"""

# A put's lease is renewed only while it is live: one that lapsed, even if no gc has ended
# it yet, stays lapsed (a gc already scanning ignores it and may take its chunks).
RENEW_LUA = """
local at = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not at or tonumber(at) < tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""

FORGET_LUA = """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""

# gc could not delete every copy: forget the copies it did delete (ARGV[2..]) and mark the
# chunk "ok" again (refs stay 0, so the next gc claims it again). Only a chunk whose upload
# finished (record_chunk wrote its sizes) is "ok"; a killed put's chunk stays "pending", so no
# later put trusts copies that may never have landed.
RELEASE_LUA = """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return -1 end
for i = 2, #ARGV do redis.call('SREM', KEYS[2], ARGV[i]) end
if redis.call('HEXISTS', KEYS[1], 'raw') == 1 then
  redis.call('HSET', KEYS[1], 'state', 'ok')
else
  redis.call('HSET', KEYS[1], 'state', 'pending')
end
return 1
"""

# gc, when a node did not answer a delete: the nodes that did delete are unlisted, and the
# chunk stays "deleting" (see maintenance._gc)
UNLIST_LUA = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
for i = 2, #ARGV do redis.call('SREM', KEYS[1], ARGV[i]) end
return 1
"""

UNLOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# gc, right before it deletes a claimed chunk's copy: its lock is still its own and the
# chunk still "deleting" (a gc that paused past its lock may find both taken over meanwhile)
CLAIMED_LUA = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[1], 'state') == 'deleting' then return 1 end
return 0
"""

RELOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


@dataclass(frozen=True)
class Node:
    id: str
    url: str
    weight: float = 1.0
    state: str = "active"  # "active" | "draining"
    token: str | None = None


@dataclass(frozen=True)
class Version:
    vid: int
    name: str
    size: int
    sha256: str
    created: float
    chunk_size: int
    replicas: int
    stats: dict
    manifest_blob: bytes

    @property
    def manifest(self) -> Manifest:
        try:
            return Manifest.decode(self.manifest_blob)
        except CorruptChunk as e:  # (framing is checked when the record is read: see Index._version)
            raise BadRecord(f"malformed version record {self.vid}: {e}", self.vid) from None


def _float(raw: bytes | None, default: float) -> float:
    """A number field of a record; missing or malformed: `default`."""
    try:
        return float(raw) if raw is not None else default
    except ValueError:
        return default


def _chunk_ids(blob: bytes | None) -> set[bytes]:
    """The chunk ids of a stored manifest, for dropping a version's references. A manifest
    that cannot be decoded gives none: its chunks keep their references, and so gc keeps
    them (never deletes a chunk some version may still use)."""
    try:
        return set(Manifest.decode(blob or b"").ids)
    except CorruptChunk:
        return set()


@contextlib.contextmanager
def _every(period: float, step, name: str):
    """Call step() every `period` seconds from a thread while the block runs (lease and
    lock renewals); a step that returns False ends the calls."""
    stop = threading.Event()

    def loop():
        while not stop.wait(period):
            if step() is False:
                return

    t = threading.Thread(target=loop, name=name, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def lease_holder() -> str:
    """A unique name for one reader of versions (a mount, a get): host, pid, random."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _glob_escape(name: str) -> str:
    """`name` as a Redis MATCH pattern that matches only itself."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in name)


class Index:
    def __init__(self, client: redis.Redis, url: str):
        self.r = client
        self.url = url
        self._lease = client.register_script(LEASE_LUA)
        self._claim = client.register_script(CLAIM_LUA)
        self._forget = client.register_script(FORGET_LUA)
        self._drop = client.register_script(DROP_LUA)
        self._add_locs = client.register_script(ADD_LOCS_LUA)
        self._orphan = client.register_script(ORPHAN_LUA)
        self._unmark = client.register_script(UNMARK_LUA)
        self._renew = client.register_script(RENEW_LUA)
        self._claimed = client.register_script(CLAIMED_LUA)
        self._release = client.register_script(RELEASE_LUA)
        self._unlock = client.register_script(UNLOCK_LUA)
        self._unlist = client.register_script(UNLIST_LUA)
        self._relock = client.register_script(RELOCK_LUA)
        self.gc_token: str | None = None  # set while this client holds the gc lock (gc_lock)
        self._add_node = client.register_script(ADD_NODE_LUA)

    # -- connection -----------------------------------------------------------------

    def now_ms(self) -> int:
        """Redis's clock, in ms. Every lease expiry is set and compared on it, so hosts whose
        clocks disagree still agree on which leases are live."""
        sec, usec = self.r.time()
        return sec * 1000 + usec // 1000

    def ping(self, loading_wait: float = 0.0) -> None:
        """IndexUnavailable unless Redis answers. A server still loading its data (right
        after it started: a reboot, a restart) is waited for up to loading_wait seconds."""
        deadline = time.monotonic() + loading_wait
        while True:
            try:
                self.r.ping()
                return
            except redis.BusyLoadingError as e:
                if time.monotonic() >= deadline:
                    raise IndexUnavailable(f"Redis at {self.url} is still loading its data after "
                                           f"{loading_wait:g} s: {e}") from None
                time.sleep(0.1)
            except redis.RedisError as e:
                raise IndexUnavailable(f"cannot reach Redis at {self.url}: {e}") from None

    # -- nodes ----------------------------------------------------------------------

    def nodes(self) -> dict[str, Node]:
        out = {}
        for nid, raw in self.r.hgetall(K_NODES).items():
            d = json.loads(raw)
            out[_s(nid)] = Node(_s(nid), d["url"], d.get("weight", 1.0), d.get("state", "active"), d.get("token"))
        return dict(sorted(out.items(), key=lambda kv: (len(kv[0]), kv[0])))

    def add_node(self, url: str, weight: float = 1.0, token: str | None = None) -> Node:
        for n in self.nodes().values():  # also covers nodes registered before K_NODE_URLS existed
            if n.url.rstrip("/") == url.rstrip("/"):
                raise UsageError(f"node {url} is already registered as {n.id}")
        nid = f"n{self.r.incr(K_NSEQ)}"
        record = json.dumps({"url": url, "weight": weight, "state": "active", "token": token})
        holder = self._add_node(keys=[K_NODE_URLS, K_NODES], args=[url.rstrip("/"), nid, record])
        if holder is not None:  # a concurrent `node add` of the same url won
            raise UsageError(f"node {url} is already registered as {_s(holder)}")
        return Node(nid, url, weight, "active", token)

    def set_node_state(self, nid: str, state: str) -> str:
        """Returns the state it had. (Read and rewritten under WATCH: a `node rm` in between
        must not bring it back.)"""
        with self.r.pipeline() as p:
            while True:
                try:
                    p.watch(K_NODES)
                    raw = p.hget(K_NODES, nid)
                    if raw is None:
                        raise NotFound(f"no node {nid!r}; see `shardfs node ls`")
                    d = json.loads(raw)
                    was, d["state"] = d.get("state", "active"), state
                    p.multi()
                    p.hset(K_NODES, nid, json.dumps(d))
                    p.execute()
                    return was
                except redis.WatchError:
                    continue

    def sole_copies(self, nid: str) -> tuple[int, int, int]:
        """(chunks, stored bytes) that some version references and no other registered node
        holds: what unregistering it would lose; and how many chunks it lists in all (what
        verify --repair would copy again). Scans every chunk's locations (which may still
        name nodes removed earlier: those hold no copy anyone reads)."""
        chunks = stored = listed = 0
        others = set(self.nodes()) - {nid}
        keys = list(self.r.scan_iter(match=P + "l:*", count=1000))
        for at in range(0, len(keys), 512):
            batch = keys[at:at + 512]
            p = self.r.pipeline(transaction=False)
            for key in batch:
                p.smembers(key)
            sole = []
            for k, locs in zip(batch, p.execute()):
                held = {_s(x) for x in locs}
                if nid in held:
                    listed += 1
                    if not held & others:
                        sole.append(k)
            p = self.r.pipeline(transaction=False)
            for key in sole:
                p.hmget(k_chunk(_s(key)[len(P) + 2:]), "refs", "stored")
            for refs, size in p.execute():
                if int(refs or 0) > 0:
                    chunks += 1
                    stored += int(size or 0)
        return chunks, stored, listed

    def remove_node(self, nid: str) -> None:
        raw = self.r.hget(K_NODES, nid)
        if raw is None or not self.r.hdel(K_NODES, nid):
            raise NotFound(f"no node {nid!r}; see `shardfs node ls`")
        url = json.loads(raw)["url"].rstrip("/")
        if _s(self.r.hget(K_NODE_URLS, url)) == nid:
            self.r.hdel(K_NODE_URLS, url)

    # -- models and versions --------------------------------------------------------

    def models(self) -> dict[str, int]:
        return {_s(k): int(v) for k, v in self.r.hgetall(K_MODELS).items()}

    def current_vid(self, name: str) -> int | None:
        v = self.r.hget(K_MODELS, name)
        return int(v) if v is not None else None

    @staticmethod
    def _version(vid: int, h: dict) -> Version:
        try:
            ver = Version(vid, _s(h[b"name"]), int(h[b"size"]), _s(h[b"sha256"]), float(h[b"created"]),
                          int(h[b"chunk_size"]), int(h[b"replicas"]), json.loads(h[b"stats"]),
                          h[b"manifest"])
        except (KeyError, ValueError) as e:
            raise BadRecord(f"malformed version record {vid}: {e}", vid) from None
        why = Manifest.framing_error(ver.manifest_blob)  # (its entries are decoded where used)
        if why is not None:
            raise BadRecord(f"malformed version record {vid}: {why}", vid)
        return ver

    def version(self, vid: int) -> Version:
        h = self.r.hgetall(k_version(vid))
        if not h:
            raise NotFound(f"version {vid} does not exist")
        return self._version(vid, h)

    def versions(self, vids, bad: list | None = None) -> list[Version]:
        """Several versions in one round trip (no manifests decoded); missing ones are skipped.
        With a `bad` list, malformed records are skipped too, and their errors added to it."""
        pipe = self.r.pipeline(transaction=False)
        for vid in vids:
            pipe.hgetall(k_version(vid))
        out = []
        for vid, h in zip(vids, pipe.execute()):
            if not h:
                continue
            try:
                out.append(self._version(vid, h))
            except BadRecord as e:
                if bad is None:
                    raise
                bad.append(e)
        return out

    def model(self, name: str) -> Version:
        vid = self.current_vid(name)
        if vid is None:
            raise self.missing(name)
        return self.version(vid)

    def missing(self, name: str, folder_hint: str = "") -> NotFound:
        """The error for a name no model has; for a folder of models, it says so."""
        pattern = _glob_escape(name) + "/*"
        for _inside, _vid in self.r.hscan_iter(K_MODELS, match=pattern, count=1000):
            return NotFound(f"no model named {name!r}: {name}/ is a folder of models (`shardfs ls {name}/` lists "
                            f"them){folder_hint}")
        return NotFound(f"no model named {name!r}; see `shardfs ls`")

    def model_vids(self, name: str) -> list[int]:
        return [int(v) for v in self.r.lrange(k_model_versions(name), 0, -1)]

    def all_vids(self) -> list[int]:
        return list(self.listed_vids())

    def listed_vids(self) -> dict[int, str]:
        """Every version id a model lists (current and replaced ones kept), with its model's name."""
        out = {}
        for key in self.r.scan_iter(match=P + "mv:*", count=1000):
            name = _s(key)[len(P) + 3:]
            out.update((int(v), name) for v in self.r.lrange(key, 0, -1))
        return out

    def removed_vids(self) -> list[int]:
        """Versions of removed models that a mount still reads (kept until gc finds them unread)."""
        return sorted(int(v) for v in self.r.smembers(K_REMOVED))

    def epoch(self) -> int:
        return int(self.r.get(K_EPOCH) or 0)

    def state(self) -> tuple[int, str | None]:
        """(epoch, index id), read together: what a mount compares to see any change,
        including an index reset whose epoch happens to come back to the same count."""
        epoch, iid = self.r.mget(K_EPOCH, K_INDEX_ID)
        return int(epoch or 0), _s(iid) if iid is not None else None

    def path_conflict(self, name: str, r=None, ignore=()) -> str | None:
        """Why `name` cannot be a model next to the existing ones, or None: in the mount a
        name is a file and each of its prefixes a folder, so no model may be a prefix folder
        of another (`org/m` and `org/m/x` cannot both exist). Models in `ignore` are about
        to be removed and do not count."""
        r = r if r is not None else self.r
        parts = name.split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            if folder not in ignore and r.hexists(K_MODELS, folder):
                return f"model {folder!r} exists, so {name!r} cannot make it a folder; choose another name"
        pattern = _glob_escape(name) + "/*"
        for inside, _vid in r.hscan_iter(K_MODELS, match=pattern, count=1000):
            if _s(inside) not in ignore:
                return (f"folder {name + '/'!r} holds model {_s(inside)!r}, so {name!r} cannot be a file; "
                        "choose another name")
        return None

    def publish(self, name: str, manifest: Manifest, size: int, sha256: str, chunk_size: int,
                replicas: int, stats: dict, force: bool, put_id: str | None = None,
                lease_margin: float = 0.0) -> int:
        """Make a version visible under `name` in one MULTI/EXEC; returns its id."""
        return self.publish_all([(name, manifest, size, sha256, chunk_size, replicas, stats)], force,
                                put_id=put_id, lease_margin=lease_margin)[0]

    def publish_all(self, entries, force: bool, put_id: str | None = None, lease_margin: float = 0.0,
                    remove=(), nodes=()) -> list[int]:
        """Make a version visible for each entry (name, manifest, size, sha256, chunk_size,
        replicas, stats), and remove the models named in `remove` (as `remove` does), all
        in one MULTI/EXEC: readers see all of it or none of it. Returns the version ids.

        With put_id, refuses to publish unless that put's lease is still live for at least
        lease_margin seconds: a lease that lapsed may have let gc take chunks it relied on.
        Refuses, too, if one of `nodes` (those holding the copies the put relies on) was
        removed meanwhile: `node rm` checks only published chunks for sole copies."""
        entries = list(entries)
        remove = set(remove) - {e[0] for e in entries}
        last = self.r.incrby(K_VSEQ, len(entries))
        vids = list(range(last - len(entries) + 1, last + 1))
        # (reading leases matter only to removals; mounts renew them every few seconds, and
        # watching them for every publish would make a busy index retry for nothing)
        watched = [K_MODELS, K_PUTS, K_NODES] + ([K_READING] if remove else [])
        retries = 0
        with self.r.pipeline() as p:
            while True:
                try:
                    p.watch(*watched, *(k_model_versions(n) for n in sorted(remove)))
                    if put_id is not None:
                        expiry = p.zscore(K_PUTS, put_id)
                        if expiry is None or expiry < self.now_ms() + lease_margin * 1000:
                            raise ShardfsError(LAPSED)
                    gone = sorted(n for n in nodes if not p.hexists(K_NODES, n))
                    if gone:
                        raise ShardfsError(f"node {gone[0]} was removed while this put stored chunks on it; "
                                           "nothing was published: put again")
                    self._check_names(p, [e[0] for e in entries], force, remove)
                    removals = [self._removal(p, n) for n in sorted(remove) if p.hexists(K_MODELS, n)]
                    p.multi()
                    for removal in removals:
                        self._queue_removal(p, *removal)
                    created = self.now_ms() / 1000  # (Redis's clock, as for leases: see prune_versions)
                    for vid, (name, manifest, size, sha256, chunk_size, replicas, stats) in zip(vids, entries):
                        p.hset(k_version(vid), mapping={
                            "name": name, "manifest": manifest.encode(), "size": size, "sha256": sha256,
                            "created": created, "chunk_size": chunk_size, "replicas": replicas,
                            "stats": json.dumps(stats)})
                        p.hset(K_MODELS, name, vid)
                        p.rpush(k_model_versions(name), vid)
                        for cid in set(manifest.ids):
                            p.hincrby(k_chunk(cid.hex()), "refs", 1)
                    p.incr(K_EPOCH)
                    p.setnx(K_INDEX_ID, secrets.token_hex(8))
                    p.execute()
                    return vids
                except redis.WatchError:
                    retries += 1
                    if retries >= PUBLISH_RETRIES:  # (signals wait for the publish: it must end)
                        raise ShardfsError(f"the index kept changing during {retries} attempts to publish; "
                                           "nothing was published: put again") from None

    def _check_names(self, p, names, force: bool, remove) -> None:
        """NameClash unless every name may be published (p watches K_MODELS). A few names are
        looked up one by one; many (a folder put) against one read of every name: a check per
        name took so long in a large index that the watched keys changed (each running put's
        heartbeat does) during every attempt, and the publish retried for ever."""
        if len(names) <= 8:
            for name in names:
                if p.hexists(K_MODELS, name) and not force:
                    raise NameClash(f"model {name!r} already exists; use --force to replace it")
                conflict = self.path_conflict(name, p, ignore=remove)
                if conflict:
                    raise NameClash(conflict)
            return
        existing = {_s(n) for n in p.hkeys(K_MODELS)}
        folders = {}  # folder of a model that stays -> one such model
        for n in existing - set(remove):
            parts = n.split("/")
            for i in range(1, len(parts)):
                folders.setdefault("/".join(parts[:i]), n)
        for name in names:
            if name in existing and not force:
                raise NameClash(f"model {name!r} already exists; use --force to replace it")
            parts = name.split("/")
            for i in range(1, len(parts)):
                folder = "/".join(parts[:i])
                if folder in existing and folder not in remove:
                    raise NameClash(f"model {folder!r} exists, so {name!r} cannot make it a folder; "
                                    "choose another name")
            if name in folders:
                raise NameClash(f"folder {name + '/'!r} holds model {folders[name]!r}, so {name!r} cannot "
                                "be a file; choose another name")

    def _leased(self, p, now_ms: int) -> set[int]:
        return {int(m.split(b":", 1)[0]) for m in p.zrangebyscore(K_READING, now_ms, "+inf")}

    def remove(self, name: str) -> tuple[list[int], list[int]]:
        """Remove a model and all its versions: (removed version ids, those of them kept).

        The name goes at once. A version some mount is reading (a live lease) keeps its
        record and its chunk references, so a reader that has the file open reads it to
        the end; prune_versions (gc) drops it once no mount reads it any more."""
        with self.r.pipeline() as p:
            while True:
                try:
                    p.watch(K_MODELS, k_model_versions(name), K_READING)
                    if not p.hexists(K_MODELS, name):
                        raise self.missing(name, f"; `shardfs rm {name}/` removes them all")
                    removal = self._removal(p, name)
                    p.multi()
                    self._queue_removal(p, *removal)
                    p.incr(K_EPOCH)
                    p.setnx(K_INDEX_ID, secrets.token_hex(8))
                    p.execute()
                    return removal[1], removal[2]
                except redis.WatchError:
                    continue

    def _removal(self, p, name: str):
        """Read what removing `name` takes (p watches the keys): (name, version ids, those
        kept for a reading mount, each version's chunk ids)."""
        vids = [int(v) for v in p.lrange(k_model_versions(name), 0, -1)]
        leased = self._leased(p, self.now_ms())
        kept = [v for v in vids if v in leased]
        chunk_sets = [_chunk_ids(p.hget(k_version(v), "manifest")) for v in vids]
        return name, vids, kept, chunk_sets

    @staticmethod
    def _queue_removal(p, name: str, vids, kept, chunk_sets) -> None:
        p.hdel(K_MODELS, name)
        p.delete(k_model_versions(name))
        for vid, ids in zip(vids, chunk_sets):
            if vid in kept:
                p.sadd(K_REMOVED, vid)
                continue
            p.delete(k_version(vid))
            for cid in ids:
                p.hincrby(k_chunk(cid.hex()), "refs", -1)

    def lease_versions(self, holder: str, vids, ttl: float) -> None:
        """A mount (`holder`) reads these versions: prune_versions keeps them for ttl seconds."""
        exp = self.now_ms() + int(ttl * 1000)
        if vids:
            self.r.zadd(K_READING, {f"{vid}:{holder}": exp for vid in vids})

    @contextlib.contextmanager
    def reading(self, vids, ttl: float = 60.0):
        """Lease these versions for as long as the block runs (get, verify), renewed from a
        thread every ttl/3, released at the end: prune_versions keeps them meanwhile. A
        version dropped before the lease landed is not brought back: callers re-read the
        versions inside the block (versions() skips those gone)."""
        vids = list(vids)
        holder = lease_holder()
        self.lease_versions(holder, vids, ttl)
        renewed = time.monotonic()

        def renew():
            nonlocal renewed
            try:
                self.lease_versions(holder, vids, ttl)
                renewed = time.monotonic()
            except redis.RedisError as e:  # the lease lapses only after ttl: retry until then
                if time.monotonic() - renewed > ttl:
                    renewed = float("inf")  # say it once
                    log.warning("the read lease on version(s) %s lapsed (Redis: %s): a `gc` now may "
                                "drop them, and this command then fails; it never returns wrong bytes",
                                ", ".join(map(str, vids[:5])) + (f" and {len(vids) - 5} more" if len(vids) > 5 else ""),
                                e)

        try:
            with _every(ttl / 3, renew, "shardfs-lease"):
                yield
        finally:
            if vids:
                try:
                    self.r.zrem(K_READING, *(f"{vid}:{holder}" for vid in vids))
                except redis.RedisError:
                    pass  # it lapses by itself

    def prune_versions(self, grace: float, now: float | None = None) -> list[tuple[str, int]]:
        """Drop replaced versions: those replaced more than `grace` seconds ago that no mount
        has open (lease_versions). Their chunk references go with them, so gc can then
        delete what nothing else uses. Returns the (name, version) pairs dropped.

        The check and the drop are one MULTI/EXEC watching the model and the leases, so a
        mount that leases a version meanwhile keeps it; a mount that opens a version after it
        was dropped finds it gone (ENOENT), never a half-deleted model."""
        now = self.now_ms() / 1000 if now is None else now
        now_ms = int(now * 1000)
        self.r.zremrangebyscore(K_READING, "-inf", now_ms)  # lapsed leases
        pruned = []
        for name in self.models():
            with self.r.pipeline() as p:
                while True:
                    try:
                        p.watch(K_MODELS, k_model_versions(name), K_READING)
                        current = p.hget(K_MODELS, name)
                        if current is None:
                            break  # removed meanwhile
                        vids = [int(v) for v in p.lrange(k_model_versions(name), 0, -1)]
                        leased = self._leased(p, now_ms)
                        drop = []
                        for i, vid in enumerate(vids[:-1]):  # (publish order; the last is current)
                            if vid == int(current) or vid in leased:
                                continue
                            replaced_at = _float(p.hget(k_version(vids[i + 1]), "created"), now)
                            if now - replaced_at >= grace:
                                drop.append(vid)
                        if not drop:
                            break
                        chunk_sets = [_chunk_ids(p.hget(k_version(v), "manifest")) for v in drop]
                        p.multi()
                        for vid, ids in zip(drop, chunk_sets):
                            p.delete(k_version(vid))
                            p.lrem(k_model_versions(name), 0, vid)
                            for cid in ids:
                                p.hincrby(k_chunk(cid.hex()), "refs", -1)
                        p.incr(K_EPOCH)
                        p.setnx(K_INDEX_ID, secrets.token_hex(8))
                        p.execute()
                        pruned += [(name, vid) for vid in drop]
                        break
                    except redis.WatchError:
                        continue
        return pruned + self.prune_removed(now_ms)

    def prune_removed(self, now_ms: int | None = None) -> list[tuple[str, int]]:
        """Drop the kept versions of removed models that no mount reads any more."""
        now_ms = self.now_ms() if now_ms is None else now_ms
        with self.r.pipeline() as p:
            while True:
                try:
                    p.watch(K_REMOVED, K_READING)
                    leased = self._leased(p, now_ms)
                    drop = [int(v) for v in p.smembers(K_REMOVED) if int(v) not in leased]
                    if not drop:
                        return []
                    names = [_s(p.hget(k_version(v), "name") or b"?") for v in drop]
                    chunk_sets = [_chunk_ids(p.hget(k_version(v), "manifest")) for v in drop]
                    p.multi()
                    for vid, ids in zip(drop, chunk_sets):
                        p.delete(k_version(vid))
                        p.srem(K_REMOVED, vid)
                        for cid in ids:
                            p.hincrby(k_chunk(cid.hex()), "refs", -1)
                    p.incr(K_EPOCH)
                    p.setnx(K_INDEX_ID, secrets.token_hex(8))
                    p.execute()
                    return list(zip(names, drop))
                except redis.WatchError:
                    continue

    # -- chunks ---------------------------------------------------------------------

    def lease_chunk(self, put_id: str, hex_id: str, ttl: float = 60) -> str:
        """Protect a chunk for a running put; returns 'absent', 'ok' or 'deleting'. A new
        lease set gets its expiry here, as renew_put extends it (a put killed before its
        first renewal leaves nothing for ever)."""
        return _s(self._lease(keys=[k_chunk(hex_id), LEASE_PREFIX + put_id], args=[hex_id, _lease_set_ttl(ttl)]))

    def start_put(self, put_id: str, ttl: float) -> None:
        # (its chunk set is made, with its expiry, by the first lease_chunk)
        self.r.zadd(K_PUTS, {put_id: self.now_ms() + int(ttl * 1000)})

    def renew_put(self, put_id: str, ttl: float) -> bool:
        """Extend a running put's lease; False if it had lapsed (RENEW_LUA), ended by gc or
        not: then its chunks may be gone, so the put must not publish, and publish refuses."""
        now = self.now_ms()
        return bool(self._renew(keys=[K_PUTS, LEASE_PREFIX + put_id],
                                args=[put_id, now, now + int(ttl * 1000), _lease_set_ttl(ttl)]))

    def end_put(self, put_id: str) -> None:
        p = self.r.pipeline()
        p.zrem(K_PUTS, put_id)
        p.delete(LEASE_PREFIX + put_id)
        p.execute()

    def record_chunk(self, hex_id: str, raw: int, stored: int, codec: int, node_ids) -> None:
        p = self.r.pipeline()
        p.hset(k_chunk(hex_id), mapping={"raw": raw, "stored": stored, "codec": codec, "state": "ok"})
        if node_ids:
            p.sadd(k_locs(hex_id), *node_ids)
        p.execute()

    def stored_bytes(self, chunk_ids) -> int:
        """The stored bytes of these chunks (ids as bytes), in windows of round trips: one
        pipeline for a whole large model held a reply per chunk at once (262k chunks, +590 MB)."""
        total, ids = 0, list(chunk_ids)
        for at in range(0, len(ids), 4096):
            p = self.r.pipeline(transaction=False)
            for cid in ids[at:at + 4096]:
                p.hget(k_chunk(cid.hex()), "stored")
            total += sum(int(v) for v in p.execute() if v is not None)
        return total

    def chunk_info(self, hex_ids) -> list[dict | None]:
        """For each id: {raw, stored, codec, refs, state, locs} or None, in two round trips."""
        p = self.r.pipeline(transaction=False)
        for h in hex_ids:
            p.hgetall(k_chunk(h))
            p.smembers(k_locs(h))
        res = p.execute()
        out = []
        for i in range(len(hex_ids)):
            h, locs = res[2 * i], res[2 * i + 1]
            if not h:
                out.append(None)
                continue
            out.append({"raw": int(h.get(b"raw", 0)), "stored": int(h.get(b"stored", 0)),
                        "codec": int(h.get(b"codec", 0)), "refs": int(h.get(b"refs", 0)),
                        "state": _s(h.get(b"state", b"ok")), "locs": sorted(_s(x) for x in locs)})
        return out

    def locations(self, hex_id: str) -> list[str]:
        return sorted(_s(x) for x in self.r.smembers(k_locs(hex_id)))

    def add_locations(self, hex_id: str, node_ids) -> bool:
        """False (and nothing added) if the chunk has no record: gc took it (ADD_LOCS_LUA)."""
        return not node_ids or bool(self._add_locs(keys=[k_chunk(hex_id), k_locs(hex_id)], args=list(node_ids)))

    def listed(self, hex_id: str, node_id: str) -> bool:
        return bool(self.r.sismember(k_locs(hex_id), node_id))

    def mark_orphan(self, hex_id: str, ttl: float = 60) -> bool:
        """Mark a chunk with no record as being deleted (ORPHAN_LUA); False if it has one."""
        return bool(self._orphan(keys=[k_chunk(hex_id)], args=[int(ttl * 1000)]))

    def unmark_orphan(self, hex_id: str) -> None:
        self._unmark(keys=[k_chunk(hex_id)])

    def drop_unleased(self, hex_id: str, node_id: str, put_id: str = "") -> bool:
        """Drop one location unless a running put (other than put_id) leases the chunk
        (DROP_LUA); whether the node no longer counts as holding it."""
        return self._drop(keys=[k_locs(hex_id), K_PUTS],
                          args=[hex_id, self.now_ms(), LEASE_PREFIX, node_id, put_id]) != -1

    def all_chunks(self):
        for key in self.r.scan_iter(match=P + "c:*", count=1000):
            yield _s(key)[len(P) + 2:]

    @contextlib.contextmanager
    def _locked(self, key: str, what: str, refused, ttl: float):
        """Hold lock `key` (SET NX PX) for the block, as `what`; yields its token. Taken:
        raises refused(what holds it, its holder (host and pid), seconds until it lapses if
        that one was killed). Renewed from a thread every ttl/3: a holder that pauses past
        it (SIGSTOP, a VM pause) loses it."""
        token = f"{what}|{lease_holder()}:{secrets.token_hex(4)}"
        if not self.r.set(key, token, nx=True, px=int(ttl * 1000)):
            other, _, holder = _s(self.r.get(key) or b"?").rpartition("|")
            left = max(1, -(-int(self.r.pttl(key)) // 1000))
            raise refused(other, holder.rsplit(":", 1)[0], left)

        def renew():
            try:
                return bool(self._relock(keys=[key], args=[token, int(ttl * 1000)]))  # False: lost
            except redis.RedisError:
                return True  # a blip: try again

        try:
            with _every(ttl / 3, renew, f"shardfs-lock-{what}"):
                yield token
        finally:
            try:
                self._unlock(keys=[key], args=[token])
            except redis.RedisError:
                pass  # it expires by itself

    @contextlib.contextmanager
    def gc_lock(self, ttl: float = 60.0):
        """Hold the gc lock for the block: one gc at a time. Two at once could interleave a
        claim, a put re-uploading the chunk, and the other's forget, leaving a published
        chunk with no record. A gc that loses it (see _locked) runs scripts that then change
        nothing."""
        def refused(_other, holder, left):
            return ShardfsError(f"another gc is running ({holder}); run gc again once it has ended (if it "
                                f"was killed, its lock lapses within {left} s)")
        with self._locked(K_GC, "gc", refused, ttl) as token:
            self.gc_token = token
            try:
                yield
            finally:
                self.gc_token = None

    @contextlib.contextmanager
    def copies_lock(self, what: str, ttl: float = 60.0):
        """Hold the lock that `node rm` and `verify --repair` share for the block. A repair
        lists a chunk on its new node before copying it there, and drops that listing if the
        copy fails; a `node rm` counting that listing as a copy, and two `node rm`s each
        counting the other's node, lost the only copies (both reproduced by a review)."""
        def refused(other, holder, left):
            return ShardfsError(f"{'another ' if other == what else ''}`shardfs {other or 'node rm'}` is running "
                                f"({holder}); run {what} again once it has ended (if it was killed, its lock "
                                f"lapses within {left} s)")
        with self._locked(K_COPIES, what, refused, ttl) as token:
            yield token

    def holds_copies_lock(self, token: str) -> bool:
        """Whether copies_lock (its token) is still held, as its holder checks before acting."""
        return bool(self._relock(keys=[K_COPIES], args=[token, 60_000]))

    def _gc_checked(self, result) -> int:
        if result == -1:
            raise ShardfsError("this gc lost its lock (it paused longer than the lock lasts, or Redis "
                               "restarted); it stopped, run gc again")
        return result

    def claim_for_gc(self, hex_id: str) -> bool:
        """Mark an unreferenced chunk that no running put leases "deleting" (needs gc_lock)."""
        return bool(self._gc_checked(self._claim(keys=[k_chunk(hex_id), K_PUTS, K_GC],
                                                 args=[hex_id, self.now_ms(), LEASE_PREFIX, self.gc_token or ""])))

    def still_claimed(self, hex_id: str) -> bool:
        """Whether this gc still holds its lock and its claim on the chunk (CLAIMED_LUA);
        raises if the lock is lost."""
        return bool(self._gc_checked(self._claimed(keys=[k_chunk(hex_id), K_GC], args=[self.gc_token or ""])))

    def release_gc_claim(self, hex_id: str, deleted_from) -> None:
        """gc could not delete every copy: see RELEASE_LUA."""
        self._gc_checked(self._release(keys=[k_chunk(hex_id), k_locs(hex_id), K_GC],
                                       args=[self.gc_token or "", *deleted_from]))

    def unlist_claimed(self, hex_id: str, deleted_from) -> None:
        """gc deleted only some copies, and a node may still delete another: see UNLIST_LUA."""
        if deleted_from:
            self._gc_checked(self._unlist(keys=[k_locs(hex_id), K_GC], args=[self.gc_token or "", *deleted_from]))

    def forget_chunk(self, hex_id: str) -> None:
        self._gc_checked(self._forget(keys=[k_chunk(hex_id), k_locs(hex_id), K_GC], args=[self.gc_token or ""]))

    def expire_puts(self) -> None:
        for pid in self.r.zrangebyscore(K_PUTS, 0, self.now_ms()):
            self.end_put(_s(pid))

    def live_puts(self) -> list[float]:
        """Seconds until each running put's lease ends (a killed put's, when it lapses)."""
        now = self.now_ms()
        return [(score - now) / 1000 for _pid, score in self.r.zrangebyscore(K_PUTS, now, "+inf", withscores=True)]
