"""Address resolution over a registry snapshot (SPEC.md §4.1, steps 2–8). Pure.

What lives here: the snapshot value types (`NodeInfo`, `Row`, `LocalPerch`, `Snapshot`), the
targets (`LocalTarget`, `RemoteTarget`), `resolve_node` for `@node` qualifiers, `resolve` for
whole addresses, and `shortest_from_form`, the `from` attribute of envelopes (§3.4).

Rules this module keeps, so that callers need not:
1. Local first: a local perch with the id wins unless `@node` names another node.
2. Hidden rows are absent: a row with `visible=False` is never a candidate (§2.6, §9.14).
3. Rows of one instance seen through several subnets count once; the instance is reached through
   its home subnet when that is in scope, otherwise through the first attached subnet showing it.
4. Nothing is ever guessed: duplicate labels, several identities or several live instances are
   refused with the candidates listed. There is no "most recently active" choice.
5. Subnet names and labels compare without regard to case; ids too.

What must not: reading the store or the network. The caller builds the `Snapshot` (from its
registry views and membership) and turns the target into traffic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Final

from spt.core.errors import Refusal, UsageError
from spt.core.identity import SHORT_HEX, NodeId
from spt.core.proto.address import Address, is_key_prefix, parse_address

LIVE_STATE: Final = "active"
OFFLINE_STATE: Final = "offline"


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A node as a member list knows it: its key and its (non-unique) label."""

    key: NodeId
    label: str

    @property
    def display(self) -> str:
        """`LABEL (xxxxxxxx…)`."""
        return self.key.display(self.label)


@dataclass(frozen=True, slots=True)
class Row:
    """One registry row as seen from one subnet (hidden rows carry `visible=False`)."""

    subnet: str
    endpoint_id: str
    home: str
    node: NodeId
    state: str
    ready: bool = False
    alive: bool = False
    hosted: bool = False
    description: str = ""
    visible: bool = True


