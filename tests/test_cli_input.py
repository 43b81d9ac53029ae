"""Bad command-line values: one clear line on stderr and a non-zero exit, never a traceback.
(Each case was a traceback, a daemon that died with its reason only in its log, or a value
silently accepted, before the fixes that came with this file.)"""

import os
import subprocess

import pytest

CASES = [
    (("get", "some/model", ""), "DEST is empty"),
    (("put", "{f}", "--chunk-size", "abc"), "cannot read size 'abc'"),
    (("put", "{f}", "--chunk-size", "-5"), "cannot read size '-5'"),
    (("mount", "{mp}", "--cache-size", "-5"), "cannot read size '-5'"),
    (("mount", "{mp}", "--read-ahead", "abc"), "cannot read size 'abc'"),
    (("mount", "{mp}", "--memory", "0"), "give 1MiB"),
    (("mount", "{mp}", "--memory", "100TB"), "this machine's"),
    (("mount", "{mp}", "--cache-size", "1"), "at least 1MiB"),
    (("mount", "{mp}", "--cache-dir", "{f}"), "not a directory"),
    (("mount", "{mp}", "--metrics", "127.0.0.1:99999"), "--metrics wants HOST:PORT"),
    (("mount", "{mp}", "--metrics", "bad"), "--metrics wants HOST:PORT"),
    (("node", "add", "http://127.0.0.1:99999"), "bad port"),
    (("node", "add", "file:///tmp/a\x01b"), "control characters"),
    (("node", "add", "file:///tmp/a/../b"), "contains '..'"),
    (("node", "add", "file://{f}"), "cannot create node directory {f}: not a directory"),
    (("node", "add", "http://127.0.0.1:8000/x/../chunks"), "contains '..'"),
    (("put", "{f}", "--key-file", "{f}"), "--key-file is used only with --encrypt"),
    (("put", "{tmp}/dangling"), "broken symbolic link (to {tmp}/gone"),
    (("node", "serve", "--root", "{f}", "--listen", "127.0.0.1:1"), "not a directory"),
    (("node", "serve", "--root", "{tmp}/r", "--listen", "127.0.0.1:99999"), "--listen wants HOST:PORT"),
    (("node", "serve", "--root", "{tmp}/r", "--listen", "192.0.2.1:18901"), "cannot listen on 192.0.2.1:18901"),
    # (from an audit: tracebacks, or a bad value accepted)
    (("put", "{tmp}", "--name", "f", "--chunk-size", "0"), "chunk size must be between"),  # a folder
    (("put", "{tmp}", "--name", "f", "--chunk-size", "100MiB"), "chunk size must be between"),
    (("put", "{f}", "--chunk-size", "9" * 400), "is too large"),
    (("put", "{f}", "--replicas", "0"), "--replicas must be at least 1"),
    (("gc", "--grace", "9" * 400), "is too large"),
    (("--redis", "redis://:pw@host:abc", "ls"), "redis://:***@host:abc"),
    (("--redis", "redis://[::1", "ls"), "redis://***"),
    (("put", "{f}", "--name", "org/m "), "starts or ends with a space"),
    (("put", "{f}", "--name", "x\u202egpj.exe"), "U+202E (RIGHT-TO-LEFT OVERRIDE)"),
    (("put", "{f}", "--encrypt", "--key-file", "{tmp}/fifo"), "is not a regular file"),
    # (from a second audit: an empty path was the current directory, mounted over or served;
    # a config file that never ends was read until memory ran out; `/` became a node)
    (("mount", ""), "argument mountpoint: must not be empty"),
    (("umount", ""), "argument mountpoint: must not be empty"),
    (("cache", "stats", "--mount", ""), "argument --mount: must not be empty"),
    (("node", "serve", "--root", "", "--listen", "127.0.0.1:1"), "argument --root: must not be empty"),
    (("--config", "/dev/zero", "ls"), "config file /dev/zero is not a regular file"),
    (("--config", "{tmp}", "ls"), "config file {tmp} is a directory"),
    (("node", "add", "file:///"), "/ already holds other files"),
    (("node", "add", "file://{tmp}"), "already holds other files (cwd, dangling, empty.toml, ...); give a new or empty"),
    (("mount", "{mp}", "--cache-dir", ""), "argument --cache-dir: must not be empty"),
    (("--config", "{tmp}/empty.toml", "mount", "{mp}"), "setting cache_dir: is empty"),
    (("put", ""), "argument file: must not be empty"),
    (("cache", "evict", "a", "--all"), "name models to evict, or --all, not both"),
    (("cache", "evict"), "name models to evict, or --all"),
    (("cache", "warm"), "name the models to warm"),
    (("rm", "\udcff"), "model name b'\\xff' is not valid UTF-8"),
    (("put", "{tmp}/hidden-only"), "hidden-only is an empty folder (but for hidden entries: .git/)"),
    # (from a black-box pass: a traceback, a typo taken for database 0, a cache the mount hid)
    (("node", "add", "http://127.0.0.1:17101", "--token-file", "{tmp}/token.bin"), "token.bin does not hold a token"),
    (("node", "serve", "--root", "{tmp}/r", "--listen", "127.0.0.1:1", "--token-file", "{tmp}/token.bin"),
     "token.bin does not hold a token"),
    (("--redis", "redis://127.0.0.1:1/abc", "ls"), "the database after the host must be a number"),
    (("mount", "{mp}", "--cache-dir", "{mp}/cache"), "is inside the mountpoint"),
]


