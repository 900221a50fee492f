"""Scale: a simulated network of 100 and 500 nodes, and real daemons on one LAN of the namespace lab.

    .venv/bin/python bench/scale.py --simulate 100,500 [--latency-ms 5] [--loss 0,0.01,0.05] [--no-lab]
    sudo .venv/bin/python bench/scale.py [--nodes 20] [--idle 10]

With `--simulate`, first (no root, no sockets, no daemons): a simulated network of each listed size
drives the real sans-IO registry core (`RegistryView`, `sign_row`, `sign_presence`, `digest`,
`missing_for`, `merge` with its signature check), every node with its own key, as
spt/core/messaging.py does it: a presence tick every 30 s re-signs each node's rows and presence
and pushes them to every member at once (full mesh, one request and one `ok` per member, nothing
re-sent when a frame is lost), a change is pushed at once, digests are compared every 60 s
(a hash of them first).
A deterministic discrete-event loop, seeded, with per-link latency and frame loss (details and
what each figure covers: bench/_simnet.py). Printed, per size: registry convergence after one
change (an endpoint row added on one node) at each loss rate, goal <= 3 s at 100 nodes; the
frames that change sent, goal <= 2N; merges accepted and stale; and one node's registry traffic
per minute in an idle subnet (messages and bytes, as `encode_frame` writes them).

Then, as root (unless `--no-lab`), the lab: starts N daemons (one per lab host, mDNS off), creates a subnet on the first and joins every
other node to it by code (`--peer` the first node), waits until every node sees all N members
online, lets them idle, reads each daemon's resident memory (VmRSS), then sends one durable
message between every ordered pair of nodes (through the control socket, as `spt send` does,
without paying N² process starts) and counts the answers.

Printed: wall time of each phase, messages delivered or queued, and idle RSS per daemon
(median, max) with N - 1 peers. Goal (issue 14): idle RSS <= 60 MB per daemon with 19 peers.

Also, without root and before the lab: a membership log of `--log-members` members (one create,
then a join per member, each signed and countersigned) evaluated from scratch by the sans-IO core
(`MembershipLog.from_entries(...).state()`); goal < 1 s for 500.

Not a test.
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


def sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def rates(text: str) -> list[float]:
    values = [float(part) for part in text.split(",") if part.strip()]
    if not values or any(not 0 <= v < 1 for v in values):
        raise argparse.ArgumentTypeError("loss rates are fractions in [0, 1), comma-separated: 0,0.01,0.05")
    return values


def simulate(node_counts: list[int], *, latency_ms: float, losses: list[float], seed: int, trials: int,
             verify_all: bool) -> None:
    import _simnet

    began = time.perf_counter()
    print(f"simulated registry: full mesh, one-way latency {latency_ms:g} ms per link (x0.5-1.5), seed {seed},"
          f" presence every {_simnet.PRESENCE_INTERVAL:g} s, anti-entropy every {_simnet.ANTI_ENTROPY_SECONDS:g} s")
    for n in node_counts:
        for loss in losses:
            runs = [_simnet.converge(n, latency_ms=latency_ms, loss=loss, seed=seed + t, verify_all=verify_all)
                    for t in range(trials)]
            done = [r.seconds for r in runs if r.seconds is not None]
            worst = max(done) if len(done) == len(runs) else None
            loops = [r.push_loop_seconds for r in runs if r.push_loop_seconds is not None]
            c = runs[0]
            converged = (f"median {median(done):.2f} s, max {worst:.2f} s" if worst is not None
                         else f"{len(runs) - len(done)} of {len(runs)} runs not converged")
            print(f"  {n} nodes, loss {loss:.0%}: converged {converged} over {trials} run(s);"
                  f" the change's push loop took {median(loops):.1f} s;"
                  f" first run: change sent {c.change_messages} frames ({c.change_bytes / 1024:.0f} KiB; 2N = {2 * n});"
                  f" until convergence {c.messages} frames, {c.lost} lost, merges {c.merges.accepted} accepted"
                  f" {c.merges.stale} stale {c.merges.refused} refused, {c.verifications} signatures checked")
            goal = "<= 3" if n == 100 else ""
            row(f"simulated registry convergence after one change, {n} nodes, loss {loss:.0%}",
                worst if worst is not None else float("inf"), "s", goal=goal,
                note=f"max of {trials}, {latency_ms:g} ms links")
            if loss == losses[0]:
                row(f"simulated frames sent per change, {n} nodes", c.change_messages, "frames",
                    baseline_name="2N", baseline=2 * n, goal="<= 1.0", note=f"loss {loss:.0%}")
        t = _simnet.traffic(n, latency_ms=latency_ms, loss=0.0, seed=seed, verify_all=verify_all)
        per_min = 60 / t.seconds
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(t.sent.by_type.items()))
        print(f"  {n} nodes, idle, one node per minute: sent {t.sent.messages * per_min:.0f} frames"
              f" ({t.sent.bytes * per_min / 1e6:.2f} MB: {kinds}), received {t.received.messages * per_min:.0f}"
              f" ({t.received.bytes * per_min / 1e6:.2f} MB)")
        row(f"simulated registry traffic per node per minute, {n} nodes", t.sent.messages * per_min, "frames",
            note=f"{t.sent.bytes * per_min / 1e6:.2f} MB sent, {t.received.bytes * per_min / 1e6:.2f} MB received")
    print(f"  simulation wall time {time.perf_counter() - began:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idling before RSS is read")
    parser.add_argument("--log-members", type=int, default=500, help="members in the evaluated membership log")
    parser.add_argument("--simulate", type=sizes, default=[], metavar="N,N",
                        help="simulated network sizes, e.g. 100,500 (no root needed)")
    parser.add_argument("--latency-ms", type=float, default=5.0, help="mean one-way latency of a simulated link")
    parser.add_argument("--loss", type=rates, default=[0.0, 0.01, 0.05], metavar="P,P",
                        help="frame loss rates of the simulated links, e.g. 0,0.01,0.05")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--trials", type=int, default=1, help="simulated changes per size and loss rate")
    parser.add_argument("--verify-all", action="store_true",
                        help="every simulated receiver checks every signature (slow at 500 nodes)")
    parser.add_argument("--no-lab", action="store_true", help="skip the namespace lab")
    args = parser.parse_args()

    if args.simulate:
        simulate(args.simulate, latency_ms=args.latency_ms, losses=args.loss, seed=args.seed,
                 trials=max(1, args.trials), verify_all=args.verify_all)

    seconds, entries = membership_seconds(args.log_members)
    print(f"membership log of {args.log_members} members ({entries} entries) evaluated in {seconds * 1e3:.0f} ms"
          " (goal < 1 s)")
    row(f"membership log of {args.log_members} members evaluated", seconds * 1e3, "ms", goal="<= 1000")

    if args.no_lab:
        return
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
