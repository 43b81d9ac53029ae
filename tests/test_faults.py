"""Faults with real processes: each ends bit-exact or with a clean error."""

import errno
import json
import os
import shutil
import signal
import subprocess

import pytest

from conftest import CACHE_LOCAL, Cli, RedisProc, add_nodes, gone, needs_fuse, sha256_file, wait_for




@needs_fuse
def test_daemon_killed_mid_read_leaves_no_partial_cache_entry(cli, nodes, model_256, mounts):
    n = nodes(2)
    for x in n:
        cli("node", "add", x.url)
    cli("put", model_256, "--name", "big.safetensors")
    m = mounts("--no-prefetch", CACHE_LOCAL)
    with pytest.raises(OSError):
        with open(m.file("big.safetensors"), "rb") as f:
            f.read(64 << 20)
            os.kill(m.pid, signal.SIGKILL)
            while f.read(1 << 20):
                pass
    wait_for(lambda: gone(m.pid),
             what="daemon to die")
    m.umount()  # recovers the dead mountpoint (stale, or still cached as a mount)
    assert not os.path.ismount(m.path)
    m.mount()  # the restarted daemon drops the killed one's unfinished fills before serving
    for d, _, files in os.walk(m.cache_dir):
        assert not [f for f in files if f.startswith(".tmp-")]
    assert sha256_file(m.file("big.safetensors")) == sha256_file(model_256)
    stats = json.loads(m.cli("cache", "stats", "--json", "--mount", m.path).stdout)
    assert stats["cache"]["corrupt"] == 0 and stats["cache"]["hits"] > 0


@needs_fuse
def test_malformed_manifest_in_redis_hides_that_model_not_the_daemon(cli, nodes, tmp_path, mounts, redis_proc):
    """(A manifest whose framing is wrong makes its version record malformed, as a bad field
    does: the model is left out of the tree, and said so in the log.)"""
    n = nodes(1)[0]
    cli("node", "add", n.url)
    for name in ("good.bin", "bad.bin"):
        (tmp_path / name).write_bytes(os.urandom(1 << 20))
        cli("put", tmp_path / name, "--name", name)
    r = redis_proc.client()
    vid = int(r.hget("shardfs:models", "bad.bin"))
    r.hset(f"shardfs:v:{vid}", "manifest", b"SFM1garbage")
    m = mounts()
    assert sorted(os.listdir(m.path)) == ["good.bin"]
    with pytest.raises(OSError) as e:
        open(m.file("bad.bin"), "rb").read()
    assert e.value.errno == errno.ENOENT
    assert open(m.file("good.bin"), "rb").read() == (tmp_path / "good.bin").read_bytes()
    assert os.path.ismount(m.path)
    with open(m.log) as f:
        assert f"malformed version record {vid}: malformed manifest: 11 bytes for 1651663207 entries" in f.read()


def test_redis_urls_with_password_and_unix_socket(tmp_path, base_env, nodes):
    node = nodes(1)[0]
    rp = RedisProc(str(tmp_path / "r"))
    sock = str(tmp_path / "r" / "redis.sock")
    rp.start("--unixsocket", sock, "--unixsocketperm", "700",
             "--user", "default", "off", "--user", "shard", "on", ">pw-123", "~*", "&*", "+@all")
    try:
        wait_for(lambda: os.path.exists(sock), what="redis socket")
        url = f"redis://shard:pw-123@127.0.0.1:{rp.port}/0"
        cli = Cli({**base_env, "SHARDFS_REDIS": url})
        cli("node", "add", node.url)
        f = tmp_path / "m.bin"
        f.write_bytes(os.urandom(300000))
        cli("put", f, "--name", "m.bin")
        unix = Cli({**base_env, "SHARDFS_REDIS": f"unix://shard:pw-123@{sock}?db=0"})
        assert "m.bin" in unix("ls").stdout
        wrong = Cli({**base_env, "SHARDFS_REDIS": f"redis://shard:nope@127.0.0.1:{rp.port}/0"})
        r = wrong("ls", check=False)
        assert r.returncode != 0 and "nope" not in r.stderr and "***" in r.stderr  # password never printed
    finally:
        rp.stop()


