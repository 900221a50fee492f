"""Publishing this node's registry rows, in-process (`Messaging.publish` on a stand-in daemon).

A change to one perch re-signs only that perch's rows, in the subnets where they changed (issue
14: `spt ready`, `send` and `ring` had cost more with every subnet held); a deletion re-signs the
subnet's rows and presence with it (docs/design/registry.md); what the views hold afterwards is
what a full publish of everything would hold.
"""

import pytest

from spt.core.config import NodeConfig
from spt.core.endpoints import Endpoints
from spt.core.identity import NodeKey
from spt.core.messaging import Messaging
from spt.core.paths import StatePaths
from spt.core.store import Store
from spt.core.subnets import Subnets


class _Members:
    """What Messaging asks of the member service: no connections, so no push goes anywhere."""

    def __init__(self):
        self.handlers = {}
        self.transport = self
        self.pushes = 0

    def spawn(self, coro, name):
        self.pushes += 1
        coro.close()

    def connection(self, node):
        return None


class _Daemon:
    def __init__(self, root, key=None):
        self.paths = StatePaths(root)
        self.paths.ensure()
        self.key = key or NodeKey.generate()
        self.store = Store(self.paths.db_file)
        self.config = NodeConfig()
        self.label = "here"
        self.announced_relays = ()
        self.user_activity_ms = None
        self.subnets = Subnets(self)
        self.members = _Members()
        self.endpoints = Endpoints(self)
        self.messaging = Messaging(self)

    def addresses(self):
        return []

    def on_endpoint_changed(self, perch_id):  # as spt.core.daemon.Daemon does
        self.messaging.publish(perch=perch_id or None)

    # what sending reaches of EndpointsHost: messaging's answers, and no hosted process
    def registry_rows(self):
        return self.messaging.registry_rows()

    def offline_nodes(self):
        return self.messaging.offline_nodes()

    def offline_reasons(self):
        return self.messaging.offline_reasons()

    def hosted_alive(self, perch_id):
        return False

    def hosted_pid(self, perch_id):
        return None


@pytest.fixture
def daemon(tmp_path):
    d = _Daemon(tmp_path / "n")
    d.subs = [d.subnets.create(name) for name in ("a", "b", "c")]
    yield d
    d.store.close()


def _signed(d):
    """Per subnet: (home, id) -> (version, deleted, ready, description) of this node's rows,
    and the version of its presence."""
    out = {}
    for sub in d.subs:
        view = d.messaging.view(sub)
        rows = {(r.home, r.endpoint_id): (r.version, r.deleted, r.ready, r.description)
                for r in view.records() if hasattr(r, "endpoint_id")}
        out[sub.name] = (rows, view.presence(d.key.node_id).version)
    return out


def _live(d):
    return {s.name: sorted((r.home, r.endpoint_id, r.ready, r.description) for r in d.messaging.view(s).rows())
            for s in d.subs}


async def test_a_perch_change_re_signs_that_perch_only_where_it_changed(daemon):
    eps, messaging = daemon.endpoints, daemon.messaging
    a, b, c = daemon.subs
    p = eps._create("p", a, "active")  # homed in a: visible there only
    eps._create("q", b, "active")
    messaging.publish()  # the presence loop's round: everything, everywhere
    before = _signed(daemon)
    assert set(before["a"][0]) == {("a", "p")} and set(before["b"][0]) == {("b", "q")} and before["c"][0] == {}

    p = eps._update(p, description="hello")
    after = _signed(daemon)
    assert after["b"] == before["b"] and after["c"] == before["c"]  # nothing re-signed there
    version, deleted, _, description = after["a"][0][("a", "p")]
    assert version > before["a"][0][("a", "p")][0] and not deleted and description == "hello"
    assert after["a"][1] == before["a"][1]  # presence: unchanged

    eps._set_setting(p, c, visible=True)  # p now shows in c too; b stays as it was
    shown = _signed(daemon)
    assert shown["b"] == before["b"] and ("a", "p") in shown["c"][0] and shown["a"] == after["a"]
    eps._set_setting(p, c, visible=False)
    hidden = _signed(daemon)
    assert hidden["c"][0][("a", "p")][1]  # a tombstone
    # with a presence signed alongside: what members keep to refuse a replay of p's row there
    assert hidden["c"][1] == hidden["c"][0][("a", "p")][0] > shown["c"][1]
    assert hidden["b"] == before["b"] and hidden["a"] == after["a"]

    pushes = daemon.members.pushes
    daemon.on_endpoint_changed("p")  # nothing changed: nothing signed, nothing pushed
    assert _signed(daemon) == hidden and daemon.members.pushes == pushes


