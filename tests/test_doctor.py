"""`shardfs doctor` against real services."""


def test_doctor_reports_each_check_and_fails_on_a_dead_node(cli, nodes):
    ns = nodes(2)
    for n in ns:
        cli("node", "add", n.url)
    r = cli("doctor")
    assert "ok    redis" in r.stdout and r.stdout.count("ok    node n") == 2, r.stdout
    assert "cache dir: " in r.stdout and "of which the cache leaves" in r.stdout, r.stdout
    # the test's nodes keep their chunks under tmp_path, on the cache's filesystem
    assert r.stdout.count("on the cache's disk: mounts read its chunks without caching them") == 2, r.stdout
    ns[1].kill()
    r = cli("doctor", check=False)
    assert r.returncode == 1
    assert "FAIL  node n2" in r.stdout and "->" in r.stdout


def test_doctor_warns_about_a_cache_disk_with_little_room(cli, small_fs):
    r = cli("doctor", "--cache-dir", small_fs("64M") / "cache", check=False)
    line = next(x for x in r.stdout.splitlines() if "cache dir:" in x)
    assert line.startswith("warn") and "leaves 3.2 MiB to others" in line and "more room" in line, line


def test_doctor_creates_no_cache_dir_it_checks(cli, tmp_path):
    """A check with a side effect: a mistyped --cache-dir was created, parents and all, and
    then reported writable."""
    r = cli("doctor", "--cache-dir", tmp_path / "typo" / "cache", check=False)
    line = next(x for x in r.stdout.splitlines() if "cache dir:" in x)
    assert f"{tmp_path} writable (a mount creates typo/cache in it)" in line, line
    assert not (tmp_path / "typo").exists()
