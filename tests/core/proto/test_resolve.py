"""Address resolution (SPEC.md §4.1 steps 2–8) and the `from` form (§3.4)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pytest

from spt.core.errors import EXIT_REFUSED, Refusal
from spt.core.identity import NodeId
from spt.core.proto.address import parse_address
from spt.core.proto.resolve import (
    LocalPerch,
    LocalTarget,
    NodeInfo,
    RemoteTarget,
    Row,
    Snapshot,
    resolve,
    resolve_node,
    shortest_from_form,
)


def nid(prefix: str) -> NodeId:
    return NodeId(bytes.fromhex(prefix.ljust(64, "0")))


ME = NodeInfo(nid("00000000ee"), "me")
LAPTOP = NodeInfo(nid("aaaa1111"), "laptop")
DESK_1 = NodeInfo(nid("bbbb2222"), "desktop")
DESK_2 = NodeInfo(nid("cccc3333"), "Desktop")  # the same label, another case: a duplicate
SERVER = NodeInfo(nid("dddd4444"), "server")

MEMBERS = {
    "home": [ME, LAPTOP, DESK_1, DESK_2],
    "work": [ME, LAPTOP, SERVER],
    "old": [ME, SERVER],  # held but detached
}


def row(node: NodeInfo, subnet: str = "home", endpoint_id: str = "sergey", home: str = "home", **kw) -> Row:
    return Row(
        subnet=subnet,
        endpoint_id=endpoint_id,
        home=home,
        node=node.key,
        state=kw.pop("state", "active"),
        **kw,
    )


def snap(
    rows: Sequence[Row] = (),
    perches: Sequence[LocalPerch] = (),
    offline: Iterable[NodeInfo] = (),
    attached: Sequence[str] = ("home", "work"),
    members: dict[str, list[NodeInfo]] | None = None,
) -> Snapshot:
    return Snapshot(
        self_node=ME,
        nodes_by_subnet=members if members is not None else MEMBERS,
        attached_subnets=list(attached),
        local_perches=list(perches),
        rows=list(rows),
        offline={n.key for n in offline},
    )


def go(text: str, snapshot: Snapshot):
    return resolve(parse_address(text), snapshot)


def refusal(text: str, snapshot: Snapshot) -> Refusal:
    with pytest.raises(Refusal) as info:
        go(text, snapshot)
    assert info.value.instance_exit_code == EXIT_REFUSED
    return info.value


# --- resolve_node ---------------------------------------------------------------------------


def test_node_by_label_ignores_case() -> None:
    assert resolve_node("LAPTOP", [ME, LAPTOP, SERVER]) == LAPTOP


def test_node_by_key_prefix_of_four_or_more_hex() -> None:
    assert resolve_node("dddd", [ME, LAPTOP, SERVER]) == SERVER
    assert resolve_node("DDDD4444", [ME, LAPTOP, SERVER]) == SERVER
    assert resolve_node(SERVER.key.hex, [ME, LAPTOP, SERVER]) == SERVER


def test_three_hex_characters_are_only_a_label() -> None:
    with pytest.raises(Refusal) as info:
        resolve_node("ddd", [ME, SERVER])
    assert info.value.status_line().partition(" ")[0] == "NO_SUCH_NODE:ddd"


def test_the_same_node_listed_twice_counts_once() -> None:
    assert resolve_node("laptop", [LAPTOP, ME, LAPTOP]) == LAPTOP


def test_duplicate_labels_are_never_guessed_between() -> None:
    with pytest.raises(Refusal) as info:
        resolve_node("desktop", [ME, DESK_1, DESK_2])
    err = info.value
    assert err.status_line().partition(" ")[0] == "AMBIGUOUS_NODE:desktop"
    assert err.lines == ("  desktop (bbbb2222…)", "  Desktop (cccc3333…)")
    assert resolve_node("bbbb", [ME, DESK_1, DESK_2]) == DESK_1


def test_a_label_and_another_nodes_key_prefix_are_ambiguous() -> None:
    beef = NodeInfo(nid("beef0000"), "x")
    named_beef = NodeInfo(nid("11110000"), "beef")
    with pytest.raises(Refusal) as info:
        resolve_node("beef", [beef, named_beef])
    assert info.value.instance_token == "AMBIGUOUS_NODE"
    assert len(info.value.lines) == 2


# --- subnet scope ---------------------------------------------------------------------------


def test_a_subnet_that_is_not_held_is_refused() -> None:
    err = refusal("play:sergey", snap([row(LAPTOP)]))
    assert err.status_line().partition(" ")[0] == "NO_SUCH_SUBNET:play"


def test_a_held_but_detached_subnet_is_refused() -> None:
    err = refusal("old:sergey", snap([row(SERVER, subnet="old", home="old")]))
    assert err.status_line().partition(" ")[0] == "NO_SUCH_SUBNET:old"


def test_subnet_prefix_ignores_case() -> None:
    target = go("HOME:Sergey@LAPTOP", snap([row(LAPTOP)]))
    assert isinstance(target, RemoteTarget)
    assert target.node == LAPTOP


def test_node_scope_is_the_members_of_the_subnets_in_scope() -> None:
    rows = [row(SERVER, subnet="work", home="work")]
    assert isinstance(go("sergey@server", snap(rows)), RemoteTarget)
    assert refusal("home:sergey@server", snap(rows)).status_line().partition(" ")[0] == "NO_SUCH_NODE:server"


# --- local first ----------------------------------------------------------------------------


def test_a_local_perch_wins_over_remote_rows() -> None:
    perch = LocalPerch("sergey", "home", {"home"})
    assert go("sergey", snap([row(LAPTOP)], [perch])) == LocalTarget(perch)


def test_local_ids_match_without_regard_to_case() -> None:
    perch = LocalPerch("Sergey", None)
    assert go("SERGEY", snap([], [perch])) == LocalTarget(perch)


def test_a_homeless_local_perch_resolves_without_a_subnet() -> None:
    perch = LocalPerch("solo", None)
    assert go("solo", snap([], [perch], attached=())) == LocalTarget(perch)


def test_at_another_node_skips_the_local_perch() -> None:
    perch = LocalPerch("sergey", "home", {"home"})
    target = go("sergey@laptop", snap([row(LAPTOP)], [perch]))
    assert isinstance(target, RemoteTarget)
    assert target.node == LAPTOP


def test_at_this_node_takes_the_local_perch() -> None:
    perch = LocalPerch("sergey", "home", {"home"})
    assert go("sergey@me", snap([row(LAPTOP)], [perch])) == LocalTarget(perch)
    assert go(f"sergey@{ME.key.short}", snap([row(LAPTOP)], [perch])) == LocalTarget(perch)


def test_at_this_node_without_a_local_perch_is_no_perch() -> None:
    err = refusal("sergey@me", snap([row(LAPTOP)]))
    assert err.status_line().partition(" ")[0] == "NO_PERCH:sergey@me"


def test_with_a_subnet_the_local_perch_must_be_homed_or_visible_there() -> None:
    homed_work = LocalPerch("sergey", "work", {"work"})
    shown_in_home = LocalPerch("sergey", "work", {"work", "home"})
    # Homed in work, hidden in home: from home's side it is absent, the remote row answers.
    target = go("home:sergey", snap([row(LAPTOP)], [homed_work]))
    assert isinstance(target, RemoteTarget)
    assert go("home:sergey", snap([row(LAPTOP)], [shown_in_home])) == LocalTarget(shown_in_home)
    assert go("work:sergey", snap([row(LAPTOP)], [homed_work])) == LocalTarget(homed_work)
    homed_but_hidden = LocalPerch("sergey", "work", set())
    assert go("work:sergey", snap([], [homed_but_hidden])) == LocalTarget(homed_but_hidden)


def test_this_nodes_own_rows_never_stand_in_for_a_missing_perch() -> None:
    err = refusal("sergey", snap([row(ME)]))
    assert err.status_line().partition(" ")[0] == "NO_PERCH:sergey"


# --- candidates -----------------------------------------------------------------------------


def test_nothing_found_is_no_perch_with_the_address_as_typed() -> None:
    err = refusal("Home:Nobody", snap([row(LAPTOP)]))
    assert err.status_line().partition(" ")[0] == "NO_PERCH:Home:Nobody"


def test_hidden_rows_are_treated_as_absent() -> None:
    assert refusal("sergey", snap([row(LAPTOP, visible=False)])).status_line().partition(" ")[0] == "NO_PERCH:sergey"
    # A second, hidden instance does not make the address ambiguous.
    target = go("sergey", snap([row(LAPTOP, state="suspended"), row(DESK_1, visible=False)]))
    assert isinstance(target, RemoteTarget)
    assert target.node == LAPTOP


def test_one_instance_seen_through_two_subnets_counts_once_and_goes_through_home() -> None:
    rows = [row(LAPTOP, subnet="work", home="home"), row(LAPTOP, subnet="home", home="home")]
    target = go("sergey", snap(rows))
    assert isinstance(target, RemoteTarget)
    assert target.subnet == "home"
    assert target.row.subnet == "home"
    via_work = go("work:sergey", snap(rows))
    assert isinstance(via_work, RemoteTarget)
    assert via_work.subnet == "work"


def test_an_instance_hidden_in_its_home_is_reached_where_it_is_visible() -> None:
    rows = [row(LAPTOP, subnet="home", visible=False), row(LAPTOP, subnet="work")]
    target = go("sergey", snap(rows))
    assert isinstance(target, RemoteTarget)
    assert target.subnet == "work"


def test_an_instance_homed_outside_scope_goes_through_the_first_attached_subnet() -> None:
    rows = [row(LAPTOP, subnet="work", home="far"), row(LAPTOP, subnet="home", home="far")]
    target = go("sergey", snap(rows, attached=("work", "home")))
    assert isinstance(target, RemoteTarget)
    assert target.subnet == "work"


def test_rows_outside_the_named_subnet_are_not_candidates() -> None:
    rows = [row(LAPTOP, subnet="home"), row(SERVER, subnet="work", home="work")]
    target = go("work:sergey", snap(rows))
    assert isinstance(target, RemoteTarget)
    assert target.node == SERVER


def test_several_identities_are_ambiguous_even_if_one_is_live() -> None:
    rows = [
        row(LAPTOP, subnet="home", home="home"),
        row(SERVER, subnet="work", home="work", state="suspended"),
    ]
    err = refusal("sergey", snap(rows))
    assert err.status_line() == "AMBIGUOUS:sergey matches 2 endpoints; qualify the address"
    assert err.lines == ("  home:sergey@laptop  active", "  work:sergey@server  suspended")


def test_one_identity_with_exactly_one_live_instance_is_that_instance() -> None:
    rows = [row(LAPTOP, state="suspended"), row(DESK_1), row(DESK_2, state="dormant")]
    target = go("sergey", snap(rows))
    assert target == RemoteTarget(DESK_1, "home", rows[1], live=True)


def test_one_identity_with_two_live_instances_is_ambiguous() -> None:
    rows = [row(LAPTOP), row(DESK_1), row(DESK_2, state="suspended")]
    err = refusal("sergey", snap(rows))
    assert err.status_line() == "AMBIGUOUS:sergey matches 3 endpoints; qualify the address"
    # One subnet: no prefix. "laptop" is unique; the two "desktop"s get key prefixes.
    assert err.lines == (
        "  sergey@bbbb2222  active",
        "  sergey@cccc3333  suspended",
        "  sergey@laptop  active",
    )


def test_one_resting_instance_is_the_target_and_will_queue() -> None:
    rows = [row(LAPTOP, state="suspended")]
    target = go("sergey", snap(rows))
    assert target == RemoteTarget(LAPTOP, "home", rows[0], live=False)


def test_several_resting_instances_are_ambiguous() -> None:
    rows = [row(LAPTOP, state="suspended"), row(SERVER, subnet="work", state="dormant")]
    err = refusal("sergey", snap(rows))
    assert err.message == "matches 2 endpoints; qualify the address"
    assert err.lines == ("  home:sergey@laptop  suspended", "  work:sergey@server  dormant")


def test_active_rows_on_an_offline_node_are_not_live() -> None:
    rows = [row(LAPTOP), row(SERVER, subnet="work")]
    err = refusal("sergey", snap(rows, offline=[LAPTOP, SERVER]))
    assert err.lines == ("  home:sergey@laptop  offline", "  work:sergey@server  offline")
    target = go("sergey", snap(rows, offline=[LAPTOP]))
    assert isinstance(target, RemoteTarget)
    assert target.node == SERVER
    assert target.live


def test_a_lone_instance_on_an_offline_node_is_the_target_and_not_live() -> None:
    target = go("sergey", snap([row(LAPTOP)], offline=[LAPTOP]))
    assert isinstance(target, RemoteTarget)
    assert not target.live


def test_at_node_narrows_the_candidates() -> None:
    rows = [row(LAPTOP), row(DESK_1)]
    target = go("sergey@laptop", snap(rows))
    assert isinstance(target, RemoteTarget)
    assert target.node == LAPTOP
    assert refusal("sergey@server", snap(rows)).status_line().partition(" ")[0] == "NO_PERCH:sergey@server"


def test_ambiguous_node_qualifier_is_refused_before_any_row() -> None:
    err = refusal("sergey@desktop", snap([row(DESK_1)]))
    assert err.instance_token == "AMBIGUOUS_NODE"
    assert set(err.lines) == {f"  {DESK_1.display}", f"  {DESK_2.display}"}


def test_qualified_forms_lengthen_a_shared_8_hex_prefix() -> None:
    twin = NodeInfo(nid("aaaa1111f"), "laptop")
    members = {"home": [ME, LAPTOP, twin]}
    err = refusal("sergey", snap([row(LAPTOP), row(twin)], members=members, attached=("home",)))
    assert err.lines == ("  sergey@aaaa11110  active", "  sergey@aaaa1111f  active")


def test_a_key_prefix_spelled_like_another_nodes_label_is_lengthened() -> None:
    impostor = NodeInfo(nid("11112222"), "aaaa1111")
    members = {"home": [ME, LAPTOP, impostor, NodeInfo(nid("eeee0000"), "laptop")]}
    rows = [row(LAPTOP), row(impostor)]
    err = refusal("sergey", snap(rows, members=members, attached=("home",)))
    assert "  sergey@aaaa11110  active" in err.lines


def test_a_typed_subnet_stays_in_the_qualified_forms() -> None:
    members = {"home": [ME, LAPTOP, DESK_1], "work": [ME, NodeInfo(nid("ffff0000"), "laptop")]}
    rows = [row(LAPTOP), row(DESK_1)]
    err = refusal("home:sergey", snap(rows, members=members))
    assert err.lines == ("  home:sergey@desktop  active", "  home:sergey@laptop  active")
    for line in err.lines:
        assert isinstance(go(line.split()[0], snap(rows, members=members)), RemoteTarget)


def test_every_listed_form_resolves_to_exactly_its_candidate() -> None:
    rows = [
        row(LAPTOP),
        row(DESK_1),
        row(DESK_2, state="dormant"),
        row(SERVER, subnet="work", home="work"),
        row(LAPTOP, subnet="work", home="work", state="suspended"),
    ]
    snapshot = snap(rows)
    err = refusal("sergey", snapshot)
    assert len(err.lines) == 5
    for line in err.lines:
        form, state = line.strip().split("  ")
        target = go(form, snapshot)
        assert isinstance(target, RemoteTarget)
        assert state == target.row.state


# --- from form ------------------------------------------------------------------------------


def test_from_form_is_the_bare_id_when_that_is_unique() -> None:
    assert shortest_from_form("alice", LAPTOP.key, snap([row(LAPTOP, endpoint_id="alice")])) == "alice"


def test_from_form_of_a_local_sender_is_its_id() -> None:
    assert shortest_from_form("alice", ME.key, snap([], [LocalPerch("alice", "home")])) == "alice"


def test_from_form_qualifies_when_the_receiver_has_a_perch_of_that_id() -> None:
    snapshot = snap([row(LAPTOP, endpoint_id="alice")], [LocalPerch("alice", "home")])
    assert shortest_from_form("alice", LAPTOP.key, snapshot) == "alice@laptop"


def test_from_form_names_the_sending_instance_of_a_multi_instance_endpoint() -> None:
    rows = [row(LAPTOP, endpoint_id="alice"), row(DESK_1, endpoint_id="alice", state="suspended")]
    assert shortest_from_form("alice", LAPTOP.key, snap(rows)) == "alice@laptop"
    # Through different subnets, the subnet prefix is shorter and just as unique.
    rows = [
        row(LAPTOP, endpoint_id="alice"),
        row(SERVER, subnet="work", endpoint_id="alice", state="suspended"),
    ]
    assert shortest_from_form("alice", LAPTOP.key, snap(rows)) == "home:alice"


def test_from_form_prefers_a_shorter_subnet_prefix() -> None:
    rows = [row(LAPTOP, endpoint_id="al"), row(SERVER, subnet="work", home="work", endpoint_id="al")]
    assert shortest_from_form("al", SERVER.key, snap(rows)) == "work:al"


def test_from_form_uses_a_key_prefix_for_a_duplicate_label() -> None:
    rows = [row(DESK_1, endpoint_id="alice"), row(DESK_2, endpoint_id="alice")]
    assert shortest_from_form("alice", DESK_2.key, snap(rows)) == "alice@cccc3333"


def test_from_form_resolves_back_to_the_sender() -> None:
    rows = [
        row(LAPTOP, endpoint_id="alice"),
        row(DESK_1, endpoint_id="alice"),
        row(DESK_2, endpoint_id="alice", subnet="home", home="home"),
        row(SERVER, subnet="work", home="work", endpoint_id="alice"),
    ]
    snapshot = snap(rows, [LocalPerch("alice", "home")])
    for sender in (LAPTOP, DESK_1, DESK_2, SERVER):
        form = shortest_from_form("alice", sender.key, snapshot)
        target = go(form, snapshot)
        assert isinstance(target, RemoteTarget)
        assert target.node == sender


def test_from_form_does_not_wait_for_the_senders_row() -> None:
    # The message came through `home`, so the sender has an instance there even when its row
    # has not replicated yet: the form is the shortest one, and it resolves once the row is in.
    assert shortest_from_form("tmp.1a2b3c4d", LAPTOP.key, snap(), via_subnet="home") == "tmp.1a2b3c4d"
    assert shortest_from_form("alice", LAPTOP.key, snap(), via_subnet="home") == "alice"
    later = snap([row(LAPTOP, endpoint_id="alice")])
    target = go("alice", later)
    assert isinstance(target, RemoteTarget) and target.node == LAPTOP
    # a perch of that id on the receiver: qualified by the sender's node
    local = snap([], [LocalPerch("alice", "home")])
    assert shortest_from_form("alice", LAPTOP.key, local, via_subnet="home") == "alice@laptop"


def test_from_form_without_a_subnet_or_row_falls_back_to_a_qualified_form() -> None:
    assert shortest_from_form("tmp.1a2b3c4d", DESK_1.key, snap()) == "tmp.1a2b3c4d@bbbb2222"


def test_refusals_raised_without_a_reason_still_explain_themselves() -> None:
    for err in (refusal("nobody", snap()), refusal("sergey@ddd", snap())):
        head, _, explanation = err.status_line().partition(" ")
        assert head in ("NO_PERCH:nobody", "NO_SUCH_NODE:ddd") and len(explanation) > 20