async def test_an_unnamed_sender_shows_in_every_subnet_and_the_rest_stays_as_signed(daemon):
    eps, messaging = daemon.endpoints, daemon.messaging
    a, _, _ = daemon.subs
    eps._create("p", a, "active")
    messaging.publish()
    before = _signed(daemon)
    token, sender = await eps.send("p", from_id=None, body="hi")
    assert token == "QUEUED" and sender.startswith("tmp.")  # held: p is not listening
    after = _signed(daemon)
    for sub in daemon.subs:
        rows, presence = after[sub.name]
        assert (sub.name, sender) in rows  # a transient sender is reachable in every subnet (§4.3)
        assert {k: v for k, v in rows.items() if k[1] != sender} == before[sub.name][0]
        assert presence == before[sub.name][1]


async def test_what_the_views_hold_after_changes_is_what_a_full_publish_holds(daemon):
    eps, messaging = daemon.endpoints, daemon.messaging
    a, b, c = daemon.subs
    messaging.publish()
    p = eps._create("p", a, "active")
    q = eps._create("q", b, "active")
    eps._set_setting(p, b, visible=True)
    eps._update(q, description="x")
    await eps.send("p", from_id=None, body="hi")
    eps._set_setting(p, b, visible=False)
    eps._set_setting(q, c, visible=True)
    incremental = _live(daemon)
    messaging.publish()
    assert _live(daemon) == incremental
    assert incremental["b"] != [] and any(row[1] == "q" for row in incremental["c"])


async def test_a_perch_deleted_before_a_restart_is_tombstoned_for_members_that_missed_it(tmp_path):
    """A member away while a perch was deleted, and the node restarted before it came back,
    must still learn of the deletion: what was signed is remembered across the restart."""
    from spt.core.proto.registry import RegistryView

    d = _Daemon(tmp_path / "n")
    a = d.subnets.create("a")
    d.endpoints._create("p", a, "active")
    d.endpoints._create("q", a, "active")
    d.messaging.publish()
    away = RegistryView(a.name, self_node=NodeKey.generate().node_id)  # a member's view of this node
    away.merge_all(d.messaging.view(a).records())
    assert {r.endpoint_id for r in away.rows()} == {"p", "q"}
    d.endpoints.purge(d.endpoints.get("p"))  # its tombstone is pushed; the member is away
    d.store.close()

    d = _Daemon(tmp_path / "n", d.key)  # the restart
    a = d.subnets.by_name("a")
    d.messaging.publish()  # the presence loop's first round
    view = d.messaging.view(a)
    away.merge_all(view.missing_for(away.digest()))  # the member is back: anti-entropy
    assert {r.endpoint_id for r in away.rows()} == {"q"}
    d.store.close()


async def test_after_a_restart_the_first_publish_signs_everything_even_for_one_perch(tmp_path):
    d = _Daemon(tmp_path / "n")
    a = d.subnets.create("a")
    d.endpoints._create("p", a, "active")
    gone = d.endpoints._create("q", a, "active")
    d.messaging.publish()
    d.endpoints.purge(gone)
    d.store.close()

    d = _Daemon(tmp_path / "n", d.key)
    a = d.subnets.by_name("a")
    d.messaging.view(a)  # a member's push arrived first: the view exists, nothing signed yet
    d.endpoints._update(d.endpoints.get("p"), description="x")  # a change of p alone
    view = d.messaging.view(a)
    assert view.presence(d.key.node_id) is not None  # presence signed too
    assert {(r.endpoint_id, r.deleted) for r in view.records() if hasattr(r, "endpoint_id")} == {("p", False), ("q", True)}
    d.store.close()
