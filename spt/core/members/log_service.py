"""The membership log as a service: merging what members send and relaying what is new,
comparing logs on a connection, the seed that follows each rotation, prune and leave, and the
prune conflicts a human must see.

The rules (what is stored, what is valid) are `spt.core.proto.membership`'s; this part moves
entries between the network, the log and the store, and tells the daemon what changed.
Collaborators: `Net`, `MemberLinks` (dialling), an `on_change` callback (the key claims settle on
every change) and the daemon parts named in `LogHost`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from spt.core.errors import PeerError, Refusal, RemoteProtocolError, SptError
from spt.core.identity import NodeId, NodeKey
from spt.core.members.links import MemberLinks
from spt.core.members.wire import (
    DIAL_TIMEOUT,
    MAX_SYNC_ENTRIES,
    REQUEST_TIMEOUT,
    Net,
    body_map,
    entries_of,
    full_of,
    heads_of,
)
from spt.core.net.connections import Connection, ConnectionClosedError
from spt.core.net.transport import ALPN_MEMBER
from spt.core.proto.frames import Frame
from spt.core.proto.membership import (
    Entry,
    MembershipState,
    PruneConflict,
    make_leave,
    make_prune,
    make_seed_rotate,
)
from spt.core.proto.resolve import NodeInfo, resolve_node
from spt.core.proto.totp import SEED_BYTES, Secret, new_seed, seed_commitment
from spt.core.subnets import HeldSubnet, Notifier, Subnets

if TYPE_CHECKING:
    from spt.core.store import Store

log = logging.getLogger(__name__)


class LogHost(Notifier, Protocol):
    """What the log service needs of the daemon."""

    store: Store
    key: NodeKey
    subnets: Subnets

    def departed(self, sub: HeldSubnet, reason: str) -> list[str]: ...

    def membership_changed(self, sub: HeldSubnet) -> None: ...


class LogService:
    """Every held subnet's log on the network: merge, relay, sync, seeds, prune, leave."""

    def __init__(
        self, host: LogHost, net: Net, links: MemberLinks,
        on_change: Callable[[HeldSubnet, MembershipState, MembershipState], None],
    ) -> None:
        self.host = host
        self.net = net
        self.links = links
        self._on_change = on_change  # before the daemon hears of it (the key claims settle here)

    async def sync_log(self, conn: Connection, sub: HeldSubnet) -> None:
        """Exchange log heads for one subnet; fetch and push what is missing. Each side says
        whether its log is full: a full one is sent only what it can still store."""
        reply = await conn.request(
            "log.sync", {"subnet": sub.id.hex(), "heads": [h.hex() for h in sub.log.heads()], "full": sub.log.is_full()},
            timeout=REQUEST_TIMEOUT,
        )
        body = body_map(reply.body)
        received = entries_of(body.get("entries"))
        stored = self.merge_from(conn, sub, received)
        their_heads = heads_of(body.get("heads"))
        theirs_missing = sub.log.entries_since(their_heads, limit=MAX_SYNC_ENTRIES, essential_only=full_of(body.get("full")))
        if theirs_missing:
            await conn.request(
                "log.push", {"subnet": sub.id.hex(), "entries": [e.to_dict() for e in theirs_missing]},
                timeout=REQUEST_TIMEOUT,
            )
        log.debug("log synced", extra={
            "subnet": sub.name, "peer": conn.peer.short, "received": len(received), "stored": len(stored), "sent": len(theirs_missing),
        })

    async def handle_log_sync(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        body = body_map(frame.body)
        sub = self.net.require_member(conn, body.get("subnet"))
        heads = heads_of(body.get("heads"))
        entries = sub.log.entries_since(heads, limit=MAX_SYNC_ENTRIES, essential_only=full_of(body.get("full")))
        log.debug("log sync answered", extra={"subnet": sub.name, "peer": conn.peer.short, "sent": len(entries)})
        return "log.entries", {
            "entries": [e.to_dict() for e in entries], "heads": [h.hex() for h in sub.log.heads()], "full": sub.log.is_full(),
        }

    async def handle_log_push(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        body = body_map(frame.body)
        # The dispatcher checked the pusher is a member now (a pruned node learns of its prune from
        # the member that pruned it, which pushes before merging).
        sub = self.net.require_member(conn, body.get("subnet"))
        self.merge_from(conn, sub, entries_of(body.get("entries")))
        return "ok", {}


    def merge(self, sub: HeldSubnet, entries: Sequence[Entry]) -> list[Entry]:
        """Merge verified entries, persist them, and act on membership changes; the ones added."""
        if not entries:
            return []
        before = sub.state()
        result = sub.log.merge(entries)
        for h, why in result.refused:
            log.warning("log entry refused", extra={"subnet": sub.name, "entry": h.hex()[:12], "reason": why})
        for h, why in result.dropped:
            log.info("log entry not stored", extra={"subnet": sub.name, "entry": h.hex()[:12], "reason": why})
        if result.conflicts:
            try:
                self.prune_conflicts(sub, result.conflicts)
            except SptError:  # telling the human must not stop the merge
                log.exception("prune conflict not recorded", extra={"subnet": sub.name})
        if not result.added:
            return []
        # what the log stored, not only what was sent: entries that waited for parents from an
        # earlier merge, and dropped ones a member's entry brought in, must reach the store too
        # (or a restart loses them and the entries built on them wait for parents again)
        added = [e for e in map(sub.log.get, result.added) if e is not None]
        with self.host.store.transaction():
            self.host.subnets.save_entries(sub, added)
        for entry in added:  # our later entries order after these, whatever our clock says (§2.10)
            self.host.subnets.observe(entry.hlc)
        after = sub.state()
        self._membership_changed(sub, before, after)
        return added

    def merge_from(self, conn: Connection, sub: HeldSubnet, entries: Sequence[Entry]) -> list[Entry]:
        """Merge entries a member sent, and pass the ones new here to the other members this node
        is connected to: an author pushes once, to the members it knows then, so a member admitted
        meanwhile (or one its push missed) would otherwise learn them only at its next reconnect.
        Each node forwards an entry once, when it first stores it, so the flood ends. Returns
        the entries stored here."""
        added = self.merge(sub, entries)
        if not added:
            return added
        body = {"subnet": sub.id.hex(), "entries": [e.to_dict() for e in added]}
        members = sub.state().members
        for other in self.net.transport.connections():
            if other.alpn == ALPN_MEMBER and other.peer != conn.peer and other.peer in members:
                self.net.spawn(self.push_one(other.peer, "log.push", body), "forward log entries")
        return added

    def prune_conflicts(self, sub: HeldSubnet, conflicts: Iterable[PruneConflict]) -> None:
        """Record prunes this log refused because histories disagree on who was removed first,
        once per (author, target), and tell the human: the log never picks by seniority."""
        store = self.host.store
        meta_key = f"prune_conflicts:{sub.id.hex()}"
        known = json.loads(store.get_meta(meta_key) or "[]")
        pairs = {(c["author"], c["target"]) for c in known}
        fresh = [c for c in conflicts if (c.author.hex, c.target.hex) not in pairs]
        if not fresh:
            return
        for c in fresh:
            pairs.add((c.author.hex, c.target.hex))
            known.append({"author": c.author.hex, "target": c.target.hex, "entry": c.entry.hex(), "time": time.time()})
        store.set_meta(meta_key, json.dumps(known[-64:]))
        st = sub.state()
        for c in fresh:
            who = st.former.get(c.author)
            author = c.author.display(who.label if who else st.members.get(c.author, ""))
            gone = st.former.get(c.target)  # a target may have left or been removed since
            target = c.target.display(gone.label if gone else st.members.get(c.target, ""))
            log.warning("prune conflict", extra={"subnet": sub.name, "author": c.author.short, "target": c.target.short})
            self.host.notify(
                sub, "prune-conflict", f"{author} tried to prune {target} in {sub.name}; refused here",
                f"{author} signed a prune of {target} that did not see {author}'s own removal (or that a removed "
                f"node's branch carried). This node kept the history it had first. If {target} should go, "
                f"prune it from a member you trust: `spt subnet prune {c.target.hex[:8]} --subnet {sub.name}`.",
                event=f"prune-conflict:{c.author.hex}>{c.target.hex}",  # members that saw it raise one
            )

    def conflicts_of(self, sub: HeldSubnet) -> list[dict[str, Any]]:
        """Recorded prune conflicts and removals the log holds that void each other."""
        out = [
            {"author": c["author"], "target": c["target"]}
            for c in json.loads(self.host.store.get_meta(f"prune_conflicts:{sub.id.hex()}") or "[]")
        ]
        for h in sorted(sub.state().conflicts):
            entry = sub.log.get(h)
            if entry is not None and entry.subject() is not None:
                out.append({"author": entry.author.hex, "target": (entry.type == "rekey" and entry.key("old").hex) or entry.key().hex})
        return out

    def _membership_changed(self, sub: HeldSubnet, before: MembershipState, after: MembershipState) -> None:
        me = self.host.key.node_id
        self._on_change(sub, before, after)
        if not after.is_member(me) and before.is_member(me):
            reason = after.standing(me)
            log.warning("this node is no longer a member", extra={"subnet": sub.name, "reason": reason})
            self.host.departed(sub, reason)
            return
        removed = [n for n in before.members if n not in after.members]
        for node in removed:
            standing = after.standing(node)
            if standing in ("left", "pruned"):  # §8.4; every member sees it: one notification
                label = before.members[node]
                self.host.notify(
                    sub, f"member-{standing}", f"{label} {standing if standing == 'left' else 'was pruned from'} {sub.name}",
                    f"{node.display(label)} is no longer a member of {sub.name}.", event=f"{standing}:{node.hex}",
                )
            if self.net.shared_subnets(node):
                continue
            for conn in self.net.transport.connections():
                if conn.peer == node:
                    conn.close(after.standing(node))
        if sub.seed is not None and sub.epoch != after.epoch:
            log.info("seed rotated; waiting for the new seed", extra={"subnet": sub.name, "epoch": after.epoch})
        self.links.keep_members_connected()
        self.host.membership_changed(sub)

    async def push_entries(self, sub: HeldSubnet, entries: Sequence[Entry], extra: Iterable[NodeId] = ()) -> None:
        """Push new entries to every member (and `extra` nodes, e.g. the one just pruned)."""
        body = {"subnet": sub.id.hex(), "entries": [e.to_dict() for e in entries]}
        targets = (set(sub.state().members) | set(extra)) - {self.host.key.node_id}
        await asyncio.gather(*(self.push_one(node, "log.push", body) for node in targets))

    async def gossip(self, sub: HeldSubnet, type_name: str, body: Mapping[str, Any]) -> None:
        targets = set(sub.state().members) - {self.host.key.node_id}
        await asyncio.gather(*(self.push_one(node, type_name, body) for node in targets))

    async def push_one(self, node: NodeId, type_name: str, body: Mapping[str, Any]) -> None:
        try:
            conn = self.net.transport.connection(node) or await self.net.transport.connect(
                node, await self.links.dial_addresses(node), timeout=DIAL_TIMEOUT
            )
            await conn.request(type_name, dict(body), timeout=REQUEST_TIMEOUT)
        except (PeerError, TimeoutError, RemoteProtocolError, ConnectionClosedError) as exc:
            log.info("push did not reach a member", extra={"peer": node.short, "what": type_name, "reason": str(exc)})

    # -- seeds (§6.5) -------------------------------------------------------------------------

    async def fetch_seed(self, conn: Connection, sub: HeldSubnet) -> None:
        reply = await conn.request("seed.fetch", {"subnet": sub.id.hex()}, timeout=REQUEST_TIMEOUT)
        if reply.type == "seed":
            self.install_seed(sub, body_map(reply.body))

    def install_seed(self, sub: HeldSubnet, body: Mapping[str, Any]) -> bool:
        epoch, raw = body.get("epoch"), body.get("seed")
        if not isinstance(epoch, int) or not isinstance(raw, bytes) or len(raw) != SEED_BYTES:
            raise RemoteProtocolError("seed", "a seed message carries an integer epoch and 20 bytes")
        seed = Secret(raw)
        if not sub.state().seed_matches(seed, epoch):
            log.warning("a seed that does not match the log's commitment was refused", extra={"subnet": sub.name})
            return False
        sub.seed, sub.epoch = seed, epoch
        with self.host.store.transaction():
            self.host.subnets.save_subnet(sub)
        log.info("seed installed", extra={"subnet": sub.name, "epoch": epoch})
        return True

    async def handle_seed_fetch(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        sub = self.net.require_member(conn, body_map(frame.body).get("subnet"))
        if sub.seed is None or sub.epoch != sub.state().epoch:
            return "no-seed", {}
        return "seed", {"epoch": sub.epoch, "seed": sub.seed.reveal()}

    async def handle_seed_install(self, conn: Connection, frame: Frame) -> tuple[str, Any]:
        body = body_map(frame.body)
        sub = self.net.require_member(conn, body.get("subnet"))
        return "ok", {"installed": self.install_seed(sub, body)}

    # -- prune, leave ---------------------------------------------------------------------------

    def resolve_member(self, sub: HeldSubnet, qualifier: str) -> NodeInfo:
        st = sub.state()
        nodes = [NodeInfo(k, label) for k, label in st.members.items()]
        nodes += [NodeInfo(k, f.label) for k, f in st.former.items() if f.reason != "rekeyed"]
        return resolve_node(qualifier, nodes)

    async def prune(self, sub: HeldSubnet, target: NodeInfo) -> None:
        me = self.host.key
        if target.key == me.node_id:
            raise Refusal("CANNOT_PRUNE_SELF", target.display, "use spt subnet leave on this node")
        prune = make_prune(
            me, parents=sub.log.essential_parents(me.node_id, target.key), target=target.key, hlc=self.host.subnets.stamp()
        )
        # Tell the pruned node first, while its connection is still open, so it learns why it is
        # refused from now on; merging locally closes that connection.
        await self.push_one(target.key, "log.push", {"subnet": sub.id.hex(), "entries": [prune.to_dict()]})
        self.merge(sub, [prune])
        seed = new_seed(os.urandom(SEED_BYTES))
        epoch = sub.state().epoch + 1
        rotate = make_seed_rotate(
            me, parents=sub.log.essential_parents(me.node_id), epoch=epoch,
            commitment=seed_commitment(sub.state().create_nonce, epoch, seed), hlc=self.host.subnets.stamp(),
        )
        self.merge(sub, [rotate])
        if not self.install_seed(sub, {"epoch": epoch, "seed": seed.reveal()}):
            raise Refusal("PRUNE_FAILED", target.display, "the seed rotation did not take effect")
        await self.push_entries(sub, [prune, rotate])
        await self.gossip(sub, "seed.install", {"subnet": sub.id.hex(), "epoch": epoch, "seed": seed.reveal()})
        for conn in self.net.transport.connections():
            if conn.peer == target.key and not self.net.shared_subnets(target.key):
                conn.close("pruned")

    async def leave(self, sub: HeldSubnet) -> None:
        me = self.host.key
        entry = make_leave(me, parents=sub.log.essential_parents(me.node_id, me.node_id), hlc=self.host.subnets.stamp())
        sub.log.merge([entry])
        with self.host.store.transaction():
            self.host.subnets.save_entries(sub, [entry])
        await self.push_entries(sub, [entry])
