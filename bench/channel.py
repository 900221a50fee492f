"""The file data channel alone: spt's AEAD frames vs TLS 1.3 from the standard library's `ssl`.

    .venv/bin/python bench/channel.py [--mb 256] [--runs 5]

Two processes on loopback TCP move the same page-cached file, 1 MiB at a time; the receiver
opens every frame into its buffer and drops it (no hashing, no disk), so only the channel is
measured. Interleaved runs, median in MB/s (10^6 bytes).

- AEAD frames: `spt_filetransfer.channel` (AES-256-GCM keyed over pinned QUIC, frames sealed and
  opened into buffers allocated once), what the file service uses.
- TLS 1.3: `ssl` with each side's self-signed Ed25519 certificate as the only trust anchor
  (CERT_REQUIRED both ways, no host names): pinning without custom crypto. OpenSSL picks
  TLS_AES_256_GCM_SHA384; Python's `ssl` cannot restrict TLS 1.3 suites.

The result decides the bulk path (docs/design/bulk-path.md). Not a test.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization

sys.path.insert(0, str(Path(__file__).parent))
from _util import median, row
from spt_filetransfer import channel

from spt.core.identity import NodeKey
from spt.core.net.pinning import make_certificate

CHUNK = 1 << 20


def write_identity(folder: Path, name: str) -> None:
    key = NodeKey.generate()
    cert = make_certificate(key)
    (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(
        key.crypto_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def tls_context(folder: Path, me: str, peer: str, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(folder / f"{me}.crt", folder / f"{me}.key")
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED  # the peer's own certificate is the only anchor
    ctx.load_verify_locations(cafile=folder / f"{peer}.crt")
    return ctx


def aead_receive(server: socket.socket, total: int, key: bytes) -> None:
    conn, _ = server.accept()
    with conn:
        rx = channel.Receiver(key, channel.C2S)
        got = 0
        while got < total:
            got += len(rx.recv(conn)[2])
        conn.sendall(b"k")


def aead_send(port: int, path: Path, total: int, key: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        tx = channel.Sender(key, channel.C2S)
        buf = bytearray(CHUNK)
        fd = os.open(path, os.O_RDONLY)
        try:
            for i in range(total // CHUNK):
                n = os.preadv(fd, [buf], i * CHUNK)
                tx.send(sock, 0, i, memoryview(buf)[:n])
        finally:
            os.close(fd)
        sock.recv(1)


def tls_receive(server: socket.socket, total: int, folder: Path) -> None:
    raw, _ = server.accept()
    with tls_context(folder, "b", "a", server=True).wrap_socket(raw, server_side=True) as conn:
        buf = memoryview(bytearray(CHUNK))
        got = 0
        while got < total:
            got += conn.recv_into(buf)
        conn.sendall(b"k")


def tls_send(port: int, path: Path, total: int, folder: Path) -> None:
    raw = socket.create_connection(("127.0.0.1", port))
    with tls_context(folder, "a", "b", server=False).wrap_socket(raw) as sock:
        buf = bytearray(CHUNK)
        fd = os.open(path, os.O_RDONLY)
        try:
            for i in range(total // CHUNK):
                n = os.preadv(fd, [buf], i * CHUNK)
                sock.sendall(memoryview(buf)[:n])
        finally:
            os.close(fd)
        sock.recv(1)


def one_run(receive: Callable[..., None], send: Callable[..., None], path: Path, total: int, extra: object) -> float:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    receiver = multiprocessing.Process(target=receive, args=(server, total, extra))
    receiver.start()
    start = time.perf_counter()
    sender = multiprocessing.Process(target=send, args=(port, path, total, extra))
    sender.start()
    sender.join(300)
    receiver.join(300)
    elapsed = time.perf_counter() - start
    server.close()
    if sender.exitcode != 0 or receiver.exitcode != 0:
        raise SystemExit(f"{send.__name__}: a side failed ({sender.exitcode}, {receiver.exitcode})")
    return total / elapsed / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    total = args.mb * CHUNK
    with tempfile.TemporaryDirectory(prefix="spt-bench-channel-") as tmp:
        folder = Path(tmp)
        write_identity(folder, "a")
        write_identity(folder, "b")
        path = folder / "payload.bin"
        with open(path, "wb") as fh:
            for _ in range(args.mb):
                fh.write(os.urandom(CHUNK))
        key = channel.derive_keys(channel.new_key(), os.urandom(16), os.urandom(16), os.urandom(16))[0]
        aead: list[float] = []
        tls: list[float] = []
        for _ in range(args.runs):  # interleaved: both see the same machine noise
            aead.append(one_run(aead_receive, aead_send, path, total, key))
            tls.append(one_run(tls_receive, tls_send, path, total, folder))
    a, t = median(aead), median(tls)
    print(f"channel only, {args.mb} MiB over loopback TCP, {args.runs} interleaved runs; median (min-max) MB/s")
    print(f"  AEAD frames (spt)        {a:8.1f}   ({min(aead):.1f}-{max(aead):.1f})")
    print(f"  TLS 1.3, pinned certs    {t:8.1f}   ({min(tls):.1f}-{max(tls):.1f})")
    print(f"  AEAD / TLS = {a / t:.2f}")
    row("file channel alone: AEAD frames", a, "MB/s", baseline_name="TLS 1.3 (ssl, pinned)", baseline=t,
        note="keep the faster: docs/design/bulk-path.md")


if __name__ == "__main__":
    main()
