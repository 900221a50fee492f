"""Fuzz targets shared by the hypothesis tests here and `bench/fuzz.py`.

Each target takes bytes (as a peer would send them) and must either succeed or raise one of the
errors its decoder documents for bad input (`SptError` subclasses, mostly RemoteProtocolError);
anything else is a crash. Targets are plain functions so a mutational loop can call them in bulk.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
from collections.abc import Callable
from typing import Any

import msgspec

from spt.core.errors import SptError
from spt.core.identity import NodeKey
from spt.core.net.paths import RELAY_DELIVER, Paths
from spt.core.net.transport import AllowKeys, Transport
from spt.core.proto import envelope
from spt.core.proto.frames import (
    MEMBER_LIMITS,
    OPEN_LIMITS,
    FrameDecoder,
    FrameError,
    _count_items,
    decode_payload,
)
from spt.core.proto.hlc import HlcTimestamp
from spt.core.proto.registry import digest_from_wire, record_from_dict, sign_presence, sign_row
from spt.core.proto.replicated import SignedRecord, check_digest_map, check_ids, sign_record

Target = Callable[[bytes], None]

_MSGPACK = msgspec.msgpack.Decoder()


def as_value(data: bytes) -> Any:
    """Bytes as a msgpack value when they are one (what a frame body would be), else as text."""
    try:
        return _MSGPACK.decode(data)
    except (msgspec.MsgspecError, ValueError, TypeError, OverflowError, RecursionError):
        return data.decode("utf-8", "replace")


# --- frames (every ALPN) -------------------------------------------------------------------------


def frames_stream(data: bytes) -> None:
    """Bytes cut into pieces at arbitrary points, fed to a stream decoder, then end of stream."""
    if not data:
        return
    cut = data[0]
    for limits in (OPEN_LIMITS, MEMBER_LIMITS):
        decoder = FrameDecoder(limits)
        try:
            for i in range(1, len(data), max(1, cut)):
                for frame in decoder.feed(data[i : i + max(1, cut)]):
                    assert isinstance(frame.type, str) and 0 < len(frame.type) <= 128
            decoder.eof()
        except FrameError:
            pass


def frame_payload(data: bytes) -> None:
    """One frame's payload; the item count bounds what msgspec builds from anything it decodes."""
    with contextlib.suppress(FrameError):
        decode_payload(data, OPEN_LIMITS)
    try:
        value = _MSGPACK.decode(data)
    except (msgspec.MsgspecError, ValueError, TypeError, OverflowError, RecursionError):
        return
    # the wire holds at least the decoded items (a repeated map key decodes once)
    assert _count_items(data, 1 << 30) >= _items(value), data[:64]


