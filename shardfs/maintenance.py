"""Reading back and keeping the store healthy: get, verify (+repair), gc."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import stat
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import envelope
from .errors import BadRecord, CorruptChunk, NodeError, NotFound, ShardfsError, UnknownFormat, UsageError
from .index import Index, Version
from .placement import rank
from .pool import NodePool

WORKERS = 8


TEMP_INFIX = ".shardfs-"  # get's partial file beside DEST: .DEST.shardfs-XXXXXXXX


def key_for(ver: Version, key):
    """The keyring to read `ver` with: None for a plain version, whatever `key` is (a
    crypto.KeyFile or Keyring: the file is read only here, for an encrypted version);
    a clear error, before any read, when no key or another key was given."""
    want = ver.stats.get("key")
    if not want:
        return None
    if key is None:
        raise UsageError(f"{ver.name} is encrypted; give its key with --key-file (or the key_file setting)")
    keyring = key.load()
    if keyring.fingerprint != want:
        raise UsageError(f"{ver.name} is encrypted with another key (fingerprint {want}, "
                         f"given {keyring.fingerprint})")
    return keyring


def _ordered_reads(pool: NodePool, idx: Index, manifest, window: int = WORKERS * 2, keyring=None):
    """Yield the raw bytes of every chunk in file order, fetched `window` ahead in parallel."""
    hexes = [c.hex() for c in manifest.ids]
    infos = idx.chunk_info(sorted(set(hexes)))
    locs = {h: (i["locs"] if i else []) for h, i in zip(sorted(set(hexes)), infos)}
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="get") as ex:
        yield from _windowed(ex, lambda h: pool.read(h, locs[h], keyring), hexes, window)


def _windowed(ex, fn, items, window: int):
    """fn(item) for every item, run in ex at most `window` ahead, results in order: memory
    stays bounded however many items there are (ex.map would submit them all at once)."""
    pending = deque()
    it = iter(items)
    for item in it:
        pending.append(ex.submit(fn, item))
        if len(pending) >= window:
            break
    while pending:
        yield pending.popleft().result()
        item = next(it, None)
        if item is not None:
            pending.append(ex.submit(fn, item))


def get_model(idx: Index, name: str, dest: str, progress_bar=None, keyring=None,
              force: bool = False, say=None) -> tuple[Version, str]:
    """Reassemble a model into dest (a file path or an existing directory), verified end to end.
    An existing file at dest is replaced only with force; anything but a regular file never.
    `say(line)` hears of partial files an earlier, killed get left beside dest (removed).

    The version is leased while it is read, so `gc` cannot drop it (and its chunks) under a
    long get after a `put --force` replaced it."""
    if not dest:
        raise UsageError("DEST is empty; give a file or directory to write the model to")
    for _attempt in range(5):
        vid = idx.current_vid(name)
        if vid is None:
            raise NotFound(f"no model named {name!r}; see `shardfs ls`")
        with idx.reading([vid]):
            try:
                ver = idx.version(vid)  # (re-read under the lease: gc may have just dropped it)
            except NotFound:
                continue  # replaced and dropped in between: take the new current version
            return _get_version(idx, name, ver, dest, progress_bar, keyring, force, say)
    raise ShardfsError(f"{name}: replaced faster than it can be read; try again")


def check_dest(dest: str, force: bool) -> None:
    """get writes a new file and renames it over dest: refuse to replace what is there
    unless asked, and never replace a device, a link, a pipe or a directory."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return
    except OSError as e:
        raise UsageError(f"{dest}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = {stat.S_IFLNK: "a symbolic link", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
                stat.S_IFIFO: "a named pipe", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}.get(
                    stat.S_IFMT(st.st_mode), "not a regular file")
        raise UsageError(f"{dest} is {kind}: get writes regular files only; give another DEST")
    if not force:
        raise UsageError(f"{dest} exists; pass --force to replace it")


LEFTOVER_MIN_AGE = 5.0  # seconds: a get locks its partial file at once (see _remove_leftovers)


