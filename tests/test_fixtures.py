"""The fixtures' own promise: a server a test starts is that test's server.

Under two pytest workers, a port free when one worker picked it can be bound by the other
worker's server before this one binds it. Waiting only until "something answers there"
would then hand the test another test's Redis or node.
"""

import socket

import redis

import conftest
from conftest import NodeProc, RedisProc, listens


def _taken_port():
    """A port with a listener on it that is none of ours, like the other worker's server."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def _first(port, monkeypatch):
    """free_port() answers `port` first, then really free ports."""
    real = conftest.free_port
    given = []

    def pick():
        if not given:
            given.append(port)
            return port
        return real()
    monkeypatch.setattr(conftest, "free_port", pick)
    return given


def test_redis_on_a_taken_port_starts_again_elsewhere(tmp_path, monkeypatch):
    with _taken_port() as other:
        taken = other.getsockname()[1]
        given = _first(taken, monkeypatch)
        rp = RedisProc(str(tmp_path / "r")).start()
        try:
            assert given == [taken] and rp.port != taken
            assert redis.Redis.from_url(rp.url).info("server")["process_id"] == rp.proc.pid
            assert not listens(rp.proc, taken) and listens(rp.proc, rp.port)
        finally:
            rp.stop()


def test_node_server_on_a_taken_port_starts_again_elsewhere(tmp_path, monkeypatch):
    with _taken_port() as other:
        taken = other.getsockname()[1]
        given = _first(taken, monkeypatch)
        node = NodeProc(str(tmp_path / "n")).start()
        try:
            assert given == [taken] and node.port != taken
            assert node.url == f"http://127.0.0.1:{node.port}" and listens(node.proc, node.port)
            import json
            import urllib.request
            with urllib.request.urlopen(node.url + "/health", timeout=5) as r:
                assert json.load(r)["chunks"] == 0
        finally:
            node.stop()


def test_a_restart_keeps_the_port_it_had(tmp_path):
    rp = RedisProc(str(tmp_path / "r")).start()
    try:
        port = rp.port
        redis.Redis.from_url(rp.url).set("k", "v")
        rp.stop()
        rp.start()
        assert rp.port == port
        assert redis.Redis.from_url(rp.url).get("k") == b"v"  # (the same server's AOF, same port)
    finally:
        rp.stop()
