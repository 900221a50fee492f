"""The direct TCP data path: AEAD frames keyed over the pinned QUIC channel.

The receiver makes a fresh 32-byte key for each `file.open` and hands it to the sender over the
member connection, which is already mutually authenticated and encrypted. A TCP connection then
opens with a clear header (magic, version, transfer id, the client's random salt); the server
answers with its own salt. Both sides derive one AES-256-GCM key per direction from the transfer
key and both salts (HKDF-SHA256), so no two connections ever share a key, and a replayed
connection fails at the first frame. Nonces are per-direction counters, never sent.

A frame is a 12-byte clear header (ciphertext length, file index, chunk index: u32 each,
big-endian), authenticated as the associated data, then the ciphertext of the payload; keeping
the indexes out of the plaintext saves two copies of every chunk. File index `CONTROL` marks
control frames (hello, ok, end, end-ack). A frame that fails authentication ends the
connection: a party without the key can neither inject nor alter data, nor move it elsewhere.

What lives here: key derivation, sealing and opening, and blocking-socket helpers. Threads and
files are the service's business.

Speed: frames are sealed and opened into buffers allocated once per connection
(`encrypt_into` / `decrypt_into`). Allocating a fresh 1 MiB object per frame cost more than the
cipher itself (page faults on every new mapping): 4-8x slower per byte on the bench machine.
The receiver's buffers lie on huge pages where the kernel gives them (`page_buffers`).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import ssl
import struct
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from spt.core.errors import RemoteProtocolError
from spt_filetransfer.manifest import CHUNK

__all__ = [
    "CONTROL",
    "ChannelError",
    "Receiver",
    "Sender",
    "client_header",
    "derive_keys",
    "read_client_header",
]

MAGIC: Final = b"SPTF"
VERSION: Final = 1
SALT: Final = 16
TID_BYTES: Final = 16
KEY_BYTES: Final = 32
HEADER_LEN: Final = len(MAGIC) + 1 + TID_BYTES + SALT
CONTROL: Final = 0xFFFFFFFF
HELLO: Final = 0
OK: Final = 1
END: Final = 2
END_ACK: Final = 3
MAX_FRAME: Final = CHUNK + 16 + 64
_HEAD = struct.Struct(">III")


class ChannelError(RemoteProtocolError):
    """The data connection broke its framing or failed authentication."""

    token = "DATA_CHANNEL"


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def derive_keys(key: bytes, tid: bytes, client_salt: bytes, server_salt: bytes) -> tuple[bytes, bytes]:
    """(client→server key, server→client key) for one TCP connection."""
    okm = HKDF(
        algorithm=hashes.SHA256(), length=2 * KEY_BYTES, salt=client_salt + server_salt,
        info=b"spt-file/1 data " + tid,
    ).derive(key)
    return okm[:KEY_BYTES], okm[KEY_BYTES:]


def client_header(tid: bytes, salt: bytes) -> bytes:
    return MAGIC + bytes([VERSION]) + tid + salt


def read_client_header(data: bytes) -> tuple[bytes, bytes]:
    """(transfer id, client salt) from the clear header; ChannelError when it is not ours."""
    if len(data) != HEADER_LEN or data[:4] != MAGIC or data[4] != VERSION:
        raise ChannelError("header", "not an spt file data connection (or another version)")
    return data[5 : 5 + TID_BYTES], data[5 + TID_BYTES :]


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from `sock`; ConnectionError when the peer closed first."""
    got = 0
    size = len(view)
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise ConnectionError("the data connection closed")
        got += n


