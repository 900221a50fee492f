"""Suspend and wake: the states a perch rests in, and the requests that change them (SPEC.md §2.4,
§4.6, §8.7). Split out of `Endpoints`, which keeps the perches, spools and listeners.

- Setting the state comes first (messages are held from that moment; a woken agent's first
  `spt ready` is not refused), then a hosted perch's process is moved by the hosting service
  (`spt.core.hosting.service`): SIGSTOP, SIGTERM/grace/SIGKILL, SIGCONT or a fresh run.
- What was held is released by the first drain after the wake edge, exactly once (the spool's
  rule; nothing here hands out messages).
- A remote perch is asked through the host's `remote_request` (the network layer); requests are
  never queued: no answer is UNREACHABLE.

What it needs of the node is `RestingHost` (the daemon passes itself): every member is required,
so a host that lacks one is a type error, not a request that silently does nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

from spt.core.endpoints import RESTING, Endpoints, Perch
from spt.core.errors import PeerError, Refusal, RemoteProtocolError
from spt.core.identity import NodeId
from spt.core.proto.resolve import LocalTarget
from spt.core.types import check_endpoint_id

if TYPE_CHECKING:
    from spt.core.daemon import Call, Daemon
    from spt.core.subnets import Subnets

log = logging.getLogger(__name__)

DEFAULT_GRACE: Final = 10.0  # §3.6 `suspend --grace`
MAX_GRACE: Final = 600.0


def grace_of(args: Mapping[str, Any]) -> float:
    """`--grace` (§3.6, default 10 s), bounded so a request cannot hold a process for ever."""
    grace = args.get("grace")
    if not isinstance(grace, int | float) or isinstance(grace, bool):
        return DEFAULT_GRACE
    return max(0.0, min(float(grace), MAX_GRACE))


class HostedProcesses(Protocol):
    """What resting asks of the hosting service (`spt.core.hosting.service.Hosting`): both do
    nothing for a perch with no running (or remembered) process."""

    async def rest(self, perch: Perch, *, warm: bool, grace: float) -> None: ...

    async def wake(self, perch: Perch) -> None: ...


class RestingHost(Protocol):
    """What `Resting` asks of the node around it; the daemon is one."""

    @property
    def subnets(self) -> Subnets: ...

    @property
    def hosting(self) -> HostedProcesses: ...

    async def remote_request(self, node: NodeId, subnet: str, kind: str, args: Mapping[str, Any]) -> dict[str, Any]:
        """Ask `node` through `subnet`; raises PeerError, TimeoutError or ConnectionError when it
        cannot be reached (UNREACHABLE here), Refusal for its own refusal."""
        ...


class Resting:
    def __init__(self, endpoints: Endpoints, host: RestingHost) -> None:
        self.eps = endpoints
        self.host = host

    def suspend_local(self, perch: Perch, *, warm: bool) -> str:
        """Rest a local perch: any listener exits with SUSPENDED; returns the token."""
        self.eps._update(perch, state="dormant" if warm else "suspended")
        self.eps.delivery.stop_listener(perch.id, "SUSPENDED")
        log.info("endpoint suspended", extra={"perch": perch.id, "warm": warm})
        return "DORMANT" if warm else "SUSPENDED"

    def wake_local(self, perch: Perch) -> str:
        """The wake edge: a resting perch is active again; its next drain releases what was held."""
        if perch.state in RESTING:
            perch = self.eps._update(perch, state="active")
            log.info("endpoint woken", extra={"perch": perch.id})
        return "WOKE"

    async def rest(self, perch: Perch, *, warm: bool, grace: float) -> str:
        """Suspend (or, warm, make dormant) a local perch and its hosted process, if any."""
        token = self.suspend_local(perch, warm=warm)  # messages are held from this moment
        if perch.hosted:
            await self.host.hosting.rest(perch, warm=warm, grace=grace)
        return token

    async def wake(self, perch: Perch) -> str:
        """The wake edge, then SIGCONT or a fresh run of the remembered command (hosted)."""
        token = self.wake_local(perch)
        if perch.hosted:
            await self.host.hosting.wake(perch)
        return token

    async def rest_or_wake(self, address_text: str, kind: str, args: Mapping[str, Any]) -> str:
        """`endpoint.suspend` / `endpoint.wake` for an address: here, or asked of its node."""
        target = self.eps.resolve(address_text)
        if isinstance(target, LocalTarget):
            perch = self.eps.require(target.perch.id, address_text)
            if kind == "endpoint.wake":
                return await self.wake(perch)
            return await self.rest(perch, warm=bool(args.get("warm")), grace=grace_of(args))
        try:
            answer = await self.host.remote_request(
                target.node.key, target.subnet, kind, {**args, "id": target.row.endpoint_id}
            )
        except (PeerError, TimeoutError, ConnectionError) as exc:
            raise Refusal("UNREACHABLE", address_text, "the hosting node cannot be reached") from exc
        except Refusal as exc:
            raise Refusal(exc.instance_token, address_text, exc.message, lines=exc.lines) from exc
        return str(answer["token"])

    async def handle_remote_request(
        self, kind: str, args: Mapping[str, Any], *, subnet: str, requester: NodeId
    ) -> dict[str, Any]:
        """A member's `endpoint.suspend` / `endpoint.wake` through `subnet` (§4.6, §8.7).

        Answers {"token": …}; a perch missing or hidden in `subnet` is Refusal NO_PERCH.
        """
        perch_id = check_endpoint_id(str(args.get("id", "")))
        perch = self.eps.get(perch_id)
        if perch is None or not any(s.canonical == subnet.lower() for s in self.eps.visible_in(perch)):
            raise Refusal("NO_PERCH", perch_id)
        label = self.host.subnets.label_of(requester) or requester.short
        log.info("remote request", extra={"op": kind, "perch": perch.id, "by": requester.display(label)})
        if kind == "endpoint.suspend":
            return {"token": await self.rest(perch, warm=bool(args.get("warm")), grace=grace_of(args))}
        if kind == "endpoint.wake":
            return {"token": await self.wake(perch)}
        raise RemoteProtocolError(kind, "unknown endpoint request")


def register_ops(daemon: Daemon, resting: Resting) -> None:
    @daemon.op("endpoint.suspend")
    async def suspend(call: Call) -> Any:
        address = str(call.args.get("address", ""))
        args = {"warm": bool(call.args.get("warm")), "grace": call.args.get("grace")}
        return {"token": await resting.rest_or_wake(address, "endpoint.suspend", args), "address": address}

    @daemon.op("endpoint.wake")
    async def wake(call: Call) -> Any:
        address = str(call.args.get("address", ""))
        return {"token": await resting.rest_or_wake(address, "endpoint.wake", {}), "address": address}
