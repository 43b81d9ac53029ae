"""Whole-file reads and writes that bypass the page cache where that saves work.

A cold read through the mount moves every byte through the kernel's page cache once
already: the mounted file's. Reading a cache entry or a node's chunk file the buffered
way adds a second cached copy of it, a memcpy out of that copy, and the page-cache
bookkeeping per page; writing a cache entry the buffered way adds the same on the other
side. With O_DIRECT the disk moves the bytes to and from our buffer directly.

Two rules keep this safe and never slower than buffered I/O:
- A file whose every page is already in the page cache (mincore says so) is read the
  buffered way: that is a memcpy, O_DIRECT would go to the disk.
- Any failure of O_DIRECT falls back to plain I/O for that call, and a short O_DIRECT
  read is finished the plain way; a filesystem that refuses O_DIRECT (EINVAL, EOPNOTSUPP)
  clears the caller's `direct` switch, so it stops trying.

A caller that verifies what it reads may ask for such a file without even the memcpy
(`pin`, the disk cache): a shared read-only mapping whose pages are locked in memory
(mlock) for as long as any view of it lives. The lock is what makes a hash of a mapping
mean something: an unlocked page could be dropped after the hash and read again from the
disk later, unchecked. Where locking is not allowed (RLIMIT_MEMLOCK) the file is copied
as above. Only for files never truncated or rewritten in place (a mapped page past a new
end of file faults with SIGBUS): the cache renames complete entries into place and only
ever unlinks them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import weakref

import numpy as np

ALIGN = 4096  # covers every logical block size and DMA alignment in use
PAGE = mmap.PAGESIZE
# errnos with which a filesystem refuses O_DIRECT (or its alignment): stop trying there
REFUSED = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def aligned(size: int, align: int = ALIGN) -> np.ndarray:
    """An uninitialized byte array starting on a page boundary."""
    base = np.empty(size + align, np.uint8)
    at = -base.ctypes.data % align
    return base[at:at + size]


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


# cachestat(2), Linux 6.5+: counts a file's pages in the page cache without mapping it.
# (One number on every architecture this runs on; elsewhere: mincore.)
_CACHESTAT = 451 if os.uname().machine in ("x86_64", "aarch64", "riscv64") else None
_libc.syscall.restype = ctypes.c_long


def resident(fd: int, size: int) -> bool:
    """Whether every page of the first `size` bytes of fd is in the page cache.

    (Linux reports every page resident for a file the caller neither owns nor may write:
    such files are read the buffered way, which is correct, only not the fastest.)"""
    global _CACHESTAT
    if size <= 0:
        return True
    if _CACHESTAT is not None:
        span, stat = _CachestatRange(0, size), _Cachestat()
        if _libc.syscall(_CACHESTAT, ctypes.c_uint(fd), ctypes.byref(span), ctypes.byref(stat), ctypes.c_uint(0)) == 0:
            return stat.nr_cache >= (size + PAGE - 1) // PAGE
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
            # an older kernel, or a seccomp filter that does not know the call: mincore from
            # now on (a file the caller may not write is "resident" there too, see above)
            _CACHESTAT = None
    return _mincore_resident(fd, size)


def _mincore_resident(fd: int, size: int) -> bool:
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        return False
    try:
        vec = np.zeros((size + PAGE - 1) // PAGE, np.uint8)
        if _libc.mincore(addr, size, vec.ctypes.data) != 0:
            return False
        return bool(np.all(vec & 1))
    finally:
        _libc.munmap(addr, size)


_mlock_refused = False  # EPERM: this process may not lock memory at all; stop asking


class MappedPages(np.ndarray):
    """The pages of a file mapped by pinned_map, with what the file was (`stamp`) then."""
    path: str = ""
    stamp: tuple = ()


def _stamp(st: os.stat_result) -> tuple:
    # a write changes mtime and ctime before it changes the data (a write into a shared
    # mapping: at its first fault on each clean page); a new entry renamed in, the inode
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def changed_since_mapped(view) -> bool:
    """Whether `view` (or a slice of it) shows a file mapped by read_whole(pin=True) that has
    been written in place since it was mapped: the pages of a shared mapping are the file's
    own, so such a write reaches them after their hash was checked. Anything else is a
    private buffer: False."""
    pages = getattr(view, "obj", None)
    if not isinstance(pages, MappedPages):
        return False
    try:
        st = os.stat(pages.path)
    except FileNotFoundError:
        return False  # evicted: the mapped file is unlinked, no one opens it by its name now
    except OSError:
        return True
    if (st.st_dev, st.st_ino) != pages.stamp[:2]:
        return False  # evicted and filled again: the mapped pages are the old, unlinked file's
    return _stamp(st) != pages.stamp


def pinned_map(fd: int, size: int) -> memoryview | None:
    """The first `size` bytes of fd as a read-only view of a shared mapping whose pages are
    locked in memory until the last view of it is gone, or None where that is not allowed.
    (A MappedPages view: read_whole sets its path and stamp.)

    (libc's mmap, not Python's: an mmap.mmap keeps a duplicate of the fd open for as long as
    it lives, one per chunk held in memory.)"""
    global _mlock_refused
    if _mlock_refused:
        return None
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        return None
    if _libc.mlock(addr, size) != 0:  # also brings in any page dropped since the caller looked
        _mlock_refused = ctypes.get_errno() == errno.EPERM
        _libc.munmap(addr, size)
        return None
    pages = np.frombuffer((ctypes.c_char * size).from_address(addr), np.uint8).view(MappedPages)
    pages.flags.writeable = False
    # Unmapped (and so unlocked) when the array goes: every view and slice of the returned
    # memoryview holds it. Not at interpreter exit, while something may still read it.
    weakref.finalize(pages, _libc.munmap, addr, size).atexit = False
    return memoryview(pages)


def read_whole(path: str, direct: bool = True, pin: bool = False,
               max_size: int | None = None) -> tuple[memoryview, bool]:
    """The whole file as a read-only view of a page-aligned buffer, and whether O_DIRECT
    is still worth trying on this filesystem (False once it was refused here). With `pin`,
    a file that is all in the page cache comes as a locked mapping instead (pinned_map).

    Raises OSError like open/read would; EFBIG for a file over max_size (nothing allocated)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        size = st.st_size
        if max_size is not None and size > max_size:
            raise OSError(errno.EFBIG, f"{size} bytes, more than the {max_size} a chunk can take")
        in_memory = size < ALIGN or not (direct or pin) or resident(fd, size)
        if pin and size >= ALIGN and in_memory:
            view = pinned_map(fd, size)
            if view is not None:  # (stamped before the caller hashes it: see changed_since_mapped)
                view.obj.path, view.obj.stamp = path, _stamp(st)
                return view, direct
        buf = aligned(-(-size // ALIGN) * ALIGN)
        got = 0
        if direct and not in_memory:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
                got = _read_direct(fd, buf, size)
            except OSError as e:
                got = 0  # read it all again the plain way (which raises real I/O errors)
                direct = e.errno not in REFUSED
            finally:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        got = _read_plain(fd, buf, got, size)
    finally:
        os.close(fd)
    out = buf[:got]
    out.flags.writeable = False
    return memoryview(out), direct


def _read_direct(fd: int, buf: np.ndarray, size: int) -> int:
    """O_DIRECT reads of whole blocks from offset 0; stops at the first short read (the end
    of the file, or a filesystem that splits reads: _read_plain goes on from there)."""
    mv = memoryview(buf)
    got = 0
    while got < size:
        n = os.preadv(fd, [mv[got:]], got)
        got += n
        if n == 0 or got % ALIGN:
            break
    return min(got, size)


def _read_plain(fd: int, buf: np.ndarray, got: int, size: int) -> int:
    """Buffered reads from `got` until `size` bytes or the end of the file."""
    mv = memoryview(buf)
    while got < size:
        n = os.preadv(fd, [mv[got:size]], got)
        if n == 0:
            break
        got += n
    return got


def write_all(fd: int, data, direct: bool) -> bool:
    """Write all of data to fd. With direct, the block-aligned head of a page-aligned
    buffer goes with O_DIRECT (no copy into the page cache) and the tail buffered. If the
    O_DIRECT part fails in any way, everything is written again the plain way (whose errors,
    like ENOSPC, are the caller's); returns False if the filesystem refused O_DIRECT."""
    mv = memoryview(data).cast("B")
    done = 0
    head = len(mv) - len(mv) % ALIGN
    if direct and head and np.frombuffer(mv, np.uint8).ctypes.data % ALIGN == 0:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
            while done < head:
                done += os.write(fd, mv[done:head])
        except OSError as e:
            os.lseek(fd, 0, os.SEEK_SET)  # write it all the plain way (whose errors are real)
            os.ftruncate(fd, 0)
            done = 0
            direct = e.errno not in REFUSED
        finally:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    while done < len(mv):
        done += os.write(fd, mv[done:])
    return direct
