"""Handing spooled messages out: listeners (`spt ready`), rings waiting for their reply, and the
acknowledgements that take a message out of its perch's spool (SPEC.md §4.2–4.4).

Split out of `spt.core.endpoints`, which keeps the perches, sending and accepting; this side
needs only the spool, the group-commit writer and a way to read (and mark busy) a perch.

Rules this module keeps:
1. A message leaves the spool only in the transaction that records the listener's
   acknowledgement (`Spool.mark_delivered`), submitted to the writer as the ack line is read; until
   that commit lands the entry stays in flight, so nothing hands it out twice. The listener
   acknowledges after the envelope is flushed to its stdout, so every message is handed out
   exactly once, across `kill -9` of either side.
2. `ready` and `ring` answer only after the acknowledgements read on their connection committed:
   the caller exits on that answer and forgets what it acked (docs/design/group-commit.md).
3. Windows (§4.4): a *drain* (the backlog when `ready` starts) hands out `default` and `active`
   messages, and `idle` ones unless the endpoint reports busy; a *push* (to a listener blocked in
   `ready`) happens only while it reports idle and hands out `default` and `idle` messages. A
   resting perch hands out nothing.
4. A ring reply for a ring still waiting is kept from the perch's listener and handed to the ring;
   if the ring ends without taking it, it is an ordinary message for the perch.
5. Every wait is bounded by a deadline or by the caller's connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from spt.core import trace
from spt.core.errors import DaemonDown, Refusal
from spt.core.spool import WINDOWS, Message, Spool, SpoolEntry

if TYPE_CHECKING:
    from spt.core.daemon import Call
    from spt.core.endpoints import Perch
    from spt.core.store import GroupCommit

log = logging.getLogger(__name__)

STOP_GRACE: Final = 5.0  # an envelope already on its way may still be acknowledged
COLLISION_WAIT: Final = 0.5  # a listener whose caller just died is noticed within this
_CLOSING: Final = "DAEMON_STOPPING"  # a listener's stop reason at shutdown: answered DAEMON_DOWN
ACKED_MEMORY: Final = 1024  # acknowledged ids kept for senders that resume after the ack
# Held messages read per look at the spool (each one's HMAC checked): the first that may go out
# is nearly always among the first few, and 64 cost a listener draining a backlog ~1 ms a message
NEXT_BATCH: Final = 8


class PerchTable(Protocol):
    """What delivery reads and writes of the perches (`Endpoints` is one)."""

    def get(self, perch_id: str) -> Perch | None: ...

    def set_busy(self, perch_id: str, busy: bool) -> None: ...


async def _first(*waits: Awaitable[Any], timeout: float | None = None) -> None:
    """Return when any of `waits` completes or `timeout` seconds pass; cancel the others."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


class _Channel:
    """The control connection of a streaming op (`ready`, `ring`): envelopes out, acks in."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.closed = asyncio.Event()
        self._acks: deque[str] = deque(maxlen=1024)
        self._ack_arrived = asyncio.Event()
        self._on_ack: tuple[str, Callable[[], None]] | None = None  # the envelope out, and its ack's effect
        self.recorded: asyncio.Future[bool] | None = None  # the last acknowledgement's commit
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while True:
                msg = await self.call.receive()
                if msg is None:
                    return
                ack = msg.get("ack")
                if isinstance(ack, str):
                    trace.mark("ack read")
                    if self._on_ack is not None and self._on_ack[0] == ack:
                        # at once, as the line is read: a request the agent sent after its ack
                        # (a ring's reply) must find the delivery recorded
                        self._on_ack[1]()
                        self._on_ack = None
                    self._acks.append(ack)
                    self._ack_arrived.set()
        except (ConnectionError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return  # a caller that sends garbage is treated as gone
        finally:
            self.closed.set()

    async def deliver(self, entry: SpoolEntry, stopped: asyncio.Event, on_ack: Callable[[], None]) -> bool:
        """Emit the envelope lines, then wait for their ack; `on_ack` runs as the ack is read.
        False when the caller is gone, or when `stopped` was set and no ack came within STOP_GRACE."""
        self._on_ack = (entry.message.id, on_ack)
        try:
            return await self._deliver(entry, stopped)
        finally:
            self._on_ack = None

    async def _deliver(self, entry: SpoolEntry, stopped: asyncio.Event) -> bool:
        lines = entry.envelope()
        try:
            for i, line in enumerate(lines):
                await self.call.emit({"msg": entry.message.id, "line": line, "last": i == len(lines) - 1})
        except (ConnectionError, OSError):
            return False
        loop = asyncio.get_running_loop()
        grace_end: float | None = None
        while True:
            while self._acks:
                if self._acks.popleft() == entry.message.id:
                    return True
            if self.closed.is_set():
                return False
            self._ack_arrived.clear()
            timeout: float | None = None
            waits: list[Awaitable[Any]] = [self._ack_arrived.wait(), self.closed.wait()]
            if stopped.is_set():
                grace_end = grace_end if grace_end is not None else loop.time() + STOP_GRACE
                timeout = grace_end - loop.time()
                if timeout <= 0:
                    return False
            else:
                waits.append(stopped.wait())
            await _first(*waits, timeout=timeout)

    async def acks_recorded(self) -> None:
        """Wait until every acknowledgement read here is committed (or failed to be): the writer
        commits in order, so the last one's commit covers the ones before it."""
        if self.recorded is not None:
            await asyncio.wait([self.recorded])

    def close(self) -> None:
        self._reader.cancel()


