"""Endpoints as this node hosts them: perches, local send and ring, and their ops.

What lives here: `Perch` (one row of the `perches` table), `Endpoints` (the service the daemon
builds after its subnets) and `register_ops`, the control operations behind `spt ready`,
`spt send`, `spt ring`, `spt whoami` and `spt endpoint …`. Handing messages out (listeners,
rings waiting for their reply, acknowledgements) is `spt.core.delivery`.

Rules this module keeps (SPEC.md §2.3–2.6, §4.2–4.4; suspend and wake are `spt.core.resting`,
hosted processes `spt.core.hosting`):
1. A perch is created only by its own `ready`, by `fork`, for a sender's own identity on first use
   (`--from`/`SPT_AGENT_ID`, so that replies are held for it), or as a sender's transient `tmp.`
   identity; never for a target (`NO_PERCH`).
2. A message is committed to the perch's spool before any answer; it leaves the spool only as
   `spt.core.delivery` records its acknowledgement.
3. A resting perch accepts no listener, so what was held for it is released once, by the first
   drain after `wake`.
4. Ring replies (§4.3): when B sends to A while A has a ring to B that B received, the message
   is stamped `reply_to` (the oldest such ring, each matched once); delivery hands it to the ring
   while that still waits.

What must not: the network. Remote targets go through the host (`spt.core.endpoints_host`, the
daemon), whose network layer forwards messages and replicates rows; a message its node cannot take
now waits in the outgoing spool.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from spt.core import trace
from spt.core.caller import may_use, restricted_uid
from spt.core.delivery import Delivery
from spt.core.endpoint_views import TRANSIENT_PREFIX, EndpointViews
from spt.core.errors import DaemonDown, PeerError, Refusal, SptError, UsageError
from spt.core.identity import NodeId
from spt.core.proto import deliver as deliver_wire
from spt.core.proto.address import parse_address
from spt.core.proto.body import check_body
from spt.core.proto.envelope import compact_json
from spt.core.proto.registry import check_description
from spt.core.proto.resolve import (
    LocalPerch,
    LocalTarget,
    NodeInfo,
    RemoteTarget,
    Row,
    Snapshot,
    Target,
    resolve,
)
from spt.core.spool import BATCH_HELD_BACK, WINDOWS, Message, OutgoingMessage, Spool, message_from_wire
from spt.core.types import check_endpoint_id, check_seconds
from spt.hooks import IncomingPayload

if TYPE_CHECKING:
    from spt.core.daemon import Call, Daemon
    from spt.core.endpoints_host import EndpointsHost
    from spt.core.subnets import HeldSubnet

log = logging.getLogger(__name__)

STATES: Final = ("active", "dormant", "suspended", "unbound")
RESTING: Final = frozenset({"dormant", "suspended"})
SENT_WAIT: Final = 5.0  # §4.2: SENT when the listener acknowledges within 5 s
TRANSIENT_SECONDS: Final = 3600.0  # §4.3: a transient identity lives 1 h after its ring returns
EXPIRE_EVERY: Final = 60.0  # seconds between sweeps of the 30-day message ids


@dataclass(frozen=True, slots=True)
class Perch:
    """A local instance's durable seat. `home` is a subnet id, None for a homeless perch."""

    id: str
    home: bytes | None
    state: str
    busy: bool
    hosted: bool
    description: str
    transient: bool
    created: float
    owner: int | None = None  # the uid that made it in system mode; None: the daemon's account
    workdir: str | None = None  # the folder it last bound from: where its project is (§2.8)

    @property
    def key(self) -> str:
        """Ids match without regard to case."""
        return self.id.lower()


def _perch(row: Any) -> Perch:
    return Perch(
        id=str(row["id"]),
        home=bytes(row["home"]) if row["home"] is not None else None,
        state=str(row["state"]),
        busy=bool(row["busy"]),
        hosted=bool(row["hosted"]),
        description=str(row["description"]),
        transient=bool(row["transient"]),
        created=float(row["created"]),
        owner=row["owner"],
        workdir=row["workdir"],
    )


