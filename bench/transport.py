"""Transport benchmark: spt's pinned QUIC vs raw aioquic vs asyncio TCP+TLS, on loopback.

Run: `.venv/bin/python bench/transport.py [--quick]`. Not a test: it prints figures and ratios
(targets: spt round trip <= 1.3x raw aioquic, spt bulk >= 0.8x raw aioquic). Round trips are
one request per new stream (one request per message on a kept TCP connection); bulk is one
stream of 64 KiB writes that the receiver acknowledges once it has read everything.

Fair baselines: raw aioquic gets the same socket buffers (SO_RCVBUF/SO_SNDBUF) and flow-control
windows as spt, and the same send-side backpressure (the writer waits while more than spt's
per-stream bound is queued but untransmitted) instead of buffering the whole payload at once.
Three interleaved rounds (raw aioquic, spt, TCP+TLS in turn, so all see the same machine noise),
each with `--bulk-samples` bulk transfers per stack (at least 5 samples per bulk figure in all);
the bulk figure is the median of the samples, printed with its spread.
Loopback only; plain asyncio event loop (never uvloop, see DESIGN.md §3).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.quic.configuration import QuicConfiguration
from cryptography.hazmat.primitives import serialization

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _util import row  # noqa: E402

from spt.core.identity import NodeKey  # noqa: E402
from spt.core.net.connections import STREAM_SEND_BUFFER  # noqa: E402
from spt.core.net.pinning import make_certificate  # noqa: E402
from spt.core.net.transport import (  # noqa: E402
    DEFAULT_CONNECTION_WINDOW,
    DEFAULT_STREAM_WINDOW,
    SOCKET_BUFFER,
    AllowKeys,
    Connection,
    Stream,
    Transport,
    serve_requests,
)
from spt.core.proto.frames import Frame  # noqa: E402

HOST = "127.0.0.1"
CHUNK = 64 * 1024
ALPN = "bench/1"


class Result:
    def __init__(self, name: str) -> None:
        self.name = name
        self.rtts: list[float] = []
        self.bulk: list[float] = []  # MB/s, one per bulk transfer

    @property
    def mb_s(self) -> float:
        return statistics.median(self.bulk)

    def spread(self) -> str:
        return f"{min(self.bulk):.1f}-{max(self.bulk):.1f}"

    def pct(self, p: float) -> float:
        ordered = sorted(self.rtts)
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1e6


async def timed_rtts(result: Result, n: int, one: Callable[[], Awaitable[None]]) -> None:
    for _ in range(max(20, n // 20)):  # warm-up
        await one()
    for _ in range(n):
        start = time.perf_counter()
        await one()
        result.rtts.append(time.perf_counter() - start)


# --- spt ----------------------------------------------------------------------------------------


async def bench_spt(n_rtt: int, bulk_bytes: int, bulk_samples: int = 1) -> Result:
    result = Result("spt")
    ka, kb = NodeKey.generate(), NodeKey.generate()

    async def echo(conn: Connection, frame: Frame) -> tuple[str, Any]:
        return ("pong", frame.body)

    async def on_stream(conn: Connection, stream: Stream) -> None:
        first = await stream.recv()
        if first is None:
            return
        if first.type != "bulk":
            await stream.send("pong", first.body, end=True)
            return
        total = len(first.body)
        async for frame in stream:
            total += len(frame.body)
        await stream.send("done", total, end=True)

    del echo  # serve_requests would do the same for the round trips; on_stream also takes bulk
    server = Transport(ka, host=HOST, accept=AllowKeys([kb.node_id]), on_stream=on_stream)
    client = Transport(kb, host=HOST, accept=AllowKeys([ka.node_id]), on_stream=serve_requests({}))
    await server.start()
    await client.start()
    try:
        conn = await client.connect(ka.node_id, [server.sockname])

        async def one() -> None:
            await conn.request("ping", b"x" * 16)

        await timed_rtts(result, n_rtt, one)
        chunk = b"\xab" * CHUNK
        for _ in range(bulk_samples):
            start = time.perf_counter()
            async with conn.open_stream() as stream:
                sent = 0
                while sent < bulk_bytes:
                    await stream.send("bulk", chunk)
                    sent += len(chunk)
                await stream.end()
                reply = await stream.recv(timeout=120)
            elapsed = time.perf_counter() - start
            assert reply is not None and reply.body == sent, reply
            result.bulk.append(sent / elapsed / 1e6)
    finally:
        await client.close()
        await server.close()
    return result


# --- raw aioquic --------------------------------------------------------------------------------


def quic_configs(key_a: NodeKey, key_b: NodeKey) -> tuple[QuicConfiguration, QuicConfiguration]:
    """Both sides with spt's flow-control windows."""
    windows = {"max_stream_data": DEFAULT_STREAM_WINDOW, "max_data": DEFAULT_CONNECTION_WINDOW}
    server = QuicConfiguration(
        is_client=False,
        alpn_protocols=[ALPN],
        certificate=make_certificate(key_a),
        private_key=key_a.crypto_key,
        **windows,  # type: ignore[arg-type]
    )
    client = QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN],
        certificate=make_certificate(key_b),
        private_key=key_b.crypto_key,
        verify_mode=ssl.CERT_NONE,
        **windows,  # type: ignore[arg-type]
    )
    return server, client


