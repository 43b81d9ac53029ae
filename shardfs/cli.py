"""The `shardfs` command line. User errors: one line on stderr and a non-zero exit.

Nothing here imports pyfuse3 or talks to Redis before a subcommand needs it, so
`--help` works on a machine with neither.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from . import __version__
from .errors import BadRecord, NotFound, ShardfsError, UsageError

EPILOG = """\
Where the index lives: --redis URL, else $SHARDFS_REDIS, else the config file's `redis`,
else an embedded redis-server that shardfs starts on a unix socket under $SHARDFS_HOME
(default ~/.local/share/shardfs). `shardfs config show` says which one is used, and why.
With no node registered, `put` registers the local node file://$SHARDFS_HOME/nodes/local.
"""


def _index(args):
    from .connect import open_index
    return open_index(args.redis)


def _size(text):
    """argparse type for sizes: its errors become argparse's one-line usage errors."""
    from .units import parse_size
    try:
        return parse_size(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _key_file(args):
    """The key file given or configured, read only when an encrypted model needs it (or None)."""
    if not getattr(args, "key_file", None):
        return None
    from .crypto import KeyFile
    return KeyFile(args.key_file, getattr(args, "sources", {}).get("key_file", "flag"))


def _keyring(args):
    """The key, read now (put --encrypt, mount): a broken key file is an error at once."""
    key = _key_file(args)
    return key.load() if key else None


def _print_json(obj):
    print(json.dumps(obj, indent=2, sort_keys=True))


# -- nodes ------------------------------------------------------------------------------

def cmd_node_add(args):
    from .stores import MARKER, foreign_entries, init_root, open_store, read_token, root_marked
    from .errors import NodeError
    import math
    idx = _index(args)
    if not (math.isfinite(args.weight) and args.weight > 0):
        raise UsageError("--weight must be a positive number")
    token = read_token(args.token_file)
    if ".." in args.url.split("?")[0].split("/"):  # (one directory under two URLs would be two nodes)
        raise UsageError(f"node URL {args.url!r} contains '..'; give the path without it")
    if "?" in args.url or "#" in args.url:  # (a file:// node took them into its path)
        raise UsageError(f"node URL {args.url!r} has a query or fragment; give scheme, host, port and path only")
    store = open_store(args.url, token)
    if args.url.startswith("file://"):
        if os.path.isdir(store.root) and not root_marked(store.root):
            other = foreign_entries(store.root)
            if other:
                shown = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
                raise UsageError(f"{store.root} already holds other files ({shown}); give a new or empty "
                                 f"directory, e.g. file://{os.path.join(store.root, 'shardfs')}")
        why = init_root(store.root, adopt=True)  # (the directory named here is the node's: see stores.MARKER)
        if why:
            raise UsageError(f"cannot create node directory {store.root}: {why}")
    try:
        try:
            health = store.health(used=False)
        except NodeError as e:
            if not args.offline:
                raise ShardfsError(f"node {args.url} does not answer ({e}); use --offline to add it anyway") from None
            health = None
        if health is not None:
            try:
                if health.get("unsure"):  # (a node server whose directory is not marked: see stores.MARKER)
                    raise NodeError(args.url, health["unsure"] + "; if it is the node's directory, `touch "
                                    f"{MARKER}` in it")
                store.probe_write()
            except NodeError as e:
                if not args.offline:
                    raise ShardfsError(f"node {args.url} answers but refuses writes ({e}); check its "
                                       f"--token-file and permissions, or use --offline to add it anyway") from None
                print(f"shardfs: warning: node {args.url} refuses writes now ({e})", file=sys.stderr)
    finally:
        store.close()
    if health and health.get("root"):
        _refuse_same_root(idx, args.url, health["root"])
    node = idx.add_node(args.url, args.weight, token)
    if health is None:
        extra = ", not reachable now"
    elif health.get("free") is None:
        extra = ", free space not reported"
    else:
        extra = f", {health['free'] / 2**30:.1f} GiB free"
    print(f"added node {node.id} {node.url} (weight {node.weight:g}{extra})")


def _refuse_same_root(idx, url: str, root: str) -> None:
    """Refuse a node whose directory a registered node already is (another spelling of its
    path, a symlink, an HTTP server in front of it): R copies there would be one copy.
    Nodes that do not answer now cannot be compared."""
    from .pool import NodePool
    pool = NodePool(idx.nodes())
    try:
        for nid, h in pool.probe(used=False).items():
            if isinstance(h, dict) and h.get("root") == root:
                raise UsageError(f"node {url} is the directory node {nid} ({pool.nodes[nid].url}) "
                                 f"already is; two nodes there would be one copy")
    finally:
        pool.close()


def cmd_node_ls(args):
    from .connect import display_url
    from .errors import NodeError
    from .pool import NodePool
    idx = _index(args)
    pool = NodePool(idx.nodes())
    health = pool.probe(used=True)
    rows = []
    for nid, node in pool.nodes.items():
        h = health.get(nid)
        up = not isinstance(h, NodeError)
        rows.append({"id": nid, "url": display_url(node.url), "weight": node.weight, "state": node.state, "up": up,
                     "used": h.get("used") if up else None, "free": h.get("free") if up else None,
                     "error": None if up else str(h)})
    pool.close()
    if args.json:
        _print_json(rows)
        return
    if not rows:
        print("no nodes registered; add one with `shardfs node add URL`")
        return
    from .units import human
    print(f"{'ID':<5} {'STATE':<9} {'UP':<5} {'WEIGHT':>6} {'USED':>10} {'FREE':>10}  URL")
    for r in rows:
        used = human(r["used"]) if r["used"] is not None else "-"
        free = human(r["free"]) if r["free"] is not None else "-"
        print(f"{r['id']:<5} {r['state']:<9} {'yes' if r['up'] else 'NO':<5} {r['weight']:>6g} {used:>10} "
              f"{free:>10}  {r['url']}")


def cmd_node_rm(args):
    from .units import human
    idx = _index(args)
    if args.id not in idx.nodes():
        raise NotFound(f"no node {args.id!r}; see `shardfs node ls`")
    with idx.copies_lock("node rm") as token:  # (no repair's copy under way is counted as one)
        sole, size, listed = idx.sole_copies(args.id)
        if sole and not args.force:
            raise ShardfsError(f"node {args.id} holds the only copy of {sole} chunk(s) ({human(size)}) that models "
                               f"use: removing it would lose them. Copy them elsewhere first (`shardfs node drain "
                               f"{args.id}`, then `shardfs verify --repair`, with --key-file for encrypted models: "
                               f"it skips those it has no key for), or pass --force")
        if not idx.holds_copies_lock(token):
            raise ShardfsError(f"node rm paused longer than its lock lasts, so its count may be out of date; "
                               f"node {args.id} was not removed: run node rm again")
        idx.remove_node(args.id)
    print(f"removed node {args.id}" + (f"; run `shardfs verify --repair` to restore the replicas it held "
                                        f"({listed} chunk(s))" if listed else " (it held no chunks)"))


def cmd_node_drain(args):
    idx = _index(args)
    state = "draining" if not args.undo else "active"
    was = idx.set_node_state(args.id, state)
    if was == state:
        print(f"node {args.id} was {state} already" + ("" if args.undo else ": new chunks go elsewhere"))
    else:
        print(f"node {args.id} is {'draining: new chunks go elsewhere' if not args.undo else 'active again'}")


def cmd_node_serve(args):
    from .nodeserver import serve
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(args.root, args.listen, args.serve_token_file, args.metrics)


# -- models -----------------------------------------------------------------------------

def cmd_put(args):
    from .chunker import check_chunk_size
    from .connect import home
    from .ingest import PutSession, open_source, put_file, summary
    check_chunk_size(args.chunk_size)  # (before anything is started or registered)
    if args.replicas is not None and args.replicas < 1:
        raise UsageError("--replicas must be at least 1")
    if not os.path.isdir(args.file):
        open_source(args.file).close()  # a bad FILE is reported before any service is started
    if args.encrypt and not args.key_file:
        raise UsageError("--encrypt needs a key: --key-file FILE (32 random bytes, e.g. head -c32 /dev/urandom)")
    keyring = _keyring(args) if args.encrypt else None
    name = args.name if args.name is not None else os.path.basename(os.path.abspath(args.file))
    folder = os.path.isdir(args.file)
    if name.endswith("/") and not folder:  # like cp FILE DIR/: the file's own name inside that folder
        name += os.path.basename(os.path.abspath(args.file))
    name = name.rstrip("/") or name
    from .names import check_name
    if not folder:
        name = check_name(name)  # (before the index: a bad name starts no embedded Redis)
    else:
        files, hidden = _folder_files(args.file)
        if hidden:  # (.git, .cache/huggingface, .gitattributes: not part of the model)
            print(f"shardfs: leaving out {len(hidden)} hidden entr{'y' if len(hidden) == 1 else 'ies'} "
                  f"(names starting with '.'): {', '.join(hidden[:5])}{', ...' if len(hidden) > 5 else ''}",
                  file=sys.stderr)
        names = {rel: check_name(f"{name}/{rel}") for rel in files}
        for path in files.values():
            open_source(path).close()  # a pipe, a broken link, an unreadable file: say so now
    idx = _index(args)
    default_node = "file://" + os.path.join(home(), "nodes", "local")
    progress = None if not args.no_progress else False
    if not folder:
        res = put_file(idx, args.file, name, replicas=args.replicas, chunk_size=args.chunk_size,
                       force=args.force, progress=progress, default_node_url=default_node, keyring=keyring)
        print(summary(res))
        return
    # --force replaces a folder whole: what the old one had and the new one has not goes too
    # (a stale single-file checkpoint left beside a new sharded one would load instead of it),
    # in the same publish as the new files
    leftovers = sorted(n for n in idx.models() if n.startswith(name + "/") and n not in names.values()) \
        if args.force else []
    # every name, clash and file checked before anything is uploaded
    for full in names.values():
        conflict = idx.path_conflict(full, ignore=set(leftovers))
        if conflict:
            raise UsageError(conflict)
    clashes = [full for full in names.values() if idx.current_vid(full) is not None]
    if clashes and not args.force:
        raise UsageError(f"{len(clashes)} model(s) under {name}/ already exist (e.g. {clashes[0]}); "
                         f"use --force to replace them")
    try:
        with PutSession(idx, replicas=args.replicas, default_node_url=default_node, keyring=keyring) as put:
            stored = []
            for rel, path in files.items():
                with open_source(path) as src:
                    stored.append(put.store(src, names[rel], args.chunk_size, progress))
            results = put.publish(stored, args.force, remove=leftovers)
    except (KeyboardInterrupt, ShardfsError) as e:
        what, code = _stopped(e) if isinstance(e, KeyboardInterrupt) else (str(e), e.exit_code)
        after = _after_publish()
        if after:
            what += after
        elif "nothing was published" not in what:
            what += f"; nothing under {name}/ was published"
        err = ShardfsError(what)
        err.exit_code = code
        raise err from None
    for res in results:
        print(summary(res))
    for old in leftovers:
        print(f"removed {old}: not in the new {name}/")


MAX_FOLDER_VISITS = 64


def _folder_files(root: str) -> tuple[dict[str, str], list[str]]:
    """Every regular file under a model folder: relative name -> path (symlinks followed),
    and the hidden files and folders left out (relative names; a folder's contents unread).
    A folder reached twice through symbolic links gives its files under both names (put
    stores their bytes once); only a link to a folder it sits in is an error (a loop)."""
    out, hidden = {}, []
    ids: dict[str, tuple[int, int]] = {}  # folder walked -> (st_dev, st_ino)
    parent: dict[str, str] = {}  # folder walked -> the folder it was listed in
    visits: dict[tuple[int, int], int] = {}  # (links can reach a folder 2^depth ways: bounded)

    def unreadable(e: OSError):  # (os.walk skips a directory it cannot list without a word)
        raise UsageError(f"cannot read folder {e.filename}: {e.strerror}; nothing was put")

    for d, dirs, files in os.walk(root, onerror=unreadable, followlinks=True):
        try:
            st = os.stat(d)
        except OSError as e:  # (removed or changed since its parent was listed)
            unreadable(e)
        me = ids[d] = (st.st_dev, st.st_ino)
        up = d
        while (up := parent.get(up)) is not None:  # (os.walk goes top-down: all above are in ids)
            if ids[up] == me:
                raise UsageError(f"{d} is the folder {up} again (a symbolic link loop); nothing was put")
        visits[me] = visits.get(me, 0) + 1
        if visits[me] > MAX_FOLDER_VISITS:
            raise UsageError(f"{d}: symbolic links reach that folder more than {MAX_FOLDER_VISITS} ways "
                             f"under {root}; nothing was put")
        hidden += [os.path.relpath(os.path.join(d, x), root) + "/" for x in sorted(dirs) if x.startswith(".")]
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        parent.update((os.path.join(d, x), d) for x in dirs)
        for f in sorted(files):
            if f.startswith("."):
                hidden.append(os.path.relpath(os.path.join(d, f), root))
                continue
            out[os.path.relpath(os.path.join(d, f), root)] = os.path.join(d, f)
    if not out:
        raise UsageError(f"{root} is an empty folder" + (f" (but for hidden entries: {', '.join(hidden[:5])})"
                                                          if hidden else ""))
    return out, hidden


def _version_row(ver, stats):
    st = stats.get(ver.vid, {})
    stored = st.get("stored", 0)
    return {"name": ver.name, "version": ver.vid, "size": ver.size, "stored": stored,
            "unique": st.get("unique", 0), "shared": st.get("shared", 0),
            "ratio": round(stored / ver.size, 4) if ver.size else 0.0,
            "chunks": len(ver.manifest), "replicas": ver.replicas, "sha256": ver.sha256,
            "file_hash": ver.stats.get("file_hash", "sha256"), "created": ver.created}


def cmd_ls(args):
    from .maintenance import stored_stats
    idx = _index(args)
    models = {n: v for n, v in idx.models().items() if n.startswith(args.prefix or "")}
    bad = []
    vers = sorted(idx.versions(list(models.values()), bad), key=lambda v: v.name)
    found = {v.vid for v in vers} | {e.vid for e in bad}
    now = idx.models()  # (read after: a model replaced or removed meanwhile is not one)
    bad += [BadRecord.missing(vid, name) for name, vid in sorted(models.items()) if vid not in found and now.get(name) == vid]
    for e in bad:  # (the others are listed all the same; the exit status says so)
        print(f"shardfs: {e}: that model is left out; `shardfs rm` it, or put it again with --force",
              file=sys.stderr)
    stats = stored_stats(idx, [v.vid for v in vers])
    rows = [_version_row(v, stats) for v in vers]
    if args.json:
        _print_json(rows)
    elif not rows:
        print("no models" + (f" under {args.prefix!r}" if args.prefix else ""))
    else:
        _print_ls(idx, rows, vers)
    if bad:
        sys.exit(1)


def _print_ls(idx, rows, vers):
    from .units import human
    print(f"{'SIZE':>10} {'STORED':>10} {'RATIO':>6} {'CHUNKS':>6} {'VER':>5}  NAME")
    for r in rows:
        print(f"{human(r['size']):>10} {human(r['stored']):>10} {r['ratio']:>6.3f} {r['chunks']:>6} "
              f"{r['version']:>5}  {r['name']}")
    tot_size = sum(r["size"] for r in rows)
    tot_unique = sum(r["unique"] for r in rows)
    every = idx.versions(idx.all_vids(), [])  # (every version kept, current or replaced: read once)
    shared_total = _shared_total(idx, vers, every)
    print(f"total: {human(tot_size)} in {len(rows)} model(s), {human(tot_unique + shared_total)} stored per "
          f"replica ({human(shared_total)} of it shared by two or more models or versions)")
    kept = _kept_total(idx, vers, every)
    if kept:
        print(f"replaced versions of these models hold {human(kept)} more per replica "
              "(`shardfs gc` frees it once no mount reads them and the grace has passed)")


def _shared_total(idx, vers, every):
    seen, total = set(), 0
    counts: dict[bytes, int] = {}
    for v in every:
        for c in set(v.manifest.ids):
            counts[c] = counts.get(c, 0) + 1
    shared = [c for v in vers for c in set(v.manifest.ids) if counts.get(c, 0) > 1 and not (c in seen or seen.add(c))]
    for info in idx.chunk_info([c.hex() for c in shared]):
        total += info["stored"] if info else 0
    return total


def _kept_total(idx, vers, every) -> int:
    """Stored bytes of chunks only the listed models' replaced versions (among `every`
    version kept) still use: on the nodes until gc prunes those versions, and in no row above."""
    listed = {c for v in vers for c in v.manifest.ids}
    current = {v.name: v.vid for v in vers}
    only_old = {c for o in every if o.name in current and o.vid != current[o.name]
                for c in o.manifest.ids} - listed
    return sum(info["stored"] for info in idx.chunk_info([c.hex() for c in only_old]) if info)


def cmd_info(args):
    from .maintenance import stored_stats
    from .units import human
    idx = _index(args)
    ver = idx.model(args.name)
    row = _version_row(ver, stored_stats(idx, [ver.vid]))
    row["chunk_size"] = ver.chunk_size
    row["codecs"] = ver.stats.get("codecs", {})
    row["dtypes"] = ver.stats.get("dtypes", {})
    row["versions"] = idx.model_vids(args.name)
    if args.json:
        _print_json(row)
        return
    print(f"name:      {row['name']}")
    print(f"version:   {row['version']} (kept versions: {', '.join(map(str, row['versions']))})")
    print(f"created:   {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ver.created))}")
    print(f"size:      {row['size']} bytes ({human(row['size'])})")
    print(f"stored:    {human(row['stored'])} per replica, ratio {row['ratio']:.3f} "
          f"(unique {human(row['unique'])}, shared {human(row['shared'])})")
    print(f"chunks:    {row['chunks']} x up to {human(ver.chunk_size)}, R={row['replicas']}")
    print(f"codecs:    {', '.join(f'{k}: {v}' for k, v in sorted(row['codecs'].items())) or '-'}")
    for dt, d in row["dtypes"].items():
        print(f"dtype:     {dt}: {human(d['raw'])} -> {human(d['stored'])} stored "
              f"(ratio {d['stored'] / d['raw']:.3f}, chunks stored by this version)")
    print(f"sha256:    {row['sha256']}" + (" (keyed: HMAC-SHA256 of the plaintext, see Security notes)"
                                              if row["file_hash"] == "hmac-sha256" else ""))


def cmd_get(args):
    from .maintenance import get_model
    idx = _index(args)
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=idx.model(args.name).size, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"get {args.name}", file=sys.stderr)
    try:
        say = bar.write if bar else print  # (a line, not through the progress bar)
        ver, dest = get_model(idx, args.name, args.dest, bar, keyring=_key_file(args), force=args.force,
                              say=lambda line: say(line, file=sys.stderr))
    finally:
        if bar:
            bar.close()
    kind = "keyed hash" if ver.stats.get("file_hash") == "hmac-sha256" else "sha256"
    print(f"wrote {dest}: {ver.size} bytes, {kind} {ver.sha256} verified")


