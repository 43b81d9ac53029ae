"""nginx serving a node directory (examples/nginx-node.conf): put, get and a mount through it."""

import hashlib
import os
import shutil
import subprocess

import pytest

from conftest import ROOT, needs_fuse, start_listening
from shardfs.stores import MARKER

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")


@pytest.fixture
def nginx_node(tmp_path):
    root, state = tmp_path / "nginx-node", tmp_path / "nginx-state"
    root.mkdir()
    state.mkdir()
    (root / ".tmp").mkdir()
    (root / MARKER).touch()  # (the config's setup step: nginx cannot make it)
    token = "n6inx-t0ken"
    (tmp_path / "token").write_text(token + "\n")

    def launch(port):
        conf = open(os.path.join(ROOT, "examples", "nginx-node.conf")).read()
        for k, v in {"@ROOT@": str(root), "@LISTEN@": f"127.0.0.1:{port}", "@TOKEN@": token,
                     "@STATE@": str(state)}.items():
            conf = conf.replace(k, v)
        if os.geteuid() == 0:
            conf = "user root;\n" + conf  # workers must write the test's root-owned directories
        (state / "nginx.conf").write_text(conf)
        return subprocess.Popen(["nginx", "-c", str(state / "nginx.conf"), "-g", "daemon off;",
                                 "-e", str(state / "error.log")], stderr=subprocess.PIPE)
    port, proc = start_listening(launch, "nginx")
    yield {"url": f"http://127.0.0.1:{port}", "root": root, "token_file": tmp_path / "token"}
    proc.terminate()
    proc.wait(10)


def chunk_files(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if len(f) == 64]


def test_put_get_through_nginx(cli, nginx_node, model_small, tmp_path):
    cli("node", "add", nginx_node["url"], "--token-file", nginx_node["token_file"])
    assert "nginx" not in cli("node", "ls").stderr
    cli("put", model_small, "--name", "m.safetensors", "--chunk-size", "1MiB")
    assert len(chunk_files(nginx_node["root"])) > 10
    cli("get", "m.safetensors", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == model_small.read_bytes()
    cli("verify")


def test_an_nginx_node_without_its_marker_answers_503_never_404(cli, nginx_node, model_small, tmp_path):
    """A disk that did not mount leaves an empty mountpoint: nginx answered 404 for every
    chunk there, and `verify --repair` dropped every copy it listed on that node."""
    cli("node", "add", nginx_node["url"], "--token-file", nginx_node["token_file"])
    cli("put", model_small, "--name", "m", "--chunk-size", "1MiB")
    root = str(nginx_node["root"])
    os.rename(root, root + ".away")  # the disk is not mounted: an empty directory instead
    os.makedirs(os.path.join(root, ".tmp"))
    try:
        r = cli("verify", "--repair", check=False)
        assert r.returncode != 0 and "missing cop" not in r.stdout.replace("0 missing copies", ""), r.stdout
        assert "repair:" not in r.stdout and "repaired:" not in r.stdout, r.stdout
        assert "no .shardfs-node in" in r.stdout + r.stderr, r.stdout + r.stderr
        r = cli("put", model_small, "--name", "m2", "--chunk-size", "1MiB", check=False)
        assert r.returncode != 0 and "no .shardfs-node in" in r.stderr, r.stderr
        assert chunk_files(root) == []  # nothing written where the disk should be
        r = cli("node", "add", nginx_node["url"] + "/", "--token-file", nginx_node["token_file"], check=False)
        assert r.returncode != 0 and "touch " + os.path.join(root, MARKER) in r.stderr, r.stderr
    finally:
        shutil.rmtree(root)
        os.rename(root + ".away", root)
    r = cli("verify")
    assert " 0 lost" in r.stdout and " 0 missing" in r.stdout, r.stdout
    cli("get", "m", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == model_small.read_bytes()


def test_nginx_refuses_writes_without_the_token(nginx_node):
    import urllib3
    http = urllib3.PoolManager(retries=False)
    url = f"{nginx_node['url']}/chunks/{'ab' * 32}"
    assert http.request("PUT", url, body=b"x").status == 401
    assert http.request("DELETE", url).status == 401
    assert http.request("GET", f"{nginx_node['url']}/chunks/../../etc/passwd").status in (400, 404)
    assert chunk_files(nginx_node["root"]) == []


@needs_fuse
def test_mount_reads_through_nginx(cli, nginx_node, model_small, mounts):
    cli("node", "add", nginx_node["url"], "--token-file", nginx_node["token_file"])
    cli("put", model_small, "--name", "m.safetensors")
    m = mounts()
    with open(m.file("m.safetensors"), "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(model_small.read_bytes()).digest()
