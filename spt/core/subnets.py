"""Subnets as the daemon holds them: create, codes, status, detach/attach, and their store rows.

The pure rules live in `spt.core.proto` (membership log, TOTP, join ceremony); this module keeps
each held subnet's log and seed in memory and in the store, and answers the control operations.
The network half (joins, log sync, prune propagation) is in `spt.core.members`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from spt.core.errors import Refusal, RemoteProtocolError, UsageError
from spt.core.identity import NodeId, sha256
from spt.core.proto.hlc import Hlc, HlcTimestamp
from spt.core.proto.membership import Entry, MembershipLog, MembershipState, make_create, subnet_id_of
from spt.core.proto.totp import SEED_BYTES, Secret, code_at, new_seed, otpauth_uri, seconds_left, step_of
from spt.core.types import canonical_subnet_name, check_subnet_name

if TYPE_CHECKING:
    from spt.core.daemon import Call, Daemon

log = logging.getLogger(__name__)

TAG_DOMAIN: Final = b"spt/rendezvous/v1"


def rendezvous_tag(name: str) -> bytes:
    """SPEC.md §5.2: derived from the public name only, never from the code or seed."""
    return sha256(TAG_DOMAIN, canonical_subnet_name(name).encode())[:16]


@dataclass
class HeldSubnet:
    """One subnet this node is a member of."""

    id: bytes
    name: str
    attached: bool
    log: MembershipLog
    seed: Secret[bytes] | None
    epoch: int | None

    @property
    def canonical(self) -> str:
        return self.name.lower()

    @property
    def short_id(self) -> str:
        return self.id.hex()[:8]

    def state(self) -> MembershipState:
        return self.log.state()

    def current_code(self, wall: float) -> tuple[Secret[str], int]:
        """The six digits for now and the seconds they stay valid; requires the current seed."""
        if self.seed is None or self.epoch != self.state().epoch:
            raise Refusal("NO_SEED", self.name, "this node has not received the current seed yet; try again once it has synced")
        return code_at(self.seed, step_of(wall)), seconds_left(wall)


class Notifier(Protocol):
    """Raises notifications for the user (SPEC.md §8.4): what each service's host offers."""

    def notify(
        self, sub: HeldSubnet | None, kind: str, title: str, body: str, *, dedupe_seconds: float = 0,
        event: str | None = None,
    ) -> str | None:
        """Raise one; None when deduplicated. `event` names one event several members observe."""
        ...


