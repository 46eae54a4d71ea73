"""Two hosts for real: network namespaces joined by a veth pair, one `megatronlite launch` on each.

tp2 x dp2 over the two hosts trains as one process does; cutting the link mid-run ends both sides within
the timeout with a line naming the lost peer, and a restart resumes from the last checkpoint and lands on
the uninterrupted run's losses. Skipped, with the reason, where namespaces cannot be made (not root, no
iproute2).
"""

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import read_metrics, set_args, tiny_overrides, train

SUBNET = "10.213.0"  # addresses of this test's own namespaces only
TIMEOUT_S = 15


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def hosts():
    """Two namespaces, host 0 at SUBNET.1 and host 1 at SUBNET.2; yields (names, their link ends)."""
    tag = os.getpid() % 100000
    names, links = (f"mlA{tag}", f"mlB{tag}"), (f"mlva{tag}", f"mlvb{tag}")
    try:
        _ip("netns", "add", names[0])
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot make network namespaces here: {getattr(e, 'stderr', e)}")
    try:
        _ip("netns", "add", names[1])
        _ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for i, (ns, link) in enumerate(zip(names, links)):
            _ip("link", "set", link, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", link)
            _ip("-n", ns, "link", "set", link, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield names, links
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def start_node(ns: str, link: str, node_rank: int, run: Path, port: int, sets: list[str]) -> subprocess.Popen:
    # each host its own network namespace and its own host name (a UTS namespace), as separate machines have
    cmd = [
        "ip",
        "netns",
        "exec",
        ns,
        "unshare",
        "--uts",
        "sh",
        "-c",
        'hostname "$0" && exec "$@"',
        f"host{node_rank}",
        sys.executable,
        "-m",
        "megatronlite",
        "launch",
        "configs/demo.yaml",
        "--nproc-per-node",
        "2",
        "--nnodes",
        "2",
        "--node-rank",
        str(node_rank),
        "--master-addr",
        f"{SUBNET}.1",
        "--master-port",
        str(port),
        "--run-dir",
        str(run),
    ]
    cmd += set_args(sets)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": link}  # gloo talks over the veth, not the hostname's address
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    out = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            out.append((p.returncode, err))
    finally:
        for p in procs:
            p.kill()
    return out


def wait_for_checkpoint(run: Path, procs: list[subprocess.Popen], timeout: float = 180) -> None:
    """Poll, with a deadline, until the run has committed a checkpoint."""
    deadline = time.monotonic() + timeout
    while not (run / "checkpoints" / "latest").exists():
        assert time.monotonic() < deadline, "no checkpoint was written"
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(600)  # a reference run, a cut run and its resume
def test_two_hosts_train_as_one_process_and_survive_a_cut_link(tmp_path, corpus, hosts):
    names, links = hosts
    common = {"train.steps": 40, "checkpoint.interval": 4, "parallel.timeout_minutes": TIMEOUT_S / 60}
    reference = train(tmp_path / "ref", tiny_overrides(corpus, tmp_path / "ref", **common))

    run = tmp_path / "run"
    sets = tiny_overrides(corpus, run, **common, **{"parallel.tensor": 2})
    procs = [start_node(ns, link, i, run, 29400, sets) for i, (ns, link) in enumerate(zip(names, links))]
    wait_for_checkpoint(run, procs)
    _ip("-n", names[0], "link", "set", links[0], "down")  # the cable is pulled
    ended = finish(procs, timeout=3 * TIMEOUT_S + 120)  # the watchdogs fire after TIMEOUT_S; torchrun then shuts down
    assert all(code != 0 for code, _ in ended), ended
    host0, host1 = (err.strip().splitlines()[-1] for _, err in ended)
    # host 0 (the store's) sees host 1's ranks go silent; host 1 loses the store on host 0
    assert "no progress for" in host0 and "not responding: rank 2" in host0, host0
    assert "no progress for" in host1 and f"{SUBNET}.1" in host1, host1

    _ip("-n", names[0], "link", "set", links[0], "up")
    procs = [start_node(ns, link, i, run, 29410, sets) for i, (ns, link) in enumerate(zip(names, links))]
    for code, err in finish(procs, timeout=240):
        assert code == 0, err[-3000:]
    got = read_metrics(run)
    assert [m["step"] for m in got] == [m["step"] for m in reference]
    for g, want in zip(got, reference):
        assert math.isclose(g["loss"], want["loss"], rel_tol=1e-5), (g["step"], g["loss"], want["loss"])
