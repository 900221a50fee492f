"""How file bytes get a TCP connection, both ends (docs/design/tcp-simultaneous-open.md).

After `file.open` (which hands the sender the receiver's per-open key and, when it has one, its
TCP listener's port), the sender tries, in order, and takes the first that completes the keyed
handshake of `channel.py`:

1. `tcp`: the receiver's listener at the address the member connection reaches it at (a LAN,
   a receiver with a public address). The receiver offers it only when the sender sees it at an
   address it has (no NAT between them). A failed try costs one round trip when refused, at
   most `LISTENER_CONNECT_SECONDS` when the SYN is dropped.
2. `tcp-punched`: a TCP simultaneous open through both NATs (`simopen.py`), agreed in
   `file.punch` over the member connection: when that connection is direct (not relayed) and
   neither NAT changed the node's UDP port (each side reports where it sees the other). A
   failed try costs one round trip when refused at once, at most `PUNCH_SECONDS` otherwise.
3. `transit`: a bulk transit through a relay's TCP listener (the `BulkTransit` hook).

Without any of them, chunks travel over QUIC (`file.chunk`). Each side's data connection is
authenticated by the key the receiver made and sent over the pinned member connection, never by
the path: whoever answers a SYN or a ticket without that key gets nothing.

Test and benchmark knob (sending daemon's environment): `SPT_FILE_DATA_PATH` = `auto`, `tcp`
(the listener only; its failure fails the try), `punched` (no listener, no transit), `transit`
(the transit only), `quic`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from spt.core.errors import PeerError, Refusal, RemoteProtocolError, SptError
from spt_filetransfer import channel, simopen
from spt_filetransfer.dataserver import HANDSHAKE_SECONDS
from spt_filetransfer.wire import as_map, check_tid

if TYPE_CHECKING:
    from spt_filetransfer.service import FileService, Outgoing

__all__ = ["DATA_PATHS", "DataPaths", "PunchOffer", "TcpPath", "handshake_on", "read_punch_offer", "tcp_handshake"]

log = logging.getLogger(__name__)

DATA_PATHS: Final = ("auto", "tcp", "punched", "transit", "quic")
LISTENER_CONNECT_SECONDS: Final = 1.0
PUNCH_REQUEST_SECONDS: Final = 3.0
PUNCH_SECONDS: Final = 2.0  # both ends' simultaneous open, from the moment each starts it


@dataclass
class TcpPath:
    sock: socket.socket
    tx: channel.Sender
    rx: channel.Receiver
    kind: str = "tcp"  # "tcp" (the receiver's listener), "tcp-punched" (simultaneous open), "transit" (a relay)


def tcp_handshake(host: str, port: int, raw_tid: bytes, key: bytes) -> TcpPath:
    """Connect to a listener and prove the key (blocking); OSError / ChannelError when it fails."""
    sock = socket.create_connection((host, port), timeout=LISTENER_CONNECT_SECONDS)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return handshake_on(sock, raw_tid, key)


def handshake_on(sock: socket.socket, raw_tid: bytes, key: bytes) -> TcpPath:
    """Prove the key on a connected socket, as the client (blocking); closes it and raises when
    that fails."""
    try:
        sock.settimeout(HANDSHAKE_SECONDS)
        client_salt = os.urandom(channel.SALT)
        sock.sendall(channel.client_header(raw_tid, client_salt))
        server_salt = bytearray(channel.SALT)
        channel.recv_exact(sock, memoryview(server_salt))
        c2s, s2c = channel.derive_keys(key, raw_tid, client_salt, bytes(server_salt))
        tx, rx = channel.Sender(c2s, channel.C2S), channel.Receiver(s2c, channel.S2C)
        tx.send(sock, channel.CONTROL, channel.HELLO)
        f, c, _ = rx.recv(sock)
        if f != channel.CONTROL or c != channel.OK:
            raise channel.ChannelError("hello", "the receiver did not confirm the data connection")
        return TcpPath(sock, tx, rx)
    except BaseException:
        sock.close()
        raise


def _relayed(host: str) -> bool:
    """A relayed peer's placeholder address (240.0.0.0/4): no address to reach it at directly."""
    try:
        return ipaddress.ip_address(host).is_reserved
    except ValueError:
        return True