def set_socket_buffers(transport: asyncio.BaseTransport | None) -> None:
    """spt's socket buffers (transport.SOCKET_BUFFER) on an aioquic UDP socket."""
    assert transport is not None
    sock = transport.get_extra_info("socket")
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)


class BackpressureProtocol(QuicConnectionProtocol):
    """aioquic's protocol plus a wake-up after every transmit, so a writer can wait for room."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.transmitted = asyncio.Event()

    def transmit(self) -> None:
        super().transmit()
        self.transmitted.set()

    async def wait_room(self, stream_id: int, written: int) -> None:
        """Wait while more than spt's per-stream bound of `written` is still untransmitted."""
        sender = self._quic._streams[stream_id].sender
        while written - sender.highest_offset > STREAM_SEND_BUFFER:
            self.transmitted.clear()
            await self.transmitted.wait()


async def bench_aioquic(n_rtt: int, bulk_bytes: int, bulk_samples: int = 1) -> Result:
    result = Result("raw aioquic")
    server_config, client_config = quic_configs(NodeKey.generate(), NodeKey.generate())

    def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def run() -> None:
            head = await reader.readexactly(1)
            if head == b"B":
                total = 1
                while data := await reader.read(1 << 20):
                    total += len(data)
                writer.write(str(total).encode())
            else:
                writer.write(head + await reader.read())
            writer.write_eof()

        asyncio.get_running_loop().create_task(run())

    server = await serve(HOST, 0, configuration=server_config, stream_handler=handle)
    set_socket_buffers(server._transport)
    port = server._transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
    try:
        async with connect(HOST, port, configuration=client_config, create_protocol=BackpressureProtocol) as client:
            protocol = client
            assert isinstance(protocol, BackpressureProtocol)
            set_socket_buffers(protocol._transport)

            async def one() -> None:
                reader, writer = await protocol.create_stream()
                writer.write(b"p" + b"x" * 16)
                writer.write_eof()
                await reader.read()

            await timed_rtts(result, n_rtt, one)
            chunk = b"\xab" * CHUNK
            for _ in range(bulk_samples):
                start = time.perf_counter()
                reader, writer = await protocol.create_stream()
                stream_id = writer.get_extra_info("stream_id")
                writer.write(b"B")
                sent = 1
                while sent < bulk_bytes:
                    writer.write(chunk)
                    sent += len(chunk)
                    await protocol.wait_room(stream_id, sent)
                writer.write_eof()
                total = int(await reader.read())
                elapsed = time.perf_counter() - start
                assert total == sent, (total, sent)
                result.bulk.append(sent / elapsed / 1e6)
    finally:
        server.close()
    return result


# --- TCP + TLS ----------------------------------------------------------------------------------