def _items(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + sum(_items(k) + _items(v) for k, v in value.items())
    if isinstance(value, list):
        return 1 + sum(_items(v) for v in value)
    return 1


# --- registry rows and presence, digests ----------------------------------------------------------

_KEY = NodeKey.generate()
_ROW = sign_row(
    _KEY, subnet="home", endpoint_id="bob", home="home", version=3,
    hlc=HlcTimestamp(1000, 0, _KEY.node_id.hex), state="active", description="d",
).to_dict()
_PRESENCE = sign_presence(_KEY, subnet="home", version=2, software_version="0.1.0", addresses=["192.0.2.1:1"]).to_dict()


def registry_record(data: bytes) -> None:
    """A record as a peer would push it: arbitrary values, and valid records with one field replaced."""
    value = as_value(data)
    for record in (value, *_mutants(value)):
        try:
            parsed = record_from_dict(record)
        except SptError:
            continue
        parsed.verify()
    with contextlib.suppress(SptError):
        digest_from_wire(value)


def _mutants(value: Any) -> list[dict[str, Any]]:
    out = []
    for base in (_ROW, _PRESENCE):
        keys = sorted(base)
        name = keys[hash(repr(value)) % len(keys)]
        out.append({**base, name: value})
        if isinstance(value, dict):
            out.append({**base, **{k: v for k, v in value.items() if isinstance(k, str | int)}})
    return out


_NOTIF = {"t": "notif", "kind": "user", "title": "t", "body": "b", "endpoint": None}
_ENTRY = {"home": "home", "endpoint": "bob", "tier": "live", "project": None, "body": "x", "forked_from": None}
_RECORD = sign_record(
    _KEY, kind="notif", record_id="ab" * 16, part="home", hlc=HlcTimestamp(1000, 0, _KEY.node_id.hex), data=_NOTIF
).to_dict()


def replicated_record(data: bytes) -> None:
    """What `rep.push` / `rep.digest` / `rep.reconcile` carry: records (arbitrary values, and a valid
    one with one field replaced), the kinds' data checks, digest maps and id lists."""
    from spt.plugins.mind_sync import check_entry
    from spt.plugins.notify import check_data

    value = as_value(data)
    keys = sorted(_RECORD)
    mutants = [value, {**_RECORD, keys[hash(repr(value)) % len(keys)]: value}]
    if isinstance(value, dict):
        mutants.append({**_RECORD, "data": value})
    for candidate in mutants:
        try:
            record = SignedRecord.from_dict(candidate)
        except SptError:
            continue
        record.verify()
        with contextlib.suppress(SptError):
            check_data(record.data)
        with contextlib.suppress(SptError):
            check_entry(record.data, record.part)
    if isinstance(value, dict):
        with contextlib.suppress(SptError):
            check_entry({**_ENTRY, **{k: v for k, v in value.items() if isinstance(k, str)}}, "live/home/bob")
    with contextlib.suppress(SptError):
        check_digest_map(value, "digest", limit=64)
    with contextlib.suppress(SptError):
        check_ids(value, limit=64)


# --- the envelope parser ----------------------------------------------------------------------------


def envelope_lines(data: bytes) -> None:
    """Lines of text as the envelope parser reads them (agents' streams)."""
    text = data.decode("utf-8", "replace")
    parser = envelope.EventParser()
    for line in text.split("\n")[:64]:
        with contextlib.suppress(SptError):
            parser.feed(line)
    with contextlib.suppress(SptError):
        envelope.parse_events(text.splitlines()[:64])
    # a well-formed prefix makes it past the line syntax more often
    for prefix in ('<EVENT type="a" from="b">', '<EVENT-PART seq="1/2" id="x" type="a" from="b">'):
        with contextlib.suppress(SptError):
            envelope.EventParser().feed(prefix + text[:200] + "</EVENT>")


# --- file manifests and file-channel frames -----------------------------------------------------------


def file_manifest(data: bytes) -> None:
    from spt_filetransfer.manifest import Manifest, manifest_problem

    value = as_value(data)
    candidates = [value]
    if isinstance(value, list):
        candidates.append({"name": "x", "files": [value]})
        candidates.append({"name": "x", "files": value})
    for candidate in candidates:
        try:
            manifest = Manifest.from_wire(candidate)
        except SptError:
            continue
        manifest_problem(manifest)


_CHANNEL_KEY = os.urandom(32)
_RECEIVER: Any = None


class _Wire:
    """The peer's side of a data connection: `recv_into` hands out `data`, then end of stream."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)

    def recv_into(self, view: memoryview, size: int) -> int:
        n = min(size, len(self.data))
        view[:n] = self.data[:n]
        self.data = self.data[n:]
        return n


def file_channel(data: bytes) -> None:
    """A data connection's bytes: the clear header, then sealed frames (forged here)."""
    global _RECEIVER
    from spt_filetransfer import channel

    with contextlib.suppress(SptError):
        channel.read_client_header(data[: channel.HEADER_LEN])
    if _RECEIVER is None:
        _RECEIVER = channel.Receiver(_CHANNEL_KEY, channel.C2S)
    _RECEIVER._count = 0  # one receiver (its 1 MiB buffer) reused: a fresh connection each call
    wire = _Wire(data)
    try:
        for _ in range(4):
            _RECEIVER.recv(wire)
    except (SptError, ConnectionError):
        pass


# --- relay datagrams and relay control messages -----------------------------------------------------


class _Recorder(Transport):
    def feed_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        self.fed = (len(data), addr)


_NODE = _Recorder(NodeKey.generate(), host="127.0.0.1", accept=AllowKeys())
_RELAY_ADDR = ("192.0.2.7", 47471)
_NODE.paths.set_relay(NodeKey.generate().node_id, _RELAY_ADDR, os.urandom(16))
_PATHS: Paths = _NODE.paths


def relay_datagram_node(data: bytes) -> None:
    """What a node's socket hands the relay paths: deliveries, notices, probes, mapping answers."""
    if not data:
        return
    for addr in (_RELAY_ADDR, ("198.51.100.1", 9)):
        for first in (data[0] & 0x3F, RELAY_DELIVER):
            datagram = bytes((first,)) + data[1:]
            if first in (0x04, 0x05):
                continue  # probes need a running punch (an event loop); covered by the reach tests
            with contextlib.suppress(SptError):
                _PATHS.receive(datagram, addr)


_SERVER: Any = None


def _server() -> Any:
    global _SERVER
    if _SERVER is None:
        from spt_relay_fallback.server import RelayServer

        _SERVER = RelayServer(NodeKey.generate(), host="127.0.0.1", port=0, alt_port=False)
    return _SERVER


def relay_datagram_server(data: bytes) -> None:
    """What the relay's socket hands its forwarder (0x01 frames and anything else)."""
    if not data:
        return
    server = _server()
    for first in (0x01, data[0] & 0x3F):
        server._datagram(bytes((first,)) + data[1:], ("198.51.100.2", 4000))


class _FakeConn:
    """Enough of a relay connection for the control handlers (they read the peer and address)."""

    def __init__(self) -> None:
        self.peer = NodeKey.generate().node_id
        self.remote_addr = ("198.51.100.3", 5000)
        self.validated_remote_addr = self.remote_addr
        self.closed = _Closed()

    def export_keying_material(self, label: bytes, length: int, context: bytes = b"") -> bytes:
        return bytes(length)

    def close(self, reason: str = "") -> None:
        pass


class _Closed:
    def add_done_callback(self, callback: Any) -> None:
        pass


class _Body:
    def __init__(self, body: Any) -> None:
        self.body = body


_CONN: Any = None


def relay_control(data: bytes) -> None:
    """Bodies of relay.register / relay.tags / relay.lookup from a connected node, run to completion."""
    global _CONN
    server = _server()
    value = as_value(data)
    if _CONN is None:
        _CONN = _FakeConn()
    conn = _CONN
    for handler in (server._register, server._tags, server._lookup):
        coro = handler(conn, _Body(value))
        try:
            coro.send(None)
        except StopIteration:
            pass
        except SptError:
            pass
        finally:
            coro.close()
    server._nodes.clear()
    server._by_token.clear()
    server._registrations._level.clear()


_LOOP: Any = None


def relay_tunnel(data: bytes) -> None:
    """The relay's UDP frames over TCP (`u16 length ‖ datagram`), each datagram handed to the
    relay's forwarder as if it had come by UDP."""
    global _LOOP
    import asyncio

    from spt_relay_fallback.tunnel import pump

    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
    server = _server()

    async def run() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        await pump(reader, lambda datagram: server._datagram(datagram, ("198.51.100.4", 4000)))

    _LOOP.run_until_complete(run())


def relay_punch_addresses(data: bytes) -> None:
    """The candidate list a peer sends in relay.punch."""
    from spt_relay_fallback.client import _addresses

    for address in _addresses(as_value(data)):
        assert 0 < address[1] < 65536


def deliver_batch(data: bytes) -> None:
    """A `msg.deliver_batch` body as a member sends it (the batch, then each message as the
    receiver decodes it), and a `msg.results` answer as the sender reads it."""
    from spt.core.proto.deliver import MAX_BATCH, decode_batch, decode_results
    from spt.core.spool import message_from_wire

    value = as_value(data)
    with contextlib.suppress(SptError):
        payloads = decode_batch(value)
        assert 0 < len(payloads) <= MAX_BATCH
        for payload in payloads:
            with contextlib.suppress(SptError):
                message_from_wire(payload, sender_node=_KEY.node_id, from_form="x@y")
    for expected in (1, 2):
        with contextlib.suppress(SptError):
            assert len(decode_results(value, expected)) == expected


def file_punch_offer(data: bytes) -> None:
    """A sender's file.punch body (its ports and where it sees us), and a file.open `seen`."""
    from spt_filetransfer.datapaths import _seen_port, read_punch_offer

    value = as_value(data)
    seen = _seen_port(value.get("seen") if isinstance(value, dict) else value)
    assert seen is None or 0 < seen < 65536
    try:
        offer = read_punch_offer(value)
    except SptError:
        return
    assert 0 < offer.port < 65536 and 0 < offer.udp_port < 65536 and offer.seen_port == seen


# --- mDNS adverts, the control socket, host sockets, releases -------------------------------------


def mdns_advert(data: bytes) -> None:
    """A TXT record as anyone on the LAN may send it (zeroconf hands its properties over)."""
    from spt.plugins.mdns import MAX_TAGS, TAG_BYTES, read_advert

    value = as_value(data)
    candidates: list[Any] = []
    if isinstance(value, dict):
        candidates.append({_as_bytes(k): v if v is None or isinstance(v, bytes) else _as_bytes(v) for k, v in value.items()})
    pieces = [data[i : i + 40] for i in range(0, min(len(data), 400), 40)]
    candidates.append({b"k": data[:64], **{b"t%d" % i: p for i, p in enumerate(pieces)}})
    candidates.append({b"k": _KEY.node_id.hex.encode(), **{p[:3] or b"t": p[3:] or None for p in pieces}})
    for props in candidates:
        advert = read_advert(props)
        if advert is not None:
            node, tags = advert
            assert len(node.raw) == 32 and len(tags) <= MAX_TAGS and all(len(t) == TAG_BYTES for t in tags)


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")


def control_request(data: bytes) -> None:
    """A line on the daemon's control socket (in system mode, from other users' processes)."""
    from spt.core.ipc import read_request

    value = as_value(data)
    lines = [data]
    shaped_values = [value]
    if isinstance(value, dict):
        shaped_values.append({"v": 1, "op": "daemon.status", **{str(k): v for k, v in value.items()}})
    for v in shaped_values:
        with contextlib.suppress(TypeError, ValueError):  # JSON has no binary map keys (msgpack has)
            lines.append(json.dumps(v, default=repr).encode())
    for line in lines:
        try:
            op, args, _ = read_request(line)
        except ValueError:
            continue
        assert isinstance(op, str) and isinstance(args, dict)


def host_frames(data: bytes) -> None:
    """Frames on a host process's Unix socket (rc viewers, the daemon's watcher): length, map."""
    import asyncio

    from spt.core.hosting.wire import WireError, read_frame

    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()

    async def run() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        for _ in range(64):
            try:
                frame = await read_frame(reader)
            except WireError:
                return
            if frame is None:
                return
            assert isinstance(frame["t"], str)

    _LOOP.run_until_complete(run())


_RELEASE_KEY: Any = None


def _release_key() -> Any:
    global _RELEASE_KEY
    if _RELEASE_KEY is None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        _RELEASE_KEY = Ed25519PrivateKey.generate()
    return _RELEASE_KEY


def update_manifest(data: bytes) -> None:
    """A release as a member's `update.offer` answer carries it: the manifest (here signed by a
    trusted key, so every check after the signature's is reached) and the signature document."""
    from spt_selfupdate.release import public_hex, sign_manifest
    from spt_selfupdate.trust import TrustedKeys, VerifyFailed, verify_manifest

    key = _release_key()
    keys = TrustedKeys(public_hex(key), "ab" * 32)
    for manifest, sig in ((data, sign_manifest(data, key)), (_MANIFEST, data), (data, data)):
        try:
            release = verify_manifest(manifest, sig, keys, installed="0.0.1")
        except VerifyFailed:
            continue
        assert release.artifacts and release.manifest_bytes == manifest


_BUNDLE_DIR: Any = None


def update_bundle(data: bytes) -> None:
    """An offline bundle (`spt update apply --file`): a tar read under caps into a folder."""
    import tempfile
    from pathlib import Path

    from spt_selfupdate.bundle import MAX_FILES, read_bundle
    from spt_selfupdate.trust import VerifyFailed

    global _BUNDLE_DIR
    if _BUNDLE_DIR is None:  # one folder for every call (kept until the process ends)
        _BUNDLE_DIR = tempfile.TemporaryDirectory(prefix="spt-fuzz-")
    folder = Path(_BUNDLE_DIR.name)
    bundle, into = folder / "b.sptupdate", folder / "into"
    into.mkdir(exist_ok=True)
    for old in into.iterdir():
        old.unlink()
    # a new file each time: ext4 flushes a file truncated and written again when it is closed
    # (auto_da_alloc), 1-20 ms per input on a busy disk, most of this target's time
    bundle.unlink(missing_ok=True)
    bundle.write_bytes(data)
    try:
        read_bundle(bundle, into)
    except VerifyFailed:
        return
    assert 2 <= len(list(into.iterdir())) <= MAX_FILES

def peer_certificate(data: bytes) -> None:
    """A peer's TLS certificate (the relay's TCP listener's, and what QUIC's pinning reads):
    parsed, then its key read as a node id; refused only with IdentityError."""
    from spt.core.net.pinning import peer_id_from_der

    candidates = [data]
    if data:  # our certificate with another key type (the key's OID ends in data[0]) and key bytes
        key = data[1:33].ljust(32, b"\0")
        candidates.append(_CERT[:_SPKI] + bytes((data[0],)) + _CERT[_SPKI + 1 : _SPKI + 4] + key + _CERT[_SPKI + 36 :])
    for der in candidates:
        with contextlib.suppress(SptError):
            assert len(peer_id_from_der(der).raw) == 32


def _certificate() -> tuple[bytes, int]:
    """Our certificate's DER, and where its public key's OID ends (the byte after 2b 65)."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from spt.core.net.pinning import make_certificate

    der = make_certificate(_KEY).public_bytes(Encoding.DER)
    raw = _KEY.crypto_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    spki = der.index(b"\x06\x03\x2b\x65\x70\x03\x21\x00" + raw) + 4
    return der, spki


_CERT, _SPKI = _certificate()


TARGETS: dict[str, Target] = {
    "frames_stream": frames_stream,
    "frame_payload": frame_payload,
    "registry_record": registry_record,
    "replicated_record": replicated_record,
    "envelope_lines": envelope_lines,
    "file_manifest": file_manifest,
    "file_channel": file_channel,
    "file_punch_offer": file_punch_offer,
    "relay_datagram_node": relay_datagram_node,
    "relay_datagram_server": relay_datagram_server,
    "relay_control": relay_control,
    "relay_punch_addresses": relay_punch_addresses,
    "relay_tunnel": relay_tunnel,
    "deliver_batch": deliver_batch,
    "mdns_advert": mdns_advert,
    "control_request": control_request,
    "host_frames": host_frames,
    "update_manifest": update_manifest,
    "update_bundle": update_bundle,
    "peer_certificate": peer_certificate,
}


_MESSAGE = {"id": "ab" * 16, "type": "msg", "from": "alice", "to": "bob", "window": "default",
            "attrs": [["json", "{}"]], "body": "hi", "reply_to": None}


def _manifest() -> bytes:
    from spt_selfupdate.trust import Artifact, manifest_document

    return manifest_document("1.2.3", "2026-01-01T00:00:00Z", "n", [Artifact("py311-linux-x86_64", "a.tar", 10, "ab" * 32)])


_MANIFEST = _manifest()


def _bundle() -> bytes:
    """A small offline bundle: manifest, signature, one artifact."""
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        for name, body in (("manifest.json", _MANIFEST), ("manifest.sig", b"{}"), ("a.tar", b"x" * 10)):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return out.getvalue()


def _seeds() -> dict[str, list[bytes]]:
    """Valid inputs for each target, for mutational fuzzing to start from."""
    from spt.core.proto.frames import encode_frame

    enc = msgspec.msgpack.encode
    frame = encode_frame("msg.deliver", {"subnet": "ab" * 32, "payload": {"x": [1, 2, b"z"]}}, req_id=7)
    return {
        "frames_stream": [bytes((5,)) + frame + frame, bytes((200,)) + frame],
        "frame_payload": [frame[4:], enc({"v": 1, "t": "x", "b": [{}, [], None, 1.5, -3, "s"]})],
        "registry_record": [enc(_ROW), enc(_PRESENCE), enc({_KEY.node_id.hex: 3})],
        "replicated_record": [enc(_RECORD), enc(_ENTRY), enc({"home": "ab" * 16}), enc(["cd" * 16])],
        "envelope_lines": [b'<EVENT type="msg" from="a@b" k="v">hi &lt;there&gt;</EVENT>\n'],
        "file_manifest": [enc({"name": "f", "files": [["a/b", 3, bytes(32), bytes(32)]]})],
        "file_channel": [b"SPTF\x01" + bytes(32) + struct.pack(">III", 32, 0, 0) + bytes(32)],
        "file_punch_offer": [enc({"tid": "ab" * 16, "subnet": "home", "port": 40000, "udp_port": 47470,
                                  "seen": "203.0.113.7:47470"}), enc({"seen": "x:\u00b2"})],
        "relay_datagram_node": [bytes((0x02,)) + bytes(32) + b"\xc0" * 40, bytes((0x03, 1)), bytes((0x07,)) + bytes(14)],
        "relay_datagram_server": [bytes((0x01,)) + bytes(48) + b"\xc0" * 40],
        "relay_control": [enc({"port": 1, "proof": bytes(32)}), enc({"tags": [bytes(16)], "port": 2}), enc({"tag": bytes(16)})],
        "relay_punch_addresses": [enc(["192.0.2.1:5", "10.0.0.1:99999", 5])],
        "deliver_batch": [
            enc({"subnet": "ab" * 32, "payloads": [_MESSAGE, {**_MESSAGE, "attrs": [["ring", "1"]], "reply_to": "cd" * 16}]}),
            enc({"results": [{"token": "SENT"}, {"error": {"code": "NO_PERCH", "message": "x"}}]}),
        ],
        "mdns_advert": [enc({"k": _KEY.node_id.hex, "t0": "ab" * 16, "t1": "cd" * 16})],
        "control_request": [b'{"v":1,"op":"daemon.status","args":{},"interactive":true}', b'{"v":1,"op":"x","args":null}'],
        "host_frames": [struct.pack(">I", 9) + enc({"t": "attach", "rows": 24})[:9] + struct.pack(">I", 2) + b"\x80\x00"],
        "update_manifest": [_MANIFEST],
        "update_bundle": [_bundle()],
        "peer_certificate": [_CERT],
        "relay_tunnel": [struct.pack("!H", 60) + bytes((0x01,)) + bytes(59) + struct.pack("!H", 2) + b"\x03\x01"],
    }
SEEDS = _seeds()


def shaped(name: str, data: bytes) -> bytes:
    """Turn fuzzer bytes into the target's input, so plain random bytes cover structure too:
    the first byte picks raw bytes, a seed with edits driven by the rest, or a msgpack value
    built from the rest (maps, arrays, strings, binaries, integers of every width, floats)."""
    if not data:
        return data
    mode, rest = data[0] % 3, data[1:]
    if mode == 0:
        return rest
    if mode == 1:
        seeds = SEEDS[name]
        seed = bytearray(seeds[rest[0] % len(seeds)] if rest else seeds[0])
        for i in range(1, len(rest) - 2, 3):
            kind, where, value = rest[i] % 4, rest[i + 1] * 7 + rest[i + 2], rest[i + 2]
            if not seed:
                seed.append(value)
                continue
            j = where % len(seed)
            if kind == 0:
                seed[j] = value
            elif kind == 1:
                del seed[j:]
            elif kind == 2:
                seed[j:j] = seed[j : j + 1 + value % 16]
            else:
                seed.insert(j, value)
        return bytes(seed)
    reader = _Reader(rest)
    try:
        return msgspec.msgpack.encode(reader.value(0))
    except (OverflowError, ValueError, TypeError):
        return rest


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def value(self, depth: int) -> Any:
        kind = self.byte() % (10 if depth < 6 else 8)
        if kind == 0:
            return None
        if kind == 1:
            return bool(self.byte() & 1)
        if kind == 2:
            return int.from_bytes(self.take(1 + self.byte() % 8), "big", signed=bool(self.byte() & 1))
        if kind == 3:
            return struct.unpack(">d", self.take(8).ljust(8, b"\0"))[0]
        if kind == 4:
            return self.take(self.byte() % 48).decode("utf-8", "replace")
        if kind == 5:
            return self.take(self.byte() % 64)
        if kind == 6:
            return ["home", "bob", "ab" * 32, "192.0.2.1:5", "kind", "row", "presence", "subnet"][self.byte() % 8]
        if kind == 7:
            return bytes(self.byte() % 2 * 16 + 16)
        if kind == 8:
            return [self.value(depth + 1) for _ in range(self.byte() % 8)]
        keys = ["kind", "subnet", "name", "files", "tag", "tags", "port", "proof", "token", "t", "v", "b", "id"]
        out: dict[Any, Any] = {}
        for _ in range(self.byte() % 8):
            k = self.byte()
            key: Any = keys[k % len(keys)] if k < 200 else k - 200
            out[key] = self.value(depth + 1)
        return out
