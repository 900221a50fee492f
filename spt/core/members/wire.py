"""What every part of the member network shares: timeouts, the shape checks of request bodies,
and `Net`, the narrow view of the member network each part is given (not the whole daemon)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Final, Protocol

from spt.core.errors import Refusal, RemoteProtocolError, SptError
from spt.core.identity import NodeId
from spt.core.net.connections import Connection, RequestError
from spt.core.proto.membership import HASH_BYTES, Entry
from spt.core.subnets import HeldSubnet

if TYPE_CHECKING:
    from spt.core.net.transport import Transport

Address = tuple[str, int]

STREAM_TIMEOUT: Final = 15.0  # seconds a peer may take for one message of a multi-step exchange
REQUEST_TIMEOUT: Final = 10.0
DIAL_TIMEOUT: Final = 5.0
MAX_SYNC_ENTRIES: Final = 4096  # entries one sync answer carries at most (§6.3 "a bounded amount")


class Net(Protocol):
    """The member network as its parts see it: the transport (replaced at start when the
    configured port is taken, so always read it here), background tasks, and who is a member."""

    @property
    def transport(self) -> Transport: ...

    @property
    def closing(self) -> bool: ...

    def spawn(self, coro: Awaitable[Any], what: str) -> None: ...

    def shared_subnets(self, peer: NodeId) -> list[HeldSubnet]: ...

    def require_member(self, conn: Connection, subnet_hex: Any) -> HeldSubnet: ...

    def held(self, subnet_hex: Any) -> HeldSubnet | None: ...


def remote_refusal(exc: RequestError, address: str) -> SptError:
    """A member's refusal (an `error` reply carrying a token), re-raised here with that token.

    NO_PERCH names the address as the user typed it; other tokens keep the peer's subject.
    """
    if exc.code == "NO_PERCH":
        return Refusal("NO_PERCH", address)
    head, _, detail = exc.remote_message.partition(" ")
    token, _, subject = head.partition(":")
    if exc.code and token == exc.code:
        return Refusal(token, subject, detail)
    return Refusal(exc.code or "REFUSED", "", exc.remote_message)


def body_map(value: Any) -> dict[str, Any]:
    """A request or reply body that must be a map; RemoteProtocolError otherwise."""
    if not isinstance(value, dict):
        raise RemoteProtocolError("body", "expected a map")
    return value


def entries_of(value: Any) -> list[Entry]:
    """The `entries` of a sync answer or push: at most MAX_SYNC_ENTRIES parsed entries."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_SYNC_ENTRIES:
        raise RemoteProtocolError("entries", f"expected a list of at most {MAX_SYNC_ENTRIES} entries")
    return [Entry.from_dict(v) for v in value]


def heads_of(value: Any) -> list[bytes]:
    """The `heads` of a log sync request or answer: at most MAX_SYNC_ENTRIES entry hashes as hex;
    RemoteProtocolError otherwise (a handler must refuse a body, never fail on it)."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_SYNC_ENTRIES:
        raise RemoteProtocolError("heads", f"expected a list of at most {MAX_SYNC_ENTRIES} entry hashes")
    out = []
    for head in value:
        if not isinstance(head, str) or len(head) != 2 * HASH_BYTES:
            raise RemoteProtocolError("heads", "a head is an entry hash as 64 hex digits")
        try:
            out.append(bytes.fromhex(head))
        except ValueError:
            raise RemoteProtocolError("heads", "a head is an entry hash as 64 hex digits") from None
    return out


def full_of(value: Any) -> bool:
    """The `full` of a log sync request or answer: the sender's log takes only prunes, leaves,
    rekeys and rotations (`MembershipLog.is_full`). Absent is false."""
    if value is None or isinstance(value, bool):
        return bool(value)
    raise RemoteProtocolError("full", "expected true or false")


def loads(raw: bytes) -> Any:
    from spt.core.proto.canonical import parse_canonical

    return parse_canonical(raw)
