"""What counts as one source for the per-address bounds (join and relay connections, relay
registrations and tunnels, transit tickets, the file data listener, key claims).

An IPv4 address is one source. An IPv6 host is usually handed a whole /64 (SLAAC and privacy
addresses draw the low 64 bits at will), so counting IPv6 addresses one by one would give an
attacker 2**64 fresh sources: an IPv6 address counts as its /64. Hosts that share a /64 share
a bound, as hosts behind one IPv4 NAT do. An IPv4-mapped address (a dual-stack socket's view of
an IPv4 peer) is its IPv4 address.
"""

from __future__ import annotations

import functools
import ipaddress

__all__ = ["source_group"]


@functools.lru_cache(maxsize=4096)  # bounds loop over their entries: keep repeat calls cheap
def source_group(host: str) -> str:
    """The source `host` counts against: itself for IPv4 (and anything that is not an IP
    address), the /64 network for IPv6 (a zone id such as ``%eth0`` ignored)."""
    if ":" not in host:
        return host
    try:
        ip = ipaddress.IPv6Address(host.partition("%")[0])
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return f"{ipaddress.IPv6Address(int(ip) >> 64 << 64)}/64"
