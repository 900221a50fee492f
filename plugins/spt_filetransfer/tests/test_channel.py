"""The TCP data path's AEAD frames: a wrong key cannot inject, an altered frame is caught."""

from __future__ import annotations

import os
import socket

import pytest
from spt_filetransfer import channel


def keys(key: bytes, tid: bytes) -> tuple[bytes, bytes]:
    return channel.derive_keys(key, tid, b"c" * 16, b"s" * 16)


def test_frames_round_trip_in_order():
    c2s, _ = keys(os.urandom(32), os.urandom(16))
    a, b = socket.socketpair()
    with a, b:
        tx, rx = channel.Sender(c2s, channel.C2S), channel.Receiver(c2s, channel.C2S)
        tx.send(a, 1, 2, b"hello")
        tx.send(a, channel.CONTROL, channel.END)
        f, c, payload = rx.recv(b)
        assert (f, c, bytes(payload)) == (1, 2, b"hello")
        assert rx.recv(b)[:2] == (channel.CONTROL, channel.END)


def test_a_wrong_key_cannot_inject():
    tid = os.urandom(16)
    good, _ = keys(os.urandom(32), tid)
    forged, _ = keys(os.urandom(32), tid)
    a, b = socket.socketpair()
    with a, b:
        channel.Sender(forged, channel.C2S).send(a, 0, 0, b"evil data")
        with pytest.raises(channel.ChannelError):
            channel.Receiver(good, channel.C2S).recv(b)


def test_altered_replayed_or_reflected_frames_fail():
    c2s, s2c = keys(os.urandom(32), os.urandom(16))
    frame = channel.Sender(c2s, channel.C2S).frame(0, 0, b"payload")
    altered = frame[:-1] + bytes([frame[-1] ^ 1])
    moved = frame[:7] + bytes([frame[7] ^ 1]) + frame[8:]  # another file index in the clear header
    cases = ((altered, c2s, channel.C2S), (moved, c2s, channel.C2S), (frame, s2c, channel.S2C), (frame + frame, c2s, channel.C2S))
    for data, key, direction in cases:
        a, b = socket.socketpair()
        with a, b:
            a.sendall(data)
            rx = channel.Receiver(key, direction)
            with pytest.raises(channel.ChannelError):
                rx.recv(b)
                rx.recv(b)  # the replayed copy: the nonce counter moved on


def test_each_connection_derives_its_own_keys():
    key, tid = os.urandom(32), os.urandom(16)
    assert channel.derive_keys(key, tid, b"1" * 16, b"2" * 16) != channel.derive_keys(key, tid, b"1" * 16, b"3" * 16)
    with pytest.raises(channel.ChannelError):
        channel.read_client_header(b"GET / HTTP/1.1\r\n" + b"x" * 21)


def test_payloads_stay_valid_for_the_ring_of_buffers():
    """A consumer may hold `buffers - 1` payloads while the next frames are opened."""
    c2s, _ = keys(os.urandom(32), os.urandom(16))
    a, b = socket.socketpair()
    with a, b:
        tx, rx = channel.Sender(c2s, channel.C2S), channel.Receiver(c2s, channel.C2S, buffers=4)
        bodies = [os.urandom(1000 + i) for i in range(8)]
        for i, body in enumerate(bodies):
            tx.send(a, 0, i, body)
        held = [rx.recv(b)[2] for _ in range(3)]
        assert [bytes(p) for p in held] == bodies[:3]
        for i in range(3, 8):
            held = [*held[1:], rx.recv(b)[2]]
            assert [bytes(p) for p in held] == bodies[i - 2 : i + 1]
