"""The control socket's operations against a daemon stand-in (a real ChunkCache, the real
Daemon.follow_pins): the interleavings with the poll that a live mount only hits by chance.
The stand-in's slow open_model (a manifest coming from Redis) forces them."""

import types

import trio

from shardfs import control
from shardfs.cache import ChunkCache
from shardfs.daemon import Daemon


def model(name, vid):
    return types.SimpleNamespace(name=name, vid=vid, hexes=[f"{vid:064x}"],
                                 manifest=types.SimpleNamespace(lengths=[4096]))


def stand_in(tmp_path, open_takes=0.5):
    d = types.SimpleNamespace(reader=None, _changed=set(), _pin_stuck={}, pin_lock=trio.Lock(), opened=[])
    d.cache = ChunkCache(str(tmp_path / "c"), 1 << 30, free_floor=0)
    d.tree = types.SimpleNamespace(current={"a": types.SimpleNamespace(name="a", vid=1)})

    async def open_model(entry):
        d.opened.append(entry.name)
        await trio.sleep(open_takes)
        return model(entry.name, entry.vid)
    d.open_model = open_model
    d.entry_by_name = lambda n: Daemon.entry_by_name(d, n)
    d.follow_pins = lambda: Daemon.follow_pins(d)
    d._follow_pins = lambda: Daemon._follow_pins(d)
    return d


async def _send(_line):
    pass


def new_version(d, vid):
    """What a poll that sees a new version of `a` does (Daemon._apply)."""
    d.tree.current["a"] = types.SimpleNamespace(name="a", vid=vid)
    d._changed.add("a")


def test_an_unpin_while_the_poll_moves_the_pin_stays_unpinned(tmp_path):
    """follow_pins opened the new version, the user's unpin went through meanwhile, and
    follow_pins then pinned the name again: "unpinned: a", and a still pinned."""
    d = stand_in(tmp_path)
    d.cache.pin("a", model("a", 1).hexes)

    async def main():
        async with trio.open_nursery() as n:
            new_version(d, 2)
            n.start_soon(d.follow_pins)
            await trio.sleep(0.1)  # (follow_pins is in open_model)
            assert await control._dispatch(d, {"op": "unpin", "names": ["a"]}, _send) == {"unpinned": ["a"]}
    trio.run(main)
    assert d.cache.pins() == []


def test_a_pin_while_the_poll_sees_a_new_version_protects_the_new_one(tmp_path):
    """The pin opened version 1; the poll applied version 2 and follow_pins passed `a` by
    (not pinned yet); the pin then landed on version 1's chunks and stayed there."""
    d = stand_in(tmp_path)

    async def main():
        async with trio.open_nursery() as n:
            n.start_soon(control._dispatch, d, {"op": "pin", "names": ["a"]}, _send)
            await trio.sleep(0.1)  # (the pin is in open_model)
            new_version(d, 2)
            await d.follow_pins()
    trio.run(main)
    assert d.cache._pins["a"] == model("a", 2).hexes


def test_a_request_naming_a_folder_many_times_opens_each_model_once(tmp_path):
    """20k copies of "org/" in one request built a list of millions and held the trio
    thread for seconds (7.0 s measured), since opening a model already open never yields."""
    d = stand_in(tmp_path, open_takes=0)
    d.tree.current = {f"org/m{i}": types.SimpleNamespace(name=f"org/m{i}", vid=i) for i in range(200)}
    names = ["org/"] * 20_000 + ["org/m7"] * 10
    got = trio.run(control._models, d, {"names": names})
    assert [m.name for m in got] == [f"org/m{i}" for i in range(200)]
    assert sorted(d.opened) == sorted(d.tree.current)


def test_an_unpin_naming_one_model_not_pinned_changes_nothing(tmp_path):
    d = stand_in(tmp_path)
    d.cache.pin("a", model("a", 1).hexes)

    async def main():
        try:
            await control._dispatch(d, {"op": "unpin", "names": ["a", "b"]}, _send)
        except control.NotFound as e:
            return str(e)
    assert trio.run(main) == "not pinned: b"
    assert d.cache.pins() == ["a"]
