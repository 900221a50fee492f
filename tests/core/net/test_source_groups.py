"""Per-address bounds count an IPv6 /64 as one source (an attacker is handed a whole /64)."""

import asyncio

import pytest

from spt.core.identity import NodeKey
from spt.core.net.sources import source_group
from spt.core.net.transport import ALPN_JOIN, UNPROVED_PER_SOURCE, AllowKeys, Transport


@pytest.mark.parametrize(
    ("host", "group"),
    [
        ("192.0.2.7", "192.0.2.7"),  # IPv4: each address its own
        ("192.0.2.8", "192.0.2.8"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # the same /64, another host part
        ("2001:DB8:1:2:abcd::9", "2001:db8:1:2::/64"),  # spelled another way
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),  # the next /64 is another source
        ("::ffff:192.0.2.7", "192.0.2.7"),  # an IPv4 peer seen by a dual-stack socket
        ("fe80::1%eth0", "fe80::/64"),  # a zone id does not make a new source
        ("240.1.2.3", "240.1.2.3"),  # a relayed peer's virtual address
        ("not-an-address", "not-an-address"),
        ("x:y", "x:y"),
    ],
)
def test_source_group(host, group):
    assert source_group(host) == group


@pytest.mark.lab
def test_join_connections_from_one_ipv6_64_share_one_sources_bound(netns_lab):
    """Over real IPv6 in a lab namespace: strangers on the join ALPN, each from its own address
    of one /64, get UNPROVED_PER_SOURCE connections between them; one from another /64 gets in."""
    lab = netns_lab(ipv6=True)
    lab.lan(1)
    (host,) = lab.hosts()
    lab.local_ipv6_nets(host, ("fd00:64::/64", "fd00:65::/64"))

    async def scenario():
        made = []

        async def transport(address):
            t = Transport(NodeKey.generate(), host=address, accept=AllowKeys(), idle_timeout=5.0)
            await t.start()
            made.append(t)
            return t

        try:
            target = await transport("fd00:64::1")
            strangers = [await transport(f"fd00:64::{i + 2:x}:1") for i in range(UNPROVED_PER_SOURCE + 2)]
            async with asyncio.timeout(15):
                results = await asyncio.gather(
                    *(s.connect_any(target.sockname, alpn=ALPN_JOIN, timeout=2.0) for s in strangers),
                    return_exceptions=True,
                )
                await asyncio.sleep(0.2)  # one over the bound is closed as soon as it is established
                held = sum(not isinstance(r, BaseException) and r.is_open for r in results)
                other = await (await transport("fd00:65::1")).connect_any(target.sockname, alpn=ALPN_JOIN, timeout=2.0)
            return held, other.is_open
        finally:
            for t in made:
                await t.close()

    # the loop runs on a thread inside the lab's namespace: every socket it opens is there
    held, other_open = lab.call(host, lambda: asyncio.run(scenario()), timeout=30)
    assert held == UNPROVED_PER_SOURCE  # before: each address its own source, all 6 held
    assert other_open
