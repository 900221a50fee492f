"""One member, or one source address, cannot take every data connection slot of a receiver.

Written as the attackers, over real TCP to the receiver's data listener: a member with a data
session of its own opens connection after connection, sends each a valid header and then stalls
(each would wait out the keyed handshake), and someone at another address opens connections and
says nothing. Another member, from a third address, must still be served.
"""

from __future__ import annotations

import os
import select
import socket
import time

import pytest
from spt_filetransfer import channel
from spt_filetransfer.dataserver import MAX_CONNECTIONS, MAX_PER_OWNER, DataServer

ATTEMPTS = MAX_CONNECTIONS + 8


def connect(port: int, source: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    sock.settimeout(5)
    return sock


def served(sock: socket.socket, tid: bytes) -> bool:
    """Send the header for `tid`: True when the receiver answers its salt, False when it hangs up."""
    salt = b""
    try:
        sock.sendall(channel.client_header(tid, os.urandom(channel.SALT)))
        while len(salt) < channel.SALT and (more := sock.recv(channel.SALT - len(salt))):
            salt += more
    except ConnectionResetError:  # closed before it read the header
        return False
    return len(salt) == channel.SALT


def hung_up(socks: list[socket.socket], expected: int) -> int:
    """How many of `socks` the receiver closed, waiting (up to 3 s) for `expected` of them."""
    closed: set[socket.socket] = set()
    deadline = time.monotonic() + 3
    while len(closed) < expected and time.monotonic() < deadline:
        readable, _, _ = select.select([s for s in socks if s not in closed], [], [], 0.1)
        for sock in readable:
            if sock.recv(1) == b"":
                closed.add(sock)
    return len(closed)


def test_one_member_or_one_address_holds_at_most_its_share_of_the_data_slots():
    server = DataServer("127.0.0.1", incoming=lambda tid: None, record_path=lambda tid, kind: None,
                        failed=lambda tid, why: None)
    port = server.ensure_listener()
    assert port is not None
    mallory, bob = os.urandom(16), os.urandom(16)
    server.open_session(mallory.hex(), "ab" * 32)
    server.open_session(bob.hex(), "cd" * 32)
    held: list[socket.socket] = []
    try:
        answered = 0
        for _ in range(ATTEMPTS):  # the member, one at a time: each stalls after its header
            held.append(connect(port, "127.0.0.1"))
            answered += served(held[-1], mallory)
        assert answered == MAX_PER_OWNER  # on the old code: MAX_CONNECTIONS, every slot

        silent = [connect(port, "127.0.0.2") for _ in range(ATTEMPTS)]  # say nothing at all
        held += silent
        assert hung_up(silent, ATTEMPTS - MAX_PER_OWNER) == ATTEMPTS - MAX_PER_OWNER

        other = connect(port, "127.0.0.3")
        held.append(other)
        assert served(other, bob), "another member found no free data connection slot"
    finally:
        for sock in held:
            sock.close()
        server.stop()


@pytest.mark.lab
def test_addresses_of_one_ipv6_64_share_one_sources_slots(netns_lab):
    """IPv6: an attacker draws a fresh address from its /64 for every connection."""
    lab = netns_lab(ipv6=True)
    lab.lan(1)
    (host,) = lab.hosts()
    lab.local_ipv6_nets(host, ("fd00:64::/64", "fd00:65::/64"))
    server = DataServer("fd00:64::1", incoming=lambda tid: None, record_path=lambda tid, kind: None,
                        failed=lambda tid, why: None)
    port = lab.call(host, server.ensure_listener)  # the listener lives in the lab; its thread need not
    bob = os.urandom(16)
    server.open_session(bob.hex(), "cd" * 32)

    def connect6(source: str) -> socket.socket:
        sock = lab.open_socket(host, socket.SOCK_STREAM, family=socket.AF_INET6, bind=(source, 0))
        sock.settimeout(5)
        sock.connect(("fd00:64::1", port))
        return sock

    try:
        silent = [connect6(f"fd00:64::{i + 2:x}:1") for i in range(ATTEMPTS)]  # each its own address
        assert hung_up(silent, ATTEMPTS - MAX_PER_OWNER) == ATTEMPTS - MAX_PER_OWNER  # before: 8 (32 held)
        assert served(connect6("fd00:65::1"), bob), "a member from another /64 found no free slot"
    finally:
        server.stop()
