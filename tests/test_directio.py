"""Whole-file reads that bypass the page cache (directio.read_whole) and the residency
check that decides when not to bypass it."""

import errno
import os

import pytest

from shardfs import directio
from shardfs.cache import ChunkCache
from shardfs.stores import FileStore, chunk_relpath, init_root

from test_cache import decoded_chunk, resident_bytes, takes_o_direct


def write_cold(path, data: bytes) -> None:
    """Write a file and push its pages out of the page cache (as after a reboot); skip the
    test where that cannot be done (tmpfs keeps every page)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        if len(data) >= 4096 and directio.resident(f.fileno(), len(data)):
            pytest.skip(f"{path}: this filesystem keeps its pages in memory (tmpfs?)")


@pytest.mark.parametrize("how", ["cachestat", "mincore"])
def test_resident_follows_the_page_cache(tmp_path, monkeypatch, how):
    if how == "mincore":
        monkeypatch.setattr(directio, "_CACHESTAT", None)  # as on kernels before 6.5
    else:
        if directio._CACHESTAT is None:
            pytest.skip("no cachestat(2) on this architecture")

        def no_fallback(fd, size):
            if directio._CACHESTAT is None:
                pytest.skip("this kernel has no cachestat(2)")
            raise AssertionError("cachestat answered, yet mincore was asked")
        monkeypatch.setattr(directio, "_mincore_resident", no_fallback)
    path = tmp_path / "f"
    write_cold(path, os.urandom(5 * 4096 + 3))
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        assert not directio.resident(fd, size)
        assert resident_bytes(str(path)) in (None, 0)
        with open(path, "rb") as f:
            f.read()  # a buffered read brings every page in
        assert directio.resident(fd, size)
        assert directio.resident(fd, 0)
        os.posix_fadvise(fd, 5 * 4096, 0, os.POSIX_FADV_DONTNEED)  # drop the last, partial page
        assert not directio.resident(fd, size)
        assert directio.resident(fd, 5 * 4096)
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 17, (1 << 20) + 5])
def test_cold_file_reads_whole_and_exact_without_filling_the_page_cache(tmp_path, size):
    path = tmp_path / "f"
    data = os.urandom(size)
    write_cold(path, data)
    got, direct = directio.read_whole(str(path))
    assert bytes(got) == data
    assert got.readonly
    if size >= 4096:  # (smaller files are always read the plain way)
        assert direct == takes_o_direct(tmp_path)
    if direct and size >= 2 * 4096:
        res = resident_bytes(str(path))
        if res is not None:
            assert res < size // 2, res  # read around the page cache, not through it


def test_a_file_in_the_page_cache_is_read_from_it(tmp_path, monkeypatch):
    path = tmp_path / "f"
    data = os.urandom(64 * 1024 + 9)
    path.write_bytes(data)  # buffered write: every page is cached
    real_fcntl = directio.fcntl.fcntl
    set_direct = []

    def watch(fd, cmd, *arg):
        if cmd == directio.fcntl.F_SETFL and arg and arg[0] & os.O_DIRECT:
            set_direct.append(fd)
        return real_fcntl(fd, cmd, *arg)
    monkeypatch.setattr(directio.fcntl, "fcntl", watch)
    got, direct = directio.read_whole(str(path))
    assert bytes(got) == data and direct
    assert set_direct == []  # a memcpy from the page cache, not a disk read


def refuse_direct_reads(monkeypatch, err=errno.EINVAL):
    """Make O_DIRECT reads fail with `err` (EINVAL: as on a filesystem that refuses them)."""
    real_preadv = os.preadv

    def preadv(fd, bufs, off, *a):
        if directio.fcntl.fcntl(fd, directio.fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(err, os.strerror(err))
        return real_preadv(fd, bufs, off, *a)
    monkeypatch.setattr(directio.os, "preadv", preadv)


def test_an_o_direct_read_error_is_retried_plainly_without_giving_up_o_direct(tmp_path, monkeypatch):
    path = tmp_path / "f"
    data = os.urandom(9 * 4096 + 1)
    write_cold(path, data)
    refuse_direct_reads(monkeypatch, errno.EIO)
    got, direct = directio.read_whole(str(path))
    assert bytes(got) == data and direct


def test_short_o_direct_reads_mid_file_are_finished_not_taken_for_the_end(tmp_path, monkeypatch):
    """Network filesystems may return less than asked in the middle of a file."""
    path = tmp_path / "f"
    data = os.urandom(20 * 4096 + 3)
    write_cold(path, data)
    if not takes_o_direct(tmp_path):
        pytest.skip("no O_DIRECT here")
    real_preadv = os.preadv
    short = []

    def preadv(fd, bufs, off, *a):
        if directio.fcntl.fcntl(fd, directio.fcntl.F_GETFL) & os.O_DIRECT:
            n = real_preadv(fd, [memoryview(bufs[0])[:3 * 4096]], off, *a)
            short.append(n)
            return min(n, 5000)  # as if the filesystem had stopped at an odd byte
        return real_preadv(fd, bufs, off, *a)
    monkeypatch.setattr(directio.os, "preadv", preadv)
    got, direct = directio.read_whole(str(path))
    assert short and bytes(got) == data and direct


def test_refused_o_direct_falls_back_to_a_plain_read(tmp_path, monkeypatch):
    path = tmp_path / "f"
    data = os.urandom(9 * 4096 + 1)
    write_cold(path, data)
    refuse_direct_reads(monkeypatch)
    got, direct = directio.read_whole(str(path))
    assert bytes(got) == data and not direct


def test_cache_and_file_node_stop_trying_o_direct_once_refused(tmp_path, monkeypatch, caplog):
    cache = ChunkCache(str(tmp_path / "c"), 1 << 30, free_floor=0)
    h, data = decoded_chunk(512)
    assert cache.put(h, data)
    write_cold(cache.path(h), bytes(data))
    init_root(str(tmp_path / "n"), adopt=True)  # (as `node add` makes it: a store never makes its root)
    node = FileStore("file://" + str(tmp_path / "n"), str(tmp_path / "n"))
    node.put(h, bytes(data))
    write_cold(os.path.join(node.root, chunk_relpath(h)), bytes(data))
    refuse_direct_reads(monkeypatch)
    cache.direct = node.direct = True
    with caplog.at_level("INFO", logger="shardfs.cache"):
        assert bytes(cache.get(h)) == bytes(data)
        assert bytes(cache.get(h)) == bytes(data)
    assert not cache.direct
    assert sum("refuses O_DIRECT" in r.getMessage() for r in caplog.records) == 1
    assert bytes(node.get(h)) == bytes(data)
    assert not node.direct


def test_refused_o_direct_fill_is_rewritten_the_plain_way(tmp_path, monkeypatch, caplog):
    real_write = os.write

    def write(fd, data):
        if directio.fcntl.fcntl(fd, directio.fcntl.F_GETFL) & os.O_DIRECT:
            real_write(fd, bytes(memoryview(data)[:4096]))  # part of it lands, then the refusal
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)
    monkeypatch.setattr(directio.os, "write", write)
    cache = ChunkCache(str(tmp_path / "c"), 1 << 30, free_floor=0)
    h, data = decoded_chunk(512, 5)
    with caplog.at_level("INFO", logger="shardfs.cache"):
        assert cache.put(h, data)
    assert not cache.direct
    assert any("refuses O_DIRECT" in r.getMessage() for r in caplog.records)
    with open(cache.path(h), "rb") as f:
        assert f.read() == bytes(data)  # no stray head from the refused attempt


@pytest.mark.parametrize("rows", [1, 512])
def test_file_node_stores_aligned_envelopes_around_the_page_cache(tmp_path, rows):
    from shardfs import envelope
    from shardfs.synth import tensor_bytes
    import numpy as np
    raw = tensor_bytes(np.random.default_rng(rows), (rows, 1024), "BF16")
    cid, blob, _ = envelope.encode(raw, "zstd-g2", aligned=True)
    assert blob.readonly and np.frombuffer(blob, np.uint8).ctypes.data % directio.ALIGN == 0
    assert bytes(blob) == envelope.encode(raw, "zstd-g2")[1]  # the same envelope, only placed
    init_root(str(tmp_path / "n"), adopt=True)  # (as `node add` makes it: a store never makes its root)
    node = FileStore("file://" + str(tmp_path / "n"), str(tmp_path / "n"))
    node.put(cid.hex(), blob)
    path = os.path.join(node.root, chunk_relpath(cid.hex()))
    if len(blob) >= 4096:  # (else there is no aligned head to write with O_DIRECT)
        assert node.direct == takes_o_direct(tmp_path)
    res = resident_bytes(path)
    if res is not None and node.direct and len(blob) > 2 * 4096:
        assert res <= 4096, res  # only the buffered tail went through the page cache
    with open(path, "rb") as f:
        assert f.read() == bytes(blob)
    assert bytes(envelope.decode(node.get(cid.hex()), cid)) == raw


def locked_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmLck:"))


def mapped_from(view) -> str | None:
    """The file whose mapping holds the view's first byte, if it is a file mapping."""
    import numpy as np
    addr = np.frombuffer(view, np.uint8).ctypes.data
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= addr < hi:
                name = fields[5].strip() if len(fields) == 6 else ""
                return name if name.startswith("/") else None  # (not "[heap]" and the like)
    return None


