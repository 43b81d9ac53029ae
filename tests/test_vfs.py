"""The namespace without a kernel: Tree and the FUSE adapter's Operations, called directly."""

import errno
import stat

import pyfuse3
import pytest
import trio

from shardfs.vfs import ROOT, IdentityConflict, Tree, file_inode


def cat(entries):
    return {name: (vid, 100 * vid, 1000.0 + vid, f"sha{vid}") for name, vid in entries.items()}


def test_names_become_paths_with_stable_inodes():
    t = Tree()
    t.update(cat({"org/a.safetensors": 1, "org/sub/b.bin": 2, "top.gguf": 3}))
    org = t.lookup(ROOT, "org")
    assert org is not None and t.attrs(org).mode == stat.S_IFDIR | 0o555
    a = t.lookup(org, "a.safetensors")
    assert a == file_inode(1)
    assert t.attrs(a).mode == stat.S_IFREG | 0o444 and t.attrs(a).size == 100
    assert t.attrs(a).mtime == 1001.0
    assert (t.attrs(ROOT).mtime, t.attrs(org).mtime) == (1003.0, 1002.0)  # the newest model under each: the same on every mount
    assert Tree().attrs(ROOT).mtime > 0  # (empty: when the mount began)
    assert [n for n, _ in t.listdir(ROOT)] == ["org", "top.gguf"]
    assert t.resolve("org/sub/b.bin") == file_inode(2)
    assert t.lookup(ROOT, "missing") is None


def test_replacing_a_model_gives_a_new_inode_and_keeps_the_old():
    t = Tree()
    t.update(cat({"m": 1}))
    changed = t.update(cat({"m": 5, "n": 6}))
    assert changed == {"m", "n"}
    assert t.resolve("m") == file_inode(5)
    assert t.entry(file_inode(1)).vid == 1  # an open reader of the old version keeps it
    assert t.current["m"].vid == 5 and t.current["m"] is t.entry(file_inode(5))
    t.update({})
    assert t.listdir(ROOT) == [] and t.lookup(ROOT, "m") is None and t.resolve("n") is None


def test_a_version_id_that_comes_back_as_another_version_is_refused():
    t = Tree()
    t.update(cat({"org/a.safetensors": 1, "b.bin": 2}))
    before = (dict(t.children), dict(t.current))
    # the index was reset: version 2 is now another model (or the same name with other bytes)
    for again in ({"new/c.bin": (2, 200, 1002.0, "sha2")},
                  {"b.bin": (2, 200, 1002.0, "another-hash")},
                  {"b.bin": (2, 200, 5000.0, "sha2")}):
        with pytest.raises(IdentityConflict, match="version 2"):
            t.update({**cat({"org/a.safetensors": 1}), **again})
        assert (t.children, t.current) == before  # nothing of it shown
    t.update(cat({"org/a.safetensors": 1, "b.bin": 2, "d.bin": 4}))  # the same versions again: fine
    assert t.resolve("d.bin") == file_inode(4)


def test_directory_inodes_survive_updates():
    t = Tree()
    t.update(cat({"a/x": 1}))
    d = t.resolve("a")
    t.update(cat({"a/x": 1, "a/y": 2, "b/z": 3}))
    assert t.resolve("a") == d


def test_model_shadowed_by_directory_is_hidden(caplog):
    t = Tree()
    t.update(cat({"a": 1, "a/b": 2}))
    assert t.resolve("a") in t.children
    assert "hidden" in caplog.text


class _FakeDaemon:
    """Only the attributes ShardOps reads for namespace calls; no reads happen here."""

    def __init__(self, tree):
        import os
        self.tree, self.uid, self.gid, self.control_path = tree, os.getuid(), os.getgid(), "/x"
        self.open_count = {}


def test_operations_translate_and_refuse_writes():
    from shardfs.fuse_ops import ShardOps
    t = Tree()
    t.update(cat({"org/a": 1}))
    ops = ShardOps(_FakeDaemon(t))

    async def main():
        org = await ops.lookup(ROOT, b"org")
        a = await ops.lookup(org.st_ino, b"a")
        assert a.st_size == 100 and a.attr_timeout >= 60
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.lookup(ROOT, b"nope")
        assert e.value.errno == errno.ENOENT
        for call in (ops.unlink(org.st_ino, b"a", None), ops.mkdir(ROOT, b"d", 0o755, None),
                     ops.rename(ROOT, b"org", ROOT, b"x", 0, None), ops.setattr(a.st_ino, None, None, None, None)):
            with pytest.raises(pyfuse3.FUSEError) as e:
                await call
            assert e.value.errno == errno.EROFS
        with pytest.raises(pyfuse3.FUSEError) as e:
            import os
            await ops.open(a.st_ino, os.O_WRONLY, None)
        assert e.value.errno == errno.EROFS
        assert await ops.getxattr(a.st_ino, b"user.shardfs.version", None) == b"1"
        assert await ops.getxattr(a.st_ino, b"user.shardfs.sha256", None) == b"sha1"
        s = await ops.statfs(None)
        assert s.f_blocks == 1 and s.f_bfree == 0
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.opendir(a.st_ino, None)
        assert e.value.errno == errno.ENOTDIR
        t.update(cat({"b": 2}))  # org/ is gone; the kernel may still hold its inode for a moment
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.opendir(org.st_ino, None)
        assert e.value.errno == errno.ENOENT  # (was ENOTDIR: "Not a directory", of a directory)
    trio.run(main)


def test_readdir_pages_through_the_listing_it_started_with(monkeypatch):
    """Offsets were positions in the live listing: a model published between two readdir
    calls of a folder shifted the rest, and `ls` skipped or repeated a name."""
    from shardfs.fuse_ops import ShardOps
    t = Tree()
    t.update(cat({f"org/m{i:02d}": i for i in range(1, 11)}))
    ops = ShardOps(_FakeDaemon(t))
    got, room = [], [4]

    def reply(token, name, attrs, next_id):  # the kernel's buffer holds 4 entries a call
        if room[0] == 0:
            return False
        room[0] -= 1
        got.append((name.decode(), next_id))
        return True
    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)

    async def main():
        org = (await ops.lookup(ROOT, b"org")).st_ino
        fh = await ops.opendir(org, None)
        await ops.readdir(fh, 0, None)
        t.update(cat({"org/a-new": 20, **{f"org/m{i:02d}": i for i in range(1, 11) if i != 6}}))
        while True:
            before, room[0] = len(got), 4
            await ops.readdir(fh, got[-1][1], None)
            if len(got) == before:
                break
        names = [n for n, _ in got]
        assert names == [".", ".."] + [f"m{i:02d}" for i in range(1, 11)]  # as when opened: none twice, none skipped
        got.clear()
        room[0] = 100
        await ops.readdir(fh, 0, None)  # rewinddir: the folder as it is now
        assert [n for n, _ in got] == [".", "..", "a-new"] + [f"m{i:02d}" for i in range(1, 11) if i != 6]
        await ops.releasedir(fh)
    trio.run(main)
