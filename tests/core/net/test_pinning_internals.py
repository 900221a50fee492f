"""Fails loudly when aioquic drops or reshapes a private name spt/core/net/pinning.py relies on.

If this fails after an aioquic upgrade, read pinning.py against the new aioquic source before
widening the version pin in pyproject.toml.
"""

import inspect
import ssl

import pytest
from aioquic import tls
from aioquic.quic import connection as quic_connection
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.stream import QuicStream

from spt.core.identity import NodeKey
from spt.core.net import pinning

METHODS = {
    QuicConnection: {
        "_initialize": ["self", "peer_cid"],
        "_write_stream_limits": ["self", "builder", "space", "stream"],
        "_write_connection_limits": ["self", "builder", "space"],
    },
    tls.Context: {
        "_client_handle_certificate_verify": ["self", "input_buf"],
        "_server_handle_certificate": ["self", "input_buf"],
        "_server_handle_certificate_verify": ["self", "input_buf"],
        "_set_peer_certificate": ["self", "certificate"],
        "_setup_traffic_protection": ["self", "direction", "epoch", "label"],
    },
}


@pytest.mark.parametrize(
    ("owner", "name"), [(owner, name) for owner, names in METHODS.items() for name in names]
)
def test_overridden_private_methods_keep_their_signatures(owner, name):
    method = getattr(owner, name, None)
    assert method is not None, f"aioquic {owner.__name__}.{name} vanished; pinning.py overrides it"
    params = list(inspect.signature(method).parameters)
    assert params == METHODS[owner][name], f"aioquic {owner.__name__}.{name} changed shape: {params}"


def test_every_listed_private_name_is_checked_here():
    listed = {name for names in pinning.PRIVATE_NAMES.values() for name in names}
    covered = {name for names in METHODS.values() for name in names} | {
        "_local_max_data",
        "_streams",
        "_close_event",
        "_handshake_confirmed",
        "_loss",
        "_network_paths",
        "_rtt_initialized",
        "_rtt_smoothed",
        "_request_client_certificate",
        "_peer_certificate",
    }
    assert listed <= covered


def _client_connection():
    key = NodeKey.generate()
    config = pinning.make_configuration(
        key,
        pinning.make_certificate(key),
        is_client=True,
        alpns=[pinning.ALPN_MEMBER],
        idle_timeout=5.0,
        stream_window=65536,
        connection_window=262144,
    )
    quic = pinning.PinnedQuicConnection(configuration=config, check_peer=lambda peer, alpn: None)
    quic.connect(("127.0.0.1", 9), now=0.0)
    return quic


def test_private_connection_attributes_exist_with_the_expected_types():
    quic = _client_connection()
    limit = quic._local_max_data
    assert isinstance(limit, quic_connection.Limit)
    assert {"used", "value", "sent"} <= set(vars(limit))
    assert isinstance(quic._streams, dict)
    assert quic._close_event is None
    assert quic._handshake_confirmed is False
    assert quic._loss._rtt_initialized is False
    assert isinstance(quic._loss._rtt_smoothed, float)
    assert quic.smoothed_rtt is None
    (path,) = quic._network_paths
    assert path.addr == ("127.0.0.1", 9) and isinstance(path.is_validated, bool)
    assert quic.validated_peer_address() == ("127.0.0.1", 9)  # a client's dialled address is trusted


def test_the_tls_context_is_reclassed_and_keeps_the_private_state_we_set():
    quic = _client_connection()
    context = quic.tls
    assert type(context).__name__ == "_PinnedContext"
    assert hasattr(context, "_request_client_certificate")
    assert hasattr(context, "_peer_certificate")
    assert not hasattr(tls.Context, "__slots__"), "re-classing needs a __dict__-based Context"
    assert context.get_session_ticket_cb is None and context.new_session_ticket_cb is None


def test_stream_state_used_for_flow_control_and_backlog_is_public_on_the_stream():
    stream = QuicStream(stream_id=0, max_stream_data_local=10, max_stream_data_remote=10)
    assert hasattr(stream.receiver, "highest_offset")
    assert hasattr(stream.receiver, "is_finished")
    assert hasattr(stream.sender, "highest_offset")
    assert hasattr(stream.sender, "reset_pending")
    assert hasattr(stream, "max_stream_data_local")


def test_key_schedule_and_alerts_we_use_exist():
    assert hasattr(tls.KeySchedule, "derive_secret")
    assert callable(tls.hkdf_expand_label)
    assert tls.AlertDescription.certificate_required == 116
    assert tls.AlertDescription.access_denied == 49
    assert tls.State.SERVER_EXPECT_CERTIFICATE_VERIFY


def test_cert_none_is_the_only_chain_check_switch():
    config = QuicConfiguration(is_client=True, verify_mode=ssl.CERT_NONE)
    assert config.verify_mode == ssl.CERT_NONE