class Sender:
    """Seals frames in one direction; the nonce is a 4-byte direction tag and a 64-bit counter."""

    def __init__(self, key: bytes, direction: int) -> None:
        self._aead = AESGCM(key)
        self._prefix = _NONCE_PREFIX[direction]
        self._count = 0
        self._out = bytearray(MAX_FRAME)

    def seal(self, file_index: int, chunk_index: int, payload: bytes | memoryview = b"") -> tuple[bytes, memoryview]:
        """(clear header, ciphertext) of one frame; the ciphertext is valid until the next seal."""
        if len(payload) + 16 > MAX_FRAME:
            raise ValueError(f"a payload of {len(payload)} bytes does not fit in one frame")
        nonce = self._prefix + self._count.to_bytes(8, "big")
        self._count += 1
        header = _HEAD.pack(len(payload) + 16, file_index, chunk_index)
        sealed = memoryview(self._out)[: len(payload) + 16]
        self._aead.encrypt_into(nonce, payload, header, sealed)
        return header, sealed

    def frame(self, file_index: int, chunk_index: int, payload: bytes | memoryview = b"") -> bytes:
        header, sealed = self.seal(file_index, chunk_index, payload)
        return header + bytes(sealed)

    def send(self, sock: socket.socket, file_index: int, chunk_index: int, payload: bytes | memoryview = b"") -> None:
        header, sealed = self.seal(file_index, chunk_index, payload)
        if isinstance(sock, ssl.SSLSocket):  # a relay transit: TLS sockets have no sendmsg
            sock.sendall(header)
            sock.sendall(sealed)
            return
        sent = sock.sendmsg([header, sealed])  # one system call, no joined copy
        if sent < len(header):
            sock.sendall(header[sent:])
            sock.sendall(sealed)
        elif sent < len(header) + len(sealed):
            sock.sendall(sealed[sent - len(header) :])


class Receiver:
    """Reads and opens frames in one direction into buffers allocated once.

    Payloads are opened into a ring of `buffers` buffers: a payload stays valid for the next
    `buffers - 1` calls to `recv`, so a consumer may hold up to that many (the service's write
    queue is sized from it).
    """

    def __init__(self, key: bytes, direction: int, buffers: int = 2) -> None:
        self._aead = AESGCM(key)
        self._prefix = _NONCE_PREFIX[direction]
        self._count = 0
        self._head = bytearray(_HEAD.size)
        # page-aligned: a payload can be written to disk with O_DIRECT
        self._buf, *self._out = page_buffers(1 + max(1, buffers), MAX_FRAME)
        self._next = 0

    def recv(self, sock: socket.socket) -> tuple[int, int, memoryview]:
        """(file index, chunk index, payload) of the next frame; ChannelError on forgery."""
        recv_exact(sock, memoryview(self._head))
        size, file_index, chunk_index = _HEAD.unpack(self._head)
        if not 16 <= size <= MAX_FRAME:
            raise ChannelError("frame", f"frame of {size} bytes is out of bounds")
        view = self._buf[:size]
        recv_exact(sock, view)
        nonce = self._prefix + self._count.to_bytes(8, "big")
        self._count += 1
        payload = self._out[self._next][: size - 16]
        self._next = (self._next + 1) % len(self._out)
        try:
            self._aead.decrypt_into(nonce, view, bytes(self._head), payload)
        except InvalidTag:
            raise ChannelError("frame", "a data frame failed authentication (wrong key or altered)") from None
        return file_index, chunk_index, payload


def page_buffers(count: int, size: int) -> list[memoryview]:
    """`count` page-aligned buffers of `size` bytes in one private anonymous map (plain memory,
    not shared pages), backed by huge pages where the kernel gives them (MADV_HUGEPAGE):
    pinning a payload for an O_DIRECT write then takes one entry per 2 MiB instead of one per
    4 KiB page, and copying, opening and hashing it miss the TLB less (docs/design/bulk-path.md)."""
    stride = -(-size // _PAGE) * _PAGE
    whole = mmap.mmap(-1, -(-count * stride // _HUGE) * _HUGE, flags=_PRIVATE)
    with contextlib.suppress(AttributeError, OSError):  # no such advice here: small pages
        whole.madvise(mmap.MADV_HUGEPAGE)
    view = memoryview(whole)
    return [view[i * stride : i * stride + size] for i in range(count)]


_NONCE_PREFIX: Final = {0: b"c2s\0", 1: b"s2c\0"}
_PRIVATE: Final = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
_PAGE: Final = mmap.PAGESIZE
_HUGE: Final = 2 << 20  # a map of whole huge pages (x86-64, arm64 with 4 KiB pages)
C2S: Final = 0
S2C: Final = 1
