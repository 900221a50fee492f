"""A daemon stores what its membership log holds, not only what a push carried.

Found with the property test's divergence (docs/design/membership-validity.md): a member's entry
can bring in entries this node dropped on arrival, or entries that waited for parents since an
earlier push. Those must reach the store too, or a restart loses them and the member's entry
built on them waits for parents again (its effect gone until a peer resends the chain).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from spt.core.identity import NodeId, NodeKey
from spt.core.net.transport import AllowKeys, Transport
from spt.core.proto.hlc import Hlc
from spt.core.proto.membership import (
    Entry,
    countersign_join,
    make_label,
    make_prune,
    propose_join,
)
from spt.testing.nodes import stored_log

pytestmark = [pytest.mark.slow, pytest.mark.root]  # subnet create/join are elevated


def test_a_dropped_chain_a_member_built_on_reaches_the_store(spt_nodes):
    alpha, beta = spt_nodes.subnet(["alpha", "beta"], name="home")
    beta_key = NodeKey.from_private_bytes((beta.home / "node.key").read_bytes())
    beta.stop()  # the test speaks as beta from here
    carol, dave = NodeKey.generate(), NodeKey.generate()
    clocks = {k.node_id: Hlc(k.node_id) for k in (beta_key, carol)}

    def hlc(key: NodeKey):
        return clocks[key.node_id].now(int(time.time() * 1000))

    log = stored_log(alpha)
    epoch = log.state().epoch
    admit_carol = countersign_join(
        propose_join(beta_key, parents=log.valid_heads(), joiner=carol.node_id, label="carol", epoch=epoch, hlc=hlc(beta_key)),
        carol,
    )
    # carol admits dave and relabels; beta, having seen both, relabels on top; meanwhile beta
    # (from another machine, say) prunes carol on what it knew before
    admit_dave = countersign_join(
        propose_join(carol, parents=[admit_carol.hash], joiner=dave.node_id, label="dave", epoch=epoch, hlc=hlc(carol)),
        dave,
    )
    carol_label = make_label(carol, parents=[admit_dave.hash], label="carol2", hlc=hlc(carol))
    beta_label = make_label(beta_key, parents=[carol_label.hash], label="beta2", hlc=hlc(beta_key))
    prune = make_prune(beta_key, parents=[admit_carol.hash], target=carol.node_id, hlc=hlc(beta_key))

    async def push_in_turn(batches: list[list[Entry]]) -> list[str]:
        host, port = alpha.address.rsplit(":", 1)
        transport = Transport(beta_key, host="127.0.0.1", port=0, accept=AllowKeys())
        await transport.start()
        try:
            conn = await transport.connect(NodeId.from_hex(alpha.key), [(host, int(port))], timeout=5)
            out = []
            for batch in batches:
                body = {"subnet": log.subnet_id.hex(), "entries": [e.to_dict() for e in batch]}
                out.append((await conn.request("log.push", body, timeout=10)).type)
            return out
        finally:
            await transport.close()

    # alpha has the prune when carol's join of dave arrives: dropped (carol is no member there);
    # beta's label then brings it in with carol's label, which waited on it
    batches = [[admit_carol], [prune], [admit_dave], [carol_label, beta_label]]
    assert asyncio.run(push_in_turn(batches)) == ["ok"] * 4

    stored = stored_log(alpha)
    assert stored.pending() == ()
    assert all(e.hash in stored for e in (admit_dave, carol_label, beta_label))
    s = stored.state()
    assert s.members.get(beta_key.node_id) == "beta2", s.members
    assert s.standing(carol.node_id) == "pruned" and dave.node_id not in s.members
    # and the running daemon says the same
    doc = alpha.json("subnet", "status", "--nodes")
    labels = {m["label"] for sub in doc["subnets"] for m in sub.get("members", [])}
    assert "beta2" in labels and "carol" not in labels and "dave" not in labels, labels
