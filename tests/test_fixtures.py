"""The fixtures' own promise: a server a test starts is that test's server.

Under two pytest workers, a port free when one worker picked it can be bound by the other
worker's server before this one binds it. Waiting only until "something answers there"
would then hand the test another test's Redis or node.
"""

import socket

import pytest
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


def _redis_is_ours(rp):
    assert redis.Redis.from_url(rp.url).info("server")["process_id"] == rp.proc.pid


def _node_is_ours(node):
    import json
    import urllib.request
    assert node.url == f"http://127.0.0.1:{node.port}"
    with urllib.request.urlopen(node.url + "/health", timeout=5) as r:
        assert json.load(r)["chunks"] == 0


@pytest.mark.parametrize("kind, answers", [(RedisProc, _redis_is_ours), (NodeProc, _node_is_ours)],
                         ids=["redis", "node"])
def test_a_server_on_a_taken_port_starts_again_elsewhere(tmp_path, monkeypatch, kind, answers):
    with _taken_port() as other:
        taken = other.getsockname()[1]
        given = _first(taken, monkeypatch)
        server = kind(str(tmp_path / "s")).start()
        try:
            assert given == [taken] and server.port != taken
            assert not listens(server.proc, taken) and listens(server.proc, server.port)
            answers(server)
        finally:
            server.stop()


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
