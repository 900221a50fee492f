"""Files across NATs: spt (direct TCP by simultaneous open, or its relay's TCP transit) vs
magic-wormhole through its transit relay, and vs spt's own QUIC path.

    sudo .venv/bin/python bench/nat_files.py [--mb 32] [--runs 3] [--kind-b symmetric,eim] [--quic-runs 1]

The namespace lab of bench/reach.py: two LANs behind NATs, `eim` and the `--kind-b` NAT, one lab
per kind:

- `symmetric`: no direct path can be punched, so both tools go through the relay host (spt
  through its relay's TCP transit);
- `eim` (routers that drop unsolicited packets, as home routers do: `drop_unsolicited`): spt's
  QUIC path is punched and its files take a direct TCP connection by simultaneous open
  (docs/design/tcp-simultaneous-open.md), NAT to NAT; magic-wormhole's direct hints are the
  hosts' private addresses, unreachable here, so it uses its transit relay. The sending daemon
  is then restarted with `SPT_FILE_DATA_PATH=quic` for the QUIC path's figure (`--quic-runs`).

and one relay host on the routed core running, side by side,

- `spt relay serve --tcp-listen` (spt's relay: QUIC rendezvous and forwarding, TCP bulk transit);
- magic-wormhole's mailbox server (`twist wormhole-mailbox`) and transit relay
  (`twist transitrelay`), the baseline.

Each run moves the same file of random bytes from a host on one LAN to a host on the other and
is timed end to end: `spt file send --wait` (hashing, AEAD frames through the relay's TCP transit,
verification and fdatasync at the receiver, FILE_SENT) against `wormhole send` / `wormhole
receive` started together with a fixed code (PAKE, transit through the relay, the receiver's
hash check), until both exit. Interleaved runs; median in MB/s (10^6 bytes) and the ratio.

Needs root, iproute2, iptables, and the baseline: `.venv/bin/pip install magic-wormhole
magic-wormhole-mailbox-server magic-wormhole-transit-relay` (skipped with a note without it).
Target (issue 14): spt >= 1.0x magic-wormhole. Not a test. Traffic stays inside the lab.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "netns"))

from _util import median, row  # noqa: E402

MAILBOX_PORT = 4000
TRANSIT_PORT = 4001
SPT_TCP_PORT = 47472


def make_file(path: Path, mb: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as fh:
        for i in range(mb):
            fh.write(i.to_bytes(8, "big") + block[8:])


def wormhole_bin(name: str) -> str | None:
    found = Path(sys.executable).parent / name
    return str(found) if found.exists() else shutil.which(name)


def measure(kind_b: str, args: argparse.Namespace, twist: str, wormhole: str) -> None:
    """One lab (eim and `kind_b` NATs): interleaved spt and magic-wormhole runs, then spt's QUIC path."""
    from test_reach import ReachLab, wait_for, wait_settled

    from spt.testing import netns

    lab = netns.Lab()
    rl = ReachLab(lab, "eim", kind_b, drop_unsolicited=kind_b == "eim")
    servers: list[subprocess.Popen[bytes]] = []
    samples: dict[str, list[float]] = {"spt": [], "magic-wormhole": []}
    quic: list[float] = []
    paths: set[str] = set()
    try:
        relay = rl.topo.relay_addr
        rl.start_relay("--tcp-listen", f"{relay}:{SPT_TCP_PORT}")
        for plugin, port in (("wormhole-mailbox", MAILBOX_PORT), ("transitrelay", TRANSIT_PORT)):
            with open(rl.root / f"{plugin}.log", "ab") as log:
                servers.append(lab.popen("relay", [twist, plugin, f"--port=tcp:{port}"], stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, cwd=rl.root))  # its database stays there
        a, b, _ = rl.pair("bench")
        settled = wait_settled(b)
        print(f"spt path between the LANs (eim, {kind_b}): {settled['kind']} ({settled.get('reason')})")
        b.cli("ready", "bob", "--once", "--timeout", "0.1")
        wait_for(lambda: any(e["id"] == "bob" for s in a.json("endpoint", "list")["subnets"] for e in s["endpoints"]),
                 30, "bob's row")
        src = rl.root / "payload.bin"
        make_file(src, args.mb)
        size = src.stat().st_size
        inbox = b.home / "endpoints" / "bob" / "inbox"
        recv_dir = rl.root / "wormhole-in"
        recv_dir.mkdir()
        os.chmod(rl.root, 0o755)
        wh = [wormhole, "--relay-url", f"ws://{relay}:{MAILBOX_PORT}/v1", "--transit-helper",
              f"tcp:{relay}:{TRANSIT_PORT}"]

        def spt_once() -> float:
            os.sync()
            started = time.perf_counter()
            sent = a.cli("file", "send", str(src), "bob", "--wait", timeout=600)
            took = time.perf_counter() - started
            if sent.returncode != 0:
                raise SystemExit(f"spt file send failed: {sent.stderr}")
            tid = sent.stdout.strip().split(":", 1)[1]
            doc = a.json("file", "status", tid)
            paths.add(doc["transfers"][0]["path"])
            shutil.rmtree(inbox, ignore_errors=True)
            return size / took / 1e6

        def wormhole_once(n: int) -> float:
            code = f"{n + 7}-bench-run"
            env = {k: v for k, v in os.environ.items() if not k.startswith("SPT_")}
            os.sync()
            started = time.perf_counter()
            sender = lab.popen(a.host, [*wh, "send", "--code", code, str(src)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
            receiver = lab.popen(b.host, ["sh", "-c", f'cd "{recv_dir}" && exec "$@"', "sh", *wh, "receive",
                                          "--accept-file", code], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
            try:
                receiver.wait(600)
                sender.wait(60)
            finally:
                for proc in (sender, receiver):
                    if proc.poll() is None:
                        proc.kill()
            took = time.perf_counter() - started
            if receiver.returncode != 0:
                err = receiver.stderr.read().decode(errors="replace") if receiver.stderr else ""
                raise SystemExit(f"wormhole receive failed: {err[-2000:]}")
            for item in recv_dir.iterdir():
                item.unlink()
            return size / took / 1e6

        for n in range(args.runs):  # interleaved: both see the same machine and lab noise
            samples["spt"].append(spt_once())
            samples["magic-wormhole"].append(wormhole_once(n))
        spt_paths = sorted(paths)
        if kind_b == "eim" and args.quic_runs:
            a.kill(signal.SIGTERM)
            a.env = {**a.env, "SPT_FILE_DATA_PATH": "quic"}
            a.start()
            # the restarted node dials b's last address again (a "direct" path, no punch needed)
            path = wait_for(lambda: (p := a.path()) and p["kind"].startswith("direct") and p, 60, "a direct path again")
            print(f"spt path after restarting the sender with SPT_FILE_DATA_PATH=quic: {path['kind']}")
            paths.clear()
            quic = [spt_once() for _ in range(args.quic_runs)]
            if paths != {"quic"}:
                raise SystemExit(f"the QUIC runs took {paths}")
    finally:
        for proc in servers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        rl.close()
        lab.close()

    s, w = median(samples["spt"]), median(samples["magic-wormhole"])
    via = "/".join(spt_paths)
    print(f"file {args.mb} MiB across two NATs (eim, {kind_b}); {args.runs} interleaved runs, median (min-max) MB/s")
    for name, values in samples.items():
        print(f"  {name:16} {median(values):8.1f}   ({min(values):.1f}-{max(values):.1f})")
    print(f"  spt data path: {via}")
    print(f"  spt / magic-wormhole = {s / w:.2f}  (target >= 1.0)")
    what = "direct TCP, simultaneous open" if via == "tcp-punched" else f"via {via}"
    row(f"files across NATs eim/{kind_b} (spt {what})", s, "MB/s", baseline_name="magic-wormhole transit relay",
        baseline=w, goal=">= 1.0", note=f"{args.mb} MiB, path {via}")
    if quic:
        q = median(quic)
        print(f"  spt QUIC path    {q:8.1f}   ({min(quic):.1f}-{max(quic):.1f}), {len(quic)} run(s) after the others")
        print(f"  spt {via} / spt QUIC = {s / q:.1f}")
        row(f"files across NATs eim/{kind_b} (spt {what})", s, "MB/s", baseline_name="spt QUIC path, same lab",
            baseline=q, note=f"{args.mb} MiB; QUIC measured after the interleaved runs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kind-b", default="symmetric,eim", help="the second LAN's NAT, one lab each (eim, symmetric)")
    parser.add_argument("--quic-runs", type=int, default=1, help="spt QUIC-path runs in the eim lab (0: none)")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.kind_b.split(",") if k.strip()]
    if not kinds or any(k not in ("eim", "symmetric") for k in kinds):
        parser.error("--kind-b takes eim and/or symmetric, comma-separated")

    from spt.testing import netns

    ok, why = netns.available()
    if not ok:
        print(f"bench/nat_files.py: skipped: {why} (run it as root with iproute2 and iptables installed)")
        return
    twist, wormhole = wormhole_bin("twist"), wormhole_bin("wormhole")
    if twist is None or wormhole is None:
        print("bench/nat_files.py: skipped: magic-wormhole is not installed (.venv/bin/pip install magic-wormhole"
              " magic-wormhole-mailbox-server magic-wormhole-transit-relay)")
        return
    for kind_b in kinds:
        measure(kind_b, args, twist, wormhole)


if __name__ == "__main__":
    main()
