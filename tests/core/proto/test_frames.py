"""The frame codec: round trips, limits, and that bad bytes only ever raise FrameError."""

import struct

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spt.core.errors import LocalProtocolError, RemoteProtocolError
from spt.core.proto.frames import MAX_FRAME, Frame, FrameDecoder, FrameError, encode_frame


def feed_in_pieces(data, cuts):
    decoder = FrameDecoder()
    frames = []
    points = sorted({c % (len(data) + 1) for c in cuts})
    start = 0
    for point in [*points, len(data)]:
        frames += decoder.feed(data[start:point])
        start = point
    decoder.eof()
    return frames


def raw_frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def test_a_frame_round_trips_with_its_request_id_and_size():
    data = encode_frame("ping", {"n": 1, "blob": b"\x00\x01"}, req_id=7)
    (frame,) = FrameDecoder().feed(data)
    assert frame == Frame("ping", {"n": 1, "blob": b"\x00\x01"}, 7)
    assert frame.size == len(data)


def test_frames_split_anywhere_decode_the_same():
    data = b"".join(encode_frame(f"t{i}", b"x" * i) for i in range(50))
    frames = feed_in_pieces(data, range(0, len(data), 3))
    assert [f.type for f in frames] == [f"t{i}" for i in range(50)]
    assert [f.body for f in frames] == [b"x" * i for i in range(50)]


def test_frame_error_is_a_remote_protocol_error():
    assert issubclass(FrameError, RemoteProtocolError)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\xff\xff\xff\xff", "exceeds"),
        (struct.pack(">I", MAX_FRAME + 1), "exceeds"),
        (raw_frame(b"\xc1"), "not valid msgpack"),
        (raw_frame(msgspec.msgpack.encode([1, "t"])), "malformed"),
        (raw_frame(msgspec.msgpack.encode({"v": 2, "t": "x"})), "version"),
        (raw_frame(msgspec.msgpack.encode({"v": 1})), "malformed"),
        (raw_frame(msgspec.msgpack.encode({"v": 1, "t": ""})), "type name"),
        (raw_frame(msgspec.msgpack.encode({"v": 1, "t": "x", "id": -1})), "request id"),
        (
            raw_frame(msgspec.msgpack.encode({"v": 1, "t": "x", "b": msgspec.msgpack.Ext(3, b"")})),
            "extension",
        ),
        (raw_frame(msgspec.msgpack.encode({"v": 1, "t": "x"}) + b"\x00"), "not valid msgpack"),
        (b"\x00\x00\x00\x00", "length 0"),
    ],
)
def test_bad_frames_raise_frame_error_naming_the_problem(data, why):
    with pytest.raises(FrameError, match=why):
        FrameDecoder().feed(data)


def test_a_truncated_tail_is_an_error_at_eof():
    data = encode_frame("ping", b"abc")
    decoder = FrameDecoder()
    assert decoder.feed(data[:-1]) == []
    with pytest.raises(FrameError, match="inside a frame"):
        decoder.eof()


def test_a_decoder_that_failed_stays_failed():
    decoder = FrameDecoder()
    with pytest.raises(FrameError):
        decoder.feed(b"\xff\xff\xff\xff")
    with pytest.raises(FrameError):
        decoder.feed(encode_frame("ok"))


def test_an_oversized_length_is_refused_before_the_body_arrives():
    decoder = FrameDecoder(max_frame=1024)
    with pytest.raises(FrameError, match="exceeds"):
        decoder.feed(struct.pack(">I", 1025))


def test_unknown_type_names_are_not_the_codecs_concern():
    (frame,) = FrameDecoder().feed(encode_frame("no-such-type", None))
    assert frame.type == "no-such-type"


def test_encoding_refuses_bad_local_input():
    with pytest.raises(LocalProtocolError):
        encode_frame("")
    with pytest.raises(LocalProtocolError):
        encode_frame("x", object())
    with pytest.raises(LocalProtocolError):
        encode_frame("x", req_id=-1)


bodies = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(
    frames=st.lists(
        st.tuples(st.text(min_size=1, max_size=20), bodies, st.none() | st.integers(0, 2**32)), max_size=6
    ),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
)
def test_any_frames_in_any_split_round_trip(frames, cuts):
    data = b"".join(encode_frame(t, b, req_id=i) for t, b, i in frames)
    decoded = feed_in_pieces(data, cuts)
    assert [(f.type, f.body, f.req_id) for f in decoded] == [
        (t, msgspec.msgpack.decode(msgspec.msgpack.encode(b)), i) for t, b, i in frames
    ]


def decode_garbage(data, cuts):
    decoder = FrameDecoder(max_frame=4096)
    try:
        start = 0
        for point in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
            for frame in decoder.feed(data[start:point]):
                assert isinstance(frame, Frame)
            start = point
        decoder.eof()
    except FrameError:
        pass


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 1000), max_size=6))
def test_random_bytes_raise_nothing_but_frame_error(data, cuts):
    decode_garbage(data, cuts)


@settings(max_examples=400, deadline=None)
@given(
    body=bodies,
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    truncate=st.integers(0, 10_000),
    cuts=st.lists(st.integers(0, 10_000), max_size=6),
)
def test_mutated_frames_raise_nothing_but_frame_error(body, flips, truncate, cuts):
    data = bytearray(encode_frame("type", body, req_id=3) + encode_frame("next", [1, 2]))
    for position, value in flips:
        data[position % len(data)] = value
    decode_garbage(bytes(data[: max(1, truncate % (len(data) + 1))]), cuts)


def test_deeply_nested_bodies_are_a_frame_error_not_a_crash():
    nested = b"\x91" * 100_000 + b"\xc0"
    payload = b"\x83\xa1v\x01\xa1t\xa1x\xa1b" + nested
    decode_garbage(raw_frame(payload), [])