class _Listener:
    """One `spt ready` blocked on a perch."""

    def __init__(self, perch: Perch, chan: _Channel) -> None:
        self.perch_id = perch.id
        self.chan = chan
        self.wake = asyncio.Event()
        self.stopped = asyncio.Event()
        self.finished = asyncio.Event()
        self.stop_reason: str | None = None
        self.draining = True

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stopped.set()
        self.wake.set()


class RingWait:
    """A `spt ring` waiting for its reply in the spool of `perch` (the sender's perch, known once
    the send chose it) on the ring's own control connection."""

    def __init__(self, ring_id: str, call: Call) -> None:
        self.ring_id = ring_id
        self.perch = ""
        self.wake = asyncio.Event()
        self.chan = _Channel(call)


class Delivery:
    """The listeners and rings of this node's perches, and the acknowledgements they read."""

    def __init__(
        self,
        spool: Spool,
        commits: GroupCommit,
        perches: PerchTable,
        *,
        on_listening: Callable[[str], None],
    ) -> None:
        """`on_listening(perch_id)` hears that a listener started or ended on a perch (the
        registry shows which perches are ready)."""
        self.spool = spool
        self.commits = commits
        self.perches = perches
        self._on_listening = on_listening
        self._listeners: dict[str, _Listener] = {}
        self._rings: dict[str, RingWait] = {}
        self._sent_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._acked: dict[str, None] = {}  # ids acknowledged lately, oldest first (ACKED_MEMORY)
        self._in_flight: set[int] = set()
        self._recording: set[asyncio.Future[bool]] = set()  # acknowledgements being committed
        self._receiving: set[str] = set()  # rings acknowledged whose record has not committed yet
        self.closing = False

    def listening(self, perch: Perch) -> bool:
        """True while a `spt ready` listens on `perch`."""
        return perch.key in self._listeners

    def shutting_down(self) -> bool:
        """True once the daemon is stopping: cleanup then leaves the store alone (it may be closed,
        and nothing durable depends on that cleanup)."""
        task = asyncio.current_task()
        return self.closing or (task is not None and task.cancelling() > 0)

    async def close(self) -> None:
        """At daemon shutdown, before the store closes: end every listener and ring, letting an
        envelope already on its way be acknowledged (bounded by STOP_GRACE), so no ack is lost."""
        self.closing = True
        for listener in list(self._listeners.values()):
            listener.stop(_CLOSING)
        for wait in list(self._rings.values()):
            wait.wake.set()
        pending = [asyncio.ensure_future(lst.finished.wait()) for lst in self._listeners.values()]
        if pending:
            await asyncio.wait(pending, timeout=STOP_GRACE + 1)
        for task in pending:
            task.cancel()
        await asyncio.sleep(0)  # let rings that were woken answer
        if self._recording:  # acknowledgements read land before the writer closes
            await asyncio.wait(list(self._recording), timeout=STOP_GRACE)

    def stop_listener(self, perch_id: str, reason: str) -> None:
        """End the listener on `perch_id`, if any, with `reason` (SUSPENDED, STOPPED…)."""
        listener = self._listeners.get(perch_id.lower())
        if listener is not None:
            listener.stop(reason)

    # -- waking -----------------------------------------------------------------------------

    def poke(self, perch: Perch, msg: Message | None = None) -> None:
        """Something changed for `perch` (a message arrived, it went idle): waiting listeners and
        the ring `msg` replies to look at the spool again."""
        if msg is not None and msg.reply_to and msg.reply_to in self._rings:
            trace.mark("poke ring")
            self._rings[msg.reply_to].wake.set()
        listener = self._listeners.get(perch.key)
        if listener is not None:
            listener.wake.set()

    def _expected(self, perch: Perch, msg: Message) -> bool:
        """True when a waiting ring or listener should take `msg` now (worth waiting for SENT)."""
        wait = self._rings.get(msg.reply_to or "")
        if wait is not None and wait.perch == perch.key:
            return True
        listener = self._listeners.get(perch.key)
        if listener is None or perch.state != "active":
            return False
        if listener.draining:
            return msg.window != "idle" or not perch.busy
        return not perch.busy and msg.window != "active"

    async def taken_within_many(self, messages: Sequence[tuple[Perch, Message]], timeout: float) -> list[bool]:
        """Per `(perch, message)` just spooled: True once a listener or ring acknowledged it within
        `timeout` seconds; False at once when none that waits would take it now (no wait at all
        when none would take any).

        Also True when the ack came first: a listener or ring looking at the spool for its own
        reasons may take a message the moment its commit lands, before its sender resumes."""
        taken = [msg.id in self._acked for _, msg in messages]
        loop = asyncio.get_running_loop()
        waiting: dict[int, asyncio.Future[None]] = {}
        for index, (perch, msg) in enumerate(messages):
            if not taken[index] and self._expected(perch, msg):
                waiting[index] = fut = loop.create_future()
                self._sent_waiters.setdefault(msg.id, []).append(fut)
        if not waiting:
            return taken
        try:
            await asyncio.wait(waiting.values(), timeout=timeout)
        finally:
            for index, fut in waiting.items():
                msg_id = messages[index][1].id
                taken[index] = fut.done() and not fut.cancelled()
                waiters = self._sent_waiters.get(msg_id, [])
                if fut in waiters:
                    waiters.remove(fut)
                if not waiters:
                    self._sent_waiters.pop(msg_id, None)
        return taken

    # -- handing over -----------------------------------------------------------------------

    async def _hand_over(self, chan: _Channel, entry: SpoolEntry, stopped: asyncio.Event) -> bool:
        """Hand `entry` to a listener or ring; True once it acknowledged.

        The acknowledgement is recorded (`mark_delivered`) by the group-commit writer, off the
        event loop and off the round trip: whoever waits for SENT hears it at once, since the
        listener has the message. Until that commit lands the entry stays in flight, so no drain
        hands it out again; were the daemon killed first, the message would be handed out again
        after the restart, as it would have been had the kill come before the ack was read.
        """
        acknowledged = False

        def record() -> None:
            nonlocal acknowledged
            acknowledged = True
            self._acked[entry.message.id] = None
            if len(self._acked) > ACKED_MEMORY:
                del self._acked[next(iter(self._acked))]
            for fut in self._sent_waiters.get(entry.message.id, []):
                if not fut.done():
                    fut.set_result(None)
            try:
                recorded = self.commits.submit(functools.partial(self.spool.mark_delivered, entry))
            except sqlite3.ProgrammingError:  # the daemon is stopping: handed out again after the restart
                self._in_flight.discard(entry.seq)
                return
            self._recording.add(recorded)
            if entry.message.is_ring:
                self._receiving.add(entry.message.id)
            chan.recorded = recorded
            recorded.add_done_callback(functools.partial(self._recorded, entry))

        self._in_flight.add(entry.seq)
        try:
            if await chan.deliver(entry, stopped, record) and not acknowledged:
                record()  # its ack was read before this delivery began (a repeated ack)
        finally:
            if not acknowledged:  # else it stays in flight until the record commits
                self._in_flight.discard(entry.seq)
        return acknowledged

    def _recorded(self, entry: SpoolEntry, recorded: asyncio.Future[bool]) -> None:
        trace.mark("ack recorded")
        self._recording.discard(recorded)
        self._receiving.discard(entry.message.id)
        self._in_flight.discard(entry.seq)
        if not recorded.cancelled() and recorded.exception() is not None:
            log.warning("an acknowledged delivery was not recorded; the message will be handed out again",
                        extra={"perch": entry.perch, "error": str(recorded.exception())})
            perch = None if self.shutting_down() else self.perches.get(entry.perch)
            if perch is not None:
                self.poke(perch)  # a listener waiting idle takes it again now, not at the next message

    def rings_received(self) -> frozenset[str]:
        """Rings whose recipient acknowledged them while the record of it is still on its way to
        disk: answerable already (`Spool.ring_to_answer`), so a reply sent at once is stamped.

        A reply need not wait for that record: lost to a crash (or failed), the ring is handed to
        its recipient again after the restart, as it would be had the crash come before the ack,
        and a second reply is stamped for it too; the ringer takes the first it gets, the other is
        an ordinary message for its perch. Each message is still handed out once.
        """
        return frozenset(self._receiving)

    # -- listening (spt ready) --------------------------------------------------------------

    def _next(self, perch: Perch | None, *, drain: bool) -> SpoolEntry | None:
        """The first message a drain (or a push) may hand out now, by arrival."""
        if perch is None or perch.state != "active":
            return None
        if drain:
            windows: tuple[str, ...] = ("default", "active") if perch.busy else WINDOWS
        elif perch.busy:
            return None
        else:
            windows = ("default", "idle")
        after = 0
        while True:  # ends: `after` grows through a finite spool
            batch = self.spool.entries(perch.id, windows=windows, after=after, limit=NEXT_BATCH)
            if not batch:
                return None
            for entry in batch:
                if entry.seq in self._in_flight or (entry.message.reply_to or "") in self._rings:
                    continue
                return entry
            after = batch[-1].seq

    async def check_free(self, perch: Perch) -> None:
        """Refusal COLLISION while another listener holds `perch` (one whose caller just died
        is given COLLISION_WAIT to notice)."""
        held = self._listeners.get(perch.key)
        if held is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(held.finished.wait(), COLLISION_WAIT)
            if self._listeners.get(perch.key) is held:
                raise Refusal("COLLISION", perch.id, "another listener holds this perch")

    async def listen(self, perch: Perch, call: Call, *, once: bool, timeout: float | None) -> dict[str, Any]:
        """`spt ready` on `perch` (checked free with `check_free`): drain, then push, until
        stopped, the caller hangs up, `once` delivered, or `timeout`. The op's answer."""
        if self.closing:
            raise DaemonDown("", "the daemon is stopping")
        chan = _Channel(call)
        listener = _Listener(perch, chan)
        self._listeners[perch.key] = listener
        self._on_listening(perch.id)
        try:
            await call.emit({"ready": perch.id})
            result = await self._listen(listener, once=once, timeout=timeout)
            # The caller exits on this answer and forgets what it acked: answered before its acks
            # are on disk, a daemon killed then would hand those messages to its next run again.
            await chan.acks_recorded()
            return result
        finally:
            if self._listeners.get(perch.key) is listener:
                del self._listeners[perch.key]
            listener.finished.set()
            chan.close()
            if not self.shutting_down():
                self._on_listening(perch.id)

    async def _listen(self, listener: _Listener, *, once: bool, timeout: float | None) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        ended = {"id": listener.perch_id}
        delivered = 0
        while listener.stop_reason is None:  # the drain: the agent's own poll
            entry = self._next(self.perches.get(listener.perch_id), drain=True)
            if entry is None:
                break
            if not await self._hand_over(listener.chan, entry, listener.stopped):
                return {**ended, "closed": True}
            delivered += 1
        listener.draining = False
        if once and delivered:
            self.perches.set_busy(listener.perch_id, True)
            return {**ended, "delivered": delivered}
        if listener.stop_reason is None:
            self.perches.set_busy(listener.perch_id, False)  # a blocked ready reports idle
        while True:
            if listener.stop_reason == _CLOSING:
                raise DaemonDown("", "the daemon is stopping; run spt ready again once it is back")
            if listener.stop_reason is not None:
                return {**ended, "ended": listener.stop_reason}
            listener.wake.clear()
            entry = self._next(self.perches.get(listener.perch_id), drain=False)
            if entry is not None:
                trace.mark("listener takes")
                if not await self._hand_over(listener.chan, entry, listener.stopped):
                    return {**ended, "closed": True}
                if once:
                    self.perches.set_busy(listener.perch_id, True)
                    return {**ended, "delivered": 1}
                continue
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return {**ended, "timeout": True}
            await _first(listener.wake.wait(), listener.chan.closed.wait(), timeout=remaining)
            if listener.chan.closed.is_set():
                return {**ended, "closed": True}

    # -- ringing ----------------------------------------------------------------------------

    def open_ring(self, ring_id: str, call: Call) -> RingWait:
        """Register a ring before it is spooled, so its reply never reaches the perch first;
        end it with `close_ring`."""
        wait = RingWait(ring_id, call)
        self._rings[ring_id] = wait
        return wait

    def close_ring(self, wait: RingWait) -> None:
        self._rings.pop(wait.ring_id, None)
        wait.chan.close()

    async def await_reply(self, wait: RingWait, sender_id: str, token: str, timeout: float) -> dict[str, Any]:
        """Hand the ring its reply from `sender_id`'s spool once one is there: the op's answer."""
        chan = wait.chan
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        never = asyncio.Event()
        while True:
            if self.closing:
                raise DaemonDown("", "the daemon is stopping; the request stays delivered or queued")
            wait.wake.clear()
            entry = self.spool.find_reply(sender_id, wait.ring_id)
            if entry is not None and entry.seq not in self._in_flight:
                trace.mark("ring takes")
                if await self._hand_over(chan, entry, never):
                    trace.mark("ring acked")
                    await chan.acks_recorded()  # as for `ready`: the caller exits on the answer
                    return {"reply": True, "token": token}
                return {"closed": True, "token": token}
            remaining = deadline - loop.time()
            if remaining <= 0:
                return {"timeout": True, "token": token}
            await _first(wait.wake.wait(), chan.closed.wait(), timeout=remaining)
            if chan.closed.is_set():
                return {"closed": True, "token": token}