class Subnets:
    """The held subnets of one node, loaded from and saved to the store."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.store = daemon.store
        self.held: dict[bytes, HeldSubnet] = {}
        last = self.store.get_meta("hlc")
        self.hlc = Hlc(daemon.key.node_id, HlcTimestamp.from_wire(json.loads(last)) if last else None)
        self._load()

    # -- persistence ----------------------------------------------------------------------

    def _load(self) -> None:
        for row in self.store.query("SELECT id, name, attached, seed, seed_epoch FROM subnets"):
            entries = [Entry.from_bytes(r["data"]) for r in self.store.query("SELECT data FROM log_entries WHERE subnet=?", (row["id"],))]
            sub_log = MembershipLog.from_entries(bytes(row["id"]), entries, stored=True)
            seed = Secret(bytes(row["seed"])) if row["seed"] is not None else None
            self.held[bytes(row["id"])] = HeldSubnet(
                bytes(row["id"]), row["name"], bool(row["attached"]), sub_log, seed, row["seed_epoch"]
            )

    def save_entries(self, sub: HeldSubnet, entries: Iterable[Entry]) -> None:
        """Persist log entries (idempotent); call inside a store transaction."""
        for entry in entries:
            self.store.db.execute(
                "INSERT OR IGNORE INTO log_entries(subnet, hash, data) VALUES(?,?,?)",
                (sub.id, entry.hash, entry.to_bytes()),
            )

    def save_subnet(self, sub: HeldSubnet) -> None:
        """Insert or update the subnet row; call inside a store transaction."""
        self.store.db.execute(
            "INSERT INTO subnets(id, name, canonical, attached, seed, seed_epoch, joined_at) VALUES(?,?,?,?,?,?,?) "
            "ON CONFLICT(id) DO UPDATE SET attached=excluded.attached, seed=excluded.seed, seed_epoch=excluded.seed_epoch",
            (sub.id, sub.name, sub.canonical, int(sub.attached), sub.seed.reveal() if sub.seed else None, sub.epoch, time.time()),
        )

    def forget(self, sub: HeldSubnet) -> None:
        """Delete every trace of a subnet this node no longer belongs to (leave, pruned)."""
        with self.store.transaction():
            self.store.db.execute("DELETE FROM subnets WHERE id=?", (sub.id,))
        self.held.pop(sub.id, None)

    def stamp(self) -> HlcTimestamp:
        """A fresh HLC timestamp, persisted so timestamps keep increasing across restarts (in the
        caller's transaction, if one is open)."""
        ts = self.hlc.now(int(time.time() * 1000))
        self.store.set_meta("hlc", json.dumps(ts.to_wire()))
        return ts

    def observe(self, received: HlcTimestamp) -> None:
        """Absorb a received timestamp, so local events stamped later order after it."""
        with contextlib.suppress(RemoteProtocolError):  # a wild clock ahead is not followed
            self.hlc.update(received, int(time.time() * 1000))

    # -- lookups --------------------------------------------------------------------------

    def by_name(self, name: str) -> HeldSubnet | None:
        canonical = name.lower()
        return next((s for s in self.held.values() if s.canonical == canonical), None)

    def require(self, name: str) -> HeldSubnet:
        sub = self.by_name(check_subnet_name(name))
        if sub is None:
            raise Refusal("NO_SUCH_SUBNET", name, "this node holds no subnet of that name")
        return sub

    def only_or_named(self, name: str | None, token: str = "SUBNET_REQUIRED") -> HeldSubnet:
        """The named subnet, or the only one held; several and no name is a refusal listing them."""
        if name:
            return self.require(name)
        subs = sorted(self.held.values(), key=lambda s: s.canonical)
        if len(subs) == 1:
            return subs[0]
        if not subs:
            raise Refusal("NO_SUCH_SUBNET", "", "this node holds no subnet")
        raise Refusal(token, "", f"this node holds {len(subs)} subnets; name one", lines=[f"  {s.name}" for s in subs])

    def departed(self) -> list[dict[str, Any]]:
        """Subnets this node left or was pruned from, with the reason; listed in status until
        this node joins that subnet again."""
        out = []
        for row in self.store.query("SELECT key, value FROM meta WHERE key LIKE 'departed:%' ORDER BY key"):
            info = json.loads(row["value"])
            out.append({
                "name": info["name"], "id": row["key"].split(":", 1)[1], "attached": False, "standing": info["reason"],
                "nodes": 0, "endpoints": 0, "joins": {"state": "open", "failed_last_hour": 0, "locked_until": None},
            })
        return out

    def attached(self) -> list[HeldSubnet]:
        return [s for s in self.held.values() if s.attached]

    def advertised_tags(self) -> list[bytes]:
        return [rendezvous_tag(s.name) for s in self.attached()]

    def member_subnets(self, node: NodeId) -> list[HeldSubnet]:
        """Attached subnets in which `node` is a current member."""
        return [s for s in self.attached() if s.state().is_member(node)]

    def label_of(self, node: NodeId) -> str | None:
        for sub in self.held.values():
            label = sub.state().members.get(node)
            if label is not None:
                return label
        return None

    # -- local operations -----------------------------------------------------------------

    def create(self, name: str) -> HeldSubnet:
        check_subnet_name(name)
        if self.by_name(name) is not None:
            raise Refusal("NAME_TAKEN", name, "this node already holds a subnet of that name")
        seed = new_seed(os.urandom(SEED_BYTES))
        # one commit (one fsync) for the stamp, the subnet and its first entry
        with self.store.transaction():
            entry = make_create(
                self.daemon.key, name=name, label=self.daemon.label, nonce=os.urandom(16), seed=seed, hlc=self.stamp()
            )
            sub = HeldSubnet(subnet_id_of(entry), name, True, MembershipLog.from_create(entry), seed, 0)
            self.save_subnet(sub)
            self.save_entries(sub, [entry])
        self.held[sub.id] = sub
        log.info("subnet created", extra={"subnet": name, "id": sub.short_id})
        return sub

    def code_answer(self, sub: HeldSubnet) -> dict[str, Any]:
        """What `create`, `show-code` and `prune` print: code, seconds left, URI. Elevated only."""
        wall = time.time()
        code, left = sub.current_code(wall)
        assert sub.seed is not None
        return {
            "name": sub.name,
            "id": sub.short_id,
            "code": code.reveal(),
            "seconds_left": left,
            "uri": otpauth_uri(sub.name, sub.seed).reveal(),
        }

    def set_attached(self, name: str, attached: bool) -> HeldSubnet:
        sub = self.require(name)
        sub.attached = attached
        with self.store.transaction():
            self.save_subnet(sub)
        return sub


def check_join_code(code: str) -> str:
    if len(code) != 6 or not code.isascii() or not code.isdigit():
        raise UsageError("BAD_CODE", "", "a join code is six digits")
    return code


def register_ops(daemon: Daemon, subnets: Subnets) -> None:
    """The control operations on subnets that need no network."""

    @daemon.op("subnet.create", elevated=True)
    async def create(call: Call) -> Any:
        name = check_subnet_name(str(call.args.get("name", "")))
        if not call.args.get("allow_duplicate_name"):
            await daemon.check_name_free(name)
        sub = subnets.create(name)
        homed = daemon.on_first_subnet(sub)
        await daemon.subnets_changed()
        return {**subnets.code_answer(sub), "homed": homed}

    @daemon.op("subnet.show_code", elevated=True)
    async def show_code(call: Call) -> Any:
        return subnets.code_answer(subnets.only_or_named(call.args.get("name")))

    @daemon.op("subnet.status")
    async def status(call: Call) -> Any:
        name = call.args.get("name")
        subs = [subnets.require(name)] if name else sorted(subnets.held.values(), key=lambda s: s.canonical)
        docs = [daemon.subnet_status(s, nodes=bool(call.args.get("nodes")), include_former=bool(call.args.get("all"))) for s in subs]
        if not name:
            docs += subnets.departed()
        return {"subnets": docs}

    @daemon.op("subnet.detach")
    async def detach(call: Call) -> Any:
        sub = subnets.set_attached(str(call.args.get("name", "")), False)
        # §4.8: announce first (presence `detached`), so peers show it at once, then stop serving
        await daemon.messaging.announce(sub)
        daemon.members.links.detached(sub)
        await daemon.subnets_changed()
        return {"name": sub.name}

    @daemon.op("subnet.attach")
    async def attach(call: Call) -> Any:
        sub = subnets.set_attached(str(call.args.get("name", "")), True)
        daemon.members.links.attached(sub)
        daemon.messaging.publish()  # presence no longer `detached`; members get it as they reconnect
        await daemon.subnets_changed()
        return {"name": sub.name}