@pytest.mark.parametrize("args,says", CASES, ids=[" ".join(a[:1] + a[2:])[:60] for a, _ in CASES])
def test_bad_values_are_one_line(cli, tmp_path, args, says):
    f = tmp_path / "file"
    f.write_bytes(b"x" * 100)
    (tmp_path / "mp").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    os.mkfifo(tmp_path / "fifo")  # (a key file that is a FIFO hung the command)
    (tmp_path / "empty.toml").write_text('cache_dir = ""\n')
    (tmp_path / "hidden-only" / ".git").mkdir(parents=True)
    (tmp_path / "token.bin").write_bytes(bytes(range(128, 160)))  # (a key file, say)
    args = [a.format(f=f, mp=tmp_path / "mp", tmp=tmp_path).replace("\\u202e", "\u202e") for a in args]
    says = says.format(tmp=tmp_path, f=f)
    # From an empty directory of the test's own: an empty path was taken for the current
    # directory, and `mount ""` run from the checkout mounted over the checkout.
    here = tmp_path / "cwd"
    here.mkdir()
    try:
        r = cli(*args, check=False, timeout=60, cwd=here)
    finally:
        for d in (here, tmp_path / "mp"):  # (what a regression would have mounted)
            if os.path.ismount(d):
                subprocess.run(["fusermount3", "-u", "-z", str(d)], capture_output=True)
    errors = r.stderr.splitlines()  # usage errors too: one line, not argparse's usage block
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(errors) == 1 and says in errors[0], r.stderr


def test_rm_of_a_name_that_is_not_utf8_offers_no_option_it_lacks(cli):
    r = cli("rm", "\udcff", check=False)
    assert r.returncode == 2 and "--name" not in r.stderr, r.stderr


def test_a_closed_or_full_stdout_is_an_error_not_a_traceback(cli):
    import sys
    r = subprocess.run([sys.executable, "-m", "shardfs", "ls"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True, env=cli.env, preexec_fn=lambda: os.close(1))
    assert r.returncode == 1 and r.stderr == "shardfs: error: standard output is closed\n", r.stderr
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "shardfs", "--help"], stdout=full, stderr=subprocess.PIPE,
                           text=True, env=cli.env)
    assert r.returncode == 1 and "No space left on device" in r.stderr, r.stderr


def test_usage_errors_are_one_line_that_names_the_help(cli):
    r = cli("put", check=False)
    assert r.returncode == 2
    assert r.stderr == ("shardfs put: error: the following arguments are required: file "
                        "(see `shardfs put --help`)\n")


def test_version(cli):
    from shardfs import __version__
    assert cli("--version").stdout == f"shardfs {__version__}\n"


def test_cache_help_prints(cli):
    assert "per-model cached %" in cli("cache", "--help").stdout


def test_negative_sizes_in_the_config_file_are_refused(cli, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("read_ahead = -5\n")
    r = cli("--config", cfg, "config", "show", check=False)
    assert r.returncode == 2 and r.stderr.strip() == "shardfs: error: setting read_ahead: -5 is not a valid value"
    assert r.stdout == ""  # nothing of the table printed before the error


def test_a_node_that_cannot_listen_leaves_no_new_root_behind(cli, tmp_path):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = "127.0.0.1:%d" % taken.getsockname()[1]
        r = cli("node", "serve", "--root", tmp_path / "new" / "root", "--listen", listen, check=False, timeout=60)
        assert r.returncode != 0 and "cannot listen on" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "new").exists()
        (tmp_path / "old").mkdir()
        r = cli("node", "serve", "--root", tmp_path / "old", "--listen", listen, check=False, timeout=60)
        assert r.returncode != 0 and (tmp_path / "old").is_dir()  # a root that was there stays


# (no FUSE needed: outside test_mount.py, whose tests skip without /dev/fuse)
def test_umount_refuses_what_shardfs_did_not_mount(cli, small_fs, tmp_path):
    other = small_fs("1M")  # a tmpfs: as root, fusermount3 -u would unmount it too
    r = cli("umount", other, check=False)
    assert r.returncode != 0 and "is a tmpfs mount, not a shardfs mount" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and os.path.ismount(other)
    (tmp_path / "plain").mkdir()
    r = cli("umount", tmp_path / "plain", check=False)
    assert r.returncode != 0 and "is not mounted" in r.stderr


