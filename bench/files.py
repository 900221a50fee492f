"""File-transfer throughput on loopback: spt vs scp (aes128-gcm) vs raw TCP, in one run.

    .venv/bin/python bench/files.py [--mb 500] [--runs 3] [--quic-mb 64]

Each method moves the same file of random bytes from one folder to another on this machine
and is timed end to end (the wall time of the command, or of the socket copy); the median of
`--runs` runs (interleaved: raw TCP, scp, spt in turn, all with the same file) is reported in
MB/s (10^6 bytes), with ratios against scp and raw TCP.

- spt: two daemons in one subnet; `spt file send --wait` (hashing at the sender, AEAD frames
  on the direct TCP path, verification and fdatasync at the receiver, FILE_SENT at the end).
  Also, for reference, a third daemon forced onto the QUIC data path (`SPT_FILE_DATA_PATH=quic`)
  compared with the TCP path on the same smaller file (`--quic-mb`): the figure behind choosing
  TCP when it is reachable.
- scp: `scp -c aes128-gcm@openssh.com` to an sshd started here on a free loopback port, with a
  temporary host key and authorized key, stopped by its pid at the end (needs root for
  /run/sshd and root's login; skipped with a note otherwise).
- raw TCP: `socket.sendfile` to a thread writing to a file: the link and the disk, no crypto.

Target (issue 14): spt >= 1.0x scp (stretch 1.2x). Not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _util import median, row

from spt.testing.nodes import NodeFactory, fresh_code


def make_file(path: Path, mb: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as fh:
        for i in range(mb):
            fh.write(block[i % 251 :] + block[: i % 251])  # distinct chunks, cheap to make


def timed(runs: int, one: Callable[[], None]) -> list[float]:
    """Wall seconds of each run; dirty pages of earlier runs are written out first (untimed)."""
    samples = []
    for _ in range(runs):
        os.sync()
        start = time.perf_counter()
        one()
        samples.append(time.perf_counter() - start)
    return samples


# --- raw TCP ---------------------------------------------------------------------------------


def raw_tcp(src: Path, dst: Path) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def receive() -> None:
        conn, _ = server.accept()
        with conn, open(dst, "wb") as out:
            buf = bytearray(1 << 20)
            view = memoryview(buf)
            while n := conn.recv_into(buf):
                out.write(view[:n])

    thread = threading.Thread(target=receive)
    thread.start()
    with socket.create_connection(("127.0.0.1", port)) as sock, open(src, "rb") as fh:
        sock.sendfile(fh)
    thread.join()
    server.close()


# --- scp -------------------------------------------------------------------------------------


class Sshd:
    """An sshd on a free loopback port with throwaway keys; stopped by pid."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("needs root (sshd privilege separation and root login)")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        for name in ("host", "client"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.root / name)], check=True
            )
        (self.root / "authorized_keys").write_text((self.root / "client.pub").read_text())
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = self.root / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.root / 'host'}\n"
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}\nPidFile {self.root / 'sshd.pid'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "PermitRootLogin prohibit-password\nCiphers aes128-gcm@openssh.com\nSubsystem sftp internal-sftp\n"
        )
        self.proc = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            time.sleep(0.05)
        raise RuntimeError("sshd did not start listening")

    def scp(self, src: Path, dst: Path) -> None:
        subprocess.run(
            [
                "scp", "-q", "-c", "aes128-gcm@openssh.com", "-P", str(self.port), "-i", str(self.root / "client"),
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                str(src), f"root@127.0.0.1:{dst}",
            ],
            check=True,
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)


# --- spt -------------------------------------------------------------------------------------


def spt_pair(factory: NodeFactory, quic_env: dict[str, str]) -> tuple[object, object, object]:
    a = factory("a", label="alpha")
    b = factory("b", label="beta")
    c = factory("c", label="gamma", env=quic_env)
    a.cli("subnet", "create", "bench", check=True)
    for joiner in (b, c):  # a code with time left: a loaded machine must not miss its step
        joiner.cli("subnet", "join", "bench", "--code", fresh_code(a, "bench"), "--peer", a.address, check=True)
    b.cli("ready", "sink", "--once", "--timeout", "0.1")
    return a, b, c