def test_two_concurrent_puts_of_one_name_one_wins(cli, nodes, tmp_path):
    n = nodes(2)
    for x in n:
        cli("node", "add", x.url)
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(os.urandom(6 << 20))
    b.write_bytes(os.urandom(6 << 20))
    procs = [subprocess.Popen(cli_cmd(["put", str(p), "--name", "same.bin"]), env=cli.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in (a, b)]
    results = [(p.wait(60), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    # (the loser is refused before its upload or, if both got past that check, at publish:
    # either way exit status 2, as for any name already taken)
    assert codes == [0, 2], results
    loser = next(err for c, err in results if c)
    assert "already exists" in loser and len(loser.strip().splitlines()) == 1
    cli("get", "same.bin", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() in (a.read_bytes(), b.read_bytes())


def cli_cmd(args):
    import sys
    return [sys.executable, "-m", "shardfs", *args]


@needs_fuse
def test_short_soak_16_readers_cache_smaller_than_working_set(cli, nodes, tmp_path, mounts):
    from shardfs import soak
    from shardfs.synth import write_safetensors
    add_nodes(cli, nodes, 3)
    srcs = {}
    for i in range(3):
        p = tmp_path / f"m{i}.safetensors"
        write_safetensors(str(p), 12 << 20, seed=20 + i)
        cli("put", p, "--name", f"soak/m{i}.safetensors", "--chunk-size", "1MiB")
        srcs[f"soak/m{i}.safetensors"] = str(p)
    m = mounts("--cache-size", "16MiB", "--memory", "8MiB", CACHE_LOCAL)  # working set 36 MiB: eviction under pressure
    # a fixed amount of work (the deadline only stops a hang): no assertion on speed
    rep = soak.run({m.file(k): v for k, v in srcs.items()}, seconds=300, readers=16, max_reads=800,
                   daemon_pid=m.pid)
    print(rep.summary())
    assert rep.errors == []
    assert rep.reads >= 800, "the soak stopped at its deadline: a reader hung"
    stats = json.loads(m.cli("cache", "stats", "--json", "--mount", m.path).stdout)
    assert stats["cache"]["evictions"] > 0 and stats["cache"]["used"] <= 16 << 20


def test_gc_with_a_node_down_does_not_block_a_later_put(cli, nodes, tmp_path, redis_proc):
    ns = add_nodes(cli, nodes, 2)
    f = tmp_path / "m.bin"
    f.write_bytes(os.urandom(3 << 20))
    cli("put", f, "--name", "m.bin", "--chunk-size", "1MiB")
    cli("rm", "m.bin")
    ns[1].kill()
    r = cli("gc")
    assert "could not delete" in r.stdout and "will retry" in r.stdout
    assert ns[0].chunk_files() == []  # the live node's copies are gone
    r = redis_proc.client()
    states = {r.hget(k, "state") for k in r.scan_iter("shardfs:c:*")}
    assert states == {b"ok"}  # claims given back: a put will not wait on a gc that cannot finish
    cli("put", f, "--name", "again.bin", "--chunk-size", "1MiB", "--replicas", "1")
    cli("get", "again.bin", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == f.read_bytes()


@needs_fuse
def test_redis_emptied_while_mounted_does_not_crash_the_daemon(cli, nodes, tmp_path, mounts, redis_proc):
    add_nodes(cli, nodes, 1)
    src = tmp_path / "m.bin"
    src.write_bytes(os.urandom(3 << 20))
    cli("put", src, "--name", "m.bin", "--chunk-size", "1MiB")
    m = mounts()
    f = open(m.file("m.bin"), "rb")
    head = f.read(1000)
    redis_proc.client().flushall()

    def stats():
        return json.loads(m.cli("cache", "stats", "--json", "--mount", m.path).stdout)
    # an emptied index is a reset (README): the mount keeps what it had and takes no more updates
    wait_for(lambda: stats()["index_conflict"], timeout=10, what="the mount noticing the emptied index")
    assert head + f.read() == src.read_bytes()  # the open file keeps reading from its manifest
    f.close()
    assert os.path.ismount(m.path) and os.listdir(m.path) == ["m.bin"]
    assert [x["name"] for x in stats()["models"]] == ["m.bin"]
    assert sha256_file(m.file("m.bin")) == sha256_file(src)


@needs_fuse
def test_a_restarted_node_is_used_again(cli, nodes, tmp_path, mounts):
    ns = add_nodes(cli, nodes, 2)
    src = tmp_path / "m.bin"
    src.write_bytes(os.urandom(6 << 20))
    cli("put", src, "--name", "m.bin", "--chunk-size", "1MiB")  # R=2: every chunk on both nodes
    m = mounts("--no-prefetch")
    ns[0].kill()
    assert sha256_file(m.file("m.bin")) == sha256_file(src)  # all from ns[1]
    ns[0].start()  # same port and directory
    ns[1].kill()
    m.cli("cache", "evict", "--all", "--mount", m.path)
    assert sha256_file(m.file("m.bin")) == sha256_file(src)  # only the restarted node can serve this


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_rediss_tls_url(tmp_path, base_env, nodes):
    from conftest import start_listening
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    port, proc = start_listening(lambda port: subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
         "--tls-auth-clients", "no", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), "TLS redis-server")
    try:
        cli = Cli({**base_env, "SHARDFS_REDIS": f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"})
        node = nodes(1)[0]
        cli("node", "add", node.url)
        f = tmp_path / "m.bin"
        f.write_bytes(os.urandom(200000))
        cli("put", f, "--name", "m.bin")
        assert "m.bin" in cli("ls").stdout
        untrusted = Cli({**base_env, "SHARDFS_REDIS": f"rediss://127.0.0.1:{port}/0"})
        r = untrusted("ls", check=False)
        assert r.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in r.stderr and "Traceback" not in r.stderr
    finally:
        proc.terminate()
        proc.wait(10)


@needs_fuse
def test_corrupt_copy_on_one_node_is_counted_and_logged_once(cli, nodes, tmp_path, mounts):
    ns = add_nodes(cli, nodes, 2)
    src = tmp_path / "m.bin"
    src.write_bytes(os.urandom(4 << 20))
    cli("put", src, "--name", "m.bin", "--chunk-size", "1MiB")  # R=2: each chunk on both nodes
    from shardfs.placement import rank
    h = os.path.basename(sorted(ns[0].chunk_files())[0])
    first = {"n1": ns[0], "n2": ns[1]}[rank(h, {"n1": 1.0, "n2": 1.0})[0]]  # the replica readers try first
    victim = next(f for f in first.chunk_files() if os.path.basename(f) == h)
    blob = bytearray(open(victim, "rb").read())
    blob[len(blob) // 2] ^= 0x55
    open(victim, "wb").write(bytes(blob))
    m = mounts("--no-prefetch")
    for _ in range(2):  # read twice (evicting between): the bad copy is reported once
        assert sha256_file(m.file("m.bin")) == sha256_file(src)
        m.cli("cache", "evict", "--all", "--mount", m.path)
    stats = json.loads(m.cli("cache", "stats", "--json", "--mount", m.path).stdout)
    assert stats["corrupt_copies"] == 1
    log = open(next(os.path.join(d, f) for d, _, fs in os.walk(m.cli.env["SHARDFS_HOME"]) for f in fs
                    if f.startswith("mount-"))).read()
    assert log.count("corrupt copy of chunk " + os.path.basename(victim)) == 1
    assert "bad copy" in cli("verify", check=False).stdout