@dataclass(frozen=True, slots=True)
class LocalPerch:
    """A perch on this node. `home` is None for a homeless (local-only) endpoint."""

    id: str
    home: str | None
    visible_in: AbstractSet[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What this node knows at one moment, as resolution needs it.

    `nodes_by_subnet` lists the members of each held subnet (this node may be among them);
    `attached_subnets` is the order subnets are tried in; `offline` is computed by the observer
    (no fresh presence, or detached), never read from rows.
    """

    self_node: NodeInfo
    nodes_by_subnet: Mapping[str, Sequence[NodeInfo]]
    attached_subnets: Sequence[str]
    local_perches: Sequence[LocalPerch]
    rows: Sequence[Row]
    offline: AbstractSet[NodeId] = frozenset()


@dataclass(frozen=True, slots=True)
class LocalTarget:
    """The address names a perch on this node."""

    perch: LocalPerch


@dataclass(frozen=True, slots=True)
class RemoteTarget:
    """The address names an instance on another node, reached through `subnet`.

    `live` is False when the message will be queued (resting instance or offline node).
    """

    node: NodeInfo
    subnet: str
    row: Row
    live: bool


Target = LocalTarget | RemoteTarget


# --- node qualifiers ------------------------------------------------------------------------


def _node_candidates(q: str, nodes: Iterable[NodeInfo]) -> dict[NodeId, NodeInfo]:
    wanted = q.lower()
    by_prefix = is_key_prefix(q)
    found: dict[NodeId, NodeInfo] = {}
    for info in nodes:
        if info.key in found:
            continue
        if info.label.lower() == wanted or (by_prefix and info.key.hex.startswith(wanted)):
            found[info.key] = info
    return found


def resolve_node(q: str, nodes: Iterable[NodeInfo]) -> NodeInfo:
    """The one node in `nodes` whose label is `q` (any case) or whose key starts with `q`.

    Raises Refusal NO_SUCH_NODE when none matches and AMBIGUOUS_NODE, listing each candidate's
    display form, when several distinct nodes do: duplicate labels are never guessed between.
    """
    found = _node_candidates(q, nodes)
    if not found:
        raise Refusal("NO_SUCH_NODE", q)
    if len(found) > 1:
        ordered = sorted(found.values(), key=lambda n: (n.label.lower(), n.key.hex))
        raise Refusal("AMBIGUOUS_NODE", q, lines=[f"  {n.display}" for n in ordered])
    return next(iter(found.values()))


# --- scope ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Scope:
    subnets: tuple[str, ...]  # S, display names, in attached order
    lowered: frozenset[str]
    nodes: tuple[NodeInfo, ...]  # this node first, then members of S (keys may repeat)

    def label_of(self, key: NodeId) -> NodeInfo:
        for info in self.nodes:
            if info.key == key:
                return info
        return NodeInfo(key, key.short)

    def qualifier_for(self, node: NodeInfo) -> str:
        """`label` when no other node in scope answers to it, else `hex_for(key)`."""
        if set(_node_candidates(node.label, self.nodes)) == {node.key}:
            return node.label
        return self.hex_for(node.key)

    def hex_for(self, key: NodeId) -> str:
        """The key's first 8 hex characters, longer only if another node in scope answers to them
        (a key sharing the prefix, or a label spelled like it)."""
        for length in range(SHORT_HEX, len(key.hex)):
            prefix = key.hex[:length]
            if set(_node_candidates(prefix, self.nodes)) <= {key}:
                return prefix
        return key.hex


def _scope(address: Address, snapshot: Snapshot) -> _Scope:
    attached = {name.lower(): name for name in snapshot.attached_subnets}
    if address.subnet is None:
        subnets = tuple(snapshot.attached_subnets)
    else:
        name = attached.get(address.subnet.lower())
        if name is None:
            raise Refusal("NO_SUCH_SUBNET", address.subnet)
        subnets = (name,)
    lowered = frozenset(s.lower() for s in subnets)
    nodes: list[NodeInfo] = [snapshot.self_node]
    for subnet, members in snapshot.nodes_by_subnet.items():
        if subnet.lower() in lowered:
            nodes.extend(members)
    return _Scope(subnets, lowered, tuple(nodes))


# --- candidates -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Instance:
    row: Row  # the row through the subnet the instance is reached by
    node: NodeInfo
    offline: bool

    @property
    def live(self) -> bool:
        return self.row.state == LIVE_STATE and not self.offline

    @property
    def state(self) -> str:
        """The state as the observer shows it: `offline` overrides what the row says."""
        return OFFLINE_STATE if self.offline else self.row.state


def _local_perch(address: Address, snapshot: Snapshot) -> LocalPerch | None:
    wanted = address.id.lower()
    for perch in snapshot.local_perches:
        if perch.id.lower() != wanted:
            continue
        if address.subnet is None:
            return perch
        subnet = address.subnet.lower()
        homed = perch.home is not None and perch.home.lower() == subnet
        if homed or any(v.lower() == subnet for v in perch.visible_in):
            return perch
    return None


def _lookup(address: Address, snapshot: Snapshot) -> LocalPerch | tuple[_Scope, list[_Instance]]:
    """Steps 2–5: a local perch, or the remote instances matching (possibly none)."""
    scope = _scope(address, snapshot)
    named: NodeInfo | None = None
    if address.node is not None:
        named = resolve_node(address.node, scope.nodes)
    self_key = snapshot.self_node.key
    if named is None or named.key == self_key:
        perch = _local_perch(address, snapshot)
        if perch is not None:
            return perch
        if named is not None:
            raise Refusal("NO_PERCH", address.text)

    wanted = address.id.lower()
    order = {s.lower(): i for i, s in enumerate(scope.subnets)}
    grouped: dict[tuple[NodeId, str, str], list[Row]] = {}
    for row in snapshot.rows:
        # This node's own rows stand for local perches, which step 4 has already decided on.
        if (
            not row.visible
            or row.node == self_key
            or row.endpoint_id.lower() != wanted
            or row.subnet.lower() not in scope.lowered
            or (named is not None and row.node != named.key)
        ):
            continue
        grouped.setdefault((row.node, row.home.lower(), wanted), []).append(row)

    instances: list[_Instance] = []
    for (node, home, _), rows in grouped.items():
        through_home = [r for r in rows if r.subnet.lower() == home]
        row = through_home[0] if through_home else min(rows, key=lambda r: order[r.subnet.lower()])
        instances.append(_Instance(row, scope.label_of(node), node in snapshot.offline))
    instances.sort(key=lambda i: (order[i.row.subnet.lower()], i.node.label.lower(), i.node.key.hex))
    return scope, instances


# --- resolution -----------------------------------------------------------------------------


def _target(instance: _Instance) -> RemoteTarget:
    return RemoteTarget(instance.node, instance.row.subnet, instance.row, instance.live)


def _ambiguous(address: Address, scope: _Scope, instances: Sequence[_Instance]) -> Refusal:
    # A subnet the user typed stays in the forms: without it they would resolve in a wider scope,
    # where the label may no longer be unique. Otherwise the prefix appears only when needed.
    spans = address.subnet is not None or len({i.row.subnet.lower() for i in instances}) > 1
    lines = []
    for inst in instances:
        prefix = f"{inst.row.subnet}:" if spans else ""
        form = f"{prefix}{inst.row.endpoint_id}@{scope.qualifier_for(inst.node)}"
        lines.append(f"  {form}  {inst.state}")
    return Refusal(
        "AMBIGUOUS", address.text, f"matches {len(instances)} endpoints; qualify the address", lines=lines
    )


def resolve(address: Address, snapshot: Snapshot) -> Target:
    """The one perch `address` names, by SPEC.md §4.1 steps 2–8.

    Raises Refusal: NO_SUCH_SUBNET (prefix not held or detached), NO_SUCH_NODE and
    AMBIGUOUS_NODE (the `@node` part), NO_PERCH (nothing visible matches), AMBIGUOUS (several
    identities, several live instances, or several resting ones; the lines are qualified forms).
    """
    found = _lookup(address, snapshot)
    if isinstance(found, LocalPerch):
        return LocalTarget(found)
    scope, instances = found
    if not instances:
        raise Refusal("NO_PERCH", address.text)
    if len({i.row.home.lower() for i in instances}) == 1:
        live = [i for i in instances if i.live]
        if len(live) == 1:
            return _target(live[0])
        if not live and len(instances) == 1:
            return _target(instances[0])
    raise _ambiguous(address, scope, instances)


def _names_sender(text: str, sender_id: str, sender_node: NodeId, snapshot: Snapshot) -> bool:
    """True when `text` resolves on `snapshot`'s node to the sender's instance and to nothing else."""
    try:
        found = _lookup(parse_address(text), snapshot)
    except (Refusal, UsageError):
        return False
    if isinstance(found, LocalPerch):
        return sender_node == snapshot.self_node.key and found.id.lower() == sender_id.lower()
    _, instances = found
    return len(instances) == 1 and instances[0].node.key == sender_node


def shortest_from_form(
    sender_id: str, sender_node: NodeId, snapshot: Snapshot, *, via_subnet: str | None = None
) -> str:
    """The `from` attribute for a message from `sender_id` on `sender_node` (SPEC.md §3.4).

    `snapshot` is the *receiver's* node. The result is the shortest address that resolves there
    to the sender's instance alone (one candidate, so it stays right when states change): forms
    with a label beat forms with a key prefix, then shorter beats longer. A sender on the
    receiver's own node is its bare id. When no form is unique (a transient `tmp.` identity
    has no row), the fully qualified form through `via_subnet` is returned.
    """
    if sender_node == snapshot.self_node.key:
        return sender_id
    if via_subnet is not None and not any(
        r.node == sender_node and r.endpoint_id.lower() == sender_id.lower() for r in snapshot.rows
    ):
        # The message came from that instance through `via_subnet`, so it exists there (senders
        # always have a perch), even if its row has not arrived yet: judge the forms with it.
        sender_row = Row(via_subnet, sender_id, via_subnet, sender_node, LIVE_STATE)
        snapshot = dataclasses.replace(snapshot, rows=[*snapshot.rows, sender_row])
    all_nodes: list[NodeInfo] = [snapshot.self_node]
    for members in snapshot.nodes_by_subnet.values():
        all_nodes.extend(members)
    scope = _Scope(tuple(snapshot.attached_subnets), frozenset(), tuple(all_nodes))
    node = scope.label_of(sender_node)
    hex_prefix = scope.hex_for(node.key)

    subnets: list[str | None] = [None]
    if via_subnet is not None:
        subnets.append(via_subnet)
    via = None if via_subnet is None else via_subnet.lower()
    subnets.extend(s for s in snapshot.attached_subnets if s.lower() != via)
    forms: list[tuple[int, int, str]] = []
    for subnet in subnets:
        prefix = "" if subnet is None else f"{subnet}:"
        for rank, qualifier in ((0, None), (0, node.label), (1, hex_prefix)):
            suffix = "" if qualifier is None else f"@{qualifier}"
            text = f"{prefix}{sender_id}{suffix}"
            forms.append((rank, len(text), text))
    for _, _, text in sorted(forms, key=lambda f: (f[0], f[1])):
        if _names_sender(text, sender_id, sender_node, snapshot):
            return text
    fallback = f"{sender_id}@{scope.qualifier_for(node)}"
    return fallback if via_subnet is None else f"{via_subnet}:{fallback}"