def spt_send(node: object, src: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        result = node.cli("file", "send", str(src), "sink", "--wait", timeout=600)  # type: ignore[attr-defined]
        if result.returncode == 0:
            break
        if "NO_PERCH" not in result.stderr or time.monotonic() > deadline:
            raise RuntimeError(f"spt file send failed: {result.stderr}")
        time.sleep(0.3)  # the perch's row is still replicating


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=512, help="file size in MiB")
    parser.add_argument("--runs", type=int, default=5, help="runs per method (interleaved rounds)")
    parser.add_argument("--quic-mb", type=int, default=32, help="file size for the QUIC-path reference")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="spt-bench-files-"))
    factory = NodeFactory()
    sshd = Sshd(work)
    samples: dict[str, list[float]] = {}
    try:
        src = work / "payload.bin"
        make_file(src, args.mb)
        small = work / "small.bin"
        make_file(small, args.quic_mb)
        dst = work / "copy.bin"
        try:
            sshd.start()
            has_scp = True
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            print(f"scp: skipped ({exc})")
            has_scp = False

        a, b, c = spt_pair(factory, {"SPT_FILE_DATA_PATH": "quic"})
        inbox = b.home / "endpoints" / "sink" / "inbox"  # type: ignore[attr-defined]
        spt_send(a, small)  # warm-up: the perch row has replicated, the listener is open
        spt_send(c, small)

        def rate(name: str, size_of: Path, one: Callable[[], None]) -> None:
            seconds = timed(1, one)[0]
            samples.setdefault(name, []).append(size_of.stat().st_size / seconds / 1e6)
            dst.unlink(missing_ok=True)  # clean-ups stay out of the timed part
            shutil.rmtree(inbox, ignore_errors=True)

        # interleaved rounds, every method on the same file: each sees the same machine noise
        for _ in range(args.runs):
            rate("raw TCP", src, lambda: raw_tcp(src, dst))
            if has_scp:
                rate("scp aes128-gcm", src, lambda: sshd.scp(src, dst))
            rate("spt (TCP path)", src, lambda: spt_send(a, src))
        # the QUIC-path reference against the TCP path on one smaller file
        for _ in range(max(1, args.runs // 2)):
            rate("spt TCP, small file", small, lambda: spt_send(a, small))
            rate("spt QUIC, small file", small, lambda: spt_send(c, small))
    finally:
        sshd.stop()
        factory.close()
        shutil.rmtree(work, ignore_errors=True)

    results = {name: median(values) for name, values in samples.items()}
    print(f"file {args.mb} MiB, {args.runs} interleaved runs per method, loopback; median (min-max) MB/s")
    for name, values in samples.items():
        print(f"  {name:22} {results[name]:8.1f}   ({min(values):.1f}-{max(values):.1f}, n={len(values)})")
    spt_rate = results["spt (TCP path)"]
    if "scp aes128-gcm" in results:
        ratio = spt_rate / results["scp aes128-gcm"]
        print(f"  spt / scp      = {ratio:.2f}  (target >= 1.0, stretch 1.2)")
        row("files on the LAN (spt TCP path)", spt_rate, "MB/s", baseline_name="scp aes128-gcm",
            baseline=results["scp aes128-gcm"], goal=">= 1.0", note=f"{args.mb} MiB loopback")
    print(f"  spt / raw TCP  = {spt_rate / results['raw TCP']:.2f}")
    quic, tcp_small = results["spt QUIC, small file"], results["spt TCP, small file"]
    print(f"  TCP path / QUIC path ({args.quic_mb} MiB) = {tcp_small / quic:.1f}")
    row("files over the QUIC data path", quic, "MB/s", baseline_name="spt TCP path, same file",
        baseline=tcp_small, note=f"{args.quic_mb} MiB loopback")


if __name__ == "__main__":
    main()
