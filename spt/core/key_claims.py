"""Key changes (SPEC.md §6.4): claims made and answered on the join ALPN, and `trust accept`.

A node whose key changed while its subnets stayed (its key file lost or replaced, or
`spt node rekey`) claims, on the join ALPN, that its old key is now this one. Members never apply
a claim by themselves: they refuse the new key, record the claim and raise a `key-change`
notification; a human runs `spt node trust accept` on one member, which proposes a `rekey` entry,
has the claimant countersign it (it does so only for the claim it made), and pushes it like a join.

Anyone can make a claim, so a claim never replaces another (every claim for a key is kept and
listed, and `trust accept` names the exact new key the human compared), repeated claims change
nothing, and claims are capped per key, per subnet and per source address: a flood of claims
costs one notification and a bounded number of rows.

Collaborators: `Net` (the transport), `MemberLinks` (addresses), `LogService` (merging and
pushing the rekey entry) and the daemon parts named in `ClaimsHost`; everything else here is the
claims' own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from spt.core.errors import IdentityError, PeerError, Refusal, RemoteProtocolError
from spt.core.identity import NodeId, NodeKey
from spt.core.net.connections import Connection
from spt.core.net.sources import source_group
from spt.core.net.transport import ALPN_JOIN
from spt.core.proto import join as jp
from spt.core.proto.canonical import canonical_bytes
from spt.core.proto.frames import Frame
from spt.core.proto.membership import REKEY, Entry, countersign_rekey, propose_rekey, sign_rekey_as_old
from spt.core.subnets import HeldSubnet, Notifier

if TYPE_CHECKING:
    from spt.core.members.links import MemberLinks
    from spt.core.members.log_service import LogService
    from spt.core.members.wire import Net
    from spt.core.paths import StatePaths
    from spt.core.proto.membership import MembershipState
    from spt.core.store import Store
    from spt.core.subnets import Subnets

log = logging.getLogger(__name__)

KEY_CLAIM_DOMAIN: Final = b"spt/key-claim/v1"
MAX_PENDING_KEY_CHANGES: Final = 16  # per subnet (§6.4)
MAX_CLAIMS_PER_KEY: Final = 4  # different new keys claiming one old key, kept side by side
MAX_CLAIMS_PER_SOURCE: Final = 4  # new claims one source address may record per window
SOURCE_WINDOW: Final = 600.0  # seconds
KEY_CLAIM_ROUNDS: Final = 6  # a claim is re-sent to members that did not take it, backing off
RECONNECT_MIN: Final = 1.0
RECONNECT_MAX: Final = 60.0
DIAL_TIMEOUT: Final = 5.0
REQUEST_TIMEOUT: Final = 10.0


class ClaimsHost(Notifier, Protocol):
    """What the key claims need of the daemon."""

    key: NodeKey
    paths: StatePaths
    store: Store
    subnets: Subnets


class KeyClaims:
    """The claimant's side (claims to send, countersigning) and the member's (recording, listing,
    accepting)."""

    def __init__(self, host: ClaimsHost, net: Net, links: MemberLinks, logs: LogService) -> None:
        self.host = host
        self.net = net
        self.links = links
        self.logs = logs
        self.store = host.store
        self.subnets = host.subnets
        self._by_source: dict[str, deque[float]] = {}

    # -- the claimant ----------------------------------------------------------------------

    def to_claim(self) -> list[tuple[HeldSubnet, NodeId]]:
        """The (subnet, old key) pairs this node must claim: called once at start.

        The key the store last ran with is kept in meta `node_key`; a held subnet in which this
        key is not a member but that key (or the one an earlier claim named) is, needs a claim.
        """
        store = self.store
        me = self.host.key.node_id
        previous = store.get_meta("node_key")
        claims: list[tuple[HeldSubnet, NodeId]] = []
        with store.transaction():
            for sub in self.subnets.held.values():
                meta_key = f"key_claim:{sub.id.hex()}"
                st = sub.state()
                if st.is_member(me):
                    store.db.execute("DELETE FROM meta WHERE key=?", (meta_key,))
                    continue
                earlier = store.get_meta(meta_key)
                old_hex = json.loads(earlier)["old"] if earlier else previous
                if not old_hex:
                    continue
                old = NodeId.from_hex(old_hex)
                if old == me or not st.is_member(old):
                    continue
                store.set_meta(meta_key, json.dumps({"old": old.hex, "new": me.hex}))
                claims.append((sub, old))
            store.set_meta("node_key", me.hex)
        if not claims:
            self.forget_old_key()
        for sub, old in claims:
            log.warning("this node's key changed; claiming the new key", extra={"subnet": sub.name, "old": old.short, "new": me.short})
        return claims

    def claim_body(self, sub: HeldSubnet, old: NodeId) -> dict[str, Any]:
        me = self.host.key
        body = {"subnet": sub.id.hex(), "old": old.hex, "new": me.node_id.hex}
        claim = {**body, "sig": me.sign(claim_bytes(body)).hex()}
        old_key = self.old_key(old)
        if old_key is not None:
            claim["oldsig"] = old_key.sign(claim_bytes(body)).hex()
        return claim

    @property
    def _old_key_file(self) -> Path:
        return self.host.paths.key_file.with_name("node.key.old")

    def old_key(self, old: NodeId) -> NodeKey | None:
        """The replaced key after `spt node rekey`, kept (0600) only to sign its claim and rekey."""
        try:
            key = NodeKey.from_private_bytes(self._old_key_file.read_bytes())
        except (FileNotFoundError, IdentityError):
            return None
        return key if key.node_id == old else None

    def forget_old_key(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._old_key_file.unlink()

    def rekey(self) -> NodeKey:
        """`spt node rekey`: write a new key file, keeping the old one to sign the claims.

        Takes effect when the daemon restarts; the claims go out then (`to_claim`).
        """
        if self.store.query("SELECT 1 FROM meta WHERE key LIKE 'key_claim:%'"):
            raise Refusal("REKEY_PENDING", self.host.key.node_id.short,
                          "an earlier key change still waits for a member's `spt node trust accept`")
        path = self.host.paths.key_file
        new = NodeKey.generate()
        self.forget_old_key()
        write_private(self._old_key_file, self.host.key.private_bytes())
        tmp = path.with_name(path.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        write_private(tmp, new.private_bytes())
        os.replace(tmp, path)
        log.warning("node key replaced; the daemon restarts to use it", extra={"new": new.node_id.short})
        return new

    async def send(self, claims: Sequence[tuple[HeldSubnet, NodeId]]) -> None:
        """Offer each claim to every other member, again (backing off) to those that missed it."""
        todo = {(sub.id, node): (sub, old) for sub, old in claims for node in sub.state().members if node != old}
        delay = RECONNECT_MIN
        for _ in range(KEY_CLAIM_ROUNDS):
            keys = list(todo)
            results = await asyncio.gather(*(self._send_one(node, *todo[(sid, node)]) for sid, node in keys))
            for key, taken in zip(keys, results, strict=True):
                if taken:
                    del todo[key]
            if not todo or self.net.closing:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 4, RECONNECT_MAX)

    async def _send_one(self, node: NodeId, sub: HeldSubnet, old: NodeId) -> bool:
        addrs = self.links.addresses_of(node)
        if not addrs:
            return True  # nothing to dial; another member will have to vouch
        try:
            conn = await self.net.transport.connect(node, addrs, alpn=ALPN_JOIN, timeout=DIAL_TIMEOUT)
            try:
                reply = await conn.request("key.claim", self.claim_body(sub, old), timeout=REQUEST_TIMEOUT)
            finally:
                conn.close("claim done")
        except (PeerError, TimeoutError, RemoteProtocolError) as exc:
            log.info("key-change claim did not reach a member", extra={"peer": node.short, "reason": str(exc)})
            return False
        log.info("key-change claim offered", extra={"peer": node.short, "subnet": sub.name, "answer": reply.type})
        return True

    async def handle_countersign(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        """The claimant's side of `trust accept`: countersign a rekey only for the claim it made."""
        from spt.core.members import body_map

        body = body_map(frame.body)
        sub = self.net.held(body.get("subnet"))
        claimed = self.store.get_meta(f"key_claim:{sub.id.hex()}") if sub is not None else None
        if sub is None or claimed is None:
            return "error", {"code": "no-claim", "message": "this node made no key-change claim for that subnet"}
        entry = Entry.from_dict(body.get("entry"), proposal=True)
        me = self.host.key.node_id
        ok = (
            entry.type == REKEY
            and entry.author == conn.peer
            and entry.key("new") == me
            and entry.key("old") == NodeId.from_hex(json.loads(claimed)["old"])
            and entry.countersig is None
            and entry.author.verify(entry.sig, entry.signed_bytes())
            and sub.state().is_member(entry.author)
        )
        if not ok:
            return "error", {"code": "not-my-claim", "message": "that rekey is not the change this node claimed"}
        signed = countersign_rekey(entry, self.host.key)
        old_key = self.old_key(entry.key("old"))
        if old_key is not None:
            signed = sign_rekey_as_old(signed, old_key)
        self.logs.merge(sub, [signed])
        log.info("rekey countersigned", extra={"subnet": sub.name, "by": conn.peer.short})
        return "ok", {"entry": signed.to_dict()}

    # -- the member ------------------------------------------------------------------------

    def _source_allows(self, host: str, now: float) -> bool:
        """At most MAX_CLAIMS_PER_SOURCE new claims per source (`source_group`) per window."""
        times = self._by_source.setdefault(host, deque())
        while times and times[0] < now - SOURCE_WINDOW:
            times.popleft()
        if len(self._by_source) > 4096:  # forget quiet sources rather than grow without bound
            for quiet in [h for h, t in self._by_source.items() if not t and h != host]:
                del self._by_source[quiet]
        if len(times) >= MAX_CLAIMS_PER_SOURCE:
            return False
        times.append(now)
        return True

    async def handle_claim(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        from spt.core.members import body_map

        body = body_map(frame.body)
        sub = self.net.held(body.get("subnet"))
        if sub is None or not sub.attached:
            return "error", {"code": "not-here", "message": "this node does not serve that subnet"}
        old, new = node_field(body.get("old")), node_field(body.get("new"))
        if new != conn.peer:
            raise RemoteProtocolError("key.claim", "a key-change claim is made by the new key itself")
        signed = {"subnet": sub.id.hex(), "old": old.hex, "new": new.hex}
        if not new.verify(sig_field(body.get("sig")), claim_bytes(signed)):
            raise RemoteProtocolError("key.claim", "the new key's signature does not verify")
        old_signed = body.get("oldsig") is not None and old.verify(sig_field(body.get("oldsig")), claim_bytes(signed))
        st = sub.state()
        if not st.is_member(old) or old == self.host.key.node_id:
            # §9.8: a key that was pruned or left never comes back through a claim
            return "error", {"code": "not-a-member", "message": f"refused: {st.standing(old)}"}
        if new in st.members or new in st.former:
            return "error", {"code": "known-key", "message": "that key already has a standing in this subnet"}
        rows = self.store.query("SELECT old, new FROM key_changes WHERE subnet=?", (sub.id,))
        if any(bytes(r["old"]) == old.raw and bytes(r["new"]) == new.raw for r in rows):
            return "ok", {"pending": True}  # a repeat changes nothing and tells nobody again
        same_old = sum(1 for r in rows if bytes(r["old"]) == old.raw)
        if len(rows) >= MAX_PENDING_KEY_CHANGES or same_old >= MAX_CLAIMS_PER_KEY:
            return "error", {"code": "too-many", "message": "too many key changes pending in this subnet"}
        host, port = conn.remote_addr
        now = time.time()
        if not self._source_allows(source_group(host), now):
            return "error", {"code": "too-many", "message": "too many key-change claims from this address; try later"}
        with self.store.transaction():
            self.store.db.execute(
                "INSERT OR IGNORE INTO key_changes(subnet, old, new, since, old_signed, source) VALUES(?,?,?,?,?,?)",
                (sub.id, old.raw, new.raw, now, int(old_signed), host),
            )
        self.links.remember_address(new, host, port, "claim")
        label = st.members[old]
        log.warning(
            "a member claims a new key; refused until accepted",
            extra={"subnet": sub.name, "node": old.display(label), "new": new.short, "source": host},
        )
        if same_old:
            return "ok", {"pending": True}  # the human was told already; the list shows every claim
        self.host.notify(
            sub, "key-change", f"{label} in {sub.name} presents a new key",
            f"old {old.fingerprint}, new {new.fingerprint}. Compare with `spt node show` on that machine, then "
            f"`spt node trust accept {label}` (or `spt node trust reject {label}`). Other claims for the same node, "
            "if any arrive, are listed by `spt node trust list`.",
            event=f"{old.hex}>{new.hex}",  # every member sees the claim: one notification for it
        )
        return "ok", {"pending": True}

    def pending(self, sub: HeldSubnet | None = None) -> list[dict[str, Any]]:
        """Pending claims (of every held subnet, or one), oldest first."""
        out = []
        rows = self.store.query("SELECT subnet, old, new, since, old_signed FROM key_changes ORDER BY since, new")
        for row in rows:
            held = self.subnets.held.get(bytes(row["subnet"]))
            if held is None or (sub is not None and held.id != sub.id):
                continue
            old, new = NodeId(bytes(row["old"])), NodeId(bytes(row["new"]))
            label = held.state().members.get(old)
            if label is None:
                continue  # the old key is gone (pruned, left, rekeyed): the claim is moot
            out.append({
                "subnet": held.name, "old": old.hex, "new": new.hex, "since": jp.iso_utc(int(float(row["since"]) * 1000)),
                "old_key_signed": bool(row["old_signed"]), "label": label,
            })
        return out

    def resolve(self, qualifier: str, subnet: str | None, new_hex: str | None = None) -> tuple[HeldSubnet, NodeId, NodeId]:
        """The one pending claim `qualifier` names (the old label or key prefix, or the new key
        prefix), narrowed to the exact new key `new_hex` when given."""
        sub = self.subnets.require(subnet) if subnet else None
        pending = self.pending(sub)
        q = qualifier.lower()
        matches = [p for p in pending if p["label"].lower() == q or p["old"].startswith(q) or p["new"].startswith(q)]
        if not matches:
            raise Refusal("NO_SUCH_CLAIM", qualifier, "no pending key change names that node; see spt node trust list")
        if new_hex is not None:
            matches = [p for p in matches if p["new"] == new_hex.lower()]
            if not matches:
                raise Refusal("CLAIM_CHANGED", qualifier,
                              "the claim you compared is no longer pending; run spt node trust accept again")
        if len({p["subnet"] for p in matches}) > 1:
            raise Refusal("SUBNET_REQUIRED", qualifier, "key changes are pending in several subnets; pass --subnet",
                          lines=[f"  {p['subnet']}" for p in matches])
        if len(matches) > 1:
            raise Refusal("AMBIGUOUS_NODE", qualifier, "several new keys claim that node; name one by its new key prefix",
                          lines=[f"  {NodeId.from_hex(p['old']).display(p['label'])} -> {p['new'][:16]}" for p in matches])
        found = matches[0]
        held = self.subnets.require(found["subnet"])
        return held, NodeId.from_hex(found["old"]), NodeId.from_hex(found["new"])

    def membership_changed(self, sub: HeldSubnet, before: MembershipState, after: MembershipState) -> None:
        """Settle claims the change made moot; once this node's own claim took effect everywhere
        it was made, the replaced key is no longer needed."""
        me = self.host.key.node_id
        self.settle(sub, after)
        if after.is_member(me) and not before.is_member(me):
            self.store.db.execute("DELETE FROM meta WHERE key=?", (f"key_claim:{sub.id.hex()}",))
            if not self.store.query("SELECT 1 FROM meta WHERE key LIKE 'key_claim:%'"):
                self.forget_old_key()

    def settle(self, sub: HeldSubnet, st: Any) -> None:
        """Claims whose old key is no longer a member (rekeyed elsewhere, pruned, left) are moot."""
        rows = self.store.query("SELECT DISTINCT old FROM key_changes WHERE subnet=?", (sub.id,))
        gone = [bytes(r["old"]) for r in rows if not st.is_member(NodeId(bytes(r["old"])))]
        if gone:
            with self.store.transaction():
                for old in gone:
                    self.store.db.execute("DELETE FROM key_changes WHERE subnet=? AND old=?", (sub.id, old))

    def drop(self, sub: HeldSubnet, old: NodeId, new: NodeId | None = None) -> None:
        """Drop one claim (`trust reject`), or every claim for `old` (once one was accepted)."""
        with self.store.transaction():
            if new is None:
                self.store.db.execute("DELETE FROM key_changes WHERE subnet=? AND old=?", (sub.id, old.raw))
            else:
                self.store.db.execute("DELETE FROM key_changes WHERE subnet=? AND old=? AND new=?", (sub.id, old.raw, new.raw))

    async def accept(self, sub: HeldSubnet, old: NodeId, new: NodeId) -> str:
        """Append the `rekey` entry, countersigned by the claimant, and push it; the new display form."""
        from spt.core.members import body_map

        me = self.host.key
        entry = propose_rekey(me, parents=sub.log.essential_parents(me.node_id, old), old=old, new=new, hlc=self.subnets.stamp())
        addrs = self.links.addresses_of(new)
        if not addrs:
            raise Refusal("TRUST_FAILED", new.short, "no known address for the claiming node")
        try:
            conn = await self.net.transport.connect(new, addrs, alpn=ALPN_JOIN, timeout=DIAL_TIMEOUT)
            try:
                reply = await conn.request(
                    "key.countersign", {"subnet": sub.id.hex(), "entry": entry.to_dict()}, timeout=REQUEST_TIMEOUT
                )
            finally:
                conn.close("countersign done")
        except (PeerError, TimeoutError) as exc:
            raise Refusal("TRUST_FAILED", new.short, f"the claiming node did not answer: {exc}") from None
        if reply.type != "ok":
            raise Refusal("TRUST_FAILED", new.short, f"the claiming node refused to countersign: {body_map(reply.body).get('message', '')}")
        signed = Entry.from_dict(body_map(reply.body).get("entry"))
        if signed.to_dict() | {"countersig": None, "oldsig": None} != entry.to_dict() | {"countersig": None, "oldsig": None}:
            raise RemoteProtocolError("key.countersign", "the countersigned entry is not the one proposed")
        label = sub.state().members.get(old, "")
        self.logs.merge(sub, [signed])
        if not sub.state().is_member(new):
            raise Refusal("TRUST_FAILED", new.short, "the rekey entry did not take effect")
        self.drop(sub, old)
        log.info("key change accepted", extra={"subnet": sub.name, "old": old.short, "new": new.display(label)})
        await self.logs.push_entries(sub, [signed])
        return new.display(label)


def write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def claim_bytes(body: Mapping[str, Any]) -> bytes:
    """What a key-change claim's signatures cover: subnet id, old and new key."""
    return KEY_CLAIM_DOMAIN + canonical_bytes({k: body[k] for k in ("subnet", "old", "new")})


def node_field(value: Any) -> NodeId:
    try:
        return NodeId.from_hex(str(value))
    except (ValueError, IdentityError):
        raise RemoteProtocolError("key", "a node key is 64 hex digits") from None


def sig_field(value: Any) -> bytes:
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != 64:
        raise RemoteProtocolError("sig", "a signature is 64 bytes as hex")
    return raw