def tls_contexts(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    key = NodeKey.generate()
    cert = make_certificate(key)
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(
        key.crypto_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    return server, client


async def bench_tcp_tls(n_rtt: int, bulk_bytes: int, bulk_samples: int = 1) -> Result:
    result = Result("TCP+TLS")
    with tempfile.TemporaryDirectory() as tmp:
        server_ctx, client_ctx = tls_contexts(Path(tmp))

    handlers: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            handlers.add(task)
        try:
            while head := await reader.readexactly(5):
                size = int.from_bytes(head[1:], "big")
                if head[:1] == b"B":
                    remaining = size
                    while remaining:
                        remaining -= len(await reader.read(min(remaining, 1 << 20)))
                    writer.write(b"ok")
                else:
                    writer.write(head + await reader.readexactly(size))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, HOST, 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection(HOST, port, ssl=client_ctx)
    try:
        payload = b"x" * 16

        async def one() -> None:
            writer.write(b"p" + len(payload).to_bytes(4, "big") + payload)
            await reader.readexactly(5 + len(payload))

        await timed_rtts(result, n_rtt, one)
        chunk = b"\xab" * CHUNK
        for _ in range(bulk_samples):
            start = time.perf_counter()
            writer.write(b"B" + bulk_bytes.to_bytes(4, "big"))
            sent = 0
            while sent < bulk_bytes:
                writer.write(chunk[: bulk_bytes - sent])
                sent += min(len(chunk), bulk_bytes - sent)
                await writer.drain()
            assert await reader.readexactly(2) == b"ok"
            result.bulk.append(sent / (time.perf_counter() - start) / 1e6)
    finally:
        writer.close()
        await writer.wait_closed()
        if handlers:
            await asyncio.wait(handlers, timeout=5)
        server.close()
        await server.wait_closed()
    return result


# --- main ---------------------------------------------------------------------------------------


def merge(results: list[Result]) -> Result:
    merged = Result(results[0].name)
    for r in results:
        merged.rtts += r.rtts
        merged.bulk += r.bulk
    return merged


async def main(quick: bool, bulk_samples: int) -> None:
    rounds = 3
    n_rtt = 300 if quick else 1000
    quic_bulk = (4 if quick else 16) * 1024 * 1024
    tcp_bulk = (64 if quick else 256) * 1024 * 1024
    began = time.perf_counter()
    runs: dict[str, list[Result]] = {}
    # interleaved rounds, pooled: every stack sees the same machine noise
    for _ in range(rounds):
        for run, size in ((bench_aioquic, quic_bulk), (bench_spt, quic_bulk), (bench_tcp_tls, tcp_bulk)):
            async with asyncio.timeout(300):
                result = await run(n_rtt, size, bulk_samples)
            runs.setdefault(result.name, []).append(result)
    raw, spt, tcp = (merge(runs[name]) for name in ("raw aioquic", "spt", "TCP+TLS"))
    print(
        f"\nloopback; {rounds} interleaved rounds, each: {n_rtt} round trips and {bulk_samples} bulk transfers"
        f" per stack ({quic_bulk >> 20} MiB over QUIC, {tcp_bulk >> 20} MiB over TCP+TLS);"
        f" bulk = median of {rounds * bulk_samples} samples"
    )
    print(f"{'transport':<12} {'RTT p50 µs':>11} {'RTT p99 µs':>11} {'mean µs':>8} {'bulk MB/s':>10} {'min-max':>13}")
    for r in (raw, spt, tcp):
        mean = statistics.mean(r.rtts) * 1e6
        print(
            f"{r.name:<12} {r.pct(0.50):>11.0f} {r.pct(0.99):>11.0f} {mean:>8.0f} {r.mb_s:>10.1f} {r.spread():>13}"
        )
    p50 = spt.pct(0.5) / raw.pct(0.5)
    p99 = spt.pct(0.99) / raw.pct(0.99)
    mean_ratio = statistics.mean(spt.rtts) / statistics.mean(raw.rtts)
    bulk = spt.mb_s / raw.mb_s
    print(
        f"\nspt / raw aioquic: RTT p50 {p50:.2f}x, p99 {p99:.2f}x, mean {mean_ratio:.2f}x (target <= 1.3);"
        f" bulk {bulk:.2f}x (target >= 0.8)"
    )
    print(f"TCP+TLS vs spt: RTT p50 {tcp.pct(0.5) / spt.pct(0.5):.2f}x, bulk {tcp.mb_s / spt.mb_s:.1f}x")
    print(f"total {time.perf_counter() - began:.1f} s")
    row("QUIC request RTT p50 (spt)", spt.pct(0.5), "µs", baseline_name="raw aioquic", baseline=raw.pct(0.5),
        goal="<= 1.3")
    row("QUIC bulk, one stream (spt)", spt.mb_s, "MB/s", baseline_name="raw aioquic (backpressure)",
        baseline=raw.mb_s, goal=">= 0.8")
    row("TCP+TLS bulk (reference)", tcp.mb_s, "MB/s", baseline_name="spt QUIC bulk", baseline=spt.mb_s,
        note="why bulk data leaves QUIC")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer round trips and less bulk data")
    parser.add_argument("--bulk-samples", type=int, default=2, help="bulk transfers per stack per round")
    cli = parser.parse_args()
    asyncio.run(main(cli.quick, max(2, cli.bulk_samples)))