def _remove_leftovers(d: str, base: str) -> list[str]:
    """Remove the partial files of dest that killed gets left in d; returns their paths.
    A get holds an exclusive flock on its partial file while it writes, and the kernel drops
    it when the process dies however it dies, so a file whose lock can be taken has no writer
    left. (The age check covers the instant between a get creating its file and locking it.)"""
    prefix, gone, now = f".{base}{TEMP_INFIX}", [], time.time()
    try:
        names = [n for n in os.listdir(d) if n.startswith(prefix)]
    except OSError:
        return gone
    for n in names:
        path = os.path.join(d, n)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < LEFTOVER_MIN_AGE:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(path)
            gone.append(path)
        except OSError:  # locked: a get is writing it (or it is not ours to remove)
            continue
        finally:
            os.close(fd)
    return gone


def _new_file_mode(dest: str) -> int:
    """The mode a file written in place would have: a file it replaces keeps its own, a new
    one gets 0666 less the umask, as `cp` gives. (The temp file is 0600; forcing 0644 made
    an encrypted model's plaintext readable by every local user, whatever the umask.)"""
    try:
        st = os.lstat(dest)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    except OSError:
        pass
    mask = os.umask(0o077)  # (read it back: the CLI is one thread)
    os.umask(mask)
    return 0o666 & ~mask