def test_pin_maps_a_file_in_the_page_cache_and_locks_it_while_a_view_lives(tmp_path):
    import resource
    if os.geteuid() != 0 and resource.getrlimit(resource.RLIMIT_MEMLOCK)[0] < 2 << 20:
        pytest.skip("RLIMIT_MEMLOCK too low here to lock 1 MiB")
    path = tmp_path / "f"
    data = os.urandom(1 << 20)
    path.write_bytes(data)  # buffered write: every page is cached
    before, fds = locked_kib(), len(os.listdir("/proc/self/fd"))
    got, _ = directio.read_whole(str(path), pin=True)
    assert mapped_from(got) == str(path)  # the page cache's pages, not a copy
    assert len(os.listdir("/proc/self/fd")) == fds  # and no descriptor kept open per view
    assert got.readonly and bytes(got) == data
    assert locked_kib() - before == 1024  # dropped pages would be read again unverified
    part = got[4096:8192]
    del got
    assert locked_kib() - before == 1024  # a slice still holds the mapping
    assert bytes(part) == data[4096:8192]
    del part
    assert locked_kib() == before


def test_pin_copies_where_locking_is_refused_and_reads_cold_files_around_the_cache(tmp_path, monkeypatch):
    path = tmp_path / "f"
    data = os.urandom(9 * 4096 + 5)
    path.write_bytes(data)
    refused = []
    monkeypatch.setattr(directio, "_mlock_refused", False)  # (restored: an EPERM here must not stick)
    monkeypatch.setattr(directio._libc, "mlock", lambda addr, n: refused.append(n) or -1)  # RLIMIT_MEMLOCK
    got, _ = directio.read_whole(str(path), pin=True)
    assert refused == [len(data)]
    assert mapped_from(got) is None and bytes(got) == data
    monkeypatch.undo()
    write_cold(path, data)
    got, direct = directio.read_whole(str(path), pin=True)
    assert mapped_from(got) is None and bytes(got) == data  # mapping it would fault page by page
    assert direct == takes_o_direct(tmp_path)
