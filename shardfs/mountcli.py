"""`shardfs mount`, `umount` and `cache ...`. pyfuse3 is imported only when mounting."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from .errors import IndexUnavailable, ShardfsError, UsageError
from .mounttab import abort_connection, daemon_pids, mounts, resolve, stat_within

MOUNT_EPILOG = """\
By default `mount` returns once the filesystem is ready; the daemon keeps running in the
background and logs to $SHARDFS_HOME/logs/. Use --foreground under systemd (it sends
READY=1 and STOPPING=1 when NOTIFY_SOCKET is set). SIGTERM, SIGINT or SIGHUP unmount cleanly.
"""


def add_mount_commands(sub) -> None:
    from .cli import _size, path_arg
    a = sub.add_parser("mount", help="mount every stored model as a read-only file",
                       epilog=MOUNT_EPILOG, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    a.add_argument("mountpoint", type=path_arg, help="an existing, preferably empty, directory")
    a.add_argument("--cache-dir", type=path_arg, help="local chunk cache (default $SHARDFS_CACHE_DIR, the config file's "
                   "cache_dir, or $SHARDFS_HOME/cache)")
    a.add_argument("--cache-size", type=_size,
                   help="cache bound in bytes, e.g. 50G (default: 10%% of the cache disk, at least 1 GiB "
                   "but at most half the disk); the cache also leaves 1 GiB (5%% of a small disk) free")
    a.add_argument("--read-ahead", type=_size, help="largest readahead window (default 64MiB)")
    a.add_argument("--memory", type=_size,
                   help="in-memory buffer of recently read chunks (default 128MiB); chunks being "
                        "fetched take at most as much again, prefetched ones a quarter of it")
    a.add_argument("--allow-other", action="store_true", help="let other users read the mount "
                   "(needs user_allow_other in /etc/fuse.conf unless root)")
    a.add_argument("--foreground", action="store_true", help="stay in the foreground (systemd)")
    a.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics on HOST:PORT/metrics")
    a.add_argument("--key-file", type=path_arg, help="key for encrypted models (default: key_file setting); "
                   "without it they fail to open with EACCES")
    a.add_argument("--no-prefetch", action="store_true", help="do not fetch a safetensors/GGUF file's "
                   "tensors ahead when it is opened (header-driven prefetch is on by default)")
    a.add_argument("--cache-local-nodes", action="store_true",
                   help="also cache chunks read from nodes whose data is on the cache's own filesystem "
                        "(default: read those straight from the node; `cache warm` and pins still "
                        "cache them)")
    a.add_argument("--no-notify-store", action="store_true", help=__import__("argparse").SUPPRESS)
    a.add_argument("--ready-fd", type=int, help=__import__("argparse").SUPPRESS)
    a.set_defaults(func=cmd_mount)

    a = sub.add_parser("umount", help="unmount (also recovers a mountpoint left stale by a killed daemon)",
                       description="Unmount a shardfs mount. One that files are open on is refused, "
                       "naming the processes; one whose daemon was killed is cleaned up; one whose "
                       "daemon does not answer (stopped or stuck) needs --force.")
    a.add_argument("mountpoint", type=path_arg, help="where a shardfs mount is (or was, if its daemon was killed)")
    a.add_argument("--force", action="store_true",
                   help="unmount even if busy or its daemon does not answer: reads in progress fail "
                        "(ECONNABORTED), the mount goes at once and the daemon is stopped")
    a.set_defaults(func=cmd_umount)

    cache = sub.add_parser("cache", help="inspect and manage a running mount's cache").add_subparsers(
        dest="cache_cmd", required=True, metavar="ACTION")
    for name, helptext in (("stats", "bytes used / limit, hits, misses, per-model cached %%, pins"),
                           ("evict", "drop models' chunks (or --all) from the cache and the kernel's pages"),
                           ("warm", "fetch whole models into the cache"),
                           ("pin", "never evict these models by LRU"),
                           ("unpin", "allow these models to be evicted again")):
        c = cache.add_parser(name, help=helptext)
        c.add_argument("--mount", type=path_arg, help="the mountpoint (default: the only shardfs mount)")
        if name == "stats":
            c.add_argument("--json", action="store_true", help="machine-readable output")
        else:
            c.add_argument("names", nargs="*", metavar="NAME", help="model names; NAME/ means a folder")
        if name == "evict":
            c.add_argument("--all", action="store_true", help="every model")
        c.set_defaults(func=cmd_cache, cache_cmd=name)


# -- helpers ----------------------------------------------------------------------------

def shardfs_mounts() -> list[str]:
    return [p for p, (kind, _dev) in mounts().items() if kind == "fuse.shardfs"]


def _not_ours(mp: str) -> str | None:
    """What else is mounted at mp ('a tmpfs mount'), or None if it is a shardfs mount."""
    kind = mounts().get(mp, ("",))[0]
    return None if kind == "fuse.shardfs" else f"a {kind or 'non-shardfs'} mount"


def _condition(mp: str) -> str:
    """A mount at mp (resolved): "live"; "stale", its daemon gone ("Transport endpoint is not
    connected"); or "hung", its daemon does not answer (stopped, or stuck)."""
    st = stat_within(mp)
    if st is None:
        return "hung"
    if isinstance(st, OSError):
        # ENOTCONN once the kernel has let the dead daemon's connection go; ECONNABORTED
        # while it is still tearing it down, right after the daemon died
        return "stale" if st.errno in (errno.ENOTCONN, errno.ECONNABORTED) else "live"
    # For a second after the daemon died the kernel may still answer stat from the root's
    # cached attributes; a shardfs mount's control socket refuses connections at once.
    if mp in shardfs_mounts() and _control_socket(mp) == "dead":
        return "stale"
    return "live"


def _control_socket(mp: str) -> str:
    """The mount's control socket: "answers"; "dead", a socket left by a killed daemon that
    nobody listens on; or "none", no socket of ours (another user's mount) or a slow daemon."""
    from .control import private_dir, socket_path
    if not private_dir(os.path.dirname(socket_path(mp))):
        return "none"  # (not ours to judge by: a socket there may be anyone's)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(socket_path(mp))
            return "answers"
        except ConnectionRefusedError:
            return "dead"
        except OSError:
            return "none"


def _fusermount(mp: str, lazy: bool = False) -> subprocess.CompletedProcess:
    exe = shutil.which("fusermount3") or shutil.which("fusermount")
    if exe is None:
        return subprocess.run(["umount"] + (["-l"] if lazy else []) + [mp], capture_output=True, text=True)
    return subprocess.run([exe, "-u"] + (["-z"] if lazy else []) + [mp], capture_output=True, text=True)


def _users_of(mp: str) -> list[str]:
    """Processes with an open file, a memory map or the cwd under the mountpoint (resolved),
    as 'pid (name)'."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            paths = [os.readlink(f"/proc/{pid}/cwd")]
            for fd in os.listdir(f"/proc/{pid}/fd"):
                paths.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
        try:  # mmap'd files (safetensors, torch mmap) hold a mount too; names need not be UTF-8
            with open(f"/proc/{pid}/maps", errors="surrogateescape") as f:
                paths.extend(parts[5] for line in f if len(parts := line.rstrip("\n").split(maxsplit=5)) == 6)
        except OSError:
            pass
        if any(p == mp or p.startswith(mp + "/") for p in paths):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    found.append(f"{pid} ({f.read().strip()})")
            except OSError:
                found.append(pid)
    return found


def recover_stale(mp: str) -> None:
    other = _not_ours(mp)
    if other:
        raise ShardfsError(f"{mp} is a stale mount (transport endpoint is not connected) of {other}, not "
                           f"shardfs; unmount it with the tool that made it (e.g. fusermount3 -u {mp})")
    r = _fusermount(mp, lazy=True)
    if mp in mounts() and _condition(mp) == "stale":
        raise ShardfsError(f"{mp} is a stale mount (transport endpoint is not connected) and could not be "
                           f"cleaned up: {r.stderr.strip()}")
    _remove_dead_socket(mp)


def _force_unmount(mp: str) -> None:
    """Cut a mount's daemon off (every read waiting on it fails at once), unmount, and stop
    the daemon: for a daemon that is stopped or stuck, which a plain unmount cannot reach."""
    _kind, dev = mounts().get(mp, ("", ""))
    aborted = bool(dev) and abort_connection(dev)
    pids = found = daemon_pids(mp)
    for pid in pids:  # (a stopped daemon acts on SIGTERM once continued; an aborted one exits anyway)
        for sig in (signal.SIGTERM, signal.SIGCONT):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
    r = _fusermount(mp, lazy=True)
    deadline = time.monotonic() + 10
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if os.path.exists(f"/proc/{p}") and not _zombie(p)]
        time.sleep(0.05)
    for pid in pids:  # (a stuck daemon: its connection is aborted, so nothing is left to lose)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if mp in mounts():
        raise ShardfsError(f"cannot unmount {mp}: {r.stderr.strip() or 'still mounted'}"
                           + ("" if aborted or found else "; its daemon could not be found or cut off"))
    _remove_dead_socket(mp)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _remove_dead_socket(mp: str) -> None:
    """The control socket a killed daemon left: removed once nobody listens on it (a new
    mount's daemon may answer there already)."""
    from .control import socket_path
    if _control_socket(mp) == "dead":
        try:
            os.unlink(socket_path(mp))
        except OSError:
            pass


# -- mount ------------------------------------------------------------------------------

def _preflight(mp: str) -> None:
    """mp: resolved. Checked in this order so that a mount whose daemon is hung is never
    stat'ed outside a thread (that stat would never return)."""
    if mp in mounts():
        state = _condition(mp)
        if state == "stale":
            recover_stale(mp)
            print(f"shardfs: recovered stale mountpoint {mp}", file=sys.stderr)
        else:
            what = "a shardfs mount" if mp in shardfs_mounts() else "in use"
            hung = " whose daemon does not answer (stopped or stuck)" if state == "hung" else ""
            fix = f"`shardfs umount {'--force ' if hung else ''}{mp}`" if mp in shardfs_mounts() else "unmount it"
            raise ShardfsError(f"mountpoint {mp} is busy: already {what}{hung}; {fix} first")
    if not os.path.exists(mp):
        raise UsageError(f"mountpoint {mp} does not exist")
    if not os.path.isdir(mp):
        raise UsageError(f"mountpoint {mp} is not a directory")
    if not os.path.exists("/dev/fuse"):
        raise ShardfsError("/dev/fuse does not exist: load the fuse module (modprobe fuse) or, in a "
                           "container, pass --device /dev/fuse")
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        raise ShardfsError(f"/dev/fuse cannot be opened ({e.strerror}); are you in the fuse group?") from None


def _has_entries(path: str) -> bool:
    try:
        with os.scandir(path) as it:
            return any(True for _ in it)
    except OSError:
        return False


def _full_label(reason: str | None) -> str:
    from .cache import FULL_WHY
    return f" (FULL: {FULL_WHY[reason]}; reads bypass it)" if reason in FULL_WHY else ""


def _default_cache_size(cache_dir: str) -> int:
    total = shutil.disk_usage(cache_dir).total
    return min(max(1 << 30, total // 10), total // 2)  # (1 GiB, but never most of a small disk)


def _check_sizes(args) -> None:
    """Flag, environment or config file: sizes the mount cannot work with are refused here."""
    from .units import human
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if not 1 << 20 <= args.memory <= ram:
        raise UsageError(f"memory {human(args.memory)}: give 1MiB .. this machine's {human(ram)}")
    if args.cache_size is not None and args.cache_size < 1 << 20:
        raise UsageError(f"cache size {human(args.cache_size)} is too small: give at least 1MiB")
    if args.read_ahead > 1 << 30:
        raise UsageError(f"read-ahead {human(args.read_ahead)}: give at most 1GiB")


def _check_cache_dir(cache_dir: str) -> None:
    from .stores import make_dir
    why = make_dir(cache_dir)
    if why:
        raise UsageError(f"cache dir {cache_dir}: {why}")


def cmd_mount(args) -> None:
    from .connect import open_index
    mp = resolve(args.mountpoint)
    _check_sizes(args)
    _preflight(mp)
    cache_dir = os.path.abspath(args.cache_dir)
    under = os.path.realpath(cache_dir)
    if under == mp or under.startswith(mp.rstrip("/") + "/"):  # (mp is resolved: no symlink hides it)
        # hidden by the mount it serves, and read-only through it: every fill failed
        raise UsageError(f"cache dir {cache_dir} is inside the mountpoint {mp}; give one outside it")
    _check_cache_dir(cache_dir)
    if args.metrics:
        from .nodeserver import parse_listen
        parse_listen(args.metrics, "--metrics")
    said_here = not args.foreground or args.ready_fd is None  # (warnings: by the command, not its daemon)
    if said_here and _has_entries(mp):
        print(f"shardfs: warning: mountpoint {mp} is not empty; what it holds is hidden while mounted",
              file=sys.stderr)
    try:
        idx = open_index(args.redis)  # fail here, with the URL, if Redis is unreachable ...
    except IndexUnavailable as e:  # ... unless this cache dir saved a model list to start from
        if not os.path.exists(os.path.join(cache_dir, "snapshots", "catalogue.json")):
            raise
        if said_here:
            print(f"shardfs: warning: {e}; mounting the models this cache dir saw last, until Redis is back "
                  f"(models this mount never opened give EIO until then)", file=sys.stderr)
        idx = None
    if not args.foreground:
        _spawn(args, mp, cache_dir)
        return
    _run_foreground(args, mp, cache_dir, idx)


def _spawn(args, mp: str, cache_dir: str) -> None:
    from .connect import home
    logdir = os.path.join(home(), "logs")
    os.makedirs(logdir, exist_ok=True)
    log_path = os.path.join(logdir, "mount-" + mp.strip("/").replace("/", "_") + ".log")
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "shardfs"] + (["--redis", args.redis] if args.redis else []) + \
          (["-v"] if args.verbose else []) + \
          ["mount", mp, "--foreground", "--ready-fd", str(w), "--cache-dir", cache_dir,
           "--read-ahead", str(args.read_ahead), "--memory", str(args.memory)]
    if args.cache_size:
        cmd += ["--cache-size", str(args.cache_size)]
    if args.allow_other:
        cmd.append("--allow-other")
    if args.no_notify_store:
        cmd.append("--no-notify-store")
    if args.no_prefetch:
        cmd.append("--no-prefetch")
    if args.cache_local_nodes:
        cmd.append("--cache-local-nodes")
    if args.metrics:
        cmd += ["--metrics", args.metrics]
    if args.key_file:
        cmd += ["--key-file", os.path.abspath(args.key_file)]
    from .cli import _terminate, stop_signals
    # SIGTERM or SIGHUP while the daemon starts (`timeout 10 shardfs mount`, a closed terminal)
    # stops it as Ctrl-C does: killed silently, this command left it to mount behind its back
    handlers = {sig: signal.signal(sig, _terminate) for sig in stop_signals()}
    proc = None
    try:
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, pass_fds=(w,),
                                    start_new_session=True, cwd="/")
        os.close(w)
        with os.fdopen(r) as ready:
            line = ready.readline().strip()
        _restore(handlers)  # (the answer is in: a signal from here on meets a finished start)
    except BaseException:  # interrupted while the daemon starts: it must not mount after we said no
        if proc is None:
            os.close(w)
            os.close(r)
            raise
        proc.terminate()  # (it unmounts cleanly on SIGTERM, caught from before the mount exists)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    finally:
        _restore(handlers)
    if line == "ok":
        print(f"mounted {mp} (daemon pid {proc.pid}, log {log_path})")
        return
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # (it said why it failed, then hung on its way out)
        proc.kill()
    raise ShardfsError(line.removeprefix("error: ") if line else f"mount daemon exited; see {log_path}")


def _restore(handlers: dict) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def _new_daemon(args, mp: str, cache_dir: str):
    from .cli import _keyring
    from .connect import open_index
    from .control import socket_path
    from .daemon import Daemon, MountConfig
    cfg = MountConfig(mountpoint=mp, cache_dir=cache_dir,
                      cache_size=args.cache_size or _default_cache_size(cache_dir),
                      read_ahead=args.read_ahead, mem_limit=args.memory, allow_other=args.allow_other,
                      control_path=socket_path(mp), notify_store=not args.no_notify_store,
                      prefetch=not args.no_prefetch, cache_local_nodes=args.cache_local_nodes,
                      keyring=_keyring(args))
    return Daemon(cfg, lambda: open_index(args.redis, timeout=3.0, loading_wait=0))  # (it keeps serving meanwhile)


def _run_foreground(args, mp: str, cache_dir: str, idx) -> None:
    import trio
    from .daemon import run, sd_notify

    logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.INFO)
    for h in logging.getLogger().handlers:
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ready_file = os.fdopen(args.ready_fd, "w") if args.ready_fd is not None else None

    def tell(msg: str):
        nonlocal ready_file
        if ready_file:
            try:
                ready_file.write(msg + "\n")
                ready_file.close()
            except OSError:  # the parent is gone (killed while waiting): nobody to tell
                pass
            ready_file = None

    try:
        try:
            daemon = _new_daemon(args, mp, cache_dir)
        except OSError as e:  # (the cache directory: read-only, full, a file where a folder goes)
            where = f" ({e.filename})" if e.filename and e.filename != cache_dir else ""
            raise ShardfsError(f"cannot use cache directory {cache_dir}: {e.strerror or e}{where}") from None
        daemon.idx = idx
        if args.metrics:
            from .metrics import daemon_metrics, serve_metrics
            serve_metrics(args.metrics, lambda: daemon_metrics(daemon))
        try:
            daemon.load_catalogue(force=True)
        except Exception as e:  # noqa: BLE001 - start from the saved snapshot if the index is away
            if not daemon.load_saved_catalogue():
                raise ShardfsError(f"cannot load the model list: {e}") from None
            daemon.redis_ok = False  # (until a poll reaches it: opens go to the snapshots meanwhile)
    except ShardfsError as e:
        tell(f"error: {e}")
        raise

    was_ready = []

    def ready():
        was_ready.append(True)
        tell("ok")
        sd_notify("READY=1\nSTATUS=mounted " + mp)

    try:
        trio.run(run, daemon, ready)
    except BaseException as group:
        e = _single(group)  # (trio's nurseries wrap what is raised in them in exception groups)
        if not isinstance(e, Exception):
            raise  # KeyboardInterrupt, SystemExit
        if was_ready:  # not a mount failure: a bug in the running daemon; keep its traceback
            logging.getLogger("shardfs.daemon").exception("the mount daemon failed")
            raise ShardfsError(f"the mount daemon of {mp} failed: {e}") from None
        # pyfuse3.init failures arrive as RuntimeError, the control socket's as ShardfsError
        tell(f"error: cannot mount {mp}: {e}")
        raise ShardfsError(f"cannot mount {mp}: {e}") from None
    finally:
        tell("error: the mount daemon stopped before the mount was ready")
    # Unmounted. A fetch still waiting on a hung node (its thread left behind) would hold the
    # exit for the node's timeout, since Python joins executor threads at exit (a systemd
    # stop would wait on it too), and nothing it does matters any more.
    logging.shutdown()
    os._exit(0)


def _single(e: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups, or e."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e


def cmd_umount(args) -> None:
    mp = resolve(args.mountpoint)  # (a symlink to a mountpoint names that mount)
    if mp not in mounts():
        raise UsageError(f"{mp} is not mounted")
    if args.force and not _not_ours(mp):  # (stale, hung or live: all go the same way)
        _force_unmount(mp)
        print(f"unmounted {mp} (forced)")
        return
    state = _condition(mp)
    if state == "stale":
        recover_stale(mp)  # (refuses another tool's stale mount)
        print(f"recovered stale mountpoint {mp}")
        return
    other = _not_ours(mp)
    if other:
        raise UsageError(f"{mp} is {other}, not a shardfs mount; shardfs umount only unmounts shardfs")
    if state == "hung":
        pids = daemon_pids(mp)
        who = f" (pid {', '.join(map(str, pids))})" if pids else ""
        raise ShardfsError(f"the daemon of {mp}{who} does not answer: it is stopped or stuck; "
                           f"`shardfs umount --force {mp}` cuts it off (reads waiting on it fail) and unmounts")
    r = _fusermount(mp)
    if r.returncode != 0:
        err = r.stderr.strip()
        if "busy" in err.lower():
            users = _users_of(mp)
            raise ShardfsError(f"{mp} is busy: in use by " + (", ".join(users) if users else "some process")
                               + "; close those files or stop those processes first (--force makes their reads fail)")
        raise ShardfsError(f"cannot unmount {mp}: {err}")
    deadline = time.monotonic() + 10
    while mp in mounts() and time.monotonic() < deadline:
        time.sleep(0.05)
    print(f"unmounted {mp}")


# -- cache ------------------------------------------------------------------------------

def _pick_mount(args) -> str:
    if args.mount:
        return resolve(args.mount)
    found = shardfs_mounts()
    if len(found) == 1:
        return found[0]
    if not found:
        raise ShardfsError("no shardfs mount is running; start one with `shardfs mount DIR`")
    raise UsageError(f"several shardfs mounts ({', '.join(found)}); choose one with --mount")


def cmd_cache(args) -> None:
    from .control import request
    from .units import human
    op = args.cache_cmd
    if op == "evict" and args.all and args.names:
        raise UsageError("name models to evict, or --all, not both")
    if op == "evict" and not args.all and not args.names:
        raise UsageError("name models to evict, or --all")
    if op in ("warm", "pin", "unpin") and not args.names:
        raise UsageError(f"name the models to {op}")
    mp = _pick_mount(args)
    if op == "stats":
        res = request(mp, {"op": "stats"})
        if args.json:
            print(json.dumps(res, indent=2, sort_keys=True))
            return
        c = res["cache"]
        print(f"cache {c['dir']}: {human(c['used'])} of {human(c['limit'])} in {c['entries']} chunks"
              f"{'' if c['writable'] else ' (NOT WRITABLE: reads bypass it)'}"
              f"{_full_label(c.get('full_reason'))}")
        print(f"hits {c['hits']}, misses {c['misses']}, evictions {c['evictions']}, damaged entries "
              f"{c['corrupt']}; replica failovers {res['failovers']}, corrupt copies {res['corrupt_copies']}"
              f"; index {'reachable' if res['redis_ok'] else 'UNREACHABLE (serving last known models)'}")
        if res.get("index_conflict"):
            print(f"INDEX RESET under this mount ({res['index_conflict']}): it shows the models it had and "
                  f"takes no updates; remount to see the index as it is now")
        if res.get("local_uncached"):
            print(f"{res['local_uncached']} chunk reads came from nodes on the cache's own disk and were not "
                  f"cached (`cache warm` or `cache pin` caches a model; mount --cache-local-nodes caches them all)")
        print(f"{'CACHED':>8} {'SIZE':>10} {'PIN':>4}  NAME")
        for m in res["models"]:
            pct = f"{m['cached_pct']:.1f}%" if m["cached_pct"] is not None else "?"
            print(f"{pct:>8} {human(m['size']):>10} {'yes' if m['pinned'] else '':>4}  {m['name']}")
        return
    if op == "evict":
        if not args.all and not args.names:
            raise UsageError("name models to evict, or --all")
        res = request(mp, {"op": "evict", "names": args.names, "all": args.all})
        if res.get("unremoved_count"):
            raise ShardfsError(f"evicted {human(res['freed'])}, but {res['unremoved_count']} cache entries "
                               f"({human(res['unremoved'])}) could not be removed from the cache directory: "
                               f"{res['why']}; they are no longer served, and the mount's next start counts "
                               f"them again")
        kept = res.get("kept_pinned")
        print(f"evicted {human(res['freed'])}" + (f"; kept {human(kept)} of chunks that pinned models share "
                                                  f"(`cache unpin` them first to evict those too)" if kept else ""))
        return
    if not args.names:
        raise UsageError(f"name the models to {op}")
    if op == "warm":
        bars = {}
        show = sys.stderr.isatty()

        def progress(msg):
            if not show:
                return
            from tqdm import tqdm
            bar = bars.get(msg["name"])
            if bar is None:
                bar = bars[msg["name"]] = tqdm(total=msg["total"], unit="B", unit_scale=True, unit_divisor=1024,
                                               desc=f"warm {msg['name']}", file=sys.stderr)
            bar.update(msg["progress"] - bar.n)
        try:
            res = request(mp, {"op": "warm", "names": args.names}, progress)
        finally:
            for bar in bars.values():
                bar.close()
        print(f"warmed {len(args.names)} model(s): {human(res['bytes'])} in cache")
        return
    res = request(mp, {"op": op, "names": args.names})
    print(f"{op}ned: {', '.join(res.get('pinned') or res.get('unpinned'))}")
    if op == "pin" and res.get("bytes", 0) > res.get("limit", float("inf")):
        print(f"shardfs: warning: the pinned models' chunks take {human(res['bytes'])}, more than the cache's "
              f"{human(res['limit'])} limit: they cannot all stay cached; raise --cache-size", file=sys.stderr)