def cmd_rm(args):
    from .names import check_name
    idx = _index(args)
    if args.name.endswith("/"):  # a model folder: every model under it
        prefix = check_name(args.name.rstrip("/"), new=False) + "/"
        names = sorted(n for n in idx.models() if n.startswith(prefix))
        if not names:
            raise NotFound(f"no models under {prefix!r}; see `shardfs ls`")
    else:
        names = [check_name(args.name, new=False)]
    for name in names:
        vids, kept = idx.remove(name)
        print(f"removed {name} ({len(vids)} version(s))"
              + (f"; {len(kept)} kept while a mount reads it (gc drops it after)" if kept else ""))
    print("run `shardfs gc` to reclaim chunks no other model shares")


def cmd_verify(args):
    from .maintenance import verify
    idx = _index(args)
    rep = verify(idx, [args.name] if args.name else None, repair=args.repair, keyring=_key_file(args))
    print(f"verified {rep.chunks} chunks: {rep.healthy} healthy, {len(rep.under)} under-replicated, "
          f"{len(rep.bad_copies)} bad copies, {len(rep.missing)} missing copies, "
          f"{len(rep.unreadable)} unreadable copies, {len(rep.lost)} lost"
          + (f", {len(rep.unlisted)} with unlisted copies" if rep.unlisted else "")
          + (f", {rep.repaired} repaired" if args.repair else "")
          + (f"; {len(rep.bad_records)} malformed or missing version record(s)" if rep.bad_records else ""))
    if rep.lost or rep.bad_records or (not rep.ok and not args.repair) or (args.repair and rep.unrepaired):
        sys.exit(1)


