"""Choosing relays from this node's config, its subnets and the build (sources.py)."""

from spt_relay_fallback.sources import build_defaults, choose, read_removed, write_removed
from spt_relay_fallback.url import RelayUrl

from spt.core.identity import NodeKey


def url(port):
    return RelayUrl.parse(f"spt-relay://10.0.0.1:{port}#{NodeKey.generate().node_id.hex}")


def test_local_first_then_subnet_then_build_each_once_and_removed_ones_left_out():
    mine, theirs, shipped, gone = url(1), url(2), url(3), url(4)
    subnet = {str(theirs): ["work"], str(mine): ["home"], str(gone): ["home"], "not a url": ["home"]}
    chosen = choose([mine], subnet, [shipped, gone], {gone.public})
    assert [(c.url, c.source, c.subnets) for c in chosen] == [
        (mine, "local", None), (shipped, "default", None), (theirs, "subnet", frozenset({"work"})),
    ]  # a learned relay serves only the subnets whose members announce it; our own serve all
    # a relay the user removed but then added locally again is used, as local
    assert next(c.source for c in choose([gone], subnet, [], {gone.public})) == "local"


def test_this_build_ships_no_default_relays():
    assert build_defaults() == []


def test_the_deny_list_survives_a_round_trip_and_a_damaged_file_counts_as_empty(tmp_path):
    assert read_removed(tmp_path) == set()
    write_removed(tmp_path, {"spt-relay://x:1#ab"})
    assert read_removed(tmp_path) == {"spt-relay://x:1#ab"}
    (tmp_path / "relay" / "removed.json").write_text("{not json")
    assert read_removed(tmp_path) == set()
