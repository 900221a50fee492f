"""The daemon half of `spt rc`: the `rc.attach` control operation and the `rc.attach` stream type.

A viewer's daemon resolves the address; a local hosted perch is attached directly, a remote one
through a stream of type `rc.attach` on the member connection of the resolution subnet. The
hosting daemon checks, in order, that the peer is a member of that subnet and the perch is visible
there (else NO_PERCH, SPEC.md §9.20), that it is hosted (NOT_HOSTED) and accepts remote viewers
(RC_REFUSED), then relays frames between the stream and the host process.

Daemons keep no viewer state: offsets, input numbers and what to resend live in the client and
the host process, so a cut anywhere in between (QUIC path, either daemon restarting) is repaired
by the client re-attaching with its last offset.

Frames on the stream: viewer → host `rc.attach` {subnet, id, offset, replay, read_only, rows, cols,
viewer}, `rc.input` {seq, data}, `rc.resize` {rows, cols}, `rc.ping` {n}; host → viewer `rc.<t>`
with the host's frame as body (`hello`, `lost`, `out`, `ack`, `ended`), `rc.pong` {n} (answered
by the hosting daemon itself: the round trip of the member connection under the stream), or one
`error` {code, message}.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from spt.core.errors import PeerError, Refusal, SptError, UsageError
from spt.hooks import HostedTerminal, NodeRuntime

log = logging.getLogger(__name__)

STREAM_TYPE: Final = "rc.attach"
MAX_INPUT: Final = 64 * 1024  # bytes in one input frame
DIAL_TIMEOUT: Final = 10.0

Out = Callable[[Mapping[str, Any]], Awaitable[None]]
In = Callable[[], Awaitable[Mapping[str, Any] | None]]


def _hello(args: Mapping[str, Any]) -> dict[str, Any]:
    """The attach parameters a viewer may set, checked."""
    offset = args.get("offset")
    if offset is not None and (not isinstance(offset, int) or isinstance(offset, bool) or offset < 0):
        raise UsageError("BAD_USAGE", str(offset), "an rc offset is a byte count")
    hello: dict[str, Any] = {
        "offset": offset,
        "replay": bool(args.get("replay", True)),
        "read_only": bool(args.get("read_only")),
        "viewer": str(args.get("viewer") or "")[:64],
    }
    run = args.get("run")
    if isinstance(run, int) and not isinstance(run, bool):
        hello["run"] = run
    rows, cols = args.get("rows"), args.get("cols")
    if isinstance(rows, int) and isinstance(cols, int) and 0 < rows <= 1000 and 0 < cols <= 1000:
        hello.update(rows=rows, cols=cols)
    return hello


def _input(msg: Mapping[str, Any]) -> tuple[int, bytes] | None:
    seq, data = msg.get("seq"), msg.get("data")
    if isinstance(seq, int) and not isinstance(seq, bool) and seq > 0 and isinstance(data, bytes) and len(data) <= MAX_INPUT:
        return seq, data
    return None


async def _relay(term: HostedTerminal, out: Out, inward: In, *, read_only: bool,
                 on_input: Callable[[], None] | None = None,
                 on_ping: Callable[[Mapping[str, Any]], Awaitable[None]] | None = None) -> Mapping[str, Any] | None:
    """Host frames go `out`; viewer frames from `inward` go to the host. Returns the `ended`
    frame when the process ended, None when either side went away."""

    async def outward() -> Mapping[str, Any] | None:
        while True:
            msg = await term.recv()
            if msg is None:
                return None
            await out(msg)
            if msg.get("t") == "ended":
                return msg

    async def inbound() -> None:
        while True:
            try:
                msg = await inward()
            except (PeerError, ConnectionError, OSError, ValueError):
                return  # the viewer's side went away (or sent garbage): the relay ends
            if msg is None:
                return
            kind = msg.get("t")
            if kind == "input" and not read_only:
                item = _input(msg)
                if item is not None:
                    await term.send_input(*item)
                    if on_input is not None:
                        on_input()
            elif (kind == "resize" and not read_only  # a read-only viewer watches at the size it gets
                  and isinstance(msg.get("rows"), int) and isinstance(msg.get("cols"), int)):
                await term.resize(int(msg["rows"]), int(msg["cols"]))
            elif kind == "ping" and on_ping is not None:
                await on_ping(msg)

    out_task = asyncio.ensure_future(outward())
    in_task = asyncio.ensure_future(inbound())
    try:
        await asyncio.wait([out_task, in_task], return_when=asyncio.FIRST_COMPLETED)
    finally:
        in_task.cancel()
        if not out_task.done():
            out_task.cancel()
        term.close()
    if in_task.done() and not in_task.cancelled():
        in_task.exception()  # retrieved: a failed viewer side only ends the relay
    if out_task.done() and not out_task.cancelled() and out_task.exception() is None:
        return out_task.result()
    return None


class RcService:
    def __init__(self, runtime: NodeRuntime) -> None:
        self.rt = runtime

    def register(self) -> None:
        self.rt.add_op("rc.attach", self.attach_op)
        self.rt.add_member_stream(STREAM_TYPE, self.on_stream)

    # -- the hosting node -----------------------------------------------------------------------

    async def on_stream(self, conn: Any, stream: Any, first: Any) -> None:
        body = first.body if isinstance(first.body, dict) else {}
        subnet, perch_id = str(body.get("subnet", "")), str(body.get("id", ""))
        try:
            if not self.rt.member_subnet(conn, subnet) or not self.rt.perch_visible(perch_id, subnet):
                raise Refusal("NO_PERCH", perch_id)
            info = self.rt.hosted_info(perch_id)
            if info is None:
                raise Refusal("NOT_HOSTED", perch_id, "this endpoint is not hosted")
            if not info["remote_attach"]:
                raise Refusal("RC_REFUSED", perch_id, "this endpoint refuses remote viewers")
            hello = _hello(body)
            term = await self.rt.attach_hosted(perch_id, hello)
        except SptError as exc:
            await stream.send("error", {"code": exc.instance_token, "message": exc.message}, end=True)
            return
        log.info("remote viewer attached", extra={"perch": perch_id, "peer": conn.peer.short,
                                                   "read_only": hello["read_only"]})

        async def out(msg: Mapping[str, Any]) -> None:
            await stream.send(f"rc.{msg.get('t')}", dict(msg), timeout=60.0)

        async def inward() -> Mapping[str, Any] | None:
            frame = await stream.recv()
            if frame is None or not isinstance(frame.body, dict):
                return None
            return {**frame.body, "t": frame.type.removeprefix("rc.")}

        async def pong(msg: Mapping[str, Any]) -> None:
            # the viewer times the member connection under its stream (bench/rc.py's baseline)
            await stream.send("rc.pong", {"n": msg.get("n")})

        try:
            ended = await _relay(term, out, inward, read_only=hello["read_only"], on_ping=pong)
        except (PeerError, ConnectionError):
            return
        if ended is not None:
            with contextlib.suppress(PeerError, ConnectionError):
                await stream.end()

    # -- the viewer's node ----------------------------------------------------------------------

    async def attach_op(self, call: Any) -> Any:
        """A viewer (the `spt rc` client) on this node; events carry the host's frames with
        `data` in base64. Ends with {"ended": exit}, or {"reconnect": true} when the path broke."""
        address = str(call.args.get("address", ""))
        hello = _hello(call.args)
        target = self.rt.resolve(address)

        async def out(msg: Mapping[str, Any]) -> None:
            event = dict(msg)
            if isinstance(event.get("data"), bytes):
                event["data"] = base64.b64encode(event["data"]).decode("ascii")
            await call.emit({"rc": event})

        async def inward() -> Mapping[str, Any] | None:
            line = await call.receive()
            if line is None:
                return None
            msg = dict(line.get("rc") or {})
            if isinstance(msg.get("data"), str):
                try:
                    msg["data"] = base64.b64decode(msg["data"], validate=True)
                except ValueError:
                    return {}
            return msg

        if not hasattr(target, "node"):  # a perch on this node
            try:
                term = await self.rt.attach_hosted(target.perch.id, hello)
            except Refusal as exc:
                return self._refused(exc, address)
            ended = await _relay(term, out, inward, read_only=hello["read_only"], on_input=self.rt.touch_user_activity)
            return {"ended": ended.get("exit")} if ended else {"reconnect": True}
        try:
            conn = await asyncio.wait_for(self.rt.connect_member(target.node.key), DIAL_TIMEOUT)
            stream = conn.open_stream()
            await stream.send(STREAM_TYPE, {**hello, "subnet": target.subnet, "id": target.row.endpoint_id})
            first = await stream.recv(timeout=DIAL_TIMEOUT)
        except (PeerError, ConnectionError, TimeoutError) as exc:
            log.info("rc: host unreachable", extra={"address": address, "reason": str(exc)})
            return {"reconnect": True, "reason": "unreachable"}
        if first is None:
            return {"reconnect": True}
        if first.type == "error":
            body = first.body if isinstance(first.body, dict) else {}
            return self._refused(Refusal(str(body.get("code", "RC_REFUSED")), address, str(body.get("message", ""))), address)

        first_msg = {**first.body, "t": first.type.removeprefix("rc.")}
        await out(first_msg)

        class _Remote:
            async def recv(self) -> Mapping[str, Any] | None:
                try:
                    frame = await stream.recv()
                except (PeerError, ConnectionError):
                    return None
                if frame is None or not isinstance(frame.body, dict):
                    return None
                return {**frame.body, "t": frame.type.removeprefix("rc.")}

            async def send_input(self, seq: int, data: bytes) -> None:
                await stream.send("rc.input", {"seq": seq, "data": data}, timeout=60.0)

            async def resize(self, rows: int, cols: int) -> None:
                await stream.send("rc.resize", {"rows": rows, "cols": cols}, timeout=60.0)

            async def ping(self, msg: Mapping[str, Any]) -> None:
                await stream.send("rc.ping", {"n": msg.get("n")}, timeout=60.0)

            def close(self) -> None:
                with contextlib.suppress(Exception):
                    stream.reset()

        remote = _Remote()
        try:
            ended = await _relay(remote, out, inward, read_only=hello["read_only"],
                                 on_input=self.rt.touch_user_activity, on_ping=remote.ping)
        except (PeerError, ConnectionError):
            ended = None
        return {"ended": ended.get("exit")} if ended else {"reconnect": True}

    @staticmethod
    def _refused(exc: Refusal, address: str) -> dict[str, Any]:
        if exc.instance_token == "RC_ENDED":
            code = exc.message.removeprefix("exit=")
            return {"ended": int(code) if code.lstrip("-").isdigit() else -1}
        raise Refusal(exc.instance_token, address, exc.message, lines=exc.lines)
