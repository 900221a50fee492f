"""Scale on real daemons: N nodes on one LAN of the namespace lab, all in one subnet.

    sudo .venv/bin/python bench/scale.py [--nodes 20] [--idle 10]

Starts N daemons (one per lab host, mDNS off), creates a subnet on the first and joins every
other node to it by code (`--peer` the first node), waits until every node sees all N members
online, lets them idle, reads each daemon's resident memory (VmRSS), then sends one durable
message between every ordered pair of nodes (through the control socket, as `spt send` does,
without paying N² process starts) and counts the answers.

Printed: wall time of each phase, messages delivered or queued, and idle RSS per daemon
(median, max) with N - 1 peers. Goal (issue 14): idle RSS <= 60 MB per daemon with 19 peers.

Also, without root and before the lab: a membership log of `--log-members` members (one create,
then a join per member, each signed and countersigned) evaluated from scratch by the sans-IO core
(`MembershipLog.from_entries(...).state()`); goal < 1 s for 500.

Not built yet (issue 14, goal 5): the simulated network of 100 and 500 nodes (registry
convergence, messages per change, presence traffic). Not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "netns"))

from _util import median, row  # noqa: E402

PORT = 47470


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def membership_seconds(members: int) -> tuple[float, int]:
    """(seconds to evaluate a fresh log of `members` members, entries in it)."""
    from spt.core.identity import NodeKey
    from spt.core.proto.hlc import Hlc
    from spt.core.proto.membership import (
        MembershipLog,
        countersign_join,
        make_create,
        propose_join,
        subnet_id_of,
    )
    from spt.core.proto.totp import new_seed

    creator = NodeKey.generate()
    clock = Hlc(creator.node_id)
    wall = 1_000_000
    create = make_create(creator, name="scale", label="n0", nonce=os.urandom(16), seed=new_seed(os.urandom(20)),
                         hlc=clock.now(wall))
    log = MembershipLog.from_create(create)
    for i in range(1, members):
        wall += 10
        joiner = NodeKey.generate()
        proposal = propose_join(creator, parents=log.heads(), joiner=joiner.node_id, label=f"n{i}", epoch=0,
                                hlc=clock.now(wall))
        log.add(countersign_join(proposal, joiner))
    entries = log.entries()
    started = time.perf_counter()
    state = MembershipLog.from_entries(subnet_id_of(create), entries).state()
    elapsed = time.perf_counter() - started
    if len(state.members) != members:
        raise SystemExit(f"the evaluated log has {len(state.members)} members, not {members}")
    return elapsed, len(entries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idling before RSS is read")
    parser.add_argument("--log-members", type=int, default=500, help="members in the evaluated membership log")
    args = parser.parse_args()

    seconds, entries = membership_seconds(args.log_members)
    print(f"membership log of {args.log_members} members ({entries} entries) evaluated in {seconds * 1e3:.0f} ms"
          " (goal < 1 s)")
    row(f"membership log of {args.log_members} members evaluated", seconds * 1e3, "ms", goal="<= 1000")

    from spt.testing import netns

    ok, why = netns.available()
    if not ok:
        print(f"bench/scale.py: skipped: {why} (run it as root with iproute2 and iptables installed)")
        return
    from spt.core.ipc import call, connect
    from spt.testing.nodes import LabNode, fresh_code

    n = max(2, args.nodes)
    root = Path(tempfile.mkdtemp(prefix="spt-scale-"))
    lab = netns.Lab()
    nodes: list[LabNode] = []
    phases: dict[str, float] = {}
    try:
        lan = lab.lan(n)
        began = time.monotonic()
        for i, host in enumerate(lan.hosts):
            home = root / f"n{i}"
            home.mkdir(mode=0o700)
            (home / "config.toml").write_text(
                f'[node]\nlabel = "n{i}"\n\n[net]\nport = {PORT}\n\n[discovery]\nmdns = false\n'
            )
            env = {k: v for k, v in os.environ.items() if not k.startswith("SPT_")}
            env.update({"SPT_HOME": str(home), "SPT_NO_AUTOSTART": "1", "SPT_NO_SUDO": "1"})
            node = LabNode(lab, host, f"n{i}", home, env)
            node.start(timeout=60)
            nodes.append(node)
        phases["start"] = time.monotonic() - began

        first = nodes[0]
        began = time.monotonic()
        first.cli("subnet", "create", "scale", check=True)
        peer = f"{lab.addr(lan.hosts[0])}:{PORT}"
        for node in nodes[1:]:
            joined = node.cli("subnet", "join", "scale", "--code", fresh_code(first, "scale", margin=6),
                              "--peer", peer, "--timeout", "30", timeout=90)
            if joined.returncode != 0:
                raise SystemExit(f"{node.name} did not join: {joined.stderr}\n{node.log()[-2000:]}")
        phases["joins"] = time.monotonic() - began

        began = time.monotonic()
        deadline = began + 180
        waiting = list(nodes)
        while waiting and time.monotonic() < deadline:
            still = []
            for node in waiting:
                doc = node.json("subnet", "status", "--nodes")
                members = doc["subnets"][0].get("members", []) if doc["subnets"] else []
                if len(members) < n or not all(m["online"] for m in members):
                    still.append(node)
            waiting = still
            if waiting:
                time.sleep(0.5)
        if waiting:
            raise SystemExit(f"{len(waiting)} nodes do not see all {n} members online")
        phases["converged"] = time.monotonic() - began

        for i, node in enumerate(nodes):
            node.cli("ready", f"p{i}", "--once", "--timeout", "0.1")
        began = time.monotonic()
        for node in nodes:  # every node lists every perch before the pairs are sent
            while time.monotonic() < began + 120:
                doc = node.json("endpoint", "list")
                if sum(len(s["endpoints"]) for s in doc["subnets"]) >= n:
                    break
                time.sleep(0.5)
        phases["perches listed"] = time.monotonic() - began

        time.sleep(args.idle)
        rss = [rss_mb(node.proc.pid) for node in nodes if node.proc is not None]

        began = time.monotonic()
        answers: dict[str, int] = {}
        for i, node in enumerate(nodes):
            for j in range(n):
                if i == j:
                    continue
                conn = connect(node.home / "spt.sock")
                try:
                    result = call(conn, "msg.send", {"address": f"p{j}", "from": f"a{i}", "body": f"{i}->{j}"})
                    token = str(result.get("token")) if isinstance(result, dict) else "?"
                except Exception as exc:  # counted, not fatal: the figure is how many got through
                    token = type(exc).__name__
                finally:
                    conn.close()
                answers[token] = answers.get(token, 0) + 1
        phases["pair messages"] = time.monotonic() - began
    finally:
        for node in nodes:
            node.kill()
        lab.close()
        shutil.rmtree(root, ignore_errors=True)

    pairs = n * (n - 1)
    print(f"{n} daemons on one LAN of the namespace lab, one subnet, mDNS off")
    for name, seconds in phases.items():
        print(f"  {name:16} {seconds:8.1f} s")
    print(f"  pair messages: {pairs} sent, answers {answers}")
    print(f"  idle RSS per daemon with {n - 1} peers: median {median(rss):.1f} MB, max {max(rss):.1f} MB"
          f"  (goal <= 60 MB)")
    row(f"idle RSS per daemon, {n} nodes", median(rss), "MB", goal="<= 60", note=f"max {max(rss):.1f} MB")
    row(f"{n} nodes join one subnet (sequential joins)", phases["joins"], "s")
    ok_pairs = answers.get("SENT", 0) + answers.get("QUEUED", 0)
    row(f"messages between every pair of {n} nodes", ok_pairs, "of", baseline_name="pairs", baseline=pairs,
        goal=">= 1.0")


if __name__ == "__main__":
    main()
