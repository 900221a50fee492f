"""A stranger who wins the race for a direct data connection gets nothing (docs/design/tcp-simultaneous-open.md).

A simultaneous open accepts whoever answers the SYN at the predicted address, and a listener
whoever connects: what authenticates the data connection is the per-open key the receiver sent
over the pinned member connection. Written as the attacker, over real sockets.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from ft_helpers import file_hash, inbox, make_pair, one, random_file, wait_for
from spt_filetransfer import channel, datapaths, simopen

MIB = 1 << 20


def test_the_sender_gives_a_stranger_who_answers_its_syn_nothing_but_the_clear_header():
    key, tid = channel.new_key(), os.urandom(16)
    stranger = socket.create_server(("127.0.0.1", 0))
    seen: dict[str, object] = {}

    def play_the_receiver() -> None:
        conn, _ = stranger.accept()
        with conn:
            conn.settimeout(5)
            head = bytearray(channel.HEADER_LEN)
            channel.recv_exact(conn, memoryview(head))
            seen["tid"], client_salt = channel.read_client_header(bytes(head))
            server_salt = os.urandom(channel.SALT)
            conn.sendall(server_salt)
            guess = channel.new_key()  # it never had the key: its best is a guess
            c2s, s2c = channel.derive_keys(guess, tid, client_salt, server_salt)
            try:
                channel.Receiver(c2s, channel.C2S).recv(conn)  # the sender's HELLO
                seen["hello"] = "opened"
            except channel.ChannelError:
                seen["hello"] = "sealed"
            conn.sendall(channel.Sender(s2c, channel.S2C).frame(channel.CONTROL, channel.OK))
            rest = b""
            for _ in range(100):  # whatever the sender still sends, until it closes
                try:
                    more = conn.recv(65536)
                except OSError:
                    break
                if not more:
                    break
                rest += more
            seen["after"] = rest

    player = threading.Thread(target=play_the_receiver)
    player.start()
    reserved = simopen.reserve("127.0.0.1")
    sock = simopen.open_direct(reserved, stranger.getsockname(), deadline=time.monotonic() + 2)
    with pytest.raises(channel.ChannelError):
        datapaths.handshake_on(sock, tid, key)
    player.join(10)
    stranger.close()
    assert seen["tid"] == tid  # the header is clear by design: a transfer id, a salt
    assert seen["hello"] == "sealed" and seen["after"] == b""
    with pytest.raises(InvalidTag):  # and nothing it saw opens without the key
        AESGCM(channel.new_key()).decrypt(os.urandom(12), os.urandom(32), b"")


@pytest.mark.slow
@pytest.mark.root  # creates subnets (elevated)
def test_the_receiver_serves_a_stranger_on_its_data_port_nothing_and_the_transfer_lands(spt_nodes, tmp_path):
    a, b = make_pair(spt_nodes, a_env={"SPT_FILE_MAX_RATE": str(4 * MIB)})
    src = random_file(tmp_path / "f.bin", 24)  # ~6 s at the capped rate: the session is live meanwhile
    queued = a.cli("file", "send", str(src), "bob")
    tid = queued.stdout.strip().split(":", 1)[1]
    wait_for(lambda: one(a, tid).get("state") == "transferring", timeout=60, what="the data connection")
    port = int(wait_for(lambda: re.findall(r"file data listener open port=(\d+)", b.log()), timeout=60, what="the port")[-1])
    # the stranger knows the transfer id (it is in every data connection's clear header)
    for payload in ((channel.CONTROL, channel.HELLO), (0, 0)):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            client_salt = os.urandom(channel.SALT)
            conn.sendall(channel.client_header(bytes.fromhex(tid), client_salt))
            server_salt = bytearray(channel.SALT)
            channel.recv_exact(conn, memoryview(server_salt))
            c2s, _ = channel.derive_keys(channel.new_key(), bytes.fromhex(tid), client_salt, bytes(server_salt))
            conn.sendall(channel.Sender(c2s, channel.C2S).frame(*payload, b"x" * 64))
            answer = b""
            try:
                while more := conn.recv(4096):
                    answer += more
            except OSError:
                pass
            assert answer == b"", "the receiver answered a stranger"
    assert one(b, tid).get("state") != "complete", "the transfer ended before the stranger came: inconclusive"
    done = wait_for(lambda: (t := one(a, tid)).get("state") == "complete" and t, timeout=120, what="completion")
    assert done["path"] == "tcp"
    assert file_hash(inbox(b) / tid / "f.bin") == file_hash(src)
