"""Raw-key pinning on aioquic: the one module that touches aioquic's private names.

What lives here (DESIGN.md §2, SPEC.md §7.1):

- the self-signed certificate made from a node's Ed25519 key;
- `PinnedQuicConnection`, a `QuicConnection` whose TLS layer (a) makes the server request a
  client certificate and refuse a handshake without one, (b) on both sides takes the peer's raw
  Ed25519 key from its certificate and asks a policy callback about it *inside* the handshake, so
  a refused peer never gets application data and both sides see a handshake failure, (c) never
  issues or accepts session tickets (resumption would skip the key check), and (d) keeps the
  exporter master secret so callers get RFC 8446 §7.5 keying material for channel binding;
- receive flow control driven by what the application has consumed, not by what arrived
  (aioquic grows its windows on receipt alone, which would let a slow reader buffer without
  bound);
- small read-only views of state the asyncio shell needs (handshake confirmed, close event,
  unsent bytes on a stream).

What must not live here: sockets, clocks, asyncio, or policy (which keys are members). Every
private name used is listed in `PRIVATE_NAMES` and checked by
`tests/core/net/test_pinning_internals.py`; `aioquic` is pinned to a minor range in pyproject.
"""

from __future__ import annotations

import datetime
import hashlib
import ssl
from collections.abc import Callable, Sequence
from typing import Any, Final

from aioquic import tls
from aioquic.buffer import Buffer  # type: ignore[attr-defined]  # public, re-exported from _buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.stream import QuicStream
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from spt.core.errors import IdentityError, LocalProtocolError
from spt.core.identity import NodeId, NodeKey

__all__ = [
    "ALPN_JOIN",
    "ALPN_MEMBER",
    "JOIN_EXPORTER_LABEL",
    "PRIVATE_NAMES",
    "PeerCheck",
    "PinnedQuicConnection",
    "make_certificate",
    "make_configuration",
    "peer_id_from_certificate",
]

ALPN_MEMBER: Final = "spt/1"
ALPN_JOIN: Final = "spt-join/1"
JOIN_EXPORTER_LABEL: Final = b"EXPORTER-spt-join-v1"

PeerCheck = Callable[[NodeId, str], "str | None"]
"""Called inside the handshake with the peer's key and the negotiated ALPN; a string refuses."""

PRIVATE_NAMES: Final[dict[str, tuple[str, ...]]] = {
    # aioquic.quic.connection.QuicConnection
    "QuicConnection": (
        "_initialize",
        "_write_stream_limits",
        "_write_connection_limits",
        "_local_max_data",
        "_streams",
        "_close_event",
        "_handshake_confirmed",
        "_loss",
        "_network_paths",
    ),
    # aioquic.quic.recovery.QuicPacketRecovery
    "QuicPacketRecovery": ("_rtt_initialized", "_rtt_smoothed"),
    # aioquic.tls.Context
    "Context": (
        "_client_handle_certificate_verify",
        "_server_handle_certificate",
        "_server_handle_certificate_verify",
        "_set_peer_certificate",
        "_setup_traffic_protection",
        "_request_client_certificate",
        "_peer_certificate",
    ),
}

_CERT_NOT_BEFORE: Final = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
_CERT_NOT_AFTER: Final = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)


def make_certificate(key: NodeKey) -> x509.Certificate:
    """A self-signed certificate carrying the node's Ed25519 key.

    Only the key matters: peers ignore names, chains and dates (SPEC.md §7.1). The serial is
    derived from the key so the certificate is the same every time it is made.
    """
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, key.node_id.hex)])
    serial = int.from_bytes(hashlib.sha256(b"spt-cert" + key.node_id.raw).digest()[:16], "big") >> 1
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.crypto_key.public_key())
        .serial_number(serial or 1)
        .not_valid_before(_CERT_NOT_BEFORE)
        .not_valid_after(_CERT_NOT_AFTER)
        .sign(key.crypto_key, algorithm=None)
    )


