"""Settings precedence: flag > environment > config file > default, shown by `config show`."""

from conftest import Cli


def test_precedence_and_sources(base_env, tmp_path):
    cfg = tmp_path / "shardfs.toml"
    cfg.write_text('redis = "redis://127.0.0.1:7/0"\ncache_size = "5G"\nread_ahead = "8MiB"\nreplicas = 3\n')
    cli = Cli({**base_env, "SHARDFS_CONFIG": str(cfg), "SHARDFS_READ_AHEAD": "16MiB"})
    out = {line.split()[0]: line for line in cli("config", "show").stdout.splitlines()[1:]}
    assert "redis://127.0.0.1:7/0" in out["redis"] and f"file {cfg}" in out["redis"]
    assert str(5 << 30) in out["cache_size"] and "file" in out["cache_size"]
    assert str(16 << 20) in out["read_ahead"] and "env SHARDFS_READ_AHEAD" in out["read_ahead"]
    assert "3" in out["replicas"] and "file" in out["replicas"]
    assert "(default)" in out["memory"] and str(128 << 20) in out["memory"]
    out = cli("--redis", "redis://127.0.0.1:9/0", "config", "show").stdout
    assert "redis://127.0.0.1:9/0" in out and "(flag)" in out
    # the file's Redis URL is really used: a command names it when it cannot connect
    r = cli("ls", check=False)
    assert r.returncode != 0 and "127.0.0.1:7" in r.stderr


def test_bad_config_is_one_clear_line(base_env, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("cache_sise = 1\n")
    r = Cli(base_env)("--config", cfg, "ls", check=False)
    assert r.returncode == 2 and "unknown setting" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    cfg.write_text("this is [not toml\n")
    r = Cli(base_env)("--config", cfg, "ls", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_config_values_of_the_wrong_type_are_one_line(base_env, tmp_path):
    cfg = tmp_path / "c.toml"
    for bad in ("replicas = [2]\n", "cache_size = true\n", "redis = 6379\n"):
        cfg.write_text(bad)
        r = Cli(base_env)("--config", cfg, "config", "show", check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "not a valid value" in r.stderr, (bad, r.stderr)
    cfg.write_bytes(b"redis = \"\xff\xfe\"\n")
    r = Cli(base_env)("--config", cfg, "ls", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
