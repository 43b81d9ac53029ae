"""Disk full, for real: small tmpfs filesystems that run out of space under a node's root,
under a get's destination and under a mount's cache.

Mounting them needs root (CI runs as root); elsewhere these tests skip and say so
(conftest.small_fs).
"""

from __future__ import annotations

import json
import os
import subprocess

from conftest import NodeProc, add_nodes, needs_fuse, sha256_file, wait_for
from test_core import SMALL, assert_one_line_error, copies, get_and_compare, id_of, ls_rows, open_idx
from shardfs.stores import MARKER

HEX = set("0123456789abcdef")


def leftovers(root) -> list[str]:
    """Files under root that are not complete chunks (a torn or temporary write)."""
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
            if not (len(f) == 64 and set(f) <= HEX) and f != MARKER]


def test_full_nodes_are_skipped_for_the_next_in_rendezvous_order(cli, nodes, redis_proc, model_small,
                                                                 small_fs, tmp_path):
    big = nodes(2)
    tiny_root = small_fs("3M")
    (tiny_root / MARKER).touch()  # (a server marks only a root it creates: see stores.MARKER)
    tiny_http = NodeProc(str(tiny_root)).start()  # answers PUTs with 507 once full
    tiny_file = small_fs("3M")  # a file:// node: ENOSPC in the writer itself
    try:
        for p in big:
            cli("node", "add", p.url)
        cli("node", "add", tiny_http.url)
        cli("node", "add", f"file://{tiny_file}")
        idx = open_idx(redis_proc)
        tiny_ids = {id_of(idx, tiny_http), next(n for n, v in idx.nodes().items() if v.url.startswith("file://"))}

        # 24 MiB in 1 MiB chunks, R=2 over 4 nodes: the two small ones fill up after a few chunks
        r = cli("put", model_small, "--name", "m", "--replicas", 2, *SMALL)
        assert "Traceback" not in r.stderr
        assert "out of space" in r.stderr or "No space left" in r.stderr, r.stderr
        ids = {c.hex() for c in idx.model("m").manifest.ids}
        infos = dict(zip(sorted(ids), idx.chunk_info(sorted(ids))))
        assert all(len(set(i["locs"])) == 2 for i in infos.values()), infos
        for root in (tiny_http.root, str(tiny_file)):
            assert leftovers(root) == [], "a write that ran out of space left a file behind"
        on_big = copies(big)
        for h, info in infos.items():  # every recorded location really holds the chunk
            assert sum(nid not in tiny_ids for nid in info["locs"]) == len(on_big.get(h, []))
        get_and_compare(cli, "m", model_small, tmp_path)
        assert "verified" in cli("verify", "m").stdout
    finally:
        tiny_http.stop()


