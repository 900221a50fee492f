"""TOTP seeds and codes (RFC 6238 vectors), the otpauth URI, commitments, Secret redaction."""

from __future__ import annotations

import base64
import pickle

import pytest

from spt.core.errors import LocalProtocolError, RemoteProtocolError
from spt.core.proto.canonical import canonical_bytes, parse_canonical
from spt.core.proto.totp import (
    Secret,
    code_at,
    new_seed,
    otpauth_uri,
    seconds_left,
    seed_commitment,
    step_of,
)

RFC_SEED = Secret(b"12345678901234567890")

# RFC 6238 Appendix B, SHA-1 column: (unix time, 8-digit TOTP).
RFC_VECTORS = [
    (59, "94287082"),
    (1111111109, "07081804"),
    (1111111111, "14050471"),
    (1234567890, "89005924"),
    (2000000000, "69279037"),
    (20000000000, "65353130"),
]


@pytest.mark.parametrize(("t", "expected"), RFC_VECTORS)
def test_rfc6238_sha1_vectors_with_eight_digits(t, expected):
    assert code_at(RFC_SEED, step_of(t), digits=8).reveal() == expected


@pytest.mark.parametrize(("t", "expected"), RFC_VECTORS)
def test_six_digit_code_is_the_last_six_of_the_rfc_value(t, expected):
    assert code_at(RFC_SEED, step_of(t)).reveal() == expected[-6:]


def test_step_boundaries():
    assert step_of(0) == 0
    assert step_of(29.999) == 0
    assert step_of(30) == 1
    assert seconds_left(30) == 30
    assert seconds_left(59.5) == 1
    assert seconds_left(45) == 15


def test_new_seed_needs_twenty_bytes():
    assert new_seed(bytes(range(20))).reveal() == bytes(range(20))
    with pytest.raises(LocalProtocolError):
        new_seed(b"short")


def test_otpauth_uri_percent_encodes_name_and_drops_padding():
    seed = new_seed(bytes(range(20)))
    uri = otpauth_uri("my net", seed).reveal()
    b32 = base64.b32encode(bytes(range(20))).decode().rstrip("=")
    assert uri == f"otpauth://totp/spt:my%20net?secret={b32}&issuer=spt"
    assert "=" not in uri.split("secret=")[1].split("&")[0]


def test_seed_commitment_binds_nonce_epoch_and_seed():
    seed = new_seed(b"s" * 20)
    base = seed_commitment(b"n" * 16, 0, seed)
    assert len(base) == 32
    assert seed_commitment(b"n" * 16, 1, seed) != base
    assert seed_commitment(b"m" * 16, 0, seed) != base
    assert seed_commitment(b"n" * 16, 0, new_seed(b"t" * 20)) != base


def test_secret_repr_str_and_format_are_redacted():
    seed = new_seed(b"\x01" * 20)
    code = code_at(seed, 1)
    for secret in (seed, code, otpauth_uri("home", seed)):
        shown = [repr(secret), str(secret), f"{secret}", f"{secret!r}", repr([secret]), str({"k": secret})]
        for text in shown:
            assert "redacted" in text or "<secret>" in text
            assert code.reveal() not in text
            assert "0101" not in text
    assert Secret(b"a") == Secret(b"a")
    assert Secret(b"a") != Secret(b"b")
    with pytest.raises(TypeError):
        hash(seed)
    with pytest.raises(TypeError):
        pickle.dumps(seed)


def test_canonical_json_sorted_compact_and_integer_only():
    assert canonical_bytes({"b": 1, "a": [True, None, "é"], "c": b"\x00\xff"}) == (
        '{"a":[true,null,"é"],"b":1,"c":"00ff"}'.encode()
    )
    with pytest.raises(LocalProtocolError):
        canonical_bytes({"x": 1.5})
    with pytest.raises(LocalProtocolError):
        canonical_bytes({1: "non-string key"})
    assert parse_canonical(b'{"a":1}') == {"a": 1}
    with pytest.raises(RemoteProtocolError):
        parse_canonical(b'{"a":1.0}')
    with pytest.raises(RemoteProtocolError):
        parse_canonical(b'{"a":NaN}')
    with pytest.raises(RemoteProtocolError):
        parse_canonical(b"\xff")