class Endpoints:
    """The perches of this node and everything that moves messages in and out of them."""

    def __init__(self, host: EndpointsHost) -> None:
        self.host = host  # the node around this service, only as far as EndpointsHost names
        self.store = host.store
        self.spool = Spool(host.store, host.key.private_bytes())
        self.commits = host.store.group_commit()  # messages arriving together share one fsync
        self.delivery = Delivery(self.spool, self.commits, self, on_listening=self._listening_changed)
        self._claiming: set[str] = set()  # ring ids a reply claimed, until that claim commits
        self._unreachable: set[NodeId] = set()  # logged as unreachable, until a message reaches it again
        self.views = EndpointViews(self)  # what listings and the registry see (read-only)
        self._expired_at = 0.0  # when the 30-day ids were last swept
        self._perch_cache: tuple[int, dict[str, Perch]] | None = None  # (store change count, perches)
        self._settings_cache: tuple[int, dict[str, dict[bytes, tuple[bool, bool]]]] | None = None
        # No ring survives a restart, so transient identities it held start their last hour now.
        with self.store.transaction() as db:
            db.execute(
                "UPDATE perches SET expires=? WHERE transient=1 AND expires IS NULL",
                (time.time() + TRANSIENT_SECONDS,),
            )
        self.housekeeping()

    @property
    def node_id(self) -> NodeId:
        return self.host.key.node_id

    @property
    def closing(self) -> bool:
        return self.delivery.closing

    async def close(self) -> None:
        """At daemon shutdown, before the store closes: end every listener and ring, letting an
        envelope already on its way be acknowledged, so no ack is lost."""
        await self.delivery.close()

    # -- perches --------------------------------------------------------------------------

    def get(self, perch_id: str) -> Perch | None:
        """The local perch `perch_id` (ids match without case), if the current caller may use it:
        in system mode a uid sees only its own perches (spt.core.caller)."""
        # ids are ASCII; SQLite's NOCASE folds ASCII only, so must this lookup
        perch = self._table().get(perch_id.lower()) if perch_id.isascii() else None
        return perch if perch is not None and may_use(perch.owner) else None

    def _table(self) -> dict[str, Perch]:
        """Every perch by lower-case id, in id order. Read again after any write on the store's
        connection (its change count moved), so it is never stale: every perch change goes
        through that connection (the group-commit writer touches only spool tables). Sends and
        arrivals look perches up several times each; this saves a query per look-up."""
        changes = self.store.db.total_changes
        if self._perch_cache is None or self._perch_cache[0] != changes:
            rows = self.store.query("SELECT * FROM perches ORDER BY id")
            self._perch_cache = (changes, {p.key: p for p in map(_perch, rows)})
        return self._perch_cache[1]

    def require(self, perch_id: str, subject: str | None = None) -> Perch:
        """The local perch `perch_id`, else Refusal NO_PERCH naming `subject` (default the id)."""
        perch = self.get(perch_id)
        if perch is None:
            raise Refusal("NO_PERCH", subject or perch_id, "no local perch has that id")
        return perch

    def perches(self, *, transient: bool = False) -> list[Perch]:
        """Local perches by id; transient `tmp.` identities only when asked."""
        return [p for p in self._table().values() if transient or not p.transient]

    def folder(self, perch: Perch) -> Path:
        return self.host.paths.endpoints / perch.id

    def _create(
        self,
        perch_id: str,
        home: HeldSubnet | None,
        state: str,
        *,
        forked_from: str | None = None,
        transient: bool = False,
        expires: float | None = None,
        hosted: bool = False,
    ) -> Perch:
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO perches(id, home, state, hosted, transient, expires, forked_from, created, owner) "
                "VALUES(?,?,?,?,?,?,?,?,?)",
                (
                    perch_id,
                    home.id if home else None,
                    state,
                    int(hosted),
                    int(transient),
                    expires,
                    forked_from,
                    time.time(),
                    restricted_uid(),  # system mode: the uid that made it (None: root or user mode)
                ),
            )
        perch = self.get(perch_id)
        assert perch is not None  # just inserted
        if not transient:
            (self.folder(perch) / "inbox").mkdir(parents=True, exist_ok=True, mode=0o700)
            log.info("perch created", extra={"perch": perch_id, "home": home.name if home else None})
            self._changed(perch)
        return perch

    def _update(self, perch: Perch, *, publish: bool = True, **fields: Any) -> Perch:
        """Change columns of a perch's row; `publish` tells the registry (not for `busy`)."""
        sets = ", ".join(f"{name}=?" for name in fields)
        with self.store.transaction() as db:
            db.execute(f"UPDATE perches SET {sets} WHERE id=?", (*fields.values(), perch.id))
        fresh = self.get(perch.id)
        if fresh is None:
            raise Refusal("NO_PERCH", perch.id, "the perch was removed meanwhile")
        if publish and not fresh.transient:
            self._changed(fresh)
        return fresh

    def _changed(self, perch: Perch) -> None:
        """Tell the registry a local row changed (the network layer publishes it)."""
        self.host.on_endpoint_changed(perch.id)

    def _check_new_id(self, perch_id: str) -> str:
        check_endpoint_id(perch_id)
        if perch_id.lower().startswith(TRANSIENT_PREFIX):
            raise UsageError("BAD_ID", perch_id, "ids beginning tmp. are reserved for transient identities")
        if self.store.db.execute("SELECT 1 FROM perches WHERE id=?", (perch_id,)).fetchone() is not None:
            # also when the perch is another uid's (system mode), which this caller cannot see
            raise Refusal("COLLISION", perch_id, "a perch with that id already exists on this node")
        return perch_id

    def home_for_new(self, subnet: str | None) -> HeldSubnet | None:
        """The home of a new perch (§2.5): `subnet` if named, the only subnet, or none at all.

        Several subnets and no name: Refusal HOME_REFUSED listing them.
        """
        subnets = self.host.subnets
        if subnet:
            return subnets.require(subnet)
        held = sorted(subnets.held.values(), key=lambda s: s.canonical)
        if not held:
            return None
        if len(held) == 1:
            return held[0]
        names = ", ".join(s.name for s in held)
        raise Refusal(
            "HOME_REFUSED", "", f"this node holds {len(held)} subnets ({names}); pass --subnet <name>"
        )

    def home_homeless(self, sub: HeldSubnet) -> list[str]:
        """Home every homeless perch in `sub` when it is this node's first subnet; their ids."""
        if len(self.host.subnets.held) != 1:
            return []
        homeless = [p for p in self.perches() if p.home is None]
        if not homeless:
            return []
        with self.store.transaction() as db:
            for perch in homeless:
                db.execute("UPDATE perches SET home=? WHERE id=?", (sub.id, perch.id))
        for perch in homeless:
            log.info("perch homed", extra={"perch": perch.id, "subnet": sub.name})
            fresh = self.get(perch.id)
            if fresh is not None:
                self._changed(fresh)
        return [p.id for p in homeless]

    def _subnet_name(self, subnet_id: bytes | None) -> str | None:
        if subnet_id is None:
            return None
        sub = self.host.subnets.held.get(subnet_id)
        return sub.name if sub else None

    # -- visibility and sync scope (§2.6) -------------------------------------------------

    def settings(self, perch: Perch) -> list[tuple[HeldSubnet, bool, bool]]:
        """(subnet, visible, in scope) for every held subnet; unset means home only."""
        explicit = self._explicit_settings().get(perch.key, {})
        out = []
        for sub in sorted(self.host.subnets.held.values(), key=lambda s: s.canonical):
            default = (sub.id == perch.home, sub.id == perch.home)
            visible, in_scope = explicit.get(sub.id, default)
            out.append((sub, visible, in_scope))
        return out

    def _explicit_settings(self) -> dict[str, dict[bytes, tuple[bool, bool]]]:
        """Every perch's explicit (visible, in scope) by subnet, read again after any write on
        the store's connection, like `_table`: resolution reads them for every perch per send."""
        changes = self.store.db.total_changes
        if self._settings_cache is None or self._settings_cache[0] != changes:
            explicit: dict[str, dict[bytes, tuple[bool, bool]]] = {}
            for r in self.store.query("SELECT perch, subnet, visible, in_scope FROM perch_subnets"):
                explicit.setdefault(str(r["perch"]).lower(), {})[bytes(r["subnet"])] = (
                    bool(r["visible"]), bool(r["in_scope"]))
            self._settings_cache = (changes, explicit)
        return self._settings_cache[1]

    def visible_in(self, perch: Perch) -> list[HeldSubnet]:
        if perch.transient:
            # A transient sender has no home; replies to its ring may come through any subnet
            # it sent through, so it is reachable (not listed) in every attached one (§4.3).
            return self.host.subnets.attached()
        return [sub for sub, visible, _ in self.settings(perch) if visible]

    def visible(self, perch: Perch, sub: HeldSubnet) -> bool:
        """`sub in visible_in(perch)` without listing every held subnet (the registry asks it for
        every perch in every subnet at each publish)."""
        if sub.id not in self.host.subnets.held:
            return False
        if perch.transient:
            return sub.attached
        home = sub.id == perch.home
        return self._explicit_settings().get(perch.key, {}).get(sub.id, (home, home))[0]

    def _set_setting(
        self, perch: Perch, sub: HeldSubnet, *, visible: bool | None = None, in_scope: bool | None = None
    ) -> None:
        current = next((v, s) for h, v, s in self.settings(perch) if h.id == sub.id)
        new = (current[0] if visible is None else visible, current[1] if in_scope is None else in_scope)
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO perch_subnets(perch, subnet, visible, in_scope) VALUES(?,?,?,?) "
                "ON CONFLICT(perch, subnet) DO UPDATE SET "
                "visible=excluded.visible, in_scope=excluded.in_scope",
                (perch.id, sub.id, int(new[0]), int(new[1])),
            )
        self._changed(perch)

    # -- resolution -----------------------------------------------------------------------

    def _remote_rows(self) -> Sequence[Row]:
        return list(self.host.registry_rows())

    def alive(self, perch: Perch) -> bool:
        """True while the perch's hosted process runs (a fact the hosting service keeps)."""
        return perch.hosted and self.host.hosted_alive(perch.id)

    def _hosted_pid(self, perch: Perch) -> int | None:
        return self.host.hosted_pid(perch.id) if perch.hosted else None

    def _offline(self) -> frozenset[NodeId]:
        return frozenset(self.host.offline_nodes())

    def _offline_reasons(self) -> Mapping[NodeId, str]:
        return self.host.offline_reasons()

    def snapshot(self) -> Snapshot:
        """What resolution needs (§4.1): local perches, members, and the replicated rows."""
        attached = sorted(self.host.subnets.attached(), key=lambda s: s.canonical)
        # system mode: a caller resolves only its own local perches (spt.core.caller)
        local = [
            LocalPerch(p.id, self._subnet_name(p.home), frozenset(s.name for s in self.visible_in(p)))
            for p in self.perches(transient=True) if may_use(p.owner)
        ]
        return Snapshot(
            self_node=NodeInfo(self.node_id, self.host.label),
            nodes_by_subnet={
                s.name: [NodeInfo(k, label) for k, label in s.state().members.items()] for s in attached
            },
            attached_subnets=[s.name for s in attached],
            local_perches=local,
            rows=self._remote_rows(),
            offline=self._offline(),
        )

    def resolve(self, text: str) -> Target:
        """Parse and resolve an address (BAD_ADDRESS, NO_PERCH, AMBIGUOUS…, as §4.1)."""
        return resolve(parse_address(text), self.snapshot())

    # -- views (spt.core.endpoint_views) -------------------------------------------------

    def subnet_rows(self, sub: HeldSubnet) -> list[dict[str, Any]]:
        return self.views.subnet_rows(sub)

    def local_rows(self, sub: HeldSubnet) -> list[dict[str, Any]]:
        return self.views.local_rows(sub)

    def count_visible(self, sub: HeldSubnet) -> int:
        return self.views.count_visible(sub)

    # -- housekeeping ---------------------------------------------------------------------

    def housekeeping(self) -> None:
        """Drop expired transient identities (with what they held) and 30-day-old ids."""
        now = time.time()
        expired = self.store.query(
            "SELECT id FROM perches WHERE transient=1 AND expires IS NOT NULL AND expires<?", (now,)
        )
        for row in expired:
            self.delivery.stop_listener(str(row["id"]), "STOPPED")
        if expired:
            with self.store.transaction() as db:
                db.execute("DELETE FROM perches WHERE transient=1 AND expires IS NOT NULL AND expires<?", (now,))
        # every send calls this: the 30-day ids (a scan of all of them) are looked at once a minute
        if now - self._expired_at >= EXPIRE_EVERY:
            self._expired_at = now
            self.spool.expire(now)

    def homed_in(self, sub: HeldSubnet) -> list[str]:
        """Ids of the perches homed in `sub`."""
        return [p.id for p in self.perches() if p.home == sub.id]

    def orphan(self, sub: HeldSubnet) -> list[str]:
        """This node is leaving `sub`: its perches homed there become local-only (ORPHANED).

        Call before the subnet row is deleted; the delete itself clears their home and their
        settings for `sub` (foreign keys), and drops outgoing messages through `sub`.
        """
        ids = self.homed_in(sub)
        with self.store.transaction() as db:
            db.execute("UPDATE perches SET home=NULL WHERE home=?", (sub.id,))
        for perch_id in ids:
            log.info("perch orphaned", extra={"perch": perch_id, "subnet": sub.name})
            fresh = self.get(perch_id)
            if fresh is not None:
                self._changed(fresh)
        return ids

    # -- the outgoing spool, drained by the network layer ---------------------------------

    def queue_outgoing(self, node: NodeId, subnet: bytes, payload: Mapping[str, Any]) -> None:
        self.spool.queue_outgoing(node, subnet, payload)

    def pending_outgoing(
        self, node: NodeId | None = None, *, limit: int = 100, due_before: float | None = None
    ) -> list[OutgoingMessage]:
        return self.spool.pending_outgoing(node, limit=limit, due_before=due_before)

    def mark_forwarded(self, *msg_ids: str) -> None:
        self.spool.mark_forwarded(*msg_ids)

    def record_attempt(self, msg_id: str, next_try: float) -> None:
        self.spool.record_attempt(msg_id, next_try)

    def defer_node(self, node: NodeId, next_try: float) -> None:
        self.spool.defer_node(node, next_try)

    def retry_node_now(self, node: NodeId) -> None:
        self.spool.retry_node_now(node)

    def retry_all_now(self) -> None:
        self.spool.retry_node_now(None)

    # -- accepting messages ---------------------------------------------------------------

    async def accept_event(self, perch: Perch, msg: Message) -> str:
        """A plugin's envelope (e.g. `type="file"`) for a local perch: spooled like a message."""
        return _one(await self._accept_many([(perch, msg, perch.id, None)]))

    async def _accept_many(
        self, items: Sequence[tuple[Perch, Message, str, str | None]]
    ) -> list[str | SptError]:
        """Spool each `(perch, message, subject, claim_from)` in order, all in one transaction of
        the group-commit writer (one fsync, one hand-over to its thread), and answer each SENT when a
        listener or ring acknowledges it within 5 s, else QUEUED, or its refusal. `claim_from`
        names a local sender perch whose ring the message may answer (it is then stamped)."""
        max_bytes = self.host.config.spool_max_bytes
        # a batch's perches refused so far (spool.BATCH_HELD_BACK); read here, the writer thread
        # has not the task's context. A batch of our own keeps its refusals in order by itself.
        held_back = BATCH_HELD_BACK.get()
        if held_back is None and len(items) > 1:
            held_back = {}
        claim_reply, append = self.spool.claim_reply, self.spool.append

        def spool_one(
            perch: Perch, msg: Message, subject: str, claim_from: str | None, db: sqlite3.Connection
        ) -> tuple[Message, str | None]:
            # on the writer thread: only `db` and immutable values
            if claim_from is not None:
                reply_to = claim_reply(claim_from, msg.sender_node, perch.id, db)
                if reply_to is not None:
                    msg = dataclasses.replace(msg, reply_to=reply_to)
            return msg, append(perch.id, msg, max_bytes=max_bytes, subject=subject, db=db, held_back=held_back)

        trace.mark("spooling")
        # committed together with the messages that arrived while the last commit ran
        spooled = await self.commits.run_each([functools.partial(spool_one, *item) for item in items])
        trace.mark("spooled")
        results: list[str | SptError] = []
        waits: list[tuple[int, Perch, Message]] = []
        fresh: dict[str, Perch] = {}
        for (perch, _, subject, _), outcome in zip(items, spooled, strict=True):
            if isinstance(outcome, sqlite3.IntegrityError):  # the perch was purged while the message waited
                outcome = Refusal("NO_PERCH", subject, "the perch was removed meanwhile")
            if isinstance(outcome, Exception):
                if not isinstance(outcome, Refusal):
                    raise outcome
                if outcome.instance_token == "SPOOL_FULL":
                    self._spool_full(perch)
                results.append(outcome)
                continue
            msg, earlier = outcome
            if earlier is not None:
                results.append(earlier)
                continue
            if perch.key not in fresh:
                fresh[perch.key] = self.get(perch.id) or perch
            self.delivery.poke(fresh[perch.key], msg)
            results.append("QUEUED")
            waits.append((len(results) - 1, fresh[perch.key], msg))
        if waits:
            taken = await self.delivery.taken_within_many([(p, m) for _, p, m in waits], SENT_WAIT)
            for (index, _, _), sent in zip(waits, taken, strict=True):
                if sent:
                    trace.mark("acknowledged")
                    results[index] = "SENT"
        return results

    def _spool_full(self, perch: Perch) -> None:
        """§8.4: the user hears that messages for a perch are being refused (at most hourly)."""
        home = self.host.subnets.held.get(perch.home) if perch.home else None
        self.host.notify(home, "spool-full", f"messages for {perch.id} are refused: its spool is full",
               f"{perch.id} holds {self.host.config.spool_max_bytes} bytes of undelivered messages; "
               f"run spt ready {perch.id} to drain them", dedupe_seconds=3600)

    def _write_behind(
        self, write: Callable[[sqlite3.Connection], object], then: Callable[[], None] | None = None
    ) -> None:
        """Queue `write` for the group-commit writer without waiting for it (behind every write
        queued before it); `then` runs once it committed or failed."""

        def done(fut: asyncio.Future[object]) -> None:
            if not fut.cancelled() and fut.exception() is not None:
                log.warning("a write-behind failed", extra={"error": str(fut.exception())})
            if then is not None:
                then()

        self.commits.submit(write).add_done_callback(done)

    # -- sending --------------------------------------------------------------------------

    def sender(self, from_id: str | None, target: Target) -> str:
        """The id something other than a ring (a message, a plugin's file) to `target` goes out
        as: `from_id`, given a perch here when it has none, else a transient identity kept for
        TRANSIENT_SECONDS. What `NodeRuntime.sender` answers plugins."""
        return self._sender(from_id, ring=False, target=target)[0]

    def _sender(self, from_id: str | None, *, ring: bool, target: Target) -> tuple[str, bool]:
        """The sender's id and whether it is a fresh transient identity (§4.3).

        A named sender without a perch here gets one (§3.4: `from` always leads back), homed by
        the usual rules and not listening, so replies to it are held for its next `spt ready`.
        With several subnets held, it is homed where this message goes.
        """
        if from_id:
            check_endpoint_id(from_id)
            perch = self.get(from_id)
            if perch is None:
                self._check_new_id(from_id)
                try:
                    home = self.home_for_new(None)
                except Refusal:
                    route = target.subnet if isinstance(target, RemoteTarget) else target.perch.home
                    home = self.host.subnets.by_name(route) if route else None
                perch = self._create(from_id, home, "active")
            return perch.id, False
        while True:  # 32 random bits: a clash is rare, and each retry draws anew
            tmp_id = f"{TRANSIENT_PREFIX}{os.urandom(4).hex()}"
            if self.get(tmp_id) is None:
                break
        expires = None if ring else time.time() + TRANSIENT_SECONDS
        self._changed(self._create(tmp_id, None, "active", transient=True, expires=expires))
        return tmp_id, True

    async def send(
        self,
        address_text: str,
        *,
        from_id: str | None,
        body: str,
        json_payload: str | None = None,
        window: str = "default",
        ring: bool = False,
        msg_id: str | None = None,
        on_sender: Callable[[str, bool], None] | None = None,
    ) -> tuple[str, str]:
        """§4.2 from this node's side: ("SENT" or "QUEUED", the sender's id), or a refusal.

        Without `from_id` the sender gets a transient identity, made only once the address has
        resolved; `on_sender(id, transient)` hears of it before the message is accepted.
        """
        if window not in WINDOWS:
            raise UsageError("BAD_USAGE", window, f"a delivery window is one of {', '.join(WINDOWS)}")
        address = parse_address(address_text)
        text = check_body(body)
        attrs: list[tuple[str, str]] = []
        if ring:
            attrs.append(("ring", "1"))
        if json_payload is not None:
            attrs.append(("json", compact_json(json_payload)))
        target = resolve(address, self.snapshot())
        sender_id, transient = self._sender(from_id, ring=ring, target=target)
        if on_sender is not None:
            on_sender(sender_id, transient)
        msg = self._message(sender_id, text, attrs, window, msg_id)
        if isinstance(target, LocalTarget):
            perch = self.require(target.perch.id, address.text)
            return _one(await self._accept_many([(perch, msg, address.text, sender_id)])), sender_id
        trace.mark("sending remote")
        payload, reply_to = self._remote_payload(target, msg)
        return _one(await self._forward_all([(target, address.text, payload, reply_to)])), sender_id

    def _message(
        self, sender_id: str, text: str, attrs: Sequence[tuple[str, str]], window: str, msg_id: str | None
    ) -> Message:
        return Message(
            id=msg_id or os.urandom(16).hex(),
            type="msg",
            from_=sender_id,
            sender_node=self.node_id,
            sender_id=sender_id,
            body=text,
            attrs=tuple(attrs),
            window=window,
        )

    async def send_many(
        self, messages: Sequence[Mapping[str, Any]], *, from_id: str | None
    ) -> tuple[list[str | SptError], str]:
        """Several sends from one sender in one call (`msg.send_many`): per message, in order,
        its token or its refusal, and the sender's id. Each is what `send` would answer, and
        durable before it is answered; messages for one node travel in one request (in order),
        local ones share one group commit. The caller should give each message an id, so a
        retry after DAEMON_DOWN cannot duplicate one."""
        composed: list[tuple[Target, Message, str] | SptError] = []
        sender_id: str | None = None
        snapshot = self.snapshot()
        resolved: dict[str, Target] = {}  # one snapshot for the batch: an address resolves once
        for item in messages:
            try:
                window = str(item.get("window") or "default")
                if window not in WINDOWS:
                    raise UsageError("BAD_USAGE", window, f"a delivery window is one of {', '.join(WINDOWS)}")
                address = parse_address(str(item.get("address", "")))
                text = check_body(str(item.get("body", "")))
                raw_json = item.get("json")
                attrs = [("json", compact_json(str(raw_json)))] if raw_json is not None else []
                msg_id = _client_msg_id(item.get("id"))
                target = resolved.get(address.text) or resolve(address, snapshot)
                if sender_id is None:
                    changes = self.store.db.total_changes
                    sender_id, _ = self._sender(from_id, ring=False, target=target)
                    if self.store.db.total_changes != changes:
                        snapshot = self.snapshot()  # the sender's perch is new
                else:
                    resolved[address.text] = target
                composed.append((target, self._message(sender_id, text, attrs, window, msg_id), address.text))
            except SptError as exc:
                composed.append(exc)
        # Local messages share one spool write; remote ones are queued for their nodes, one
        # group per node (kept together and in order on the wire).
        local: list[tuple[int, tuple[Perch, Message, str, str | None]]] = []
        remote: list[tuple[int, tuple[RemoteTarget, str, dict[str, Any], str | None]]] = []
        results: list[str | SptError] = []
        no_ring: set[tuple[NodeId, str]] = set()  # targets with no ring of theirs to answer
        for index, entry in enumerate(composed):
            results.append("QUEUED")  # each is replaced below
            if isinstance(entry, SptError):
                results[index] = entry
                continue
            target, msg, subject = entry
            if isinstance(target, RemoteTarget):
                payload, reply_to = self._remote_payload(target, msg, no_ring)
                remote.append((index, (target, subject, payload, reply_to)))
                continue
            perch = self.get(target.perch.id)
            if perch is None:
                results[index] = Refusal("NO_PERCH", subject, "no local perch has that id")
            else:
                local.append((index, (perch, msg, subject, sender_id)))
        jobs: list[tuple[list[int], Awaitable[list[str | SptError]]]] = []
        if local:
            jobs.append(([i for i, _ in local], self._accept_many([item for _, item in local])))
        if remote:
            jobs.append(([i for i, _ in remote], self._forward_all([item for _, item in remote])))
        for (indexes, _), outcomes in zip(jobs, await asyncio.gather(*(job for _, job in jobs)), strict=True):
            for index, outcome in zip(indexes, outcomes, strict=True):
                results[index] = outcome
        return results, sender_id or from_id or ""

    async def _forward_all(
        self, items: Sequence[tuple[RemoteTarget, str, dict[str, Any], str | None]]
    ) -> list[str | SptError]:
        """Hand `(target, subject, payload, ring it answers)` to the network, per target node in
        order as one group, and answer each: the target's token, its refusal, or QUEUED once the
        message is held in the outgoing spool (all held ones in one write)."""
        results: list[str | SptError | None] = [None] * len(items)
        groups: dict[tuple[NodeId, str], list[int]] = {}
        for index, (target, _, _, _) in enumerate(items):
            groups.setdefault((target.node.key, target.subnet), []).append(index)
        forwarding: dict[int, asyncio.Future[str]] = {}
        subnets: dict[int, HeldSubnet] = {}
        for (node, subnet), indexes in groups.items():
            sub = self.host.subnets.by_name(subnet)
            if sub is None:
                for index in indexes:
                    results[index] = Refusal("NO_SUCH_SUBNET", subnet)
                continue
            subnets.update((index, sub) for index in indexes)
            if not self._queue_first(node):
                trace.mark("forwarding")
                futures = self.host.forward_messages(items[indexes[0]][0], [items[i][2] for i in indexes])
                forwarding.update(zip(indexes, futures, strict=True))
        if forwarding:
            await asyncio.wait(forwarding.values())
        hold: list[int] = []
        for index, (target, subject, _, reply_to) in enumerate(items):
            if results[index] is not None:
                continue
            future = forwarding.get(index)
            exc = future.exception() if future is not None else None
            if future is None or isinstance(exc, PeerError | TimeoutError | ConnectionError):
                if exc is not None and target.node.key not in self._unreachable:  # one line per outage
                    self._unreachable.add(target.node.key)
                    log.info("target unreachable; its messages are queued",
                             extra={"node": target.node.key.short, "reason": str(exc)})
                hold.append(index)
            elif exc is None:
                self._unreachable.discard(target.node.key)
                results[index] = future.result()
            elif isinstance(exc, Refusal):
                if reply_to is not None:
                    self._write_behind(functools.partial(self.spool.mark_answered, reply_to, False))
                # §3.7: these name the address as typed, whatever the target called its perch
                named = exc.instance_token in ("NO_PERCH", "SPOOL_FULL")
                results[index] = Refusal(exc.instance_token, subject, exc.message, lines=exc.lines) if named else exc
            else:
                raise exc
        if hold:
            held = [(items[i][0].node.key, subnets[i].id, items[i][2]) for i in hold]

            def hold_all(db: sqlite3.Connection) -> None:
                for node, subnet_id, payload in held:
                    self.spool.hold_outgoing(node, subnet_id, payload, db)

            await self.commits.run(hold_all)
            self.host.outgoing_queued()  # committed now: the drain may forward it at once, not at its next tick
            for index in hold:
                results[index] = "QUEUED"
        return [r if r is not None else "QUEUED" for r in results]

    def _remote_payload(
        self, target: RemoteTarget, msg: Message, no_ring: set[tuple[NodeId, str]] | None = None
    ) -> tuple[dict[str, Any], str | None]:
        """What travels for `msg` to another node, and the ring it answers (claimed now).
        `no_ring` (a batch's) remembers targets found with no ring to answer, so the rest of
        the batch does not look again (no ring arrives while the batch is composed)."""
        key = (target.node.key, target.row.endpoint_id)
        reply_to = None
        if no_ring is None or key not in no_ring:
            reply_to = self.spool.ring_to_answer(
                msg.sender_id, target.node.key, target.row.endpoint_id, excluding=self._claiming,
                received=self.delivery.rings_received(),  # acked just now, the record still on its way
            )
            if reply_to is None and no_ring is not None:
                no_ring.add(key)
        if reply_to is not None:
            # The claim commits while the reply travels: were it lost to a crash, the ring would be
            # answerable again, which is right, as the reply may not have left either.
            self._claiming.add(reply_to)
            self._write_behind(functools.partial(self.spool.mark_answered, reply_to, True),
                               lambda: self._claiming.discard(reply_to))
        payload: dict[str, Any] = {
            "id": msg.id,
            "type": msg.type,
            "from": msg.sender_id,
            "to": target.row.endpoint_id,
            "window": msg.window,
            "attrs": [list(a) for a in msg.attrs],
            "body": msg.body,
            "reply_to": reply_to,
        }
        return payload, reply_to

    def _queue_first(self, node: NodeId) -> bool:
        """Behind messages already queued for that node, or to a node known offline, a message
        is queued at once: forwarding it directly would overtake them (§4.2 step 7), or wait
        out a dial that cannot succeed."""
        return bool(self.spool.pending_outgoing(node, limit=1)) or node in self._offline()

    async def deliver_incoming(
        self, payload: Mapping[str, Any], *, subnet: str, sender_node: NodeId, from_form: str
    ) -> str:
        """One message a member forwarded through `subnet` (§4.2 step 3): "SENT" or "QUEUED";
        `deliver_incoming_many` for one."""
        incoming = IncomingPayload("send", sender_node, subnet, str(payload.get("to", "")), from_form, payload)
        return _one(await self.deliver_incoming_many([incoming]))

    async def deliver_incoming_many(self, incomings: Sequence[IncomingPayload]) -> list[str | SptError]:
        """Messages a member forwarded (§4.2 step 3), in order: per message "SENT", "QUEUED" or
        its refusal: NO_PERCH when no perch has the id or it is hidden in the subnet it came
        through, RemoteProtocolError when malformed. Spooled together in one write."""
        results: list[str | SptError] = []
        items: list[tuple[Perch, Message, str, str | None]] = []
        indexes: list[int] = []
        visible: dict[tuple[str, str], bool] = {}  # (perch, subnet): a batch's messages share both
        for incoming in incomings:
            results.append("QUEUED")  # replaced below
            try:
                payload = incoming.value
                msg = message_from_wire(payload, sender_node=incoming.sender, from_form=incoming.sender_form)
                to = str(payload["to"])
                perch = self.get(to)
                if perch is not None and (perch.key, incoming.subnet) not in visible:
                    subnet = incoming.subnet.lower()
                    visible[(perch.key, incoming.subnet)] = any(s.canonical == subnet for s in self.visible_in(perch))
                if perch is None or not visible[(perch.key, incoming.subnet)]:
                    raise Refusal("NO_PERCH", to)
            except SptError as exc:
                results[-1] = exc
                continue
            items.append((perch, msg, to, None))
            indexes.append(len(results) - 1)
        if items:
            for index, outcome in zip(indexes, await self._accept_many(items), strict=True):
                results[index] = outcome
        return results

    # -- listening (spt ready): the rest is in spt.core.delivery --------------------------

    def set_busy(self, perch_id: str, busy: bool) -> None:
        """What the endpoint reports (§4.4); only the listener's windows read it (not published)."""
        perch = self.get(perch_id)
        if perch is not None and perch.busy != busy:
            self._update(perch, publish=False, busy=int(busy))

    def _listening_changed(self, perch_id: str) -> None:
        perch = self.get(perch_id)
        if perch is not None:
            self._changed(perch)  # the rows show which perches are ready

    async def ready(self, call: Call) -> dict[str, Any]:
        if self.closing:
            raise DaemonDown("", "the daemon is stopping")
        perch_id = check_endpoint_id(str(call.args.get("id") or ""))
        once = bool(call.args.get("once"))
        timeout = call.args.get("timeout")
        timeout = None if timeout is None else check_seconds(timeout)
        self.housekeeping()
        perch = self.get(perch_id)
        if perch is None:
            self._check_new_id(perch_id)
            home = self.home_for_new(call.args.get("subnet") or None)
            perch = self._create(perch_id, home, "active")
        if perch.state in RESTING:
            raise Refusal(
                "SUSPENDED",
                perch.id,
                f"the endpoint is {perch.state}; wake it with: spt endpoint wake {perch.id}",
            )
        await self.delivery.check_free(perch)
        if perch.state == "unbound":
            perch = self._update(perch, state="active")
        cwd = call.args.get("cwd")
        if isinstance(cwd, str) and cwd.startswith("/") and cwd != perch.workdir:
            perch = self._update(perch, publish=False, workdir=cwd)  # the mind's project (§2.8)
        return await self.delivery.listen(perch, call, once=once, timeout=timeout)

    # -- ringing --------------------------------------------------------------------------

    async def ring(self, call: Call) -> dict[str, Any]:
        if self.closing:
            raise DaemonDown("", "the daemon is stopping")
        args = call.args
        timeout = check_seconds(args.get("timeout", 120))
        self.housekeeping()
        wait = self.delivery.open_ring(os.urandom(16).hex(), call)
        transient = False

        def on_sender(sender: str, fresh: bool) -> None:
            nonlocal transient
            wait.perch, transient = sender.lower(), fresh

        try:
            token, sender_id = await self.send(
                str(args.get("address", "")),
                from_id=args.get("from") or None,
                body=str(args.get("body", "")),
                json_payload=args.get("json"),
                window=str(args.get("window") or "default"),
                ring=True,
                msg_id=wait.ring_id,
                on_sender=on_sender,
            )
            await call.emit({"sent": token, "from": sender_id})
            return await self.delivery.await_reply(wait, sender_id, token, timeout)
        finally:
            self.delivery.close_ring(wait)
            perch = self.get(wait.perch) if wait.perch and not self.delivery.shutting_down() else None
            if perch is not None:
                if transient:
                    self._update(perch, expires=time.time() + TRANSIENT_SECONDS)
                self.delivery.poke(perch)  # a reply the ring did not take is now the perch's

    # -- states: the rest is in spt.core.resting ------------------------------------------

    def purge(self, perch: Perch) -> int:
        """Delete a perch, its spool, settings and folder; returns how many messages it held."""
        count, _ = self.spool.held(perch.id)
        self.delivery.stop_listener(perch.id, "STOPPED")
        with self.store.transaction() as db:
            db.execute("DELETE FROM perches WHERE id=?", (perch.id,))
        shutil.rmtree(self.folder(perch), ignore_errors=True)
        log.info("perch purged", extra={"perch": perch.id, "dropped": count})
        self._changed(perch)
        return count

    def fork(self, source: Perch, new_id: str, subnet: str | None) -> Perch:
        """A new identity as an `unbound` perch (§4.7); the mind copy is the sync tiers' hook."""
        self._check_new_id(new_id)
        if self.get(new_id) is not None:
            raise Refusal("COLLISION", new_id, "a perch with that id already exists on this node")
        home = self.home_for_new(subnet)
        perch = self._create(new_id, home, "unbound", forked_from=source.id)
        self.host.fork_mind(source.id, perch.id)
        return perch