def peer_id_from_der(der: bytes) -> NodeId:
    """`peer_id_from_certificate` of a certificate's DER bytes; IdentityError when they do not
    parse (cryptography raises InvalidVersion, not ValueError, for a bad version field)."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion) as exc:
        raise IdentityError("", f"peer certificate does not parse: {exc}") from exc
    return peer_id_from_certificate(cert)


def peer_id_from_certificate(cert: x509.Certificate) -> NodeId:
    """The raw Ed25519 key in `cert`; IdentityError when it holds any other kind of key."""
    try:
        public = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:  # a key type cryptography does not know, too
        raise IdentityError("", f"peer certificate has an unreadable key: {exc}") from exc
    if not isinstance(public, Ed25519PublicKey):
        raise IdentityError(type(public).__name__, "peer certificate key is not Ed25519")
    return NodeId(public.public_bytes(Encoding.Raw, PublicFormat.Raw))


def make_configuration(
    key: NodeKey,
    certificate: x509.Certificate,
    *,
    is_client: bool,
    alpns: Sequence[str],
    idle_timeout: float,
    stream_window: int,
    connection_window: int,
) -> QuicConfiguration:
    """A QUIC configuration for one side: our certificate, no CA checks, no tickets.

    `verify_mode=CERT_NONE` turns off aioquic's chain and name checks only; the pinned key is
    checked by `PinnedQuicConnection` instead.
    """
    return QuicConfiguration(
        is_client=is_client,
        alpn_protocols=list(alpns),
        certificate=certificate,
        private_key=key.crypto_key,
        verify_mode=ssl.CERT_NONE,
        idle_timeout=idle_timeout,
        max_stream_data=stream_window,
        max_data=connection_window,
    )


class _CertificateRequired(tls.Alert):
    description = tls.AlertDescription.certificate_required


class _AccessDenied(tls.Alert):
    description = tls.AlertDescription.access_denied


class _PinnedContext(tls.Context):
    """aioquic's TLS context with the peer-key check and the exporter secret added.

    Instances are made by aioquic as plain `tls.Context` and then re-classed by
    `PinnedQuicConnection._initialize`; the attributes below are set right after.
    """

    spt_check: PeerCheck
    spt_offered: NodeId | None
    spt_peer: NodeId | None
    spt_refusal: str | None
    spt_exporter_secret: bytes | None

    def _spt_check_peer(self) -> None:
        cert = self._peer_certificate
        if cert is None:
            self.spt_refusal = "no peer certificate"
            raise _CertificateRequired(self.spt_refusal)
        try:
            peer = peer_id_from_certificate(cert)
        except IdentityError as exc:
            self.spt_refusal = exc.message
            raise tls.AlertBadCertificate(exc.message) from exc
        self.spt_offered = peer
        reason = self.spt_check(peer, self.alpn_negotiated or "")
        if reason is not None:
            self.spt_refusal = reason
            raise _AccessDenied(reason)
        self.spt_peer = peer

    def _set_peer_certificate(self, certificate: tls.Certificate) -> None:
        # aioquic turns only ValueError into bad_certificate; cryptography raises InvalidVersion
        # for a bad version field, which would escape the datagram handler and leave the
        # handshake hanging. Both sides parse here (client and server certificates alike).
        try:
            super()._set_peer_certificate(certificate)
        except x509.InvalidVersion as exc:
            self.spt_refusal = f"peer certificate does not parse: {exc}"
            raise tls.AlertBadCertificate(self.spt_refusal) from exc

    def _client_handle_certificate_verify(self, input_buf: Buffer) -> None:
        # super() checks the CertificateVerify signature (possession of the key); the key itself
        # is judged before our Finished goes out, so a refused server never sees our Finished.
        super()._client_handle_certificate_verify(input_buf)
        self._spt_check_peer()

    def _server_handle_certificate(self, input_buf: Buffer) -> None:
        super()._server_handle_certificate(input_buf)
        if self.state != tls.State.SERVER_EXPECT_CERTIFICATE_VERIFY:
            # aioquic continues without client authentication on an empty Certificate
            # (RFC 8446 §4.4.2.4 allows it); spt never does.
            self.spt_refusal = "the client presented no certificate"
            raise _CertificateRequired(self.spt_refusal)

    def _server_handle_certificate_verify(self, input_buf: Buffer) -> None:
        # Refusing here, before the client's Finished, means the server never derives the
        # client's 1-RTT keys for a refused peer: no application data in either direction.
        super()._server_handle_certificate_verify(input_buf)
        self._spt_check_peer()

    def _setup_traffic_protection(self, direction: tls.Direction, epoch: tls.Epoch, label: bytes) -> None:
        if label == b"s ap traffic" and self.key_schedule is not None:
            # Both sides reach this point with the master secret extracted and the transcript at
            # ClientHello..server Finished: exactly what RFC 8446 §7.1 derives "exp master" from.
            self.spt_exporter_secret = self.key_schedule.derive_secret(b"exp master")
        super()._setup_traffic_protection(direction, epoch, label)


class PinnedQuicConnection(QuicConnection):
    """A QUIC connection that proves both node keys and checks them against `check_peer`.

    `stream_window` and `connection_window` bound what the peer may send beyond what the
    application has consumed (see `hold` / `release`), per stream and in total, in bytes.
    """

    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        check_peer: PeerCheck,
        original_destination_connection_id: bytes | None = None,
    ) -> None:
        if configuration.session_ticket is not None:
            raise LocalProtocolError("", "session tickets are disabled in spt; do not configure one")
        super().__init__(
            configuration=configuration,
            original_destination_connection_id=original_destination_connection_id,
        )
        self._spt_check = check_peer
        self._spt_stream_window = configuration.max_stream_data
        self._spt_connection_window = configuration.max_data
        self._spt_stream_half = self._spt_stream_window // 2
        self._spt_connection_half = self._spt_connection_window // 2
        self._spt_release_batch = min(self._spt_stream_window, self._spt_connection_window) // 4
        self._spt_released = 0
        self._spt_held: dict[int | None, int] = {}
        self._spt_held_total = 0
        self.closed_locally = False
        """True once this side decided to close (our call, or an error aioquic detected here)."""

    # --- TLS ------------------------------------------------------------------------------------

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        context = self.tls
        # aioquic builds a plain tls.Context with no factory hook; re-class that one instance.
        # _PinnedContext adds methods only, so the object layout is unchanged.
        context.__class__ = _PinnedContext
        assert isinstance(context, _PinnedContext)
        context.spt_check = self._spt_check
        context.spt_offered = None
        context.spt_peer = None
        context.spt_refusal = None
        context.spt_exporter_secret = None
        # aioquic calls this "for test purposes only"; for spt it is the point.
        context._request_client_certificate = not self._is_client
        context.session_ticket = None
        context.get_session_ticket_cb = None
        context.new_session_ticket_cb = None

    @property
    def _pinned(self) -> _PinnedContext | None:
        context = getattr(self, "tls", None)
        return context if isinstance(context, _PinnedContext) else None

    @property
    def peer_id(self) -> NodeId | None:
        """The peer's key, once the handshake accepted it."""
        context = self._pinned
        return None if context is None else context.spt_peer

    @property
    def offered_peer(self) -> NodeId | None:
        """The key the peer proved, accepted or not (for logging refusals)."""
        context = self._pinned
        return None if context is None else context.spt_offered

    @property
    def refusal(self) -> str | None:
        """Why this side refused the peer inside the handshake, if it did."""
        context = self._pinned
        return None if context is None else context.spt_refusal

    @property
    def alpn(self) -> str | None:
        context = self._pinned
        return None if context is None else context.alpn_negotiated

    def validated_peer_address(self) -> tuple[Any, ...] | None:
        """The peer address in use if QUIC validated it, else the newest one it did validate
        (RFC 9000 §9.3: after a migration the new address is unproved until PATH_RESPONSE)."""
        for path in self._network_paths:
            if path.is_validated:
                return tuple(path.addr)
        return None

    @property
    def handshake_confirmed(self) -> bool:
        """True once the handshake is confirmed (RFC 9001 §4.1.2).

        A client is confirmed by the server's HANDSHAKE_DONE, which the server sends only after
        it accepted our key: the first moment the client may trust the connection.
        """
        return self._handshake_confirmed

    @property
    def smoothed_rtt(self) -> float | None:
        """The smoothed round-trip time in seconds (RFC 9002 §5.3), None before a sample."""
        loss = self._loss
        return loss._rtt_smoothed if loss._rtt_initialized else None

    @property
    def idle_timeout(self) -> float:
        """The idle timeout in force, in seconds: the smaller of ours and the peer's once its
        transport parameters arrived (RFC 9000 §10.1), never under three probe timeouts."""
        return float(self._idle_timeout())

    @property
    def close_event(self) -> ConnectionTerminated | None:
        """Why the connection is closing, as soon as either side decided (not after draining)."""
        return self._close_event

    def close(self, error_code: int = 0, frame_type: int | None = None, reason_phrase: str = "") -> None:
        if self._close_event is None:
            self.closed_locally = True
        super().close(error_code=error_code, frame_type=frame_type, reason_phrase=reason_phrase)

    def export_keying_material(self, label: bytes, length: int, context: bytes = b"") -> bytes:
        """TLS-Exporter(label, context, length) of RFC 8446 §7.5; equal on both sides.

        Raises LocalProtocolError before the handshake has produced the exporter secret.
        """
        tls_context = self._pinned
        secret = None if tls_context is None else tls_context.spt_exporter_secret
        if tls_context is None or secret is None or tls_context.key_schedule is None:
            raise LocalProtocolError("", "no exporter secret yet: the handshake is not complete")
        if not 0 < length <= 255 * tls_context.key_schedule.algorithm.digest_size:
            raise LocalProtocolError(str(length), "exporter length out of range")
        algorithm = tls_context.key_schedule.algorithm
        empty = hashes.Hash(algorithm)
        derived = tls.hkdf_expand_label(algorithm, secret, label, empty.finalize(), algorithm.digest_size)
        context_hash = hashes.Hash(algorithm)
        context_hash.update(context)
        return tls.hkdf_expand_label(algorithm, derived, b"exporter", context_hash.finalize(), length)

    # --- receive flow control -------------------------------------------------------------------

    def hold(self, stream_id: int, size: int) -> None:
        """The application now holds `size` more received bytes of `stream_id`, unconsumed."""
        self._spt_held[stream_id] = self._spt_held.get(stream_id, 0) + size
        self._spt_held_total += size

    def release(self, stream_id: int, size: int) -> bool:
        """The application consumed `size` held bytes; True when a window update may be due.

        Batched (a quarter window of consumption) so the caller does not transmit per frame; the
        limit writers below work out exactly what to announce.
        """
        held = self._spt_held.get(stream_id, 0)
        if size >= held:
            self._spt_held.pop(stream_id, None)
            size = held
        else:
            self._spt_held[stream_id] = held - size
        self._spt_held_total -= size
        self._spt_released += size
        if self._spt_released < self._spt_release_batch:
            return False
        self._spt_released = 0
        return True

    def forget_stream(self, stream_id: int) -> None:
        """Release everything held for a stream the application stopped reading."""
        self._spt_held_total -= self._spt_held.pop(stream_id, 0)

    def _write_stream_limits(
        self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: QuicStream
    ) -> None:
        # Runs for every stream in every packet built, on the latency path: keep it lean.
        local = stream.max_stream_data_local
        if local:
            receiver = stream.receiver
            grant = (
                receiver.highest_offset - self._spt_held.get(stream.stream_id, 0) + self._spt_stream_window
            )
            if grant >= local + self._spt_stream_half:
                stream.max_stream_data_local = local = grant
        if stream.max_stream_data_local_sent == local:
            return  # nothing to announce; aioquic's method would only apply its doubling rule
        # aioquic doubles the window whenever half of it has *arrived*; hide the received offset
        # from that rule so only consumption (above) moves the window.
        receiver = stream.receiver
        highest = receiver.highest_offset
        receiver.highest_offset = 0
        try:
            super()._write_stream_limits(builder, space, stream)
        finally:
            receiver.highest_offset = highest

    def _write_connection_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace) -> None:
        max_data = self._local_max_data
        used = max_data.used
        grant = used - self._spt_held_total + self._spt_connection_window
        if grant >= max_data.value + self._spt_connection_half:
            max_data.value = grant
        if used * 2 <= max_data.value:
            super()._write_connection_limits(builder, space)  # aioquic's doubling rule stays off
            return
        max_data.used = 0  # hide what arrived from that rule, as in _write_stream_limits
        try:
            super()._write_connection_limits(builder, space)
        finally:
            max_data.used = used

    # --- send side ------------------------------------------------------------------------------

    def unsent(self, stream_id: int, written: int) -> int:
        """Bytes of the `written` we gave `stream_id` that have not been transmitted yet."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.sender.reset_pending:
            return 0
        return max(0, written - stream.sender.highest_offset)