def cmd_gc(args):
    from .maintenance import gc
    from .units import human, parse_duration
    grace = parse_duration(args.grace)
    idx = _index(args)
    pruned = []

    def prune():  # (under gc's lock)
        pruned.extend(idx.prune_versions(grace) if grace != float("inf") else idx.prune_removed())
        for name, vid in pruned:
            print(f"gc: dropped version {vid} of {name} (replaced or removed, and no mount reads it)")
    n, freed = gc(idx, first=prune)
    print(f"gc: dropped {len(pruned)} replaced or removed version(s); "
          f"deleted {n} unreferenced chunk(s), {human(freed)} per replica")


def cmd_config(args):
    from .config import show
    show(args.cfg, args)


def cmd_doctor(args):
    from .doctor import run
    if not run(args.redis, args.cache_dir):
        sys.exit(1)


# -- parser -----------------------------------------------------------------------------

def path_arg(value: str) -> str:
    """argparse type of a path argument: an empty one (an unset shell variable) is refused,
    never taken for the current directory (`mount ""` mounted over it)."""
    if not value:
        raise argparse.ArgumentTypeError("must not be empty")
    return value


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (with where to look), not argparse's usage block and then
    the error; exit status 2 as argparse's."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")

    def _print_message(self, message, file=None):
        if message:  # (argparse's own drops write errors: `--help > /dev/full` exited 0)
            (file or sys.stderr).write(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="shardfs", description="Store ML model checkpoints as compressed, "
                                "replicated, content-addressed chunks and read them back through a "
                                "read-only FUSE mount.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--redis", metavar="URL", help="Redis index URL (redis://, rediss://, unix://); "
                   "default $SHARDFS_REDIS, the config file's redis, or the embedded server")
    p.add_argument("--config", type=path_arg, metavar="FILE", help="TOML config file (default $SHARDFS_CONFIG, "
                   "$SHARDFS_HOME/config.toml, /etc/shardfs/config.toml)")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    p.add_argument("--version", action="version", version=f"shardfs {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    node = sub.add_parser("node", help="manage backing nodes").add_subparsers(dest="node_cmd", required=True,
                                                                               metavar="ACTION")
    a = node.add_parser("add", help="register a node (file:///path or http://host:port)")
    a.add_argument("url", help="file:///absolute/path (a directory) or http://host:port (a `node serve` "
                   "server or nginx with WebDAV)")
    a.add_argument("--weight", type=float, default=1.0, help="relative share of chunks (default 1)")
    a.add_argument("--token-file", type=path_arg, help="file holding the node's write token (default: token_file setting)")
    a.add_argument("--offline", action="store_true", help="register even if the node does not answer, or refuses writes, now")
    a.set_defaults(func=cmd_node_add)
    a = node.add_parser("ls", help="list nodes with health and free space")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.set_defaults(func=cmd_node_ls)
    a = node.add_parser("rm", help="unregister a node (then `verify --repair`); refused while it holds "
                        "the only copy of chunks that models use")
    a.add_argument("id", help="node id, as `shardfs node ls` shows it")
    a.add_argument("--force", action="store_true", help="remove it even if that loses chunks")
    a.set_defaults(func=cmd_node_rm)
    a = node.add_parser("drain", help="stop placing new chunks on a node (then `verify --repair`)")
    a.add_argument("id", help="node id, as `shardfs node ls` shows it")
    a.add_argument("--undo", action="store_true", help="make the node active again")
    a.set_defaults(func=cmd_node_drain)
    a = node.add_parser("serve", help="run an HTTP node server over a directory")
    a.add_argument("--root", required=True, type=path_arg, help="directory holding the chunks")
    a.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="address to serve on, e.g. 127.0.0.1:8001 (0.0.0.0 for every interface)")
    a.add_argument("--token-file", type=path_arg, dest="serve_token_file",
                   help="require this token (Authorization: Bearer) for PUT and DELETE")
    a.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics on HOST:PORT/metrics")
    a.set_defaults(func=cmd_node_serve)

    a = sub.add_parser("put", help="ingest a checkpoint file, or every file of a model folder")
    a.add_argument("file", type=path_arg, help="a file, or a folder (Hugging Face style): each file becomes NAME/relative/path")
    a.add_argument("--name", help="model name, a relative path like org/model.safetensors (default: file name)")
    a.add_argument("--replicas", type=int, help="copies of each chunk (default $SHARDFS_REPLICAS, the config "
                   "file's replicas, or min(2, live nodes))")
    a.add_argument("--chunk-size", type=_size, default=4 << 20, help="64KiB..64MiB (default 4MiB)")
    a.add_argument("--force", action="store_true", help="replace an existing model of that name")
    a.add_argument("--encrypt", action="store_true", help="seal every chunk with AES-256-GCM under --key-file; "
                   "nodes hold only ciphertext")
    a.add_argument("--key-file", type=path_arg, help="32-byte key (raw or hex) for --encrypt (default: key_file setting)")
    a.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    a.set_defaults(func=cmd_put)

    a = sub.add_parser("ls", help="list models: size, stored bytes, ratio, chunks, version")
    a.add_argument("prefix", nargs="?", help="only models whose name starts with this")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.set_defaults(func=cmd_ls)
    a = sub.add_parser("info", help="details of one model")
    a.add_argument("name", help="model name, as `shardfs ls` shows it")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.set_defaults(func=cmd_info)
    a = sub.add_parser("get", help="reassemble a model into a file without FUSE, verified")
    a.add_argument("name", help="model name, as `shardfs ls` shows it")
    a.add_argument("dest", help="file path or existing directory")
    a.add_argument("--force", action="store_true", help="replace an existing file at DEST "
                   "(never a device, link, pipe or directory)")
    a.add_argument("--key-file", type=path_arg, help="the key of an encrypted model (default: key_file setting)")
    a.set_defaults(func=cmd_get)
    a = sub.add_parser("rm", help="remove a model and its versions, or NAME/ for a whole folder "
                       "(chunks go at the next gc)")
    a.add_argument("name", help="model name, or a folder as NAME/")
    a.set_defaults(func=cmd_rm)
    a = sub.add_parser("verify", help="check every chunk is hash-valid on R live nodes")
    a.add_argument("name", nargs="?", help="one model (default: every model)")
    a.add_argument("--repair", action="store_true", help="re-replicate and drop bad copies")
    a.add_argument("--key-file", type=path_arg, help="key of encrypted models (others are checked anyway; "
                   "encrypted ones without it are skipped)")
    a.set_defaults(func=cmd_verify)
    a = sub.add_parser("gc", help="drop replaced versions no mount reads, then delete chunks "
                                  "that no version references")
    a.add_argument("--grace", default="1d", metavar="DURATION",
                   help="keep a replaced version at least this long after `put --force` replaced "
                        "it, e.g. 0, 15m, 2h, 1d (default), never; versions open in a running "
                        "mount are kept regardless")
    a.set_defaults(func=cmd_gc)
    a = sub.add_parser("config", help="show effective settings and where each came from")
    a.add_argument("action", choices=["show"], help="show: print every setting and its source")
    a.set_defaults(func=cmd_config)
    a = sub.add_parser("doctor", help="check FUSE, Redis, every node, the cache dir and read-ahead")
    a.add_argument("--cache-dir", type=path_arg, help="the cache dir a mount would use (default $SHARDFS_CACHE_DIR, the "
                   "config file's cache_dir, or $SHARDFS_HOME/cache)")
    a.set_defaults(func=cmd_doctor)

    try:
        from .mountcli import add_mount_commands
    except ImportError:  # pragma: no cover - the mount module is optional at import time
        pass
    else:
        add_mount_commands(sub)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) during a command that leaves work behind when cut short: raised
    like Ctrl-C, so put and get clean up the same way."""


def _terminate(signum, frame):
    raise Terminated(signum)


def stop_signals() -> list:
    """The signals that stop a command cleanly: SIGTERM, and SIGHUP unless it is ignored (as
    under `nohup`, which asks for the work to go on when the terminal closes)."""
    import signal
    return [signal.SIGTERM] + ([signal.SIGHUP] if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN else [])


def _after_publish() -> str:
    """'' or, for a put stopped once its publish was done, what it published."""
    from .ingest import published
    if not published:
        return ""
    what = ", ".join(f"{r.name} version {r.vid}" for r in published[:3]) + (" ..." if len(published) > 3 else "")
    return f" after publishing {what}"


def _put_outcome() -> str:
    """What a put that Redis failed did publish, as far as it can tell."""
    from .ingest import publishing
    if publishing:  # (failed inside the publish: Redis may have applied it before it went)
        return (f"; whether {publishing[0]}{' ...' if len(publishing) > 1 else ''} was published is not "
                f"known: see `shardfs ls` once Redis is back")
    return _after_publish() or ("; nothing was published (`shardfs gc` reclaims the chunks stored so "
                                "far once Redis is back)")


def _stopped(e: KeyboardInterrupt) -> tuple[str, int]:
    """How a command cut short says so, and its exit status (128 + the signal)."""
    return ("terminated", 128 + e.args[0]) if isinstance(e, Terminated) else ("interrupted", 130)


def main(argv=None) -> int:
    if sys.stdout is None:  # started with stdout closed (`shardfs ls >&-`): say so, once
        print("shardfs: error: standard output is closed", file=sys.stderr or sys.__stderr__)
        return 1
    try:
        args = build_parser().parse_args(argv)
        # (--help and usage errors exit from in there: their text must have gone out)
    except SystemExit:
        try:
            sys.stdout.flush()
        except OSError as err:
            _drop_stdout()
            print(f"shardfs: error: {err.strerror}", file=sys.stderr)
            return 1
        raise
    except OSError as err:  # writing --help to a full or closed output
        _drop_stdout()
        if not isinstance(err, BrokenPipeError):  # (`| head`: quiet, as for every command)
            print(f"shardfs: error: {err.strerror}", file=sys.stderr)
        return 1
    if args.cmd in ("put", "get", "verify", "gc"):  # (mount and node serve handle SIGTERM themselves)
        import signal
        for sig in stop_signals():
            signal.signal(sig, _terminate)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="shardfs: %(levelname)s: %(message)s")
    try:
        if args.cmd == "config":  # show what flags would not override
            from .config import Config, config_path
            args.cfg = Config(config_path(args.config))
        else:
            if args.cmd == "put" and args.key_file and not args.encrypt:
                # (checked before the key_file setting fills in: a configured key alone is fine)
                raise UsageError("--key-file is used only with --encrypt: add --encrypt to seal "
                                 "this model, or drop --key-file")
            from .config import apply
            apply(args)
        args.func(args)
        sys.stdout.flush()  # (a full or closed stdout fails here, inside the handlers below)
    except ShardfsError as e:
        print(f"shardfs: error: {e}", file=sys.stderr)
        return e.exit_code
    except _redis_errors() as e:  # (looked up only when something is raised)
        from . import connect
        url = connect.display_url(connect.last_url) if connect.last_url else "the index"
        print(f"shardfs: error: Redis at {url} failed: {e}{_put_outcome() if args.cmd == 'put' else ''}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        what, code = _stopped(e)
        if args.cmd == "put":
            what += _after_publish() or "; nothing was published (run `shardfs gc` to reclaim partial uploads)"
        elif args.cmd == "mount" and not getattr(args, "foreground", True):
            what += "; the mount daemon was stopped, nothing is mounted"
        elif args.cmd == "cache" and getattr(args, "cache_cmd", None) == "warm":
            what += "; the mount stops warming (what it fetched stays cached)"
        print(f"shardfs: {what}", file=sys.stderr)
        return code
    except BrokenPipeError:
        _drop_stdout()
        return 1
    except UnicodeEncodeError as e:  # a name from argv that is not UTF-8, on its way to Redis
        bad = os.fsencode(e.object) if isinstance(e.object, str) else e.object
        print(f"shardfs: error: {bad!r} is not valid UTF-8; names stored in the index must be", file=sys.stderr)
        return 2
    except OSError as e:  # what no command catches itself: writing the output to a full disk, say
        _drop_stdout()
        print(f"shardfs: error: {e}", file=sys.stderr)
        return 1
    return 0


class _NeverRaised(Exception):
    pass


def _redis_errors() -> type[Exception]:
    """redis.RedisError if redis was imported (nothing else raises it), without importing it:
    `node serve` and `--help` do without it, and it cost every such start 0.13 s."""
    mod = sys.modules.get("redis")
    return mod.RedisError if mod is not None else _NeverRaised


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's flush at exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
