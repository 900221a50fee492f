"""Control operations (the local socket) on subnets that need the network: join, prune, leave,
unlock, and the key-change verbs (`spt node trust …`, `spt node rekey`)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any

from spt.core.errors import UsageError
from spt.core.subnets import check_join_code
from spt.core.types import check_seconds

if TYPE_CHECKING:
    from spt.core.daemon import Call, Daemon
    from spt.core.members import Members


def register_ops(daemon: Daemon, members: Members) -> None:
    """Control operations on subnets that need the network."""

    @daemon.op("subnet.join", elevated=True)
    async def join(call: Call) -> Any:
        args = call.args
        entered_at = time.monotonic() - int(args.get("entered_ago_ms", 0)) / 1000
        timeout = check_seconds(args.get("timeout", 30.0))  # else -1 searched no time: JOIN_NOT_FOUND
        result = await members.joins.join(
            str(args.get("name", "")),
            check_join_code(str(args.get("code", ""))),
            peers=[str(p) for p in args.get("peers", [])],
            timeout=timeout,
            entered_at=entered_at,
            id_prefix=args.get("id"),
            on_progress=(lambda text: call.emit({"progress": text})) if call.interactive else None,
        )
        homed = daemon.on_first_subnet(result.sub)
        await daemon.subnets_changed()
        return {
            "name": result.sub.name,
            "id": result.sub.short_id,
            "homed": homed,
            "timing": {"discovery_s": result.discovery_s, "ceremony_s": result.ceremony_s},
        }

    @daemon.op("subnet.prune", elevated=True)
    async def prune(call: Call) -> Any:
        sub = daemon.subnets.only_or_named(call.args.get("subnet"))
        target = members.logs.resolve_member(sub, str(call.args.get("node", "")))
        await members.logs.prune(sub, target)
        return {**daemon.subnets.code_answer(sub), "pruned": target.display}

    @daemon.op("subnet.leave", elevated=True)
    async def leave(call: Call) -> Any:
        sub = daemon.subnets.require(str(call.args.get("name", "")))
        await members.logs.leave(sub)
        orphaned = daemon.departed(sub, "left")
        await daemon.subnets_changed()
        return {"name": sub.name, "orphaned": orphaned}

    @daemon.op("node.trust.list")
    async def trust_list(call: Call) -> Any:
        pins = [
            {"subnet": sub.name, "label": label, "key": key.hex}
            for sub in sorted(daemon.subnets.held.values(), key=lambda s: s.canonical)
            for key, label in sorted(sub.state().members.items(), key=lambda kv: (kv[1].lower(), kv[0].hex))
        ]
        return {"pins": pins, "pending": members.claims.pending()}

    @daemon.op("node.trust.accept", elevated=True)
    async def trust_accept(call: Call) -> Any:
        node, subnet = str(call.args.get("node", "")), call.args.get("subnet")
        if call.args.get("preview"):
            sub, old, new = members.claims.resolve(node, subnet)
            label = sub.state().members.get(old, "")
            return {"subnet": sub.name, "old": old.display(label), "old_fingerprint": old.fingerprint,
                    "new": new.display(label), "new_fingerprint": new.fingerprint, "new_key": new.hex}
        # The accept names the exact new key the human compared: a claim that arrived since the
        # preview (an outsider's, say) is never the one accepted.
        new_key = call.args.get("new")
        if not isinstance(new_key, str) or len(new_key) != 64:
            raise UsageError("BAD_USAGE", node, "trust accept names the previewed new key (64 hex digits)")
        sub, old, new = members.claims.resolve(node, subnet, new_key)
        return {"subnet": sub.name, "trusted": await members.claims.accept(sub, old, new)}

    @daemon.op("node.trust.reject")
    async def trust_reject(call: Call) -> Any:
        node = str(call.args.get("node", ""))
        sub, old, new = members.claims.resolve(node, call.args.get("subnet"))
        members.claims.drop(sub, old, new)
        return {"subnet": sub.name, "node": node}

    @daemon.op("node.rekey", elevated=True)
    async def rekey(call: Call) -> Any:
        new = members.claims.rekey()
        # Answer first, then restart under the new key (the service manager or autostart brings
        # the daemon back; `spt node rekey` restarts it itself when it may).
        asyncio.get_running_loop().call_later(0.2, daemon.request_stop)
        return {"display": new.node_id.display(daemon.label), "key": new.node_id.hex, "pid": os.getpid()}

    @daemon.op("subnet.unlock", elevated=True)
    async def unlock(call: Call) -> Any:
        sub = daemon.subnets.require(str(call.args.get("name", "")))
        members.joins.unlock(sub)
        return {"name": sub.name}