def test_every_argument_of_every_command_says_what_it_is():
    """`--help` explains: no positional argument or option is listed bare."""
    import argparse

    from shardfs.cli import build_parser

    bare = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, path + [name])
            elif action.help is None and not isinstance(action, argparse._HelpAction):
                bare.append(" ".join(path + [action.dest]))

    walk(build_parser(), ["shardfs"])
    assert bare == []


def test_a_proc_file_that_says_it_is_empty_is_named_as_such(cli):
    r = cli("put", "/proc/cpuinfo", check=False)  # (the first put says which local node it made)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("shardfs: error: /proc/cpuinfo reports a size of 0 but has data "
                                                 "(a /proc or /sys file?); copy it to a regular file and put that")
    assert cli("ls").stdout.strip() == "no models"


def test_config_show_never_prints_a_redis_password(cli, redis_proc):
    from conftest import Cli
    url = f"redis://:hunter2@127.0.0.1:{redis_proc.port}/0?password=hunter2"
    out = Cli({**cli.env, "SHARDFS_REDIS": url})("config", "show", check=False)
    assert "hunter2" not in out.stdout + out.stderr and ":***@" in out.stdout, out.stdout


def test_replicas_from_the_environment_or_the_config_file_are_checked(cli, tmp_path):
    from conftest import Cli
    f = tmp_path / "f"
    f.write_bytes(b"x" * 100)
    r = Cli({**cli.env, "SHARDFS_REPLICAS": "-3"})("put", f, check=False)
    assert r.returncode == 2 and "setting replicas: '-3': must be at least 1" in r.stderr, r.stderr
    conf = tmp_path / "c.toml"
    conf.write_text("replicas = 0\n")
    r = cli("--config", conf, "put", f, check=False)
    assert r.returncode == 2 and "setting replicas: 0: must be at least 1" in r.stderr, r.stderr
    assert "n1" not in cli("node", "ls").stdout  # refused before the local node was registered


def test_a_mountpoint_name_that_is_not_utf8_anywhere_in_the_mount_table_is_no_traceback(cli, tmp_path):
    """The mount table is read for every mount, umount and cache command: one mount anywhere
    whose path is not UTF-8 made each of them a traceback."""
    import subprocess
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = os.path.join(os.fsencode(tmp_path), b"not-utf8-\xff")
    os.mkdir(d)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", d], check=True)
    try:
        r = cli("umount", os.fsdecode(d), check=False)
        assert r.returncode == 2 and "a tmpfs mount, not a shardfs mount" in r.stderr, r.stderr
        assert len(r.stderr.splitlines()) == 1
    finally:
        subprocess.run(["umount", d], check=True)


def test_a_control_wait_that_is_not_seconds_is_one_line(cli, tmp_path):
    r = cli("cache", "stats", "--mount", tmp_path, check=False, env={"SHARDFS_CONTROL_WAIT": "2s"})
    assert r.returncode == 2 and r.stderr == ("shardfs: error: SHARDFS_CONTROL_WAIT='2s': give the seconds to "
                                              "wait for the mount, e.g. 120\n"), r.stderr


def test_a_control_answer_keeps_the_client_waiting_while_the_daemon_works(monkeypatch):
    """Only a warm used to send lines while it worked: a long evict looked like a stuck
    daemon to a client waiting for a word. Errors come out as themselves, not grouped."""
    import trio
    import trio.testing

    from shardfs import control
    from shardfs.errors import NotFound
    monkeypatch.setattr(control, "KEEPALIVE", 0.05)
    sent = []

    async def send(obj):
        sent.append(obj)

    async def slow(tell, fail=False):
        await trio.sleep(0.5)
        if fail:
            raise NotFound("no such model")
        return 7
    clock = trio.testing.MockClock(autojump_threshold=0)  # (0.5 s of its time, not the machine's)
    assert trio.run(control._kept_alive, send, slow, clock=clock) == 7
    assert len(sent) >= 5 and all(m == {"alive": True} for m in sent), sent
    with pytest.raises(NotFound):
        trio.run(control._kept_alive, send, lambda tell: slow(tell, fail=True), clock=clock)


def test_a_warm_whose_client_left_stops_and_a_pin_goes_on(monkeypatch):
    """Ctrl-C on `cache warm` left the daemon warming the whole model."""
    import trio
    import trio.testing

    from shardfs import control
    monkeypatch.setattr(control, "KEEPALIVE", 0.05)
    done = []

    async def gone(obj):
        raise trio.BrokenResourceError

    async def work(tell):
        for step in range(10):
            await trio.sleep(0.1)
            done.append(step)
        return "finished"
    clock = trio.testing.MockClock(autojump_threshold=0)
    with pytest.raises(trio.BrokenResourceError):
        trio.run(lambda: control._kept_alive(gone, work, stop_when_left=True), clock=clock)
    assert done == []  # stopped at the first keep-alive that found the client gone
    assert trio.run(control._kept_alive, gone, work, clock=clock) == "finished" and len(done) == 10
