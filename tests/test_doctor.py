"""`shardfs doctor` against real services."""


def test_doctor_reports_each_check_and_fails_on_a_dead_node(cli, nodes):
    ns = nodes(2)
    for n in ns:
        cli("node", "add", n.url)
    r = cli("doctor")
    assert "ok    redis" in r.stdout and r.stdout.count("ok    node n") == 2, r.stdout
    ns[1].kill()
    r = cli("doctor", check=False)
    assert r.returncode == 1
    assert "FAIL  node n2" in r.stdout and "->" in r.stdout