def test_every_node_full_is_one_clear_error_and_nothing_is_published(cli, nodes, redis_proc, model_small,
                                                                     small_fs, tmp_path):
    roots = [small_fs("2M"), small_fs("2M")]
    for root in roots:
        cli("node", "add", f"file://{root}")
    r = cli("put", model_small, "--name", "m", "--replicas", 2, *SMALL, check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    *warnings, error = r.stderr.strip().splitlines()
    assert error.startswith("shardfs: error: could not store chunk") and "No space left" in error, error
    # at most one warning per full node, each a whole line, however many workers ran into it
    named = [w.split()[4] for w in warnings]
    assert named and len(named) == len(set(named)) and set(named) <= {"n1", "n2"}, r.stderr
    assert all(w.startswith("shardfs: warning: skipping node") and w.endswith("No space left on device")
               for w in warnings), r.stderr
    assert ls_rows(cli) == {}
    for root in roots:
        assert leftovers(root) == []
    # the chunks that did fit belong to no model: gc takes them back
    cli("gc")
    assert all(set(fs) <= {MARKER} for root in roots for _, _, fs in os.walk(root))


def test_get_into_a_full_directory_fails_cleanly(cli, nodes, model_small, small_fs):
    add_nodes(cli, nodes, 1)
    cli("put", model_small, "--name", "m", *SMALL)
    dest = small_fs("4M")
    r = cli("get", "m", dest / "m.safetensors", check=False)
    assert_one_line_error(r, "m.safetensors", "No space left")
    assert os.listdir(dest) == [], "a failed get left a partial file"


@needs_fuse
def test_mount_cache_on_a_small_disk_stays_within_it_and_serves_exact_bytes(cli, nodes, model_small, small_fs,
                                                                           mounts, tmp_path):
    add_nodes(cli, nodes, 2)
    cli("put", model_small, "--name", "m.safetensors", *SMALL)
    other = tmp_path / "other.bin"
    other.write_bytes(os.urandom(3 << 20))
    cli("put", other, "--name", "other.bin", *SMALL)
    cache = small_fs("32M")  # the model is 24 MiB: more than the cache may take of this disk
    m = mounts(cache_dir=cache / "c")

    def stats():
        return json.loads(cli("cache", "stats", "--json", "--mount", m.path).stdout)

    for _ in range(2):
        assert sha256_file(m.file("m.safetensors")) == sha256_file(model_small)
    st = stats()["cache"]
    # sized for the disk it is on: at most half of it, and 5% of it left free
    assert st["limit"] == 16 << 20 and st["free_floor"] == (32 << 20) // 20, st
    assert 0 < st["used"] <= st["limit"] and st["entries"] > 0, st
    # (fills land just after the reads they serve)
    wait_for(lambda: leftovers(cache / "c" / "data" / "chunks") == [], what="cache fills to land")
    # warm makes room for a model that fits by evicting the least recently used chunks
    r = cli("cache", "warm", "other.bin", "--mount", m.path)
    row = next(x for x in stats()["models"] if x["name"] == "other.bin")
    assert row["cached_pct"] == 100.0, (row, r.stdout)
    assert sha256_file(m.file("other.bin")) == sha256_file(other)

    # pinned chunks cannot make way: a full cache serves reads without caching and says so once
    cli("cache", "pin", "other.bin", "--mount", m.path)
    cli("cache", "evict", "m.safetensors", "--mount", m.path)
    with open(cache / "filler", "wb", buffering=0) as f:  # someone else takes the rest of the disk
        try:
            f.write(b"\0" * (32 << 20))
        except OSError:
            pass
    assert sha256_file(m.file("m.safetensors")) == sha256_file(model_small)
    st = stats()["cache"]
    assert st["full"] is True and st["used"] == 3 << 20, st
    log = open(m.log).read()
    assert log.count("is full (") == 1, log
    assert "(FULL: " in cli("cache", "stats", "--mount", m.path).stdout
    r = cli("cache", "warm", "m.safetensors", "--mount", m.path, check=False)
    assert r.returncode != 0 and "could not be written to the cache" in r.stderr and "Traceback" not in r.stderr
    assert "it is full: its disk is down to the free floor" in r.stderr, r.stderr
    os.unlink(cache / "filler")
    # room again, but 24 MiB cannot stay in a 16 MiB cache: warm says so, it does not claim success
    r = cli("cache", "warm", "m.safetensors", "--mount", m.path, check=False)
    assert_one_line_error(r, "m.safetensors: its 24.0 MiB of chunks is more than the cache's whole limit (16.0 MiB): "
                          "raise --cache-size (only ")
    assert stats()["cache"]["full"] is False and "has room again" in open(m.log).read()
    assert sha256_file(m.file("other.bin")) == sha256_file(other)


def test_node_add_refuses_a_node_server_on_a_read_only_disk(cli, small_fs):
    """Its token check passes and a DELETE of an absent id answers 404, so the write probe
    passed and every later PUT failed: the server now says in its health that it cannot write."""
    d = small_fs("1M")
    (d / MARKER).touch()
    node = NodeProc(str(d)).start()
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)
        r = cli("node", "add", node.url, check=False)
        assert r.returncode != 0 and "refuses writes" in r.stderr and "read-only" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        subprocess.run(["mount", "-o", "remount,rw", str(d)], check=True)
        cli("node", "add", node.url)
    finally:
        node.stop()


@needs_fuse
def test_warm_short_of_disk_space_blames_the_disk_not_the_cache_size(cli, nodes, small_fs, mounts, tmp_path):
    """The cache's limit had room and its disk did not: warm told the user to raise
    --cache-size, which would not have helped."""
    add_nodes(cli, nodes, 2)
    ten = tmp_path / "ten.bin"
    ten.write_bytes(os.urandom(10 << 20))
    cli("put", ten, "--name", "ten.bin", *SMALL)
    cache = small_fs("32M")
    m = mounts(cache_dir=cache / "c")
    st = json.loads(cli("cache", "stats", "--json", "--mount", m.path).stdout)["cache"]
    assert st["limit"] == 16 << 20 and st["used"] == 0, st  # 10 MiB fits the limit
    free = os.statvfs(cache).f_bavail * os.statvfs(cache).f_frsize
    with open(cache / "filler", "wb") as f:  # someone else leaves 4 MiB above the free floor
        f.write(b"\0" * (free - st["free_floor"] - (4 << 20)))
    r = cli("cache", "warm", "ten.bin", "--mount", m.path, check=False)
    line = assert_one_line_error(r, "ten.bin: only", "free floor")
    assert "--cache-size" not in line, line
    assert sha256_file(m.file("ten.bin")) == sha256_file(ten)  # (served all the same)
