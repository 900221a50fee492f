"""Per-address bounds count an IPv6 /64 as one source (an attacker is handed a whole /64)."""

import pytest

from spt.core.net.sources import source_group


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