def _port(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536 else None


def _seen_port(value: Any) -> int | None:
    """The port of a "host:port" a peer reported, or None."""
    if not isinstance(value, str):
        return None
    _, _, port = value.rpartition(":")
    return _port(int(port)) if port.isascii() and port.isdigit() and len(port) <= 5 else None


@dataclass(frozen=True)
class PunchOffer:
    """A sender's `file.punch`: its TCP port, its QUIC UDP port, and where it sees us."""

    tid: str
    port: int
    udp_port: int
    seen_port: int | None


def read_punch_offer(body: Any) -> PunchOffer:
    """The offer in a `file.punch` body; RemoteProtocolError when it is not one."""
    body = as_map(body, "file.punch")
    tid = check_tid(body.get("tid"))
    port, udp_port = _port(body.get("port")), _port(body.get("udp_port"))
    if port is None or udp_port is None:
        raise RemoteProtocolError("file.punch", "a punch offer is {tid, subnet, port, udp_port, seen}")
    return PunchOffer(tid, port, udp_port, _seen_port(body.get("seen")))


class DataPaths:
    """The sender's choice of data connection, and the receiver's side of punching and transit."""

    def __init__(self, svc: FileService) -> None:
        self.svc = svc

    @property
    def _host(self) -> str:
        return self.svc.server.host

    # -- the sender ---------------------------------------------------------------------------

    async def connect(self, conn: Any, out: Outgoing, opened: Any) -> TcpPath | None:
        """The first data connection that completes the keyed handshake, or None (QUIC chunks)."""
        mode = self.svc.data_path
        key, port = opened.get("key"), _port(opened.get("port"))
        if mode == "quic" or not isinstance(key, bytes):
            return None
        path: TcpPath | None = None
        if mode == "tcp" and port is None:
            raise OSError("the receiver offers no listener reachable from here (SPT_FILE_DATA_PATH=tcp)")
        if mode in ("auto", "tcp") and port is not None:
            path = await self._listener(conn, out, port, key)
        if path is None and mode in ("auto", "punched"):
            path = await self._punched(conn, out, key)
        if path is None and mode in ("auto", "transit"):
            path = await self._transit(conn, out, key)
        if path is not None:
            out.sock = path.sock
        return path

    async def _listener(self, conn: Any, out: Outgoing, port: int, key: bytes) -> TcpPath | None:
        host = str(conn.remote_addr[0])
        if _relayed(host):
            return None
        started = time.monotonic()
        try:
            return await asyncio.wait_for(
                self.svc.loop.run_in_executor(self.svc.executor, tcp_handshake, host, port, bytes.fromhex(out.tid), key),
                LISTENER_CONNECT_SECONDS + HANDSHAKE_SECONDS + 1,
            )
        except (OSError, TimeoutError, SptError) as exc:
            if self.svc.data_path == "tcp":
                raise
            log.info("no TCP path to the receiver's listener", extra={
                "tid": out.tid, "host": host, "reason": str(exc) or type(exc).__name__,
                "ms": round((time.monotonic() - started) * 1000)})
            return None

    async def _punched(self, conn: Any, out: Outgoing, key: bytes) -> TcpPath | None:
        """A TCP simultaneous open with the receiver, agreed over the member connection."""
        host, their_udp = str(conn.remote_addr[0]), int(conn.remote_addr[1])
        if _relayed(host):
            log.info("no TCP simultaneous open: the member connection is relayed", extra={"tid": out.tid})
            return None
        started = time.monotonic()
        loop, executor = self.svc.loop, self.svc.executor
        sock: socket.socket | None = None
        try:
            sock = simopen.reserve(self._host)
            body = {
                "tid": out.tid, "subnet": out.row["subnet"], "port": sock.getsockname()[1],
                "udp_port": self.svc.rt.port, "seen": f"{host}:{their_udp}",
            }
            try:
                reply = (await conn.request("file.punch", body, timeout=PUNCH_REQUEST_SECONDS)).body
            except (PeerError, SptError, TimeoutError) as exc:  # e.g. a receiver without file.punch
                raise OSError(f"the receiver did not agree: {exc}") from None
            if not isinstance(reply, dict) or not reply.get("ok"):
                reason = reply.get("reason") if isinstance(reply, dict) else None
                raise OSError(str(reason or "the receiver declined"))
            their_port = _port(reply.get("port"))
            if their_port is None:
                raise OSError("the receiver gave no port")
            deadline = time.monotonic() + PUNCH_SECONDS
            reserved, sock = sock, None  # open_direct uses or closes it
            raw = await loop.run_in_executor(executor, lambda: simopen.open_direct(reserved, (host, their_port), deadline=deadline))
            path = await asyncio.wait_for(
                loop.run_in_executor(executor, handshake_on, raw, bytes.fromhex(out.tid), key), HANDSHAKE_SECONDS + 1
            )
        except (OSError, TimeoutError, SptError, ValueError) as exc:
            # any failure of the attempt (out of ports or descriptors too) falls back to the next path
            log.info("no TCP simultaneous open", extra={
                "tid": out.tid, "host": host, "reason": str(exc) or type(exc).__name__,
                "ms": round((time.monotonic() - started) * 1000)})
            return None
        finally:
            if sock is not None:
                sock.close()
        path.kind = "tcp-punched"
        log.info("direct TCP by simultaneous open", extra={
            "tid": out.tid, "peer": f"{host}:{their_port}", "ms": round((time.monotonic() - started) * 1000)})
        return path

    async def _transit(self, conn: Any, out: Outgoing, key: bytes) -> TcpPath | None:
        """The keyed data connection through a bulk transit (a relay's TCP listener), or None."""
        svc = self.svc
        for transit in svc.rt.bulk_transits():
            try:
                offered = await transit.offer(svc.rt, out.node)
                if offered is None:
                    continue
                invitation, join_ours = offered
                await svc._request(
                    conn, "file.transit", {"tid": out.tid, "subnet": out.row["subnet"], "via": transit.name, "invitation": dict(invitation)}
                )
                sock = await svc.loop.run_in_executor(svc.executor, join_ours)
                try:
                    path = await asyncio.wait_for(
                        svc.loop.run_in_executor(svc.executor, handshake_on, sock, bytes.fromhex(out.tid), key),
                        HANDSHAKE_SECONDS + 5,
                    )
                except BaseException:
                    sock.close()
                    raise
            except (OSError, TimeoutError, SptError) as exc:
                log.info("no bulk transit", extra={"tid": out.tid, "via": transit.name, "reason": str(exc)})
                continue
            path.kind = "transit"
            return path
        return None

    # -- the receiver -------------------------------------------------------------------------

    def listener_reachable(self, seen: Any, sender_host: str) -> bool:
        """Whether the sender can reach our TCP listener where it reaches our QUIC socket: it
        sees us (`seen`, "host:port", from an older sender absent) at an address of ours, the
        one we reach it from. Otherwise a NAT is between us and would drop or reset the SYN."""
        if not isinstance(seen, str):
            return True
        host = seen.rpartition(":")[0]
        if self._host:
            return host == self._host
        try:
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        except OSError:
            return True
        try:
            probe.connect((sender_host, 9))  # picks the route and our address on it; sends nothing
            return bool(probe.getsockname()[0] == host)
        except OSError:
            return True
        finally:
            probe.close()

    def _check_data_request(self, conn: Any, body: Any, tid: str) -> None:
        """Refuse unless this peer has an active incoming transfer and an open data session."""
        svc = self.svc
        svc._incoming_for(conn, body, tid)  # an active transfer from this very peer, in the named subnet
        if not svc.server.has_session(tid):
            raise Refusal("FILE_UNKNOWN", tid, "no open data session for this transfer (file.open first)")

    async def req_punch(self, conn: Any, frame: Any) -> tuple[str, Any]:
        """The sender proposes a TCP simultaneous open: answer our port and start ours at once."""
        offer = read_punch_offer(frame.body)
        tid = offer.tid
        self._check_data_request(conn, frame.body, tid)
        host, seen_udp = str(conn.remote_addr[0]), int(conn.remote_addr[1])
        why = None
        if _relayed(host):
            why = "the member connection is relayed: no direct address"
        elif seen_udp != offer.udp_port:
            why = "the sender's NAT changes ports (its UDP port is seen as another): its TCP port cannot be predicted"
        elif offer.seen_port != self.svc.rt.port:
            why = "this node's NAT changes ports: its TCP port cannot be predicted"
        if why is not None:
            log.info("no TCP simultaneous open", extra={"tid": tid, "reason": why})
            return "file.punch", {"ok": False, "reason": why}
        owner = self._start_opening(conn, tid)
        try:
            sock = simopen.reserve(self._host)
        except BaseException:
            self.svc.server.give_slot(owner)
            raise
        deadline = time.monotonic() + PUNCH_SECONDS

        def run() -> None:
            try:
                raw = simopen.open_direct(sock, (host, offer.port), deadline=deadline)
            except BaseException as exc:
                self.svc.server.give_slot(owner)  # nothing to serve
                if not isinstance(exc, (OSError, ValueError)):
                    raise
                log.info("no TCP simultaneous open", extra={"tid": tid, "reason": str(exc)})
                return
            self.svc.server.serve(raw, "tcp-punched", owner)

        port = sock.getsockname()[1]
        # ours starts before the answer leaves; through dropping NATs either SYN may come first
        try:
            threading.Thread(target=run, name="spt-file-punch", daemon=True).start()
        except BaseException:
            sock.close()
            self.svc.server.give_slot(owner)
            raise
        return "file.punch", {"ok": True, "port": port}

    def _start_opening(self, conn: Any, tid: str) -> str:
        """A data connection slot for the asking member (its owner name), or FILE_BUSY. A data
        connection in the making (a simultaneous open: a thread and a bound port for up to
        PUNCH_SECONDS; a transit join: a thread and a connection to the relay for up to its
        TRANSIT_WAIT) holds one, or a member's requests, answered at once, would start threads
        without limit."""
        owner = str(conn.peer.hex)
        if not self.svc.server.take_slot(owner):
            raise Refusal("FILE_BUSY", tid, "too many data connections, or this node holds its share of them")
        return owner

    async def req_transit(self, conn: Any, frame: Any) -> tuple[str, Any]:
        """The sender invites us to a bulk transit: join it on a thread and serve the data there."""
        svc = self.svc
        body = as_map(frame.body, "file.transit")
        tid = check_tid(body.get("tid"))
        self._check_data_request(conn, body, tid)
        via, invitation = body.get("via"), body.get("invitation")
        transit = next((t for t in svc.rt.bulk_transits() if t.name == via), None)
        if transit is None or not isinstance(invitation, dict):
            raise Refusal("NO_TRANSIT", str(via), "this node has no such bulk transit")
        peer = conn.peer
        owner = self._start_opening(conn, tid)

        def run() -> None:
            try:
                sock = transit.join(svc.rt, peer, invitation)
            except BaseException as exc:
                svc.server.give_slot(owner)  # nothing to serve
                if not isinstance(exc, (OSError, SptError)):
                    raise
                log.info("bulk transit not joined", extra={"tid": tid, "via": via, "reason": str(exc)})
                return
            svc.server.serve(sock, "transit", owner)

        try:
            threading.Thread(target=run, name="spt-file-transit", daemon=True).start()
        except BaseException:
            svc.server.give_slot(owner)
            raise
        return "ok", {"ok": True}