_HEX: Final = frozenset("0123456789abcdef")


def _client_msg_id(value: Any) -> str | None:
    """A message id chosen by the client (32 hex), so that a send retried after DAEMON_DOWN
    carries the same id and receivers drop the copy (§4.2.5); None: the daemon picks one."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) != 32 or not set(value) <= _HEX:
        raise UsageError("BAD_USAGE", str(value)[:40], "a message id is 32 lowercase hex characters")
    return value



def _one(outcomes: Sequence[str | SptError]) -> str:
    """The token of a batch of one, or its refusal raised."""
    (outcome,) = outcomes
    if isinstance(outcome, SptError):
        raise outcome
    return outcome


def _bool_arg(args: Mapping[str, Any], name: str) -> bool:
    return bool(args.get(name))


def register_ops(daemon: Daemon, eps: Endpoints) -> None:
    """The control operations on endpoints and messages (all unprivileged, SPEC.md §1)."""

    @daemon.op("endpoint.ready")
    async def ready(call: Call) -> Any:
        return await eps.ready(call)

    @daemon.op("msg.send")
    async def send(call: Call) -> Any:
        eps.housekeeping()
        address = str(call.args.get("address", ""))
        token, sender_id = await eps.send(
            address,
            from_id=call.args.get("from") or None,
            body=str(call.args.get("body", "")),
            json_payload=call.args.get("json"),
            window=str(call.args.get("window") or "default"),
            msg_id=_client_msg_id(call.args.get("id")),
        )
        return {"token": token, "address": address, "from": sender_id}

    @daemon.op("msg.send_many")
    async def send_many(call: Call) -> Any:
        """Several messages from one sender in one call: `{"from", "messages": [{"address",
        "body", "json"?, "window"?, "id"?}, ...]}`, answered per message in order."""
        eps.housekeeping()
        messages = call.args.get("messages")
        if (
            not isinstance(messages, list) or not 0 < len(messages) <= deliver_wire.MAX_BATCH
            or not all(isinstance(m, dict) for m in messages)
        ):
            raise UsageError("BAD_USAGE", "messages", f"a batch is 1 to {deliver_wire.MAX_BATCH} messages, each a map")
        if sum(deliver_wire.body_bytes(m) for m in messages) > deliver_wire.MAX_BATCH_BYTES:
            raise UsageError("BAD_USAGE", "messages", f"a batch's bodies may hold {deliver_wire.MAX_BATCH_BYTES} bytes")
        results, sender_id = await eps.send_many(messages, from_id=call.args.get("from") or None)
        return {
            "from": sender_id,
            "results": [
                {"token": r, "address": str(m.get("address", ""))} if isinstance(r, str)
                else {"error": r.to_wire(), "address": str(m.get("address", ""))}
                for r, m in zip(results, messages, strict=True)
            ],
        }

    @daemon.op("msg.ring")
    async def ring(call: Call) -> Any:
        return await eps.ring(call)

    @daemon.op("endpoint.whoami")
    async def whoami(call: Call) -> Any:
        return {
            "self": eps.views.self_view(call.args.get("self") or None),
            "subnets": [
                {"name": s.name} for s in sorted(daemon.subnets.held.values(), key=lambda s: s.canonical)
            ],
            "node": {"label": daemon.label, "key": daemon.key.node_id.hex},
        }

    @daemon.op("endpoint.list")
    async def listing(call: Call) -> Any:
        return eps.views.listing(call.args.get("self") or None, call.args.get("subnet") or None)

    @daemon.op("endpoint.state")
    async def state(call: Call) -> Any:
        perch = eps.require(str(call.args.get("id", "")))
        activity = str(call.args.get("activity", ""))
        if activity not in ("busy", "idle"):
            raise UsageError("BAD_USAGE", activity, "the activity is busy or idle")
        eps.set_busy(perch.id, activity == "busy")
        perch = eps.require(perch.id)
        eps.delivery.poke(perch)
        return {"id": perch.id, "activity": activity}

    @daemon.op("endpoint.stop")
    async def stop(call: Call) -> Any:
        perch = eps.require(str(call.args.get("id", "")))
        eps.delivery.stop_listener(perch.id, "STOPPED")
        return {"id": perch.id}

    @daemon.op("endpoint.purge")
    async def purge(call: Call) -> Any:
        perch = eps.require(str(call.args.get("id", "")))
        if perch.hosted:
            await daemon.hosting.stop_for_purge(perch)  # §3.6: the hosted process stops first
        return {"id": perch.id, "dropped": eps.purge(perch)}

    @daemon.op("endpoint.fork")
    async def fork(call: Call) -> Any:
        source = eps.require(str(call.args.get("id", "")))
        perch = eps.fork(source, str(call.args.get("new_id", "")), call.args.get("subnet") or None)
        return {"id": perch.id, "from": source.id, "home": eps._subnet_name(perch.home)}

    @daemon.op("endpoint.description.set")
    async def description_set(call: Call) -> Any:
        perch = eps.require(str(call.args.get("id", "")))
        text = "" if call.args.get("clear") else check_description(str(call.args.get("text", "")))
        eps._update(perch, description=text)
        return {"id": perch.id}

    @daemon.op("endpoint.description.show")
    async def description_show(call: Call) -> Any:
        address = str(call.args.get("address", ""))
        target = eps.resolve(address)
        if isinstance(target, LocalTarget):
            perch = eps.require(target.perch.id, address)
            endpoint_id, text = perch.id, perch.description
        else:
            endpoint_id, text = target.row.endpoint_id, target.row.description
        if not text:
            raise Refusal("NO_DESCRIPTION", address, "this endpoint has no description")
        return {"address": address, "id": endpoint_id, "description": text}

    def settings_doc(perch: Perch) -> dict[str, Any]:
        return {
            "id": perch.id,
            "subnets": [
                {"subnet": s.name, "visible": visible, "home": s.id == perch.home, "in_scope": in_scope}
                for s, visible, in_scope in eps.settings(perch)
            ],
        }

    @daemon.op("endpoint.visibility.list")
    async def visibility_list(call: Call) -> Any:
        return settings_doc(eps.require(str(call.args.get("id", ""))))

    @daemon.op("endpoint.visibility.set")
    async def visibility_set(call: Call) -> Any:
        perch = eps.require(str(call.args.get("id", "")))
        sub = daemon.subnets.require(str(call.args.get("subnet", "")))
        eps._set_setting(perch, sub, visible=_bool_arg(call.args, "visible"))
        return {"id": perch.id, "subnet": sub.name}

    @daemon.op("endpoint.scope.list")
    async def scope_list(call: Call) -> Any:
        doc = settings_doc(eps.require(str(call.args.get("id", ""))))
        doc["scope"] = [s["subnet"] for s in doc["subnets"] if s["in_scope"]]
        doc["effective"] = [s["subnet"] for s in doc["subnets"] if s["in_scope"] and s["visible"]]
        return doc

    @daemon.op("endpoint.scope.set")
    async def scope_set(call: Call) -> Any:
        perch = eps.require(str(call.args.get("id", "")))
        sub = daemon.subnets.require(str(call.args.get("subnet", "")))
        eps._set_setting(perch, sub, in_scope=_bool_arg(call.args, "in_scope"))
        visible = any(s.id == sub.id for s in eps.visible_in(perch))
        return {"id": perch.id, "subnet": sub.name, "hidden": not visible}
