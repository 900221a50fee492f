"""Fuzz every network decoder in bulk, then feed a real daemon garbage over real sockets.

    .venv/bin/python bench/fuzz.py [--inputs 1000000] [--engine loop|atheris] [--garbage-seconds 20]

1. Decoders: the targets of tests/fuzz/_targets.py (frames, registry rows and presence, the
   envelope parser, file manifests, file-channel frames, relay datagrams on both ends, relay
   control messages, punch candidates), `--inputs` in total, shared evenly. The `loop` engine
   (default) is a mutational loop: random bytes, seeds with random edits, and inputs that were
   accepted before, mutated again; every input goes through `shaped` like the hypothesis tests.
   It counts crashes (exceptions a decoder does not document) and goes on; goal 0. The
   `atheris` engine runs each target under coverage-guided atheris (when installed) in a
   child process and reports its exit status (atheris stops at the first crash).
2. Garbage over real sockets: a real daemon on loopback; strangers on `spt-join/1` send random
   frames, shaped frames and raw stream bytes for `--garbage-seconds`, while a member keeps
   asking for the membership log. Reports the daemon's peak RSS (VmHWM) and the member's
   slowest answer; goal: under 150 MB, under 1 s.

Not a test (tests/fuzz runs 10,000 examples per target in the suite); prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "fuzz"))
sys.path.insert(0, str(Path(__file__).parent))

from _util import row  # noqa: E402

from spt.core.errors import SptError  # noqa: E402


def fuzz_loop(total: int, seed: int) -> dict[str, tuple[int, int]]:
    """Inputs and crashes per target; prints the first crash of each target."""
    from _targets import SEEDS, TARGETS, shaped

    rng = random.Random(seed)
    per_target = max(1, total // len(TARGETS))
    results: dict[str, tuple[int, int]] = {}
    for name, target in sorted(TARGETS.items()):
        kept: list[bytes] = list(SEEDS[name])
        crashes = 0
        started = time.monotonic()
        for i in range(per_target):
            pick = rng.random()
            if pick < 0.4 or not kept:
                data = rng.randbytes(rng.randrange(0, 600))
            else:
                base = bytearray(kept[rng.randrange(len(kept))])
                for _ in range(rng.randrange(1, 8)):
                    j = rng.randrange(len(base) + 1)
                    op = rng.randrange(4)
                    if op == 0 and base:
                        base[min(j, len(base) - 1)] = rng.randrange(256)
                    elif op == 1:
                        del base[j:]
                    elif op == 2:
                        base[j:j] = base[j : j + rng.randrange(1, 32)]
                    else:
                        base[j:j] = rng.randbytes(rng.randrange(1, 8))
                data = bytes(base)
            try:
                target(shaped(name, data))
            except SptError:
                pass
            except Exception:
                crashes += 1
                if crashes == 1:
                    print(f"CRASH in {name} on {data[:120]!r}:\n{traceback.format_exc()}", flush=True)
                continue
            if len(kept) < 256 and i % 97 == 0:
                kept.append(data)  # something that went through: a base for further mutation
        elapsed = time.monotonic() - started
        results[name] = (per_target, crashes)
        print(f"  {name:24} {per_target:>9} inputs  {crashes} crashes  {per_target / elapsed:>8.0f}/s", flush=True)
    return results


def fuzz_atheris(total: int) -> dict[str, tuple[int, int]]:
    from _targets import TARGETS

    results = {}
    per_target = max(1, total // len(TARGETS))
    for name in sorted(TARGETS):
        code = (
            "import sys, atheris\n"
            f"sys.path.insert(0, {str(ROOT / 'tests' / 'fuzz')!r})\n"
            "with atheris.instrument_imports():\n"
            "    from _targets import TARGETS, shaped\n"
            "from spt.core.errors import SptError\n"
            f"target = TARGETS[{name!r}]\n"
            "def one(data):\n"
            "    try:\n"
            f"        target(shaped({name!r}, data))\n"
            "    except SptError:\n"
            "        pass\n"
            "atheris.Setup(sys.argv, one)\n"
            "atheris.Fuzz()\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, f"-runs={per_target}", "-max_len=1024", "-print_final_stats=0"],
            capture_output=True, text=True, timeout=3600, check=False,
        )
        crashed = done.returncode != 0
        results[name] = (per_target, int(crashed))
        print(f"  {name:24} {per_target:>9} inputs  {'CRASH' if crashed else '0 crashes'}", flush=True)
        if crashed:
            print(done.stderr[-3000:], flush=True)
    return results


# --- garbage over real sockets -----------------------------------------------------------------


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


async def _garbage(target: tuple[str, int], seconds: float, seed: int) -> int:
    """Strangers on the join ALPN sending garbage; returns how many payloads went out."""
    from _targets import SEEDS, shaped

    from spt.core.identity import NodeKey
    from spt.core.net.transport import ALPN_JOIN, AllowKeys, Transport
    from spt.core.proto.frames import encode_frame

    rng = random.Random(seed)
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t = Transport(NodeKey.generate(), host="127.0.0.1", accept=AllowKeys(), alpns=(ALPN_JOIN,))
        await t.start()
        try:
            conn = await t.connect_any(target, alpn=ALPN_JOIN, timeout=3)
            for _ in range(64):
                if not conn.is_open:
                    break
                stream = conn.open_stream()
                kind = rng.randrange(3)
                if kind == 0:
                    data = rng.randbytes(rng.randrange(1, 4096))
                elif kind == 1:
                    data = shaped("frames_stream", rng.choice(SEEDS["frames_stream"]) + rng.randbytes(64))
                else:
                    data = encode_frame(rng.choice(["join", "log.offer", "key.claim", "x"]), shaped("file_manifest", rng.randbytes(300)))
                conn._write(stream, data, True)
                sent += 1
                await asyncio.sleep(0)
            await asyncio.sleep(0.05)
        except Exception:
            pass  # refused, reset or closed: what a daemon may do to a stranger
        finally:
            await t.close()
    return sent


async def _member(key, peer, target: tuple[str, int], subnet: str, stop: asyncio.Event) -> list[float]:
    from spt.core.net.transport import AllowKeys, Transport

    t = Transport(key, host="127.0.0.1", accept=AllowKeys())
    await t.start()
    times: list[float] = []
    try:
        while not stop.is_set():
            started = time.monotonic()
            conn = await t.connect(peer, [target], timeout=5)
            await conn.request("log.sync", {"subnet": subnet, "heads": []}, timeout=5)
            times.append(time.monotonic() - started)
            await asyncio.sleep(0.1)
    finally:
        await t.close()
    return times


def garbage_over_sockets(seconds: float, seed: int) -> tuple[int, int, float, int]:
    """(peak RSS kB before, after, slowest member answer s, payloads sent)."""
    from spt.core.identity import NodeId, NodeKey
    from spt.testing.nodes import NodeFactory

    factory = NodeFactory()
    try:
        alpha, beta = factory.subnet(["alpha", "beta"])
        subnet = alpha.json("subnet", "status")["subnets"][0]["id"]
        beta_key = NodeKey.from_private_bytes((beta.home / "node.key").read_bytes())
        beta.stop()
        host, port = alpha.address.split(":")
        target = (host, int(port))
        peer = NodeId.from_hex(alpha.key)
        assert alpha.proc is not None
        before = peak_rss_kb(alpha.proc.pid)

        async def scenario() -> tuple[int, list[float]]:
            stop = asyncio.Event()
            member = asyncio.create_task(_member(beta_key, peer, target, subnet, stop))
            strangers = [asyncio.create_task(_garbage(target, seconds, seed + i)) for i in range(4)]
            sent = sum(await asyncio.gather(*strangers))
            stop.set()
            return sent, await member

        sent, times = asyncio.run(scenario())
        alive = alpha.proc.poll() is None and alpha.cli("daemon", "status").returncode == 0
        if not alive:
            print(alpha.log()[-3000:])
            raise SystemExit("the daemon did not survive the garbage")
        return before, peak_rss_kb(alpha.proc.pid), max(times) if times else float("inf"), sent
    finally:
        factory.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=1_000_000, help="decoder inputs in total, over all targets")
    parser.add_argument("--engine", choices=("loop", "atheris"), default="loop")
    parser.add_argument("--garbage-seconds", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "big"))
    args = parser.parse_args()

    print(f"== decoders: {args.inputs} inputs, engine {args.engine}, seed {args.seed}")
    started = time.monotonic()
    results = fuzz_atheris(args.inputs) if args.engine == "atheris" else fuzz_loop(args.inputs, args.seed)
    inputs = sum(n for n, _ in results.values())
    crashes = sum(c for _, c in results.values())
    print(f"   {inputs} inputs in {time.monotonic() - started:.0f} s; crashes: {crashes} (goal 0)")
    row("fuzz: crashes", crashes, "crashes", goal="<= 0", note=f"{inputs} inputs, {len(results)} decoders")

    print(f"== garbage over real sockets to a daemon for {args.garbage_seconds:g} s")
    before, peak, slowest, sent = garbage_over_sockets(args.garbage_seconds, args.seed)
    print(f"   {sent} garbage streams sent; daemon peak RSS {peak / 1024:.1f} MB (at start {before / 1024:.1f} MB); "
          f"slowest member answer {slowest * 1000:.0f} ms")
    row("fuzz: daemon peak RSS under garbage", peak / 1024, "MB", baseline_name="at start", baseline=before / 1024, goal="<= 150")
    row("fuzz: slowest member answer under garbage", slowest * 1000, "ms", goal="<= 1000")
    if crashes:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