def _get_version(idx: Index, name: str, ver: Version, dest: str, progress_bar, keyring,
                 force: bool, say=None) -> tuple[Version, str]:
    keyring = key_for(ver, keyring)  # (a key given for a plain model is neither read nor used)
    if os.path.isdir(dest):
        dest = os.path.join(dest, os.path.basename(name))
    d = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(d):
        raise UsageError(f"{d}: " + ("not a directory" if os.path.exists(d) else "no such directory"))
    check_dest(dest, force)
    pool = NodePool(idx.nodes())
    # (versions sealed before keyed file hashes recorded a plain SHA-256)
    keyed = keyring is not None and ver.stats.get("file_hash") == "hmac-sha256"
    sha = keyring.file_hash() if keyed else hashlib.sha256()
    what = "keyed hash (HMAC-SHA256)" if keyed else "SHA-256"
    for path in _remove_leftovers(d, os.path.basename(dest)):
        if say:
            say(f"removed {path}: a partial file an interrupted get left")
    try:
        fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{os.path.basename(dest)}{TEMP_INFIX}")
    except OSError as e:
        raise UsageError(f"cannot write in {d}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until closed: see _remove_leftovers
    except OSError:
        pass  # (a filesystem without locks: no later get can take a lock there either)
    try:
        with os.fdopen(fd, "wb") as out:
            for raw in _ordered_reads(pool, idx, ver.manifest, keyring=keyring):
                sha.update(raw)
                out.write(raw)
                if progress_bar:
                    progress_bar.update(len(raw))
            out.flush()
            os.fsync(out.fileno())
        if sha.hexdigest() != ver.sha256:
            raise ShardfsError(f"{name}: reassembled {what} {sha.hexdigest()} differs from the "
                               f"recorded {ver.sha256}; nothing written")
        os.chmod(tmp, _new_file_mode(dest))
        os.rename(tmp, dest)
        tmp = None
    except OSError as e:
        raise ShardfsError(f"cannot write {dest}: {e.strerror}") from None
    finally:
        pool.close()
        if tmp:
            os.unlink(tmp)
    return ver, dest


@dataclass
class VerifyReport:
    chunks: int = 0
    healthy: int = 0
    under: list = field(default_factory=list)       # (hex, good node ids, wanted R)
    bad_copies: list = field(default_factory=list)  # (hex, node id, reason)
    missing: list = field(default_factory=list)     # (hex, node id)
    unreadable: list = field(default_factory=list)  # (hex, node id, reason): node errored, copy kept
    lost: list = field(default_factory=list)        # hex with no good copy
    unlisted: list = field(default_factory=list)    # (hex, node ids): good copies the index does not list
    repaired: int = 0  # chunks repair changed (copied, or dropped broken copies) and left with R good ones
    unrepaired: list = field(default_factory=list)  # hex repair could not bring to R good copies
    bad_records: list = field(default_factory=list)  # BadRecord: malformed version records

    @property
    def ok(self) -> bool:
        return not (self.under or self.bad_copies or self.missing or self.lost or self.unreadable
                    or self.bad_records or self.unlisted)


def verify(idx: Index, names: list[str] | None, repair: bool = False, out=sys.stdout,
           keyring=None) -> VerifyReport:
    """Check that every chunk of the named (or all) models is hash-valid on R live nodes."""
    models = idx.models()
    if names:
        for n in names:
            if n not in models:
                raise NotFound(f"no model named {n!r}; see `shardfs ls`")
        vids = [vid for n in names for vid in idx.model_vids(n)]
    else:  # (with versions of removed models a mount still reads: a drain must copy them too)
        vids = idx.all_vids() + idx.removed_vids()
    asked = {models[n] for n in names} if names else set()
    with idx.reading(vids):  # gc must not drop a version (and its chunks) mid-check: false "lost"
        # (a repair holds the lock `node rm` takes: no `node rm` counts a copy it is making)
        with idx.copies_lock("verify --repair") if repair else contextlib.nullcontext():
            return _verify(idx, vids, asked, repair, out, keyring)


def _verify(idx: Index, vids: list[int], asked: set[int], repair: bool, out, keyring) -> VerifyReport:
    """asked: the current versions of the models named, whose key must be given (their
    replaced versions, kept for their readers, may be under a key since rotated)."""
    want: dict[str, int] = {}
    keyrings: dict[str, object] = {}  # chunk -> keyring of its (encrypted) version
    rep = VerifyReport()
    vers = idx.versions(vids, rep.bad_records)
    rep.bad_records += _missing_records(idx, set(vids) - {v.vid for v in vers} - {e.vid for e in rep.bad_records})
    for ver in vers:
        fp = ver.stats.get("key")
        if fp and (keyring is None or keyring.load().fingerprint != fp):  # (a broken key file: its error)
            if ver.vid in asked:
                key_for(ver, keyring)  # raises: the user asked for this model
            print(f"skipping {ver.name} (version {ver.vid}): encrypted with a key not given", file=out)
            continue
        for cid in ver.manifest.ids:
            want[cid.hex()] = max(want.get(cid.hex(), 0), ver.replicas)
            if fp:
                keyrings[cid.hex()] = keyring.load()
    pool = NodePool(idx.nodes())
    health = pool.probe()
    live = {nid: pool.nodes[nid].weight for nid, h in health.items()
            if not isinstance(h, NodeError) and pool.nodes[nid].state == "active"}
    for nid, h in health.items():
        if isinstance(h, NodeError):
            print(f"node {nid} {pool.nodes[nid].url} is down: {h}", file=out)
    for e in rep.bad_records:
        print(f"{e}: its chunks are not checked (and gc keeps them); `shardfs rm` its model, or "
              "put it again with --force", file=out)
    hexes = sorted(want)
    infos = dict(zip(hexes, idx.chunk_info(hexes)))

    def check(h):
        good, bad, missing, unreadable = [], [], [], []
        blob = None  # a good copy's envelope, for repair to copy as it is
        locs = (infos[h] or {"locs": []})["locs"]
        for nid in locs:
            if nid not in pool.nodes or isinstance(health.get(nid), NodeError):
                continue
            try:
                got = pool.store(nid).get(h)
                envelope.decode(got, bytes.fromhex(h), keyrings.get(h))
                good.append(nid)
                if repair and blob is None:
                    blob = got
            except NodeError as e:  # a flaky node's copy may be fine: report it, never drop it
                (missing if e.missing else unreadable).append((nid, str(e)))
            except UnknownFormat as e:  # a newer release's copy: not this one's to judge
                unreadable.append((nid, f"{e}: written by a newer shardfs?"))
            except CorruptChunk as e:
                bad.append((nid, f"corrupt: {e}"))
        found = []
        # Short of good copies, with no listed one on a node that is down or cannot answer now
        # to explain it: look elsewhere. (Not for every chunk of a node that is down: that
        # would be a request to every other node for each of its chunks, each verify.)
        away = [n for n in locs if isinstance(health.get(n), NodeError)] + [n for n, _ in unreadable]
        if len([n for n in good if n in live]) + len(away) < want[h]:
            found, copy = _unlisted_copies(pool, health, h, keyrings.get(h), listed=locs)
            if repair and blob is None:
                blob = copy
        return h, good, bad, missing, unreadable, blob, found

    try:
        with ThreadPoolExecutor(WORKERS) as ex:
            for h, good, bad, missing, unreadable, blob, found in _windowed(ex, check, hexes, 2 * WORKERS):
                rep.chunks += 1
                relisted = False
                if found and not repair:
                    rep.unlisted.append((h, found))
                    print(f"unlisted copy: chunk {h} is on node(s) {', '.join(found)}, where the index does not "
                          f"list it, so mounts cannot find it there: `shardfs verify --repair` lists it", file=out)
                elif found:
                    if idx.add_locations(h, found):
                        print(f"repair: listed chunk {h} on node(s) {', '.join(found)}, which hold a good copy "
                              "the index did not list", file=out)
                        good, relisted = good + found, True
                    else:
                        print(f"repair: chunk {h} has no record in the index (it lists no node for it), so its "
                              f"copies on {', '.join(found)} cannot be listed: put a file that holds it again",
                              file=out)
                for nid, why in unreadable:
                    rep.unreadable.append((h, nid, why))
                    print(f"unreadable copy (left in place): chunk {h} on node {nid}: {why}", file=out)
                for nid, why in bad:
                    rep.bad_copies.append((h, nid, why))
                    print(f"bad copy: chunk {h} on node {nid} ({pool.nodes[nid].url}): {why}", file=out)
                for nid, _ in missing:
                    rep.missing.append((h, nid))
                    print(f"missing copy: chunk {h} on node {nid} ({pool.nodes[nid].url})", file=out)
                active_good = [n for n in good if n in live]
                if not good:
                    rep.lost.append(h)
                    print(f"LOST: chunk {h} has no good copy on any live node"
                          + (" the index lists it on" if found else "")
                          + (f" ({len(unreadable)} copies this shardfs cannot read are left in place)"
                             if unreadable else ""), file=out)
                    if repair and (bad or missing):
                        # no copy to repair from; drop the broken ones, so that putting a file
                        # with this chunk again uploads it instead of trusting them
                        if not _drop_broken(idx, pool, h, bad, missing, out):
                            print(f"repair: dropped the broken copies of chunk {h}; putting a file that "
                                  f"holds it again (with the same --chunk-size) restores it", file=out)
                    continue
                if len(active_good) >= want[h] and not bad and not missing and not unreadable:
                    if relisted:
                        rep.repaired += 1
                    else:
                        rep.healthy += 1
                    continue
                if len(active_good) < want[h]:
                    rep.under.append((h, active_good, want[h]))
                    print(f"under-replicated: chunk {h} has {len(active_good)} of {want[h]} good copies "
                          f"({', '.join(active_good) or 'none live'})", file=out)
                if repair and (bad or missing or len(active_good) < want[h]):
                    if _repair(idx, pool, live, h, blob, active_good, want[h], bad, missing,
                               [nid for nid, _ in unreadable], out):
                        rep.repaired += 1
                    else:
                        rep.unrepaired.append(h)
    finally:
        pool.close()
    return rep


def _unlisted_copies(pool: NodePool, health: dict, h: str, keyring, listed) -> tuple[list[str], bytes | None]:
    """Good copies of chunk h on answering nodes the index does not list it on: where a chunk
    with fewer good listed copies than it needs may have more (a node removed and added again
    under a new id, a disk that was not mounted when a repair dropped its listings, a
    directory restored). Looked for only then: one request per node, most of them a 404.
    Returns the nodes, and one of their copies' envelope."""
    found, copy = [], None
    for nid in sorted(pool.nodes):
        if nid in listed or isinstance(health.get(nid), NodeError):
            continue
        try:
            got = pool.store(nid).get(h)
            envelope.decode(got, bytes.fromhex(h), keyring)
        except (NodeError, UnknownFormat, CorruptChunk):
            continue
        found.append(nid)
        copy = got if copy is None else copy
    return found, copy


def _missing_records(idx: Index, gone: set[int]) -> list[BadRecord]:
    """Of versions whose record was not found, those a model still lists (read after: gc
    drops a record and its listing together, so a version it dropped meanwhile is not
    one): a model that cannot be read, where verify said nothing."""
    if not gone:
        return []
    listed = idx.listed_vids()
    return [BadRecord.missing(vid, listed[vid]) for vid in sorted(gone) if vid in listed]


def _drop_broken(idx, pool, h, bad, missing, out) -> list[str]:
    """Drop bad and missing copies from the index, and bad ones from their node too; returns
    the nodes whose copies were left listed. A running put that leases the chunk may be
    storing it again right now: its copies are left alone (Index.drop_unleased), and so is
    a missing copy that is back."""
    left = []
    for nid, is_bad in [(n, True) for n, _ in bad] + [(n, False) for n, _ in missing]:
        store, gone = pool.store(nid), True
        if is_bad:
            # The copy goes before its listing: while listed and there, a put that leases the
            # chunk finds it and stores nothing on that node; once it is gone, such a put
            # stores a good copy, whose listing stays (drop_unleased, and the look below).
            # Dropping the listing first let a put store a good copy there that this delete
            # then removed, from under the version the put published.
            try:
                store.delete(h)
            except NodeError:
                gone = False  # (its listing goes all the same: readers skip a bad copy)
        if gone and _holds(store, h):
            continue  # stored again since it was checked (or deleted)
        if not idx.drop_unleased(h, nid):
            print(f"repair: left chunk {h} listed on {nid}: a running put leases it (and may be storing "
                  "it there again); verify again once it ends", file=out)
            left.append(nid)
        elif gone and _holds(store, h):
            # stored there again between the look above and the drop, by a put that has ended
            # since (and published, maybe): listed again, or that version has a lost chunk
            idx.add_locations(h, [nid])
    return left


def _holds(store, h: str) -> bool:
    try:
        return store.has(h)
    except NodeError:
        return False


def _repair(idx, pool, live, h, blob, good, want, bad, missing, unreadable, out) -> bool:
    """Drop broken copies and copy the chunk (`blob`: a good copy's envelope, stored as it is)
    until it has `want` good ones; whether it has them, and no broken copy is left listed.
    Nodes holding a copy that could not be read (`unreadable`) are not written to: that copy
    stays listed, whatever happens to the copy made elsewhere."""
    left = _drop_broken(idx, pool, h, bad, missing, out)
    have = list(good)
    if len(have) >= want:
        return not left
    listed = set(idx.locations(h))
    for nid in rank(h, live):
        if len(have) >= want:
            break
        if nid in have or nid in unreadable:
            continue
        if not idx.add_locations(h, [nid]):
            print(f"repair: chunk {h[:16]} was garbage-collected meanwhile", file=out)
            return True
        try:
            pool.store(nid).put(h, blob)
            have.append(nid)
        except NodeError as e:
            # only the listing added just now (a copy listed before stays listed), and not if the
            # node may have stored the copy before its answer was lost (gc finds it by its listing)
            if nid not in listed and not e.unsure:
                idx.drop_unleased(h, nid)  # (a running put may have stored it there meanwhile)
            print(f"repair: could not copy chunk {h[:16]} to {nid}: {e}", file=out)
    if len(have) >= want:
        print(f"repaired: chunk {h} now on {', '.join(have)}", file=out)
        return not set(left) - set(have)  # (a copy made again where a broken one was left is good)
    return False


def gc(idx: Index, out=sys.stdout, first=None) -> tuple[int, int]:
    """Delete every chunk no version references and no running put relies on.

    One gc runs at a time (Index.gc_lock); `first()` runs once the lock is taken (the CLI
    drops old versions there, so a gc refused for another one running has changed nothing).
    Returns (chunks deleted, stored bytes freed per replica)."""
    with idx.gc_lock():
        if first is not None:
            first()
        idx.expire_puts()
        live = idx.live_puts()
        if live:  # (their chunks are not this gc's: a killed put's are the next one's, once its lease ends)
            print(f"gc: {len(live)} put(s) under way keep the chunks they stored; a put that was killed keeps "
                  f"them until its lease ends (within {math.ceil(max(live))} s), and a later gc reclaims them",
                  file=out)
        pool = NodePool(idx.nodes())
        try:
            return _gc(idx, pool, out)
        finally:
            pool.close()


def _gc(idx: Index, pool: NodePool, out) -> tuple[int, int]:
    deleted = freed = 0
    skip = {}  # nodes gc deletes nothing through this run, and why
    for nid in pool.nodes:
        try:
            why = pool.store(nid).unsure()
        except NodeError as e:
            why = str(e)
        if why:
            skip[nid] = why
            print(f"gc: could not delete anything on node {nid}: {why}; will retry next gc", file=out)
    for h in list(idx.all_chunks()):
        if not idx.claim_for_gc(h):
            continue
        gone, failed, unsure, lost = [], [], [], False
        try:
            info = idx.chunk_info([h])[0] or {"locs": [], "stored": 0}
            for nid in info["locs"]:
                if nid not in pool.nodes:
                    continue
                if nid in skip:
                    failed.append(nid)
                    continue
                if not idx.still_claimed(h):  # (raises if this gc lost its lock while deleting)
                    lost = True  # no longer this gc's to delete: leave the chunk as it is now
                    break
                try:
                    pool.store(nid).delete(h)
                    gone.append(nid)
                except NodeError as e:
                    failed.append(nid)
                    if e.unsure:  # (asked, no answer: the node may still delete it, later)
                        unsure.append(nid)
                    skip[nid] = str(e)  # (not one more timeout per chunk on a node that hangs)
                    print(f"gc: could not delete chunk {h[:16]} from {nid}: {e}; deleting nothing more there "
                          "this run, will retry next gc", file=out)
        except BaseException:  # interrupted, or Redis failed: a chunk left "deleting" would stall puts
            try:
                idx.release_gc_claim(h, gone)
            except Exception:  # noqa: BLE001 - the next gc takes the claim over
                pass
            raise
        if lost:
            continue
        if unsure:
            # A delete that went out unanswered may still be done, later: were the claim given
            # back, a put could count on that copy (it is there when the put looks) and publish
            # a version that then loses it. The chunk stays claimed, so such a put waits for
            # it, until a gc whose deletes are answered finishes it (its listings on nodes
            # that did delete go now).
            idx.unlist_claimed(h, gone)
            print(f"gc: chunk {h[:16]} stays claimed for deletion ({', '.join(unsure)} may still delete its "
                  f"copy); a put of a file that holds it waits for the gc that finishes it: run gc again "
                  f"once {'that node answers' if len(unsure) == 1 else 'those nodes answer'}", file=out)
        elif failed:
            # give the claim back (state "ok", refs 0): a put needing the chunk re-uploads it
            # instead of waiting on a gc that cannot finish while that node is down
            idx.release_gc_claim(h, gone)
        else:
            idx.forget_chunk(h)
            deleted += 1
            freed += info["stored"]
    for nid in pool.nodes:  # temp files of puts killed mid-write (file:// nodes; servers sweep their own)
        try:
            swept = pool.store(nid).sweep_temps()
        except (NodeError, OSError):
            continue
        if swept:
            print(f"gc: removed {swept} temp file(s) that killed writers left on node {nid}", file=out)
    return deleted, freed


def stored_stats(idx: Index, vids: list[int]) -> dict[int, dict]:
    """Per version: stored bytes of its unique chunks, and which of them other versions share."""
    vers = idx.versions(vids, [])  # (a malformed record is reported by whoever lists it)
    all_vers = idx.versions(idx.all_vids(), [])
    users: dict[bytes, set] = {}
    for v in all_vers:
        for c in set(v.manifest.ids):
            users.setdefault(c, set()).add(v.vid)
    hexes = sorted({c.hex() for v in vers for c in v.manifest.ids})
    info = dict(zip(hexes, idx.chunk_info(hexes)))
    out = {}
    for v in vers:
        uniq = shared = 0
        for c in set(v.manifest.ids):
            s = (info.get(c.hex()) or {}).get("stored", 0)
            if len(users.get(c, ())) > 1:
                shared += s
            else:
                uniq += s
        out[v.vid] = {"stored": uniq + shared, "unique": uniq, "shared": shared}
    return out

