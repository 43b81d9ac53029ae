"""The pyfuse3 adapter: translates kernel requests into calls on the daemon, nothing more.

Errors become errno in exactly one place, `_errors`: only FUSEError may leave a pyfuse3
handler (anything else would end the mount). Known failures map to their errno; an
unexpected exception is a bug, logged with its traceback and answered with EIO.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat

import pyfuse3

from .errors import ChunkUnavailable, CorruptChunk, IndexUnavailable, KeyMismatch, NotFound
from .reader import ReadState
from .vfs import ROOT

log = logging.getLogger("shardfs.fuse")

ATTR_TIMEOUT = 3600.0  # a file inode never changes: a new version gets a new inode
ENTRY_TIMEOUT = 1.0    # names move to new versions; the kernel re-asks after this
XATTRS = (b"user.shardfs.version", b"user.shardfs.sha256", b"user.shardfs.cached_bytes")


_said: set[str] = set()


def _errors(fn):
    @functools.wraps(fn)
    async def wrapper(*args, **kw):
        try:
            return await fn(*args, **kw)
        except pyfuse3.FUSEError:
            raise
        except IndexUnavailable as e:  # (a model that cannot be loaded: say so, once per cause)
            if str(e) not in _said and len(_said) < 10000:
                _said.add(str(e))
                log.warning("%s: %s; answered EIO", fn.__name__, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except (ChunkUnavailable, CorruptChunk) as e:  # (the reader logs these, once per chunk)
            log.debug("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except NotFound:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except KeyMismatch as e:
            log.warning("%s", e)
            raise pyfuse3.FUSEError(errno.EACCES) from None
        except Exception:
            log.exception("bug in %s; answered EIO", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


def _erofs(*_args, **_kw):
    raise pyfuse3.FUSEError(errno.EROFS)


async def _async_erofs(*_args, **_kw):
    _erofs()


class ShardOps(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, daemon):
        super().__init__()
        self.d = daemon
        self.tree = daemon.tree
        self._fh = 0
        self._handles: dict[int, tuple] = {}
        self._dirs: dict[int, tuple] = {}  # open directory handle -> (inode, its listing at offset 0)

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        a = self.tree.attrs(inode)
        if a is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_size = a.size
        e.st_uid = self.d.uid
        e.st_gid = self.d.gid
        ns = int(a.mtime * 1e9)
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = ns
        e.st_blksize = 1 << 20
        e.st_blocks = (a.size + 511) // 512
        is_file = stat.S_ISREG(a.mode)
        e.attr_timeout = ATTR_TIMEOUT if is_file else ENTRY_TIMEOUT
        e.entry_timeout = ENTRY_TIMEOUT
        e.generation = 0
        return e

    @_errors
    async def lookup(self, parent_inode, name, ctx=None):
        ino = self.tree.lookup(parent_inode, os.fsdecode(name))
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(ino)

    @_errors
    async def getattr(self, inode, ctx=None):
        return self._attrs(inode)

    async def forget(self, inode_list):
        pass

    @_errors
    async def opendir(self, inode, ctx):
        listing = self.tree.listdir(inode, dots=True)
        if listing is None:  # (a folder whose models went, the kernel's entry not yet lapsed: ENOENT)
            raise pyfuse3.FUSEError(errno.ENOTDIR if self.tree.entry(inode) is not None else errno.ENOENT)
        self._fh += 1
        self._dirs[self._fh] = (inode, listing)
        return self._fh

    @_errors
    async def readdir(self, fh, start_id, token):
        # The listing is taken at offset 0 (opendir, rewinddir) and kept: offsets are positions
        # in it, so a model published between two readdir calls of a large folder cannot make
        # a name skipped or listed twice.
        inode, listing = self._dirs.get(fh, (None, []))
        if start_id == 0 and inode is not None:
            listing = self.tree.listdir(inode, dots=True) or []
            self._dirs[fh] = (inode, listing)
        for i, (name, ino) in enumerate(listing[start_id:], start_id):
            a = self.tree.attrs(ino)
            if a is None:
                continue  # removed since the listing was taken
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(ino), i + 1):
                break

    @_errors
    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    @_errors
    async def open(self, inode, flags, ctx):
        # (O_APPEND alone writes nothing: a read-only open with it works, as on any read-only fs)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_CREAT):
            raise pyfuse3.FUSEError(errno.EROFS)
        entry = self.tree.entry(inode)
        if entry is None:
            raise pyfuse3.FUSEError(errno.EISDIR if inode in self.tree.children else errno.ENOENT)
        model = await self.d.open_model(entry)
        self._fh += 1
        self._handles[self._fh] = (model, ReadState())
        self.d.opened(model)
        return pyfuse3.FileInfo(fh=self._fh, keep_cache=True, direct_io=False)

    @_errors
    async def read(self, fh, off, size):
        model, state = self._handles[fh]
        return await self.d.reader.read(model, off, size, state)

    @_errors
    async def release(self, fh):
        model, _ = self._handles.pop(fh, (None, None))
        if model is not None:
            self.d.closed(model)

    @_errors
    async def getxattr(self, inode, name, ctx):
        if inode == ROOT and name == b"user.shardfs.control":
            return os.fsencode(self.d.control_path)
        entry = self.tree.entry(inode)
        if entry is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        if name == b"user.shardfs.version":
            return str(entry.vid).encode()
        if name == b"user.shardfs.sha256":
            return entry.sha256.encode()
        if name == b"user.shardfs.cached_bytes":
            # without opening the model: `getfattr -R -d` over a large catalogue must not load
            # and keep every manifest (cached_bytes_of); unknown while the index is away
            got = (await self.d.cached_bytes_of([entry])).get(entry.vid)
            if got is None:
                raise pyfuse3.FUSEError(errno.EAGAIN)
            return str(got[0]).encode()
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    @_errors
    async def listxattr(self, inode, ctx):
        if inode == ROOT:
            return [b"user.shardfs.control"]
        return list(XATTRS) if self.tree.entry(inode) else []

    @_errors
    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        total = sum(f.size for f in self.tree.current.values())
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (total + 4095) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.tree.current) + len(self.tree.children)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    @_errors
    async def access(self, inode, mode, ctx):
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

    # Everything that would change the tree: read-only.
    setattr = write = create = mkdir = mknod = symlink = link = _async_erofs
    unlink = rmdir = rename = setxattr = removexattr = _async_erofs
